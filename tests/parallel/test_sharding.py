"""Sharding rules, meshes and sharded training (8 CPU devices in a subprocess).

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX
starts, so the multi-device checks run this file as a script in a subprocess
(``python tests/test_sharding.py``), which prints its measurements as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

AXES = ("data", "fsdp", "tensor")
_CONFIG = dict(model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               tie_word_embeddings=False)


def _tiny_model(r: int | None = 8, **overrides):
  """A random 2-layer NF4 Llama with LoRA (B nonzero) on all linears unless ``r`` is None."""
  import jax.numpy as jnp
  from flax import nnx

  import jqlora
  from jqlora.models import LlamaConfig, build_model, random_source

  c = LlamaConfig.from_hf({**_CONFIG, **overrides})
  model = build_model(c, random_source(c, std=0.05), dtype=jnp.float32, progress=False)
  if r is None:
    return model
  jqlora.apply_lora(model, jqlora.LoraConfig(r=r, init="gaussian"), rngs=nnx.Rngs(0))
  for _, m in jqlora.nn.lora_modules(model):  # B = 0 would leave A without gradient
    m.lora_b.set_value(jnp.full(m.lora_b.get_value().shape, 0.01, jnp.float32))
  return model


def _toy_mixer(seed: int = 0):
  """A non-Llama NNX model whose NF4 linears are named ``wi`` and ``wo`` (no jqlora name rule
  knows them); they shard only because their Variables carry logical axes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jqlora
  from jqlora.nn import Frozen, Linear, axes

  class Mixer(nnx.Module):
    def __init__(self, vocab=64, dim=128, hidden=256):
      k = jax.random.split(jax.random.key(seed), 3)
      self.table = Frozen(0.5 * jax.random.normal(k[0], (vocab, dim)), **axes(("vocab", "embed")))
      self.wi = Linear(jqlora.quantize_nf4(jax.random.normal(k[1], (hidden, dim)) / dim**0.5),
                       axes=("mlp", "embed"))
      self.wo = Linear(jqlora.quantize_nf4(jax.random.normal(k[2], (dim, hidden)) / hidden**0.5),
                       axes=("embed", "mlp"))

    def __call__(self, input_ids, *, positions=None, segment_ids=None):
      h = self.table.get_value()[input_ids]
      h = h + self.wo(jax.nn.gelu(self.wi(h)))
      return (h @ self.table.get_value().T).astype(jnp.float32)

  model = Mixer()
  jqlora.apply_lora(model, jqlora.LoraConfig(r=8, target_modules=["wi", "wo"], init="gaussian"),
                    rngs=nnx.Rngs(0))
  for _, m in jqlora.nn.lora_modules(model):  # B = 0 would leave A without gradient
    m.lora_b.set_value(jnp.full(m.lora_b.get_value().shape, 0.01, jnp.float32))
  return model


def test_toy_model_specs_come_from_its_metadata():
  from jax.sharding import AbstractMesh
  from jax.sharding import PartitionSpec as P

  from jqlora.parallel import partition_specs

  specs = partition_specs(_toy_mixer(), AbstractMesh((2, 2, 2), AXES))
  wi, wo = specs["wi"]["weight"].get_value(), specs["wo"]["weight"].get_value()
  assert (wi.packed, wi.absmax) == (P("tensor", "fsdp"),) * 2  # column-parallel by its names
  assert (wo.packed, wo.absmax) == (P("fsdp", "tensor"),) * 2  # row-parallel by its names
  assert specs["wi"]["lora_a"].get_value() == P("fsdp", "tensor")
  assert specs["wo"]["lora_b"].get_value() == P("tensor", "fsdp")
  assert specs["table"].get_value() == P("tensor", "fsdp")


# -- in-process: rules and errors (one device is enough) ---------------------------------

def test_mesh_product_must_equal_the_device_count():
  import jax

  from jqlora.parallel import make_mesh, mesh_from_config

  n = len(jax.devices())
  with pytest.raises(ValueError, match=rf"= {2 * n}, but there are {n} devices"):
    make_mesh(data=2, tensor=n)
  with pytest.raises(ValueError, match="mesh.fsdp must be a positive integer"):
    make_mesh(fsdp=0)
  with pytest.raises(ValueError, match="unknown axis.*'model'"):
    mesh_from_config({"model": 2})
  mesh = mesh_from_config({})
  assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}


