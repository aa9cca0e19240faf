"""QLoRA training, side by side: jqlora against PyTorch (peft + bitsandbytes).

Four stacks train the same model on the same batch with the same LoRA adapter
(rank, alpha, targets, initial values), the same AdamW and the same dtype, each
in its own process so that peak memory is per stack:

- ``jqlora-qlora``: jqlora, frozen NF4 base (block 64, double quant);
- ``jqlora-lora``: jqlora, float base (``jqlora.load_model(quantize=False)``);
- ``peft-bnb``: transformers + bitsandbytes NF4 (block 64, double quant) + peft;
- ``peft-lora``: transformers + peft with a float base.

Models: the embedded default ``SmolLM2-135M-Instruct`` (jqlora reads its GGUF;
transformers reads the same GGUF, and a first process writes it as a plain
safetensors folder) or, with ``--big``, a random-weight TinyLlama-shaped 1.1B
model written once to a temporary safetensors folder (``bench_load.py``'s
writer). The first process also saves the bitsandbytes NF4 checkpoint of that
folder (transformers refuses ``gguf_file`` together with a bitsandbytes
config); both QLoRA stacks load it as stored, so they train the same NF4 codes.
jqlora's own quantization of the original weights is compared with it
separately (error, differing codes, initial loss). The first jqlora process
initialises the adapter (A Kaiming-uniform, B zero: PEFT's init) and saves it
with ``jqlora.save_adapter``; every other stack loads that file (PEFT:
``PeftModel.from_pretrained(..., is_trainable=True)``).

Measured per stack: model load time, the first step (jqlora: compilation
included), median step time and tokens/s over the steps after the warm-up ones, peak
RSS (``ru_maxrss`` of the process; on a GPU also peak device memory), the loss of
every step, and the NF4 quantization error (mean absolute error of the
dequantized weights against the checkpoint's). Writes
``compare_torch<suffix>.{json,md,png}``.

On a GPU (JAX's default backend is ``gpu`` and torch sees CUDA) the same runs use
bfloat16 and compare against bitsandbytes' CUDA kernels; the NF4 kernels' own
benchmark is ``benchmarks/bench_kernels.py``.

  python benchmarks/compare_torch.py            # SmolLM2, 4 x 128, r=16 all-linear, 12 steps
  python benchmarks/compare_torch.py --big      # the random 1.1B model, 1 x 128 (slow on a CPU)
  python benchmarks/compare_torch.py --quick    # < 5 minutes on a 2-core CPU
  python benchmarks/compare_torch.py --smoke --out-dir /tmp/x   # CI smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

STACKS = ("jqlora-qlora", "jqlora-lora", "peft-bnb", "peft-lora")
SMOLLM2 = "SmolLM2-135M"
BIG = "Llama-1.1B-random"


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


def presets(args: argparse.Namespace) -> list[Setting]:
  """The settings a command line asks for."""
  if args.smoke:
    return [Setting(SMOLLM2, batch=1, seq=32, steps=5, warmup=1, remat=args.remat)]
  if args.quick:
    return [Setting(SMOLLM2, batch=2, seq=64, steps=6, warmup=2, remat=args.remat)]
  if args.big:
    return [Setting(BIG, batch=args.batch or 1, seq=128, steps=args.steps or 4, warmup=1,
                    remat=args.remat)]
  return [Setting(SMOLLM2, batch=args.batch or 4, seq=128, steps=args.steps or 12, warmup=2,
                  remat=args.remat)]


# -- child processes --------------------------------------------------------------

def _peak_rss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


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

  s = Setting(**{**spec["setting"], "betas": tuple(spec["setting"]["betas"])})
  quantize = spec["stack"] == "jqlora-qlora"
  dtype = jnp.dtype(spec["dtype"])
  start = time.perf_counter()
  # QLoRA reads the bitsandbytes checkpoint as stored: both QLoRA stacks train the same NF4 codes
  path = spec["nf4_path"] if quantize else spec["jqlora_path"]
  model = jqlora.load_model(path, quantize=False, dtype=dtype, progress=False)
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  load_s = time.perf_counter() - start
  adapter = pathlib.Path(spec["adapter_dir"])
  if (adapter / "adapter_config.json").is_file():
    jqlora.load_adapter(model, adapter)
  else:
    config = jqlora.LoraConfig(r=s.r, alpha=s.alpha, target_modules="all-linear")
    jqlora.apply_lora(model, config, rngs=nnx.Rngs(s.seed))
    jqlora.save_adapter(model, adapter)
  model.remat = s.remat
  tx = optax.adamw(s.lr, b1=s.betas[0], b2=s.betas[1], eps=s.eps, weight_decay=s.weight_decay)
  optimizer = jqlora.make_optimizer(model, tx)
  ids = _token_batch(s, model.config.vocab_size)
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
  result = _timed_steps(lambda: jqlora.train_step(model, optimizer, batch)["loss"], s)
  result.update(load_s=load_s, peak_rss_bytes=_peak_rss_bytes(), vocab_size=model.config.vocab_size,
                trainable_params=jqlora.trainable_params(model, verbose=False)[0])
  if jax.default_backend() == "gpu":
    result["peak_device_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
  if quantize:  # after the peak was read
    result.update(_own_quantization(model, spec["jqlora_path"], dtype, batch))
  return result


def _own_quantization(stored, path: str, dtype, batch: dict) -> dict:
  """jqlora's own NF4 quantization of the original weights, against the stored bitsandbytes one.

  Returns the mean absolute error of jqlora's dequantized weights, the fraction
  of 4-bit codes and of (double-quantized) block-scale codes that differ from
  the stored checkpoint's, and the initial loss (adapters start at zero) with
  jqlora's own NF4 weights.
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
  return {"nf4_mae": err / n_weights, "own_packed_bytes_differ": codes / n_codes,
          "own_scale_codes_differ": scales / n_scales if n_scales else None,
          "own_quantization_loss_step1": float(total / count)}


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

  s = Setting(**{**spec["setting"], "betas": tuple(spec["setting"]["betas"])})
  gpu = spec["gpu"]
  device = "cuda" if gpu else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)
  dtype = getattr(torch, spec["dtype"])
  folder = pathlib.Path(spec["torch_path"])
  quantized = spec["stack"] == "peft-bnb"
  start = time.perf_counter()
  base = AutoModelForCausalLM.from_pretrained(spec["nf4_path"] if quantized else folder,
                                              dtype=dtype, device_map={"": device})
  load_s = time.perf_counter() - start
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
  result.update(load_s=load_s, peak_rss_bytes=_peak_rss_bytes(),
                vocab_size=base.config.vocab_size, trainable_params=sum(p.numel() for p in params))
  if gpu:
    result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
  if quantized:
    result["nf4_mae"] = _bnb_nf4_mae(model.get_base_model(), folder)
  return result


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
  spec = json.loads(pathlib.Path(spec_file).read_text())
  load_before = os.getloadavg()[0]
  result = {"export": export, "jqlora": run_jqlora, "peft": run_peft}[spec["kind"]](spec)
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
  """Where the numbers come from: CPU model, cores, memory, library versions."""
  import importlib.metadata as md
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
  info = {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
          "memory_gib": None if mem is None else round(mem / 2**30, 1), "gpu": gpu,
          "versions": {p: md.version(p) for p in ("jax", "flax", "optax", "torch", "transformers",
                                                   "peft", "bitsandbytes")}}
  if gpu:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True)
    info["gpu_name"] = proc.stdout.strip()
  return info


