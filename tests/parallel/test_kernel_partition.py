"""The NF4 kernels under a mesh run per shard (8 CPU devices, Pallas interpret mode, in a subprocess).

The worker sets ``JQLORA_BACKEND=interpret,einsum`` (the Triton kernels interpreted, the
reference attention) and records the shapes each kernel call sees while XLA partitions
the program, then prints its measurements as JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

AXES = ("data", "fsdp", "tensor")
_CONFIG = dict(model_type="llama", vocab_size=96, hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               tie_word_embeddings=False)
_GATHER = re.compile(r"= (\(?[^=]*?\)?) all-gather(?:-start)?\(")  # one result or a tuple
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _model():
  """A random 2-layer NF4 Llama with LoRA (B nonzero) on all linears."""
  import jax.numpy as jnp
  from flax import nnx

  import jqlora
  from jqlora.models import LlamaConfig, build_model, random_source

  c = LlamaConfig.from_hf(_CONFIG)
  model = build_model(c, random_source(c, std=0.05), dtype=jnp.float32, progress=False)
  jqlora.apply_lora(model, jqlora.LoraConfig(r=8, init="gaussian"), rngs=nnx.Rngs(0))
  for _, m in jqlora.nn.lora_modules(model):  # B = 0 would leave A without gradient
    m.lora_b.set_value(jnp.full(m.lora_b.get_value().shape, 0.01, jnp.float32))
  return model


def _recording(calls: list):
  """Wraps the Pallas matmul entry points to append ``(x.shape, w.shape)`` of every call."""
  import pallas_kernels.nf4_matmul as kernels

  for name in ("matmul", "matmul_transposed"):
    fn = getattr(kernels, name)

    def wrapped(x, w, *, _fn=fn, **kwargs):
      calls.append([list(x.shape), list(w.shape)])
      return _fn(x, w, **kwargs)
    setattr(kernels, name, wrapped)


def _layer_case(mesh, axes, x_spec, calls) -> dict:
  """A QLoRA layer's output and gradients (x, A, B) on one device and on ``mesh``."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding

  import jqlora
  from jqlora import parallel

  def make():
    w = jqlora.quantize_nf4(jax.random.normal(jax.random.key(2), (256, 512)) / 16)
    layer = jqlora.nn.QLoRALinear(w, axes=axes, r=8, alpha=16, rngs=nnx.Rngs(0))
    layer.lora_b.set_value(jnp.full(layer.lora_b.get_value().shape, 0.01, jnp.float32))
    return layer

  x = jax.random.normal(jax.random.key(3), (8, 4, 512), jnp.float32)

  def run(layer, x):
    graphdef, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)

    def loss(lora, x, rest):  # the NF4 weight an argument, placed as shard_model put it
      y = nnx.merge(graphdef, lora, rest)(x)
      return jnp.sum(y ** 2), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(lora, x, rest)

  (_, y1), (g1, dx1) = run(make(), x).compile()(*_args(make(), x))
  layer = parallel.shard_model(make(), mesh)
  xs = jax.device_put(x, NamedSharding(mesh, x_spec))
  lowered = run(layer, xs)
  calls.clear()
  compiled = lowered.compile()
  shapes = list(calls)
  (_, y8), (g8, dx8) = compiled(*_args(layer, xs))
  err = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  return {"y": err(y8, y1), "dx": err(dx8, dx1),
          "lora": max(err(a, b) for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1))),
          "calls": shapes, "gathers": _gathers(compiled.as_text())}


def _args(layer, x):
  from flax import nnx

  _, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)
  return lora, x, rest


def _gathers(hlo: str) -> list:
  """``[dtype, shape]`` of every all-gather in a compiled HLO text."""
  return [[a.group(1), [int(d) for d in a.group(2).split(",") if d]]
          for m in _GATHER.finditer(hlo) for a in _ARRAY.finditer(m.group(1))]


def _worker() -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jqlora
  from jqlora import parallel
  from jqlora.training import make_schedule, make_tx

  assert len(jax.devices()) == 8, jax.devices()
  calls: list = []
  _recording(calls)
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  out: dict = {}

  # dequantize_nf4 per shard: the interpreted kernel and the native C kernel
  t = jqlora.quantize_nf4(jax.random.normal(jax.random.key(1), (192, 640)))  # 10 blocks a row
  ts = jax.tree.map(lambda a: jax.device_put(
      a, NamedSharding(mesh, P("tensor", "fsdp") if a.ndim == 2 else P())), t)  # as shard_model
  want = np.asarray(jqlora.dequantize_nf4(t, backend="xla"))
  for backend in ("interpret", "native"):
    f = jax.jit(lambda t, b=backend: jqlora.dequantize_nf4(t, backend=b))
    compiled = f.lower(ts).compile()
    got = compiled(ts)
    out[f"dequantize_{backend}"] = {
        "equal": bool(np.array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))),
        "spec": str(got.sharding.spec), "shards": sorted({s.data.shape for s in
                                                          got.addressable_shards}),
        "gathers": _gathers(compiled.as_text())}

  # one QLoRA layer: column-parallel (batch-split x) and row-parallel (x split on in by tensor)
  out["column"] = _layer_case(mesh, ("mlp", "embed"), P(("data", "fsdp")), calls)
  out["row"] = _layer_case(mesh, ("embed", "mlp"), P(("data", "fsdp"), None, "tensor"), calls)

  # the 2-layer model: loss and LoRA gradients, then the compiled train step's HLO
  rng = np.random.default_rng(1)
  ids = rng.integers(0, _CONFIG["vocab_size"], size=(8, 16)).astype(np.int32)
  batch = {"input_ids": ids, "labels": ids}

  def loss_and_grads(model, batch):
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora):
      logits = nnx.merge(graphdef, lora, rest)(batch["input_ids"])
      logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(loss))(lora)

  l1, g1 = loss_and_grads(_model(), batch)
  model = parallel.shard_model(_model(), mesh)
  l8, g8 = loss_and_grads(model, parallel.shard_batch(batch, mesh))
  out["model"] = {"loss": [float(l1), float(l8)], "grads": max(
      float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)))}

  optimizer = parallel.shard_model(jqlora.make_optimizer(model, make_tx(make_schedule(
      "constant", 1e-3, 5))), mesh)
  step, state, opt_state = jqlora.training.functional_step(model, optimizer)

  lowered = jax.jit(step).lower(state, opt_state, parallel.shard_batch(batch, mesh))
  calls.clear()
  compiled = lowered.compile()
  weights = []
  for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, jqlora.format.NF4Tensor)):
    if isinstance(v, jqlora.format.NF4Tensor):
      weights.append(list(v.shape))
  out["step"] = {"calls": list(calls), "gathers": _gathers(compiled.as_text()), "weights": weights}
  return out