def test_rules_split_nf4_and_adapters_with_their_base():
  from jax.sharding import AbstractMesh
  from jax.sharding import PartitionSpec as P

  from jqlora.format import NF4Tensor
  from jqlora.parallel import partition_specs

  specs = partition_specs(_tiny_model(), AbstractMesh((2, 2, 2), AXES))
  q, o = specs["layers"]["self_attn"]["q_proj"], specs["layers"]["self_attn"]["o_proj"]
  qw, ow = q["weight"].get_value(), o["weight"].get_value()
  assert isinstance(qw, NF4Tensor)
  # column-parallel: out on tensor, in (whole blocks) on fsdp; stacked layer axis unsplit
  assert (qw.packed, qw.absmax) == (P(None, "tensor", "fsdp"),) * 2
  assert (qw.absmax2, qw.offset) == (P(), P())  # nested scales replicated
  assert q["lora_a"].get_value() == P(None, "fsdp", "tensor")
  assert q["lora_b"].get_value() == P(None, "fsdp", "tensor")
  # row-parallel: in on tensor, out on fsdp; A follows in, B follows out
  assert (ow.packed, ow.absmax) == (P(None, "fsdp", "tensor"),) * 2
  assert o["lora_a"].get_value() == P(None, "tensor", "fsdp")
  assert o["lora_b"].get_value() == P(None, "tensor", "fsdp")
  assert specs["embed_tokens"].get_value() == P("tensor", "fsdp")
  assert specs["layers"]["input_layernorm"]["weight"].get_value() == P()
  assert q["scale"].get_value() == P()


def test_rank_not_divisible_is_left_unsplit():
  from jax.sharding import AbstractMesh
  from jax.sharding import PartitionSpec as P

  from jqlora.parallel import partition_specs

  specs = partition_specs(_tiny_model(r=3), AbstractMesh((1, 2, 2), AXES))
  q = specs["layers"]["self_attn"]["q_proj"]
  assert q["lora_a"].get_value() == P(None, "fsdp", None)
  assert q["lora_b"].get_value() == P(None, None, "tensor")


def test_strict_indivisible_dimension_names_the_tensor_and_the_axis():
  from jax.sharding import AbstractMesh

  from jqlora.parallel import partition_specs

  # tensor = 3: vocab 64 is the first tensor that does not divide
  with pytest.raises(ValueError, match=r"embed_tokens has vocab = 64, not divisible by mesh axis "
                                       r"'tensor' of size 3"):
    partition_specs(_tiny_model(), AbstractMesh((1, 1, 3), AXES), strict=True)
  # everything divides by 3 but k_proj's out = 2 kv heads * 32 = 64
  sizes = dict(vocab_size=96, hidden_size=192, intermediate_size=384, num_attention_heads=6)
  with pytest.raises(ValueError, match=r"layers/self_attn/k_proj/weight \(NF4 absmax\) has out "
                                       r"= 64, not divisible by mesh axis 'tensor' of size 3"):
    partition_specs(_tiny_model(r=None, **sizes), AbstractMesh((1, 1, 3), AXES), strict=True)
  with pytest.raises(ValueError, match=r"layers/self_attn/k_proj/lora_b has out = 64, not "
                                       r"divisible by mesh axis 'tensor' of size 3"):
    partition_specs(_tiny_model(**sizes), AbstractMesh((1, 1, 3), AXES), strict=True)
  # fsdp = 4 would cut gate_proj's 64-input blocks (in = 128 is 2 blocks)
  with pytest.raises(ValueError, match=r"gate_proj/weight \(NF4 absmax\) has in/block_size \(in "
                                       r"= 128, block_size = 64\) = 2, not divisible by mesh axis "
                                       r"'fsdp' of size 4"):
    partition_specs(_tiny_model(), AbstractMesh((1, 4, 1), AXES), strict=True)