def _ratios(stacks: dict, gpu: bool) -> dict:
  """The issue's targets as measured ratios (None when a stack did not run)."""
  mem = "peak_device_bytes" if gpu else "peak_rss_bytes"
  q, lora, bnb = stacks["jqlora-qlora"], stacks["jqlora-lora"], stacks["peft-bnb"]
  targets = {
      "tokens_per_s_vs_peft_bnb": (q["tokens_per_s"] / bnb["tokens_per_s"], ">=", 1.5 if gpu else 1.3),
      "peak_memory_vs_peft_bnb": (q[mem] / bnb[mem], "<=", 1.0 if gpu else 0.6),
      "step_time_vs_jqlora_lora": (q["median_step_s"] / lora["median_step_s"], "<=", 1.2),
  }
  return {k: {"ratio": r, "target": f"{op} {t}", "met": r >= t if op == ">=" else r <= t}
          for k, (r, op, t) in targets.items()}


def _loss_agreement(stacks: dict, n: int = 5) -> dict:
  """max |loss difference| over the first ``n`` steps, per pair of same-maths stacks."""
  out = {}
  for ours, theirs in (("jqlora-qlora", "peft-bnb"), ("jqlora-lora", "peft-lora")):
    a, b = stacks[ours]["losses"][:n], stacks[theirs]["losses"][:n]
    out[f"{ours} vs {theirs}"] = {"steps": min(len(a), len(b)),
                                  "max_abs_diff": max(abs(x - y) for x, y in zip(a, b))}
  return out