@pytest.fixture(scope="module")
def eight_devices() -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "JQLORA_BACKEND": "interpret,einsum"}
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _pieces(weights: list) -> set:
  """Shapes of ``[out, in]`` weights cut by ``tensor`` and/or ``fsdp`` (2 each), whole ones included."""
  return {(o // a, i // b) for o, i in weights for a in (1, 2) for b in (1, 2)}


def _float_weight_gathers(gathers: list, weights: list, layers: int = 1) -> list:
  """The floating all-gathers whose result is shaped like a weight or a set of its shards
  (stacked over ``layers`` too); vocab = 96 keeps the float embedding's gathers apart."""
  shapes = _pieces(weights) | {(layers, *s) for s in _pieces(weights)}
  return [g for g in gathers if g[0] in ("f32", "bf16", "f16") and tuple(g[1]) in shapes]


@pytest.mark.slow
def test_dequantize_decodes_each_shard_in_place(eight_devices):
  for backend in ("interpret", "native"):
    r = eight_devices[f"dequantize_{backend}"]
    assert r["equal"], backend  # bit-identical, nested scales found by global block number
    assert r["spec"] == "P('tensor', 'fsdp')" and r["shards"] == [[96, 320]]
    assert r["gathers"] == []  # nothing moves: each device decodes its own storage


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["column", "row"])
def test_sharded_qlora_layer_equals_one_device(eight_devices, kind):
  r = eight_devices[kind]
  assert r["y"] < 1e-6 and r["dx"] < 1e-6 and r["lora"] < 1e-5, r
  # each device's kernels (forward, input gradient) see its shard: W [256, 512] cut by tensor
  # (and by fsdp unless its codes were gathered), x at most half of the 8 x 4 rows
  assert len(r["calls"]) == 2, r["calls"]
  assert {tuple(w) for _, w in r["calls"]} <= _pieces([[256, 512]]) - {(256, 512)}, r["calls"]
  assert all(np.prod(x[:-1]) <= 8 * 4 // 2 for x, _ in r["calls"]), r["calls"]
  forward = r["calls"][0] if r["calls"][0][0][-1] == r["calls"][0][1][1] else r["calls"][1]
  assert forward == ([[2, 4, 512], [128, 512]] if kind == "column" else [[2, 4, 256], [256, 256]])
  assert _float_weight_gathers(r["gathers"], [[256, 512]]) == []
  assert any(g[0] == "u8" for g in r["gathers"])  # the codes are what is gathered


@pytest.mark.slow
def test_sharded_model_equals_one_device(eight_devices):
  r = eight_devices["model"]
  np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=1e-6)
  assert r["grads"] < 1e-5


@pytest.mark.slow
def test_sharded_train_step_is_fsdp_and_kernels_see_shards(eight_devices):
  r = eight_devices["step"]
  assert r["calls"], "no kernel call was partitioned"
  # true FSDP: the hidden states stay split by rows over data x fsdp (the model's
  # ``hidden_sharding``), so each kernel's x holds a quarter of the 8 x 16 tokens, and its W
  # is cut by tensor alone: the codes were gathered over fsdp, as bytes, never as floats
  tensor_cut = {(o // 2, i) for o, i in r["weights"]} | {(o, i // 2) for o, i in r["weights"]}
  seen = {tuple(w) for _, w in r["calls"]}
  assert seen <= tensor_cut and len(seen) >= 4, seen
  assert len(r["calls"]) == 2 * len(r["weights"])  # forward and input gradient of each (scan body)
  assert all(np.prod(x[:-1]) == 8 * 16 // 4 for x, _ in r["calls"]), r["calls"]
  assert any(g[0] == "u8" for g in r["gathers"]), r["gathers"]
  assert _float_weight_gathers(r["gathers"], r["weights"], layers=2) == [], r["gathers"]


if __name__ == "__main__":
  print(json.dumps(_worker()))
