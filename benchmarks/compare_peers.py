"""QLoRA training, side by side: jqlora against its peers (peft + bitsandbytes, qwix).

Five stacks train the same model on the same batch with the same LoRA adapter
(rank, alpha, targets, initial values), the same AdamW and the same dtype, each
in its own process so that peak memory is per stack:

- ``jqlora-qlora``: jqlora, frozen NF4 base (block 64, double quant);
- ``jqlora-lora``: jqlora, float base (``jqlora.load_model(quantize=False)``);
- ``peft-bnb``: transformers + bitsandbytes NF4 (block 64, double quant) + peft;
- ``peft-lora``: transformers + peft with a float base;
- ``qwix-qlora``: Google's qwix (``LoraProvider(weight_qtype="nf4", tile_size=64)``, tunix's
  QLoRA) wrapping a plain Flax NNX Llama (``peers/qwix_llama.py``) built from the same float
  weights; qwix quantizes them itself (NF4 blocks of 64, float block scales, no double quant).

Models: the embedded default ``SmolLM2-135M-Instruct`` (jqlora reads its GGUF;
transformers reads the same GGUF, and a first process writes it as a plain
safetensors folder) or a random-weight Llama-shaped model (``--big``: TinyLlama's
1.1B shape; ``--curves`` adds SmolLM2-360M's shape) written once to a temporary
safetensors folder (``bench_load.py``'s writer). The first process also saves
the bitsandbytes NF4 checkpoint of that folder (transformers refuses
``gguf_file`` together with a bitsandbytes config); jqlora-qlora and peft-bnb
load it as stored, so they train the same NF4 codes. jqlora's own quantization
of the original weights is compared with it separately (error, differing codes,
initial loss). The first jqlora process initialises the adapter (A
Kaiming-uniform, B zero: PEFT's init) and saves it with ``jqlora.save_adapter``;
every other stack loads that file (PEFT: ``PeftModel.from_pretrained(...,
is_trainable=True)``; qwix: copied into its ``kernel_lora_a/b``).

What the backward pass keeps: without ``--remat``, the jqlora stacks use selective
checkpointing (``Llama.remat = "selective"``: each layer keeps its projections, attention
output and mid-layer residual and recomputes norms, RoPE, softmax and SwiGLU, no matmul),
the torch stacks and qwix keep what their autograd keeps; ``--jqlora-saves all`` makes jqlora
keep everything XLA keeps (``Llama.remat = False``). ``--remat``: per-layer activation
checkpointing in every stack.

Measured per stack: model load time, the first step (JAX stacks: compilation
included), median step time and tokens/s over the steps after the warm-up ones,
peak RSS (``ru_maxrss`` of the process, and the peak after loading alone:
``train_peak_rss_bytes``; on a GPU also peak device memory), the loss of every
step, the NF4 quantization error (mean absolute error of the dequantized weights
against the float checkpoint's), the 1-minute load average at start and end,
model FLOPs per step (``model_flops``) and the CPU "MFU": those FLOPs per
second over the dense float32 matmul throughput a calibration process measured
in the same run (JAX and torch, the larger counts). For jqlora-qlora a memory
breakdown: baseline RSS, weights, optimizer state, saved activations (the
backward's residuals), XLA temporaries and what is left (allocator, load
transients). Writes ``compare_peers<suffix>.{json,md,png}``.

On a GPU (JAX's default backend is ``gpu`` and torch sees CUDA) the same runs use
bfloat16 and compare against bitsandbytes' CUDA kernels; the NF4 kernels' own
benchmark is ``benchmarks/bench_kernels.py``.

  python benchmarks/compare_peers.py            # SmolLM2, 4 x 128, r=16 all-linear, 12 steps
  python benchmarks/compare_peers.py --big      # the random 1.1B model, 1 x 128 (slow on a CPU)
  python benchmarks/compare_peers.py --quick    # < 10 minutes on a 2-core CPU (CI)
  python benchmarks/compare_peers.py --curves   # sequence 128..2048 and model 135M..1.1B
  python benchmarks/compare_peers.py --smoke --out-dir /tmp/x   # the smallest run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import machine  # the benchmarks' shared machine description (benchmarks/machine.py)
import numpy as np

STACKS = ("jqlora-qlora", "jqlora-lora", "peft-bnb", "peft-lora", "qwix-qlora")
KIND = {"jqlora-qlora": "jqlora", "jqlora-lora": "jqlora", "peft-bnb": "peft", "peft-lora": "peft",
        "qwix-qlora": "qwix"}
SMOLLM2 = "SmolLM2-135M"
MID = "Llama-360M-random"
BIG = "Llama-1.1B-random"
#: config.json of the random models besides TinyLlama-1.1B's (``bench_load.CONFIG``): SmolLM2-360M's
#: layers with an untied head over a 24k vocabulary (``bench_load``'s writer always writes a head),
#: 362M parameters as SmolLM2-360M's tied 49k one.
RANDOM_CONFIGS = {
    MID: {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 960,
          "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
          "num_key_value_heads": 5, "vocab_size": 24576, "max_position_embeddings": 8192,
          "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
          "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16"},
}
CURVE_SEQS = (128, 512, 1024, 2048)
CURVE_MODELS = (SMOLLM2, MID, BIG)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One comparison: model, batch ``[batch, seq]``, adapter, optimizer, steps."""

  model: str
  batch: int
  seq: int
  steps: int
  warmup: int
  r: int = 16
  alpha: int = 32
  lr: float = 2e-4
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  weight_decay: float = 0.0
  seed: int = 0
  remat: bool = False
  #: without ``remat``, the jqlora stacks' ``Llama.remat``: "selective" (keep the projections,
  #: recompute norms, RoPE, softmax and SwiGLU; no matmul recomputed) or "all" (XLA keeps all)
  jqlora_saves: str = "selective"