def compare(s: Setting, workdir: pathlib.Path, env: dict, gpu: bool) -> dict:
  """Runs the four stacks on one setting; their results, the ratios and the loss agreement."""
  print(f"{s.model}: batch {s.batch} x {s.seq}, r={s.r} all-linear, {s.steps} steps", flush=True)
  folder = workdir / s.model
  folder.mkdir()
  common = {"setting": dataclasses.asdict(s), "dtype": "bfloat16" if gpu else "float32",
            "gpu": gpu, "adapter_dir": str(folder / "adapter"), "torch_path": str(folder / "hf"),
            "nf4_path": str(folder / "hf-bnb-nf4")}
  if s.model == SMOLLM2:
    from jqlora.io.loading import DEFAULT_MODEL, default_model_path
    common["jqlora_path"] = DEFAULT_MODEL
    _run_child({**common, "kind": "export", "gguf": str(default_model_path())}, folder, env)
  else:
    import bench_load
    common["jqlora_path"] = common["torch_path"]
    bench_load.write_checkpoint(pathlib.Path(common["torch_path"]), bench_load.CONFIG, seed=s.seed)
    _run_child({**common, "kind": "export"}, folder, env)
  stacks = {}
  for stack in STACKS:  # jqlora-qlora first: it writes the shared initial adapter
    stacks[stack] = _run_child({**common, "kind": stack.split("-")[0], "stack": stack}, folder, env)
  vocab = {r["vocab_size"] for r in stacks.values()}
  if len(vocab) != 1:
    raise RuntimeError(f"{s.model}: the stacks disagree on the vocabulary size: {vocab}")
  return {"setting": dataclasses.asdict(s), "dtype": common["dtype"], "stacks": stacks,
          "ratios": _ratios(stacks, gpu), "loss_agreement": _loss_agreement(stacks)}


# -- reporting ------------------------------------------------------------------