def test_indivisible_dimension_is_left_unsplit_with_one_warning_line(caplog):
  from jax.sharding import AbstractMesh
  from jax.sharding import PartitionSpec as P

  from jqlora.parallel import partition_specs

  # fsdp = 4 cannot cut gate/up/q/k/v_proj's 2 input blocks: those stay whole, the rest splits
  with caplog.at_level("WARNING", logger="jqlora.parallel"):
    specs = partition_specs(_tiny_model(), AbstractMesh((1, 4, 1), AXES))
  up = specs["layers"]["mlp"]["up_proj"]["weight"].get_value()
  assert (up.packed, up.absmax) == (P(None, "tensor", None),) * 2  # out still on tensor (size 1)
  down = specs["layers"]["mlp"]["down_proj"]["weight"].get_value()
  assert (down.packed, down.absmax) == (P(None, "fsdp", "tensor"),) * 2  # out = 128 splits by 4
  assert specs["layers"]["mlp"]["up_proj"]["lora_a"].get_value() == P(None, "fsdp", "tensor")
  lines = [r.getMessage() for r in caplog.records if r.name == "jqlora.parallel"]
  assert len(lines) == 1 and "\n" not in lines[0]
  assert "left unsplit" in lines[0]
  assert "layers/mlp/gate_proj/weight (NF4 absmax) (in/block_size (in = 128, block_size = 64) " \
         "= 2 on 'fsdp' of size 4)" in lines[0]
  assert "down_proj" not in lines[0]


def test_batch_size_must_divide_data_times_fsdp():
  import jax

  from jqlora.parallel import make_mesh, shard_batch

  n = len(jax.devices())
  mesh = make_mesh(data=n)
  ids = np.zeros((n + 1 if n > 1 else 1, 4), np.int32)
  if n > 1:
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] has batch size"):
      shard_batch({"input_ids": ids}, mesh)
  else:
    out = shard_batch({"input_ids": ids, "labels": ids, "segment_ids": None}, mesh)
    assert sorted(out) == ["input_ids", "labels"]


# -- subprocess: 8 CPU devices ----------------------------------------------------------

def _worker() -> dict:
  """5 QLoRA steps on 1 device and on a (2, 2, 2) mesh; losses and per-device bytes."""
  import jax
  from flax import nnx

  import jqlora
  from jqlora import parallel
  from jqlora.format import NF4Tensor
  from jqlora.training import make_schedule, make_tx

  assert len(jax.devices()) == 8, jax.devices()
  rng = np.random.default_rng(1)
  batches = []
  for _ in range(5):
    ids = rng.integers(0, _CONFIG["vocab_size"], size=(8, 16)).astype(np.int32)
    labels = np.where(rng.random(ids.shape) < 0.2, -100, ids).astype(np.int32)
    batches.append({"input_ids": ids, "labels": labels})

  def run(mesh, make=_tiny_model):
    model = make()
    if mesh is not None:
      parallel.shard_model(model, mesh)
    optimizer = jqlora.make_optimizer(model, make_tx(make_schedule("constant", 1e-2, 5)))
    if mesh is not None:
      parallel.shard_model(optimizer, mesh)
    losses = []
    for batch in batches:
      if mesh is not None:
        batch = parallel.shard_batch(batch, mesh)
      losses.append(float(jqlora.train_step(model, optimizer, batch)["loss"]))
    return model, optimizer, losses

  _, _, single = run(None)
  model, optimizer, sharded = run(parallel.make_mesh(data=2, fsdp=2, tensor=2))
  _, _, toy_single = run(None, _toy_mixer)
  toy, _, toy_sharded = run(parallel.make_mesh(data=2, fsdp=2, tensor=2), _toy_mixer)
  toy_shapes = {"wi": sorted(parallel.shard_shapes(toy.wi.weight.get_value().packed)),
                "wo_lora_a": sorted(parallel.shard_shapes(toy.wo.lora_a.get_value()))}

  per_device = {"nf4": {}, "nested": {}, "adapters": {}, "moments": {}}
  totals = dict.fromkeys(per_device, 0)

  def add(kind, x):
    totals[kind] += x.nbytes
    for s in x.addressable_shards:
      per_device[kind][str(s.device)] = per_device[kind].get(str(s.device), 0) + s.data.nbytes

  shapes = {}
  for path, v in jax.tree_util.tree_leaves_with_path(
      nnx.state(model), is_leaf=lambda x: isinstance(x, NF4Tensor)):
    name = jax.tree_util.keystr(path)
    if isinstance(v, NF4Tensor):
      add("nf4", v.packed), add("nf4", v.absmax), add("nested", v.absmax2), add("nested", v.offset)
      shapes[name] = [sorted(parallel.shard_shapes(v.packed)),
                      sorted(parallel.shard_shapes(v.absmax)), list(v.packed.shape),
                      list(v.absmax.shape)]
    elif "lora_" in name:
      add("adapters", v)
      shapes[name] = [sorted(parallel.shard_shapes(v)), list(v.shape)]
  for path, v in jax.tree_util.tree_leaves_with_path(nnx.state(optimizer)):
    if "lora_" in jax.tree_util.keystr(path):
      add("moments", v)
  # the hidden states are held batch-split; a batch the mesh's rows do not divide still runs
  fresh, ids = _tiny_model(), batches[0]["input_ids"][:3]
  want = np.asarray(fresh(ids))
  placed = parallel.shard_model(_tiny_model(), parallel.make_mesh(data=2, fsdp=2, tensor=2))
  odd = float(np.max(np.abs(np.asarray(placed(ids)) - want)) / np.max(np.abs(want)))
  hidden = {"before": fresh.hidden_sharding is None, "spec": list(placed.hidden_sharding.spec),
            "odd_batch": odd}
  return {"single": single, "sharded": sharded, "shapes": shapes, "totals": totals,
          "per_device": per_device, "toy_single": toy_single, "toy_sharded": toy_sharded,
          "toy_shapes": toy_shapes, "hidden": hidden}