def presets(args: argparse.Namespace) -> list[Setting]:
  """The settings a command line asks for (``--curves``: the sequence curve, then the model one)."""
  same = dict(remat=args.remat, jqlora_saves=args.jqlora_saves)
  if args.smoke:
    return [Setting(SMOLLM2, batch=1, seq=32, steps=5, warmup=1, **same)]
  if args.quick:
    return [Setting(SMOLLM2, batch=2, seq=64, steps=6, warmup=2, **same)]
  if args.curves:
    steps = args.steps or 4
    warmup = 1  # the first step compiles (JAX) or warms the allocator (torch); the rest are timed
    tokens = args.curve_tokens
    seqs = [Setting(SMOLLM2, batch=max(1, tokens // t), seq=t, steps=steps, warmup=warmup,
                    **same) for t in args.curve_seqs]
    sizes = [Setting(m, batch=args.batch or 4, seq=128, steps=steps, warmup=warmup,
                     **same) for m in args.curve_models]
    return seqs + [s for s in sizes if s not in seqs]
  if args.big:
    return [Setting(BIG, batch=args.batch or 1, seq=128, steps=args.steps or 4, warmup=1,
                    **same)]
  return [Setting(SMOLLM2, batch=args.batch or 4, seq=128, steps=args.steps or 12, warmup=2,
                  **same)]


def model_flops(c: dict, s: Setting) -> dict:
  """Model FLOPs of one training step of a frozen base with LoRA on every decoder linear.

  ``c`` is the model's ``config.json``. Per token, the forward is ``2 N`` (``N``:
  the base's matmul weights, the LM head included) plus ``2 N_a`` (adapters); the
  backward ``2 N`` (input gradients only: the base is frozen) plus ``4 N_a``
  (input and weight gradients). Attention (scores and values, the whole ``T x T``
  as dense kernels compute it) is ``4 B T^2 H D_h`` per layer forward and twice
  that backward. Recomputation under checkpointing is not model FLOPs.
  """
  h, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
  heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
  dh = c.get("head_dim") or h // heads
  shapes = [(h, heads * dh), (h, kv * dh), (h, kv * dh), (heads * dh, h), (h, f), (h, f), (f, h)]
  base = layers * sum(i * o for i, o in shapes) + c["vocab_size"] * h
  adapters = layers * sum(s.r * (i + o) for i, o in shapes)
  tokens = s.batch * s.seq
  attention = layers * 4 * s.batch * s.seq ** 2 * heads * dh
  forward = 2 * base * tokens + 2 * adapters * tokens + attention
  backward = 2 * base * tokens + 4 * adapters * tokens + 2 * attention
  return {"base_params": base, "adapter_params": adapters, "forward": forward,
          "backward": backward, "total": forward + backward}


# -- child processes --------------------------------------------------------------

def _peak_rss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _status_bytes(field: str) -> int | None:
  """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), else None."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_peak() -> int:
  """Peak RSS so far, then resets the kernel's mark (``VmHWM``, and with it ``ru_maxrss``) so that
  training's peak reads apart from loading's."""
  peak = _peak_rss_bytes()
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
  except OSError:
    pass
  return peak


def _memory_marks(result: dict, load_peak: int, rss_before_load: int | None,
                  rss_after_load: int | None) -> None:
  """Adds the memory marks: whole-run peak, peak after loading, RSS before and after loading."""
  train_peak = _peak_rss_bytes()
  result.update(peak_rss_bytes=max(load_peak, train_peak), train_peak_rss_bytes=train_peak,
                load_peak_rss_bytes=load_peak, baseline_rss_bytes=rss_before_load,
                rss_after_load_bytes=rss_after_load)


def _setting(spec: dict) -> Setting:
  return Setting(**{**spec["setting"], "betas": tuple(spec["setting"]["betas"])})


def _token_batch(s: Setting, vocab_size: int) -> np.ndarray:
  """Fixed random token ids ``int32 [batch, seq]`` (the labels are the same ids)."""
  return np.random.default_rng(s.seed + 1).integers(0, vocab_size, (s.batch, s.seq), np.int32)


def _timed_steps(step, s: Setting) -> dict:
  """Runs ``step() -> loss`` ``s.steps`` times; the summary of times and losses."""
  losses, times = [], []
  for _ in range(s.steps):
    start = time.perf_counter()
    losses.append(float(step()))  # float() waits for the device
    times.append(time.perf_counter() - start)
  median = statistics.median(times[s.warmup:])
  return {"losses": losses, "step_seconds": times, "first_step_s": times[0],
          "median_step_s": median, "tokens_per_s": s.batch * s.seq / median}


def run_jqlora(spec: dict) -> dict:
  """Loads, adapts and trains with jqlora; the result dict of one stack."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import jqlora

  s = _setting(spec)
  quantize = spec["stack"] == "jqlora-qlora"
  dtype = jnp.dtype(spec["dtype"])
  jax.devices()  # the runtime is part of the baseline
  rss_before = _status_bytes("VmRSS")
  start = time.perf_counter()
  # QLoRA reads the bitsandbytes checkpoint as stored: both QLoRA stacks train the same NF4 codes
  path = spec["nf4_path"] if quantize else spec["jqlora_path"]
  model = jqlora.load_model(path, quantize=False, dtype=dtype, progress=False)
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  load_s = time.perf_counter() - start
  rss_after = _status_bytes("VmRSS")
  load_peak = _reset_peak()
  adapter = pathlib.Path(spec["adapter_dir"])
  if (adapter / "adapter_config.json").is_file():
    jqlora.load_adapter(model, adapter)
  else:
    config = jqlora.LoraConfig(r=s.r, alpha=s.alpha, target_modules="all-linear")
    jqlora.apply_lora(model, config, rngs=nnx.Rngs(s.seed))
    jqlora.save_adapter(model, adapter)
  model.remat = True if s.remat else "selective" if s.jqlora_saves == "selective" else False
  tx = optax.adamw(s.lr, b1=s.betas[0], b2=s.betas[1], eps=s.eps, weight_decay=s.weight_decay)
  optimizer = jqlora.make_optimizer(model, tx)
  ids = _token_batch(s, model.config.vocab_size)
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
  result = _timed_steps(lambda: jqlora.train_step(model, optimizer, batch)["loss"], s)
  _memory_marks(result, load_peak, rss_before, rss_after)
  result.update(load_s=load_s, vocab_size=model.config.vocab_size,
                trainable_params=jqlora.trainable_params(model, verbose=False)[0])
  if jax.default_backend() == "gpu":
    result["peak_device_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
  if spec.get("breakdown"):  # after the peaks were read
    result["memory_breakdown"] = _memory_breakdown(model, optimizer, batch, result)
  if quantize:
    result.update(_own_quantization(model, spec["jqlora_path"], dtype, batch))
  return result


def _tree_bytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _memory_breakdown(model, optimizer, batch: dict, result: dict) -> dict:
  """Where jqlora's peak RSS goes: baseline, weights, optimizer, saved activations, temporaries, rest.

  ``saved_activations``: the residuals the backward pass keeps (JAX's
  ``saved_residuals`` of the loss as a function of the adapters, the weights
  and adapters themselves and captured constants left out); ``temporaries``: the rest of XLA's
  temporary buffers of the compiled step (``memory_analysis()``, the saved
  activations live there too); ``allocator_and_other``: the training phase's
  peak RSS minus all of those and the baseline (allocator retention, compiled
  code, what loading left behind).
  """
  import jax
  from flax import nnx
  from jax._src.ad_checkpoint import saved_residuals

  from jqlora.training import eval_loss_sums, functional_step

  graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(adapters, rest):
    return eval_loss_sums(nnx.merge(graphdef, adapters, rest), batch)[0]

  saved = sum(a.size * a.dtype.itemsize for a, where in saved_residuals(loss, adapters, rest)
              if not where.startswith(("from the argument", "from a constant"))
              and hasattr(a, "dtype"))
  weights = _tree_bytes(nnx.state(model))
  step, m_state, opt_state = functional_step(model, optimizer)

  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(m_state, opt_state, shapes).compile()
  analysis = compiled.memory_analysis()
  temp = analysis.temp_size_in_bytes
  baseline = result["baseline_rss_bytes"] or 0
  opt_bytes = _tree_bytes(opt_state)
  peak = result["train_peak_rss_bytes"]  # the training phase's (loading's is apart)
  return {"baseline": baseline, "weights": weights, "optimizer_state": opt_bytes,
          "saved_activations": saved, "temporaries": max(temp - saved, 0),
          "allocator_and_other": peak - baseline - weights - opt_bytes - max(temp, saved),
          "peak_rss": peak, "xla_temp_size": temp,
          "xla_argument_size": analysis.argument_size_in_bytes,
          "xla_output_size": analysis.output_size_in_bytes,
          "xla_alias_size": analysis.alias_size_in_bytes}


def _own_quantization(stored, path: str, dtype, batch: dict) -> dict:
  """jqlora's own NF4 quantization of the original weights, against the stored bitsandbytes one.

  Returns the mean absolute error of jqlora's dequantized weights, the fraction
  of 4-bit codes and of (double-quantized) block-scale codes that differ from
  the stored checkpoint's, and the initial loss (adapters start at zero) with
  jqlora's own NF4 weights, with and without double quantization of the block
  scales (without: the scales stay float, as qwix keeps them).
  """
  import jax
  import jax.numpy as jnp

  import jqlora
  from jqlora.io.loading import open_source
  from jqlora.models.config import LINEARS
  from jqlora.training import eval_loss_sums

  own = jqlora.load_model(path, quantize=True, dtype=dtype, progress=False)
  source = open_source(path)
  abs_err = jax.jit(lambda t, w: jnp.sum(jnp.abs(jqlora.dequantize_nf4(t, jnp.float32) - w)))
  err = codes = scales = 0.0
  n_weights = n_codes = n_scales = 0
  for sub, name in LINEARS:
    mine = getattr(getattr(own.layers, sub), name).weight.get_value()
    theirs = getattr(getattr(stored.layers, sub), name).weight.get_value()
    codes += float(jnp.sum(mine.packed != theirs.packed))
    n_codes += mine.packed.size
    if mine.double_quant and theirs.double_quant:
      scales += float(jnp.sum(mine.absmax != theirs.absmax))
      n_scales += mine.absmax.size
    for i in range(own.config.num_hidden_layers):
      w = np.asarray(source.get(f"model.layers.{i}.{sub}.{name}.weight"), np.float32)
      err += float(abs_err(jax.tree.map(lambda x, i=i: x[i], mine), w))
      n_weights += w.size
  total, count = eval_loss_sums(own, batch)
  del own
  # qwix keeps float block scales: the same NF4 without double quantization, for comparison
  single = jqlora.load_model(path, quantize=True, double_quant=False, dtype=dtype, progress=False)
  single_total, single_count = eval_loss_sums(single, batch)
  return {"nf4_mae": err / n_weights, "own_packed_bytes_differ": codes / n_codes,
          "own_scale_codes_differ": scales / n_scales if n_scales else None,
          "own_quantization_loss_step1": float(total / count),
          "own_single_quant_loss_step1": float(single_total / single_count)}


def _tensor_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> safetensors file of a Hugging Face folder (sharded or not)."""
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
  from safetensors import safe_open
  with safe_open(folder / "model.safetensors", framework="pt") as f:
    return {k: folder / "model.safetensors" for k in f.keys()}


def _bnb_nf4_mae(model, folder: pathlib.Path) -> float:
  """Mean |dequantize(W) - W| over every bitsandbytes 4-bit linear of ``model``."""
  import bitsandbytes as bnb
  from safetensors import safe_open

  files = _tensor_files(folder)
  total, count = 0.0, 0
  for name, module in model.named_modules():
    if isinstance(module, bnb.nn.Linear4bit):
      key = name.replace(".base_layer", "") + ".weight"
      with safe_open(files[key], framework="pt") as f:
        w = f.get_tensor(key).float()
      deq = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
      total += float((deq.float().cpu() - w).abs().sum())
      count += w.numel()
  return total / count


def run_peft(spec: dict) -> dict:
  """Loads, adapts and trains with transformers + peft (+ bitsandbytes); one stack's result."""
  import bitsandbytes as bnb
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  s = _setting(spec)
  gpu = spec["gpu"]
  device = "cuda" if gpu else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)
  dtype = getattr(torch, spec["dtype"])
  folder = pathlib.Path(spec["torch_path"])
  quantized = spec["stack"] == "peft-bnb"
  rss_before = _status_bytes("VmRSS")
  start = time.perf_counter()
  base = AutoModelForCausalLM.from_pretrained(spec["nf4_path"] if quantized else folder,
                                              dtype=dtype, device_map={"": device})
  load_s = time.perf_counter() - start
  rss_after = _status_bytes("VmRSS")
  load_peak = _reset_peak()
  for name, module in base.named_modules():
    if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state.blocksize != 64:
      raise RuntimeError(f"{name}: bitsandbytes used block size "
                         f"{module.weight.quant_state.blocksize}, the comparison needs 64")
  if s.remat:
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model = PeftModel.from_pretrained(base, spec["adapter_dir"], is_trainable=True)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, eps=s.eps,
                                weight_decay=s.weight_decay)
  ids = torch.from_numpy(_token_batch(s, base.config.vocab_size)).long().to(device)

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  result = _timed_steps(step, s)
  _memory_marks(result, load_peak, rss_before, rss_after)
  result.update(load_s=load_s, vocab_size=base.config.vocab_size,
                trainable_params=sum(p.numel() for p in params))
  if gpu:
    result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
  if quantized:
    result["nf4_mae"] = _bnb_nf4_mae(model.get_base_model(), folder)
  return result