def markdown(report: dict) -> str:
  """The results as markdown tables: per stack, then the targets."""
  m = report["machine"]
  where = m.get("gpu_name") or f"{m['cpu']}, {m['cpus']} cores, {m['memory_gib']} GiB"
  lines = ["# jqlora vs PyTorch (peft + bitsandbytes): QLoRA training", "",
           f"Machine: {where} ({m['platform']}); "
           + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", ""]
  mem_name = "peak GPU memory" if m["gpu"] else "peak RSS"
  for r in report["runs"]:
    s = r["setting"]
    lines += [f"## {s['model']}: batch {s['batch']} x {s['seq']}, LoRA r={s['r']} alpha={s['alpha']} "
              f"all-linear, AdamW lr={s['lr']}, {r['dtype']}, {s['steps']} steps "
              f"({s['warmup']} warm-up)"
              + (", activation checkpointing in every stack" if s["remat"] else ""), "",
              f"| stack | load s | first step s | median step s | tokens/s | {mem_name} GiB "
              "| loss step 1 | loss last step | NF4 MAE | load avg |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in r["stacks"].items():
      mem = x.get("peak_device_bytes", x["peak_rss_bytes"]) if m["gpu"] else x["peak_rss_bytes"]
      mae = f"{x['nf4_mae']:.3e}" if "nf4_mae" in x else "-"
      lines.append(f"| {name} | {x['load_s']:.1f} | {x['first_step_s']:.2f} | "
                   f"{x['median_step_s']:.3f} | {x['tokens_per_s']:.0f} | {mem / 2**30:.2f} | "
                   f"{x['losses'][0]:.5f} | {x['losses'][-1]:.5f} | {mae} | "
                   f"{max(x['load_avg_1min']):.1f} |")
    lines += ["", "| target | measured | wanted | |", "|---|---:|---:|---|"]
    for k, t in r["ratios"].items():
      lines.append(f"| jqlora-qlora {k.replace('_', ' ')} | {t['ratio']:.2f}x | {t['target']} | "
                   f"{'met' if t['met'] else 'MISSED'} |")
    for k, t in r["loss_agreement"].items():
      lines.append(f"| loss {k}, first {t['steps']} steps, max abs diff | {t['max_abs_diff']:.1e} "
                   f"| <= 1e-3 | {'met' if t['max_abs_diff'] <= 1e-3 else 'MISSED'} |")
    q, b = r["stacks"]["jqlora-qlora"], r["stacks"]["peft-bnb"]
    scales = q["own_scale_codes_differ"]
    lines += ["", f"Both QLoRA stacks train the same NF4 codes: the bitsandbytes checkpoint that "
              f"transformers wrote (jqlora loads it as stored). jqlora's own quantization of the "
              f"same weights: NF4 MAE {q['nf4_mae']:.4e} (bitsandbytes: {b['nf4_mae']:.4e}); "
              f"{100 * q['own_packed_bytes_differ']:.2f}% of packed 4-bit bytes and "
              + ("-" if scales is None else f"{100 * scales:.2f}%")
              + f" of double-quantized block-scale codes differ from bitsandbytes'; the initial "
              f"loss with jqlora's own NF4 weights is {q['own_quantization_loss_step1']:.5f} "
              f"({q['own_quantization_loss_step1'] - b['losses'][0]:+.1e} from peft-bnb's).", ""]
  lines.append(f"First step: jqlora's includes XLA compilation. Median step over the steps after "
               f"the warm-up. Each stack ran in its own process, one after the other; load avg is "
               f"the machine's 1-minute load average (max of start and end of the stack's run): "
               f"above {m['cpus']} other work shared the CPUs. OMP_WAIT_POLICY={m['omp_wait_policy']} for "
               f"every stack (torch's spinning OpenMP threads collapse on a shared CPU).")
  if m["gpu"]:
    lines.append("NF4 kernel micro-benchmarks: `benchmarks/bench_kernels.py`.")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: pathlib.Path) -> None:
  """tokens/s, peak memory and loss per step of every stack, one row per model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = report["runs"]
  fig, axes = plt.subplots(len(runs), 3, figsize=(14, 3.8 * len(runs)), squeeze=False)
  colors = dict(zip(STACKS, ("tab:blue", "tab:cyan", "tab:red", "tab:orange")))
  gpu = report["machine"]["gpu"]
  for row, r in zip(axes, runs):
    names = list(r["stacks"])
    x = r["stacks"]
    row[0].bar(names, [x[n]["tokens_per_s"] for n in names], color=[colors[n] for n in names])
    row[0].set_ylabel("tokens/s (higher is better)")
    mem = [x[n]["peak_device_bytes" if gpu else "peak_rss_bytes"] / 2**30 for n in names]
    row[1].bar(names, mem, color=[colors[n] for n in names])
    row[1].set_ylabel(f"peak {'GPU memory' if gpu else 'RSS'} GiB (lower is better)")
    for n in names:
      style = "-" if n.startswith("jqlora") else "--"
      row[2].plot(range(1, len(x[n]["losses"]) + 1), x[n]["losses"], style, color=colors[n],
                  label=n, marker="o", markersize=3)
    row[2].set_xlabel("step")
    row[2].set_ylabel("training loss")
    row[2].legend(fontsize=8)
    s = r["setting"]
    row[0].set_title(f"{s['model']}, {s['batch']}x{s['seq']}, {r['dtype']}")
    for ax in row[:2]:
      ax.tick_params(axis="x", labelrotation=20, labelsize=8)
  m = report["machine"]
  fig.suptitle(f"jqlora vs peft + bitsandbytes on {m.get('gpu_name') or m['cpu']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="SmolLM2, 2 x 64, 6 steps (< 5 min, CPU)")
  mode.add_argument("--smoke", action="store_true", help="SmolLM2, 1 x 32, 5 steps (CI)")
  mode.add_argument("--big", action="store_true",
                    help="the random 1.1B Llama model instead (default 1 x 128, 4 steps)")
  parser.add_argument("--remat", action="store_true",
                      help="activation checkpointing per layer in every stack")
  parser.add_argument("--batch", type=int, help="sequences per step (default 4; --big: 1)")
  parser.add_argument("--steps", type=int, help="steps, warm-up included (default 12; --big: 4)")
  parser.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child_main(args.child)
    return

  # Passive OpenMP waiting: on a CPU shared with other work, torch's spinning threads slow it
  # down several times (measured: 0.5 s vs 2-9 s a step); an explicit setting is kept.
  env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1",
         "TRANSFORMERS_OFFLINE": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TQDM_DISABLE": "1"}
  gpu = _probe_gpu(env)
  suffix = ("_smoke" if args.smoke else "_quick" if args.quick else "_big" if args.big else "") \
      + ("_remat" if args.remat else "") + ("_gpu" if gpu else "")
  report = {"machine": {**machine_info(gpu), "omp_wait_policy": env["OMP_WAIT_POLICY"]}, "runs": []}
  with tempfile.TemporaryDirectory(prefix="jqlora_compare_") as tmp:
    for s in presets(args):
      report["runs"].append(compare(s, pathlib.Path(tmp), env, gpu))
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"compare_torch{suffix}"
  stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
  table = markdown(report)
  stem.with_suffix(".md").write_text(table)
  plot(report, stem.with_suffix(".png"))
  print(table)
  print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
  main()