@pytest.fixture(scope="module")
def eight_devices() -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_training_matches_one_device(eight_devices):
  single, sharded = eight_devices["single"], eight_devices["sharded"]
  assert len(single) == len(sharded) == 5
  np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
  assert len(set(single)) == 5  # the steps really change the adapters


@pytest.mark.slow
def test_toy_model_shards_by_its_metadata_and_trains_as_one_device(eight_devices):
  single, sharded = eight_devices["toy_single"], eight_devices["toy_sharded"]
  np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
  assert len(set(single)) == 5
  shapes = eight_devices["toy_shapes"]
  assert shapes["wi"] == [[128, 32]]  # wi [256, 128/2]: out on tensor, in on fsdp
  assert shapes["wo_lora_a"] == [[128, 4]]  # lora_a [256, 8]: in on tensor, r on fsdp


@pytest.mark.slow
def test_shard_model_holds_hidden_states_split_by_rows(eight_devices):
  r = eight_devices["hidden"]
  assert r["before"] and r["spec"] == [["data", "fsdp"]]  # B over data x fsdp, as the batch
  assert r["odd_batch"] < 1e-5  # B = 3 on 4 row shards: left to XLA, same logits


@pytest.mark.slow
def test_each_device_holds_a_quarter_of_nf4_bytes_and_adapters(eight_devices):
  shapes = eight_devices["shapes"]
  packed, absmax, full_packed, full_absmax = shapes["['layers']['mlp']['up_proj']['weight'].value"]
  assert full_packed == [2, 256, 64] and packed == [[2, 128, 32]]  # [L, out/tensor, in/2/fsdp]
  assert full_absmax == [2, 256, 2] and absmax == [[2, 128, 1]]  # one 64-input block per shard
  packed, absmax, _, _ = shapes["['layers']['mlp']['down_proj']['weight'].value"]
  assert packed == [[2, 64, 64]] and absmax == [[2, 64, 2]]  # [L, out/fsdp, in/2/tensor]
  assert shapes["['layers']['self_attn']['o_proj']['lora_a'].value"] == [[[2, 64, 4]], [2, 128, 8]]
  assert shapes["['layers']['mlp']['up_proj']['lora_b'].value"] == [[[2, 4, 128]], [2, 8, 256]]
  totals, per_device = eight_devices["totals"], eight_devices["per_device"]
  for kind in ("nf4", "adapters", "moments"):
    assert len(per_device[kind]) == 8
    assert set(per_device[kind].values()) == {totals[kind] // 4}, kind  # fsdp * tensor = 4
  assert set(per_device["nested"].values()) == {totals["nested"]}  # replicated, tiny
  assert totals["nested"] < totals["nf4"] / 50


if __name__ == "__main__":
  print(json.dumps(_worker()))