def run_qwix(spec: dict) -> dict:
  """Builds the Flax Llama from the float checkpoint, wraps it with qwix's NF4 QLoRA and trains it."""
  import jax
  import jax.numpy as jnp
  import optax
  import qwix
  from flax import nnx
  from peers import qwix_llama

  s = _setting(spec)
  dtype = jnp.dtype(spec["dtype"])
  jax.devices()
  rss_before = _status_bytes("VmRSS")
  start = time.perf_counter()
  floats = qwix_llama.load(spec["torch_path"], dtype, remat=s.remat)
  ids = jnp.asarray(_token_batch(s, floats.config.vocab_size))
  provider = qwix.LoraProvider(module_path=qwix_llama.LINEAR_PATTERN, rank=s.r,
                               alpha=float(s.alpha), weight_qtype="nf4", tile_size=64)
  # qwix quantizes the float kernels on this first call (PTQ), then keeps only the NF4 ones
  model = qwix.apply_lora_to_model(floats, provider, ids[:1, :8], rngs=nnx.Rngs(s.seed))
  del floats
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  load_s = time.perf_counter() - start
  rss_after = _status_bytes("VmRSS")
  load_peak = _reset_peak()
  adapted = qwix_llama.set_adapter(model, spec["adapter_dir"])
  tx = optax.adamw(s.lr, b1=s.betas[0], b2=s.betas[1], eps=s.eps, weight_decay=s.weight_decay)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def train_step(model, optimizer, ids):
    grad_fn = nnx.value_and_grad(lambda m: qwix_llama.loss_fn(m(ids), ids),
                                 argnums=nnx.DiffState(0, nnx.LoRAParam))
    loss, grads = grad_fn(model)
    optimizer.update(model, grads)
    return loss

  result = _timed_steps(lambda: train_step(model, optimizer, ids), s)
  _memory_marks(result, load_peak, rss_before, rss_after)
  lora = nnx.state(model, nnx.LoRAParam)
  result.update(load_s=load_s, vocab_size=model.config.vocab_size, adapted_linears=adapted,
                trainable_params=sum(x.size for x in jax.tree.leaves(lora)))
  if jax.default_backend() == "gpu":
    result["peak_device_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
  result["nf4_mae"] = _qwix_nf4_mae(model, spec["torch_path"])
  return result


def _qwix_nf4_mae(model, folder: str) -> float:
  """Mean |dequantize(W) - W| over qwix's NF4 kernels against the float checkpoint."""
  import jax
  import jax.numpy as jnp
  import qwix

  from jqlora.io.loading import open_source
  from jqlora.models.config import LINEARS

  source = open_source(folder)
  abs_err = jax.jit(lambda q, w: jnp.sum(jnp.abs(qwix.dequantize(q).astype(jnp.float32) - w)))
  total, count = 0.0, 0
  for i, block in enumerate(model.layers):
    for sub, name in LINEARS:
      q = getattr(getattr(block, sub), name).kernel.array
      w = np.asarray(source.get(f"model.layers.{i}.{sub}.{name}.weight"), np.float32).T
      total += float(abs_err(q, w))
      count += w.size
  return total / count


def calibrate(spec: dict) -> dict:
  """Dense float32 matmul throughput, FLOP/s, of JAX and of torch at the step's largest shape.

  ``[B*T, hidden] @ [hidden, intermediate]`` (the MLP's up projection), median
  of repeated timed calls after a warm-up.
  """
  import jax
  import jax.numpy as jnp
  import torch

  c = spec["config"]
  s = _setting(spec)
  m, k, n = s.batch * s.seq, c["hidden_size"], c["intermediate_size"]
  flops = 2 * m * k * n
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
  repeats = min(200, max(3, int(spec.get("calibration_flop", 2e11) // flops)))

  def median_time(fn):
    fn()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  mm = jax.jit(jnp.matmul)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  jax_t = median_time(lambda: mm(ja, jb).block_until_ready())
  torch.set_num_threads(os.cpu_count() or 1)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  torch_t = median_time(lambda: torch.mm(ta, tb))
  return {"shape": [m, k, n], "repeats": repeats, "jax_flop_per_s": flops / jax_t,
          "torch_flop_per_s": flops / torch_t,
          "flop_per_s": max(flops / jax_t, flops / torch_t)}


def export(spec: dict) -> dict:
  """transformers writes the checkpoints the PyTorch stacks load.

  From the GGUF (if given) a plain float32 safetensors folder (transformers reads
  the GGUF itself; it refuses ``gguf_file`` together with a bitsandbytes config),
  then from that folder a bitsandbytes NF4 checkpoint (block 64, double quant):
  both QLoRA stacks load it, so they train the same NF4 codes.
  """
  import torch
  from safetensors.torch import save_file
  from transformers import AutoModelForCausalLM, BitsAndBytesConfig

  floats = pathlib.Path(spec["torch_path"])
  if spec.get("gguf"):
    gguf = pathlib.Path(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tensors = model.state_dict()
    if model.config.tie_word_embeddings:
      tensors.pop("lm_head.weight")  # shared with the embedding; safetensors refuses aliases
    floats.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, floats / "model.safetensors",
              metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF marker; the folder holds plain float32
    (floats / "config.json").write_text(json.dumps(config, indent=2))
    del model, tensors
  dtype = getattr(torch, spec["dtype"])
  bnb_config = BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
  model = AutoModelForCausalLM.from_pretrained(
      floats, dtype=dtype, quantization_config=bnb_config,
      device_map={"": "cuda" if spec["gpu"] else "cpu"})
  model.save_pretrained(spec["nf4_path"])
  return {}


def child_main(spec_file: str) -> None:
  """Entry point of a child process: runs ``spec["kind"]`` and writes its JSON result."""
  from jqlora.io.allocator import return_freed_memory_while_loading

  spec = json.loads(pathlib.Path(spec_file).read_text())
  return_freed_memory_while_loading()  # each stack owns its process, as the jqlora CLI does
  load_before = os.getloadavg()[0]
  kinds = {"export": export, "calibrate": calibrate, "jqlora": run_jqlora, "peft": run_peft,
           "qwix": run_qwix}
  result = kinds[spec["kind"]](spec)
  result["load_avg_1min"] = [load_before, os.getloadavg()[0]]
  pathlib.Path(spec["result"]).write_text(json.dumps(result))


# -- the parent ---------------------------------------------------------------

def _run_child(spec: dict, workdir: pathlib.Path, env: dict) -> dict:
  name = spec.get("stack", spec["kind"])
  spec = {**spec, "result": str(workdir / f"{name}.result.json")}
  spec_file = workdir / f"{name}.spec.json"
  spec_file.write_text(json.dumps(spec))
  print(f"  {name} ...", flush=True)
  proc = subprocess.run([sys.executable, __file__, "--child", str(spec_file)], env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(pathlib.Path(spec["result"]).read_text())


def _probe_gpu(env: dict) -> bool:
  """Whether JAX's default backend is a GPU and torch sees CUDA (asked in a throwaway process)."""
  code = ("import jax, torch; "
          "print(jax.default_backend() == 'gpu' and torch.cuda.is_available())")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  return proc.stdout.strip().endswith("True")


def machine_info(gpu: bool) -> dict:
  """Where the numbers come from: CPU model and ISA flags, cores, memory, library versions."""
  info = machine.machine_info(("jax", "jaxlib", "flax", "optax", "qwix", "torch", "transformers",
                                "peft", "bitsandbytes"))
  info.update(gpu=gpu, load_avg_start=list(os.getloadavg()))
  if gpu:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True)
    info["gpu_name"] = proc.stdout.strip()
  return info


def _ratios(stacks: dict, gpu: bool) -> dict:
  """The issue's targets as measured ratios (only those whose stacks ran)."""
  mem = "peak_device_bytes" if gpu else "peak_rss_bytes"
  q = stacks.get("jqlora-qlora")
  targets = {}
  if q and "peft-bnb" in stacks:
    bnb = stacks["peft-bnb"]
    targets["tokens_per_s_vs_peft_bnb"] = (q["tokens_per_s"] / bnb["tokens_per_s"], ">=",
                                           1.5 if gpu else 2.0)
    targets["peak_memory_vs_peft_bnb"] = (q[mem] / bnb[mem], "<=", 1.0 if gpu else 0.6)
  if q and "qwix-qlora" in stacks:
    targets["tokens_per_s_vs_qwix"] = (q["tokens_per_s"] / stacks["qwix-qlora"]["tokens_per_s"],
                                       ">=", 1.5)
  if q and "jqlora-lora" in stacks:
    targets["step_time_vs_jqlora_lora"] = (q["median_step_s"] / stacks["jqlora-lora"]["median_step_s"],
                                           "<=", 1.2)
  if "jqlora-lora" in stacks and "peft-lora" in stacks:
    targets["lora_peak_memory_vs_peft_lora"] = (
        stacks["jqlora-lora"][mem] / stacks["peft-lora"][mem], "<=", 1.0)
  if q and "mfu" in q:
    targets["mfu"] = (q["mfu"], ">=", 0.85)
  return {k: {"ratio": r, "target": f"{op} {t}", "met": r >= t if op == ">=" else r <= t}
          for k, (r, op, t) in targets.items()}


def _loss_agreement(stacks: dict, n: int = 5) -> dict:
  """max |loss difference| over the first ``n`` steps, per pair of stacks that ran.

  jqlora-qlora/peft-bnb and jqlora-lora/peft-lora compute the same maths;
  qwix-qlora against peft-bnb measures how far qwix's own NF4 is from bitsandbytes'.
  """
  out = {}
  for ours, theirs in (("jqlora-qlora", "peft-bnb"), ("jqlora-lora", "peft-lora"),
                       ("qwix-qlora", "peft-bnb"), ("qwix-qlora", "peft-lora")):
    if ours in stacks and theirs in stacks:
      a, b = stacks[ours]["losses"][:n], stacks[theirs]["losses"][:n]
      out[f"{ours} vs {theirs}"] = {"steps": min(len(a), len(b)), "step1_diff": a[0] - b[0],
                                    "max_abs_diff": max(abs(x - y) for x, y in zip(a, b))}
  return out


def _model_config(name: str) -> dict:
  """``config.json`` of a random model of ``RANDOM_CONFIGS`` / ``bench_load.CONFIG``."""
  if name == BIG:
    import bench_load
    return bench_load.CONFIG
  return RANDOM_CONFIGS[name]


def prepare(model: str, workdir: pathlib.Path, env: dict, gpu: bool, seed: int) -> dict:
  """Writes a model's checkpoints once (float folder, bitsandbytes NF4 folder): the spec's paths."""
  folder = workdir / model
  if folder.is_dir():
    return json.loads((folder / "paths.json").read_text())
  folder.mkdir()
  common = {"dtype": "bfloat16" if gpu else "float32", "gpu": gpu,
            "adapter_dir": str(folder / "adapter"), "torch_path": str(folder / "hf"),
            "nf4_path": str(folder / "hf-bnb-nf4")}
  if model == SMOLLM2:
    from jqlora.io.loading import DEFAULT_MODEL, default_model_path
    common["jqlora_path"] = DEFAULT_MODEL
    _run_child({**common, "kind": "export", "gguf": str(default_model_path())}, folder, env)
  else:
    import bench_load
    common["jqlora_path"] = common["torch_path"]
    bench_load.write_checkpoint(pathlib.Path(common["torch_path"]), _model_config(model), seed=seed)
    _run_child({**common, "kind": "export"}, folder, env)
  common["config"] = json.loads((pathlib.Path(common["torch_path"]) / "config.json").read_text())
  (folder / "paths.json").write_text(json.dumps(common))
  return common


def compare(s: Setting, workdir: pathlib.Path, env: dict, gpu: bool,
            stacks: tuple[str, ...] = STACKS, breakdown: bool = False) -> dict:
  """Runs the stacks on one setting; their results, FLOPs and MFU, the ratios, the loss agreement."""
  print(f"{s.model}: batch {s.batch} x {s.seq}, r={s.r} all-linear, {s.steps} steps", flush=True)
  common = {**prepare(s.model, workdir, env, gpu, s.seed), "setting": dataclasses.asdict(s)}
  run_dir = workdir / s.model / f"{s.batch}x{s.seq}{'-remat' if s.remat else ''}"
  run_dir.mkdir()
  calibration = _run_child({**common, "kind": "calibrate"}, run_dir, env)
  flops = model_flops(common["config"], s)
  results = {}
  # jqlora-qlora first: it writes the shared initial adapter (run for that alone if not asked for)
  need_adapter = not (pathlib.Path(common["adapter_dir"]) / "adapter_config.json").is_file()
  first = ("jqlora-qlora",) if need_adapter or "jqlora-qlora" in stacks else ()
  order = first + tuple(x for x in stacks if x != "jqlora-qlora")
  failed = {}
  for stack in order:
    spec = {**common, "kind": KIND[stack], "stack": stack,
            "breakdown": breakdown and stack == "jqlora-qlora"}
    try:
      r = _run_child(spec, run_dir, env)
    except RuntimeError as e:  # e.g. out of memory at a large setting: the other stacks still run
      if stack == "jqlora-qlora" and need_adapter:
        raise  # the other stacks start from the adapter it writes
      failed[stack] = str(e)[-2000:]
      print(f"  {stack} FAILED: {str(e).splitlines()[0]}", flush=True)
      continue
    r["model_flops"] = flops["total"]
    r["mfu"] = flops["total"] / r["median_step_s"] / calibration["flop_per_s"]
    if stack in stacks:
      results[stack] = r
  vocab = {r["vocab_size"] for r in results.values()}
  if len(vocab) != 1:
    raise RuntimeError(f"{s.model}: the stacks disagree on the vocabulary size: {vocab}")
  return {"setting": dataclasses.asdict(s), "dtype": common["dtype"], "flops": flops,
          "calibration": calibration, "stacks": results, "failed": failed,
          "ratios": _ratios(results, gpu), "loss_agreement": _loss_agreement(results)}


# -- reporting ------------------------------------------------------------------

GIB = 2.0 ** 30
COLORS = dict(zip(STACKS, ("tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:green")))


def _title(r: dict) -> str:
  s = r["setting"]
  return (f"{s['model']}: batch {s['batch']} x {s['seq']}, LoRA r={s['r']} alpha={s['alpha']} "
          f"all-linear, AdamW lr={s['lr']}, {r['dtype']}, {s['steps']} steps ({s['warmup']} warm-up)"
          + (", activation checkpointing in every stack" if s["remat"] else
             ", jqlora with selective checkpointing (no matmul recomputed), the others without"
             if s.get("jqlora_saves") == "selective" else ""))


def _run_tables(r: dict, gpu: bool) -> list[str]:
  mem_name = "peak GPU memory" if gpu else "peak RSS"
  cal = r["calibration"]
  lines = [f"## {_title(r)}", "",
           f"Model FLOPs per step {r['flops']['total'] / 1e9:.1f} G; measured dense float32 matmul "
           f"{cal['flop_per_s'] / 1e9:.0f} GFLOP/s (JAX {cal['jax_flop_per_s'] / 1e9:.0f}, torch "
           f"{cal['torch_flop_per_s'] / 1e9:.0f}, at {' x '.join(map(str, cal['shape']))}).", "",
           f"| stack | load s | first step s | median step s | tokens/s | MFU | {mem_name} GiB "
           "| peak after load GiB | loss step 1 | loss last step | NF4 MAE | load avg |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, x in r["stacks"].items():
    mem = x.get("peak_device_bytes", x["peak_rss_bytes"]) if gpu else x["peak_rss_bytes"]
    train = x.get("train_peak_rss_bytes")
    mae = f"{x['nf4_mae']:.3e}" if "nf4_mae" in x else "-"
    lines.append(f"| {name} | {x['load_s']:.1f} | {x['first_step_s']:.2f} | "
                 f"{x['median_step_s']:.3f} | {x['tokens_per_s']:.0f} | {100 * x['mfu']:.0f}% | "
                 f"{mem / GIB:.2f} | {'-' if train is None else f'{train / GIB:.2f}'} | "
                 f"{x['losses'][0]:.5f} | {x['losses'][-1]:.5f} | {mae} | "
                 f"{max(x['load_avg_1min']):.1f} |")
  for name, err in r.get("failed", {}).items():
    reason = err.strip().splitlines()[-1][:120].replace("|", "/")
    lines.append(f"| {name} | failed: {reason} |" + " |" * 10)
  lines += ["", "| target | measured | wanted | |", "|---|---:|---:|---|"]
  for k, t in r["ratios"].items():
    unit = "" if k == "mfu" else "x"
    who = "jqlora-lora" if k.startswith("lora_") else "jqlora-qlora"
    lines.append(f"| {who} {k.removeprefix('lora_').replace('_', ' ')} | {t['ratio']:.2f}{unit} | "
                 f"{t['target']} | {'met' if t['met'] else 'MISSED'} |")
  for k, t in r["loss_agreement"].items():
    if k.startswith("jqlora"):
      lines.append(f"| loss {k}, first {t['steps']} steps, max abs diff | {t['max_abs_diff']:.1e} "
                   f"| <= 1e-3 | {'met' if t['max_abs_diff'] <= 1e-3 else 'MISSED'} |")
  q, b = r["stacks"].get("jqlora-qlora"), r["stacks"].get("peft-bnb")
  if q and b and "own_packed_bytes_differ" in q:
    scales = q["own_scale_codes_differ"]
    lines += ["", f"jqlora-qlora and peft-bnb train the same NF4 codes: the bitsandbytes checkpoint "
              f"that transformers wrote (jqlora loads it as stored). jqlora's own quantization of "
              f"the same weights: NF4 MAE {q['nf4_mae']:.4e} (bitsandbytes: {b['nf4_mae']:.4e}); "
              f"{100 * q['own_packed_bytes_differ']:.2f}% of packed 4-bit bytes and "
              + ("-" if scales is None else f"{100 * scales:.2f}%")
              + f" of double-quantized block-scale codes differ from bitsandbytes'; the initial "
              f"loss with jqlora's own NF4 weights is {q['own_quantization_loss_step1']:.5f} "
              f"({q['own_quantization_loss_step1'] - b['losses'][0]:+.1e} from peft-bnb's)."]
  w = r["stacks"].get("qwix-qlora")
  if w and b:
    d = r["loss_agreement"]["qwix-qlora vs peft-bnb"]
    lines += ["", f"qwix-qlora quantizes the float weights itself (NF4, blocks of 64 inputs, "
              f"float32 block scales, no double quantization): NF4 MAE {w['nf4_mae']:.4e} against "
              f"bitsandbytes' {b['nf4_mae']:.4e}; its step-1 loss is {d['step1_diff']:+.1e} from "
              f"peft-bnb's (max {d['max_abs_diff']:.1e} over the first {d['steps']} steps)"
              + (f"; jqlora's NF4 of the same weights without double quantization starts at "
                 f"{q['own_single_quant_loss_step1']:.5f} "
                 f"({w['losses'][0] - q['own_single_quant_loss_step1']:+.1e} from qwix's)"
                 if q and "own_single_quant_loss_step1" in q else "") + "."]
  if q and "memory_breakdown" in q:
    m = q["memory_breakdown"]
    parts = ("baseline", "weights", "optimizer_state", "saved_activations", "temporaries",
             "allocator_and_other", "peak_rss")
    lines += ["", "jqlora-qlora memory breakdown of the training phase's peak RSS (GiB): " + ", ".join(
        f"{k.replace('_', ' ')} {m[k] / GIB:.3f}" for k in parts) + "."]
  return lines + [""]


def markdown(report: dict) -> str:
  """The results as markdown tables: per run, the stacks, then the targets."""
  m = report["machine"]
  where = m.get("gpu_name") or f"{m['cpu']}, {m['cpus']} cores, {m['memory_gib']} GiB"
  lines = ["# jqlora vs its peers (peft + bitsandbytes, qwix): QLoRA training", "",
           f"Machine: {where} ({m['platform']}); ISA: {' '.join(m['isa_flags']) or '-'}; "
           + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", ""]
  for r in report["runs"]:
    lines += _run_tables(r, m["gpu"])
  lines.append(f"First step: the JAX stacks' includes XLA compilation. Median step over the steps "
               f"after the warm-up. MFU: model FLOPs per step (forward 2 N T, frozen-base input "
               f"gradients 2 N T, adapters, attention) per second over the run's measured dense "
               f"float32 matmul throughput. Each stack ran in its own process, one after the "
               f"other; load avg is the machine's 1-minute load average (max of start and end of "
               f"the stack's run): above {m['cpus']} other work shared the CPUs. "
               f"OMP_WAIT_POLICY={m['omp_wait_policy']} for every stack (torch's spinning OpenMP "
               f"threads collapse on a shared CPU).")
  if m["gpu"]:
    lines.append("NF4 kernel micro-benchmarks: `benchmarks/bench_kernels.py`.")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: pathlib.Path) -> None:
  """tokens/s, peak memory and loss per step of every stack, one row per run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = report["runs"]
  fig, axes = plt.subplots(len(runs), 3, figsize=(14, 3.8 * len(runs)), squeeze=False)
  gpu = report["machine"]["gpu"]
  for row, r in zip(axes, runs):
    names = list(r["stacks"])
    x = r["stacks"]
    row[0].bar(names, [x[n]["tokens_per_s"] for n in names], color=[COLORS[n] for n in names])
    row[0].set_ylabel("tokens/s (higher is better)")
    mem = [x[n]["peak_device_bytes" if gpu else "peak_rss_bytes"] / GIB for n in names]
    row[1].bar(names, mem, color=[COLORS[n] for n in names])
    row[1].set_ylabel(f"peak {'GPU memory' if gpu else 'RSS'} GiB (lower is better)")
    for n in names:
      style = "-" if n.startswith("jqlora") else "--"
      row[2].plot(range(1, len(x[n]["losses"]) + 1), x[n]["losses"], style, color=COLORS[n],
                  label=n, marker="o", markersize=3)
    row[2].set_xlabel("step")
    row[2].set_ylabel("training loss")
    row[2].legend(fontsize=8)
    s = r["setting"]
    row[0].set_title(f"{s['model']}, {s['batch']}x{s['seq']}, {r['dtype']}")
    for ax in row[:2]:
      ax.tick_params(axis="x", labelrotation=20, labelsize=8)
  m = report["machine"]
  fig.suptitle(f"jqlora vs peft + bitsandbytes and qwix on {m.get('gpu_name') or m['cpu']}",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def curve_points(report: dict) -> dict:
  """The curves: ``{"sequence" | "model": {stack: [(x, tokens/s, peak RSS GiB, MFU), ...]}}``."""
  out = {"sequence": {}, "model": {}}
  for r in report["runs"]:
    s = r["setting"]
    axes = []
    if s["model"] == SMOLLM2 and s["batch"] * s["seq"] == report["curve_tokens"]:
      axes.append(("sequence", s["seq"]))
    if (s["batch"], s["seq"]) == (report["curve_batch"], 128) and s["model"] in report["curve_models"]:
      axes.append(("model", r["flops"]["base_params"] / 1e6))
    for key, x in axes:
      for name, v in r["stacks"].items():
        out[key].setdefault(name, []).append(
            (x, v["tokens_per_s"], v["peak_rss_bytes"] / GIB, v["mfu"]))
  return out


def plot_curves(report: dict, path: pathlib.Path) -> None:
  """tokens/s, peak RSS and MFU against sequence length and against model size."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  points = curve_points(report)
  fig, axes = plt.subplots(2, 3, figsize=(14, 7.6))
  labels = {"sequence": f"sequence length (batch x length = {report['curve_tokens']})",
            "model": f"base matmul parameters (M), {report['curve_batch']} x 128"}
  for row, key in zip(axes, ("sequence", "model")):
    for name, pts in points[key].items():
      pts = sorted(pts)
      xs = [p[0] for p in pts]
      for ax, i in zip(row, (1, 2, 3)):
        ax.plot(xs, [p[i] for p in pts], "-o" if name.startswith("jqlora") else "--o",
                color=COLORS[name], label=name, markersize=3)
    for ax, ylabel in zip(row, ("tokens/s", "peak RSS GiB", "MFU")):
      ax.set_xscale("log", base=2 if key == "sequence" else 10)
      ax.set_xlabel(labels[key])
      ax.set_ylabel(ylabel)
    row[0].legend(fontsize=8)
  fig.suptitle(f"cost curves on {report['machine'].get('gpu_name') or report['machine']['cpu']}",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None, stem: str = "compare_peers",
         default_stacks: tuple[str, ...] = STACKS) -> None:
  """The command line (``compare_torch.py`` calls it with its own stem and the four torch stacks)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="SmolLM2, 2 x 64, 6 steps (CI)")
  mode.add_argument("--smoke", action="store_true", help="SmolLM2, 1 x 32, 5 steps")
  mode.add_argument("--big", action="store_true",
                    help="the random 1.1B Llama model instead (default 1 x 128, 4 steps)")
  mode.add_argument("--curves", action="store_true",
                    help="sequence-length curve (SmolLM2) and model-size curve (135M/360M/1.1B)")
  parser.add_argument("--remat", action="store_true",
                      help="activation checkpointing per layer in every stack")
  parser.add_argument("--jqlora-saves", choices=("selective", "all"), default="selective",
                      help="without --remat, what the jqlora stacks keep for the backward pass: "
                           "'selective' (Llama.remat='selective', no matmul recomputed; the "
                           "default) or 'all' (Llama.remat=False)")
  parser.add_argument("--batch", type=int, help="sequences per step (default 4; --big: 1)")
  parser.add_argument("--steps", type=int, help="steps, warm-up included (default 12; --big, --curves: 4)")
  parser.add_argument("--stacks", default=",".join(default_stacks),
                      help=f"comma-separated, of {', '.join(STACKS)} (default: %(default)s)")
  parser.add_argument("--breakdown", action="store_true",
                      help="jqlora-qlora memory breakdown (default with --curves)")
  parser.add_argument("--curve-seqs", type=lambda v: [int(x) for x in v.split(",")],
                      default=list(CURVE_SEQS), help="--curves: sequence lengths")
  parser.add_argument("--curve-tokens", type=int, default=2048,
                      help="--curves: batch x length of the sequence curve")
  parser.add_argument("--curve-models", type=lambda v: v.split(","), default=list(CURVE_MODELS),
                      help=f"--curves: models, of {', '.join(CURVE_MODELS)}")
  parser.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child_main(args.child)
    return
  stacks = tuple(args.stacks.split(","))
  unknown = set(stacks) - set(STACKS)
  if unknown:
    parser.error(f"unknown stacks {sorted(unknown)}; choose from {', '.join(STACKS)}")

  # Passive OpenMP waiting: on a CPU shared with other work, torch's spinning threads slow it
  # down several times (measured: 0.5 s vs 2-9 s a step); an explicit setting is kept.
  env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1",
         "TRANSFORMERS_OFFLINE": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TQDM_DISABLE": "1"}
  gpu = _probe_gpu(env)
  suffix = ("_smoke" if args.smoke else "_quick" if args.quick else "_big" if args.big
            else "_curves" if args.curves else "") + ("_remat" if args.remat else "") \
      + ("_saveall" if args.jqlora_saves == "all" and not args.remat else "") \
      + ("_gpu" if gpu else "")
  report = {"machine": {**machine_info(gpu), "omp_wait_policy": env["OMP_WAIT_POLICY"]}, "runs": [],
            "curve_tokens": args.curve_tokens, "curve_models": args.curve_models,
            "curve_batch": args.batch or 4}
  breakdown = args.breakdown or args.curves
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{stem}{suffix}"
  with tempfile.TemporaryDirectory(prefix="jqlora_compare_") as tmp:
    for s in presets(args):
      report["runs"].append(compare(s, pathlib.Path(tmp), env, gpu, stacks, breakdown))
      path.with_suffix(".json").write_text(json.dumps(report, indent=2))  # kept if a later run dies
  table = markdown(report)
  path.with_suffix(".md").write_text(table)
  (plot_curves if args.curves else plot)(report, path.with_suffix(".png"))
  print(table)
  print(f"wrote {path}.json, .md, .png")


if __name__ == "__main__":
  main()
