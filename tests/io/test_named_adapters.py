"""Several named adapters on one model, against PEFT's multi-adapter API (issue 14 item 3)."""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx
from jax import monitoring

import jqlora
from jqlora.generate import generate_ids
from jqlora.nn import route_adapters

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's event name
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@contextlib.contextmanager
def compilations():
  """Counts XLA compilations in the block: ``with compilations() as n: ...; n[0]``."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    count[0] += event == BACKEND_COMPILE

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    monitoring.unregister_event_duration_listener(listener)


def _torch_base(data_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(
      data_dir / "hf" / "tiny-llama" / "base", dtype=torch.float32)


def _peft_adapter(data_dir, folder, seed, **config):
  """A random (non-zero) PEFT adapter on the tiny llama, written to ``folder``."""
  torch.manual_seed(seed)
  model = peft.get_peft_model(_torch_base(data_dir), peft.LoraConfig(init_lora_weights=False,
                                                                        **config))
  model.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def adapters(data_dir, tmp_path_factory):
  """``{name: folder}``: the bundled adapter, a second of the same shapes, a narrower third."""
  root = tmp_path_factory.mktemp("adapters")
  return {"default": data_dir / "hf" / "tiny-llama" / "adapter",
          "second": _peft_adapter(data_dir, root / "second", 1, r=8, lora_alpha=8, target_modules=ALL),
          "narrow": _peft_adapter(data_dir, root / "narrow", 2, r=4, lora_alpha=12,
                                  target_modules=["q_proj", "v_proj"],
                                  rank_pattern={"model.layers.1.self_attn.v_proj": 2})}


def _jqlora(data_dir, adapters, names=("default", "second", "narrow")):
  model = jqlora.load_model(data_dir / "hf" / "tiny-llama" / "base", quantize=False,
                            dtype=jnp.float32, progress=False)
  for name in names:
    jqlora.load_adapter(model, adapters[name], adapter_name=name)
  return model


def _peft(data_dir, adapters, names=("default", "second", "narrow")):
  model = peft.PeftModel.from_pretrained(_torch_base(data_dir), adapters[names[0]],
                                         adapter_name=names[0])
  for name in names[1:]:
    model.load_adapter(adapters[name], adapter_name=name)
  return model.eval()


def _ids(data_dir, rows=4):
  ids = np.load(data_dir / "hf" / "tiny-llama" / "reference_logits.npz")["input_ids"]
  return np.concatenate([ids, (ids + 7) % 512])[:rows]


@pytest.mark.slow
def test_each_adapter_alone_and_a_mixed_batch_equal_peft(data_dir, adapters, tmp_path):
  ids = _ids(data_dir)
  model, reference = _jqlora(data_dir, adapters), _peft(data_dir, adapters)
  assert jqlora.list_adapters(model) == ("default", "second", "narrow")
  assert jqlora.active_adapter(model) == "default"  # loading more adapters keeps the first active
  run = lambda: np.asarray(model(jnp.asarray(ids, jnp.int32)))
  with torch.no_grad():
    expect = lambda **kw: reference(torch.as_tensor(ids), **kw).logits.numpy()
    outputs = {}
    for name in ("second", "narrow", "default"):
      reference.set_adapter(name)
      jqlora.set_adapter(model, name)
      assert jqlora.active_adapter(model) == name
      outputs[name] = run()
      np.testing.assert_allclose(outputs[name], expect(), atol=1e-4, rtol=0)
    with reference.disable_adapter():
      base = expect()
    with jqlora.disable_adapters(model):
      np.testing.assert_allclose(run(), base, atol=1e-4, rtol=0)
    np.testing.assert_allclose(run(), outputs["default"], atol=0, rtol=0)  # enabled again
    assert np.abs(outputs["second"] - outputs["default"]).max() > 1e-2  # they differ
    assert np.abs(outputs["narrow"] - base).max() > 1e-2

    rows = ["narrow", "__base__", "second", "default"]
    route_adapters(model, rows)
    mixed = run()
    route_adapters(model, None)
    np.testing.assert_allclose(mixed, expect(adapter_names=rows), atol=1e-4, rtol=0)
    for i, name in enumerate(rows):  # each row as that adapter alone gives it
      np.testing.assert_allclose(mixed[i], base[i] if name == "__base__" else outputs[name][i],
                                 atol=1e-5, rtol=0)

  # PEFT's folder layout both ways: "default" in the folder, the others in subfolders
  jqlora.set_adapter(model, "second")
  jqlora.save_adapter(model, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "adapter_config.json", "adapter_model.safetensors", "narrow", "second"]
  assert json.loads((tmp_path / "narrow" / "adapter_config.json").read_text())["r"] == 4
  saved = {name: tmp_path if name == "default" else tmp_path / name for name in adapters}
  reread = _peft(data_dir, saved)
  loaded = jqlora.load_model(data_dir / "hf" / "tiny-llama" / "base", quantize=False,
                             dtype=jnp.float32, progress=False)
  for name in ("default", "narrow"):
    jqlora.load_adapter(loaded, tmp_path, adapter_name=name)  # finds the subfolder
  jqlora.save_adapter(model, tmp_path / "only", adapter_name="narrow")
  assert [p.name for p in (tmp_path / "only").iterdir()] == ["narrow"]
  with torch.no_grad():
    for name in ("default", "narrow"):
      reread.set_adapter(name)
      jqlora.set_adapter(loaded, name)
      np.testing.assert_allclose(np.asarray(loaded(jnp.asarray(ids, jnp.int32))),
                                 reread(torch.as_tensor(ids)).logits.numpy(), atol=1e-4, rtol=0)
      np.testing.assert_allclose(reread(torch.as_tensor(ids)).logits.numpy(), outputs[name],
                                 atol=1e-4, rtol=0)


@pytest.mark.slow
def test_mixed_batch_generation_equals_each_row_alone(data_dir, adapters):
  model = _jqlora(data_dir, adapters)
  ids = _ids(data_dir).tolist()
  prompts = [ids[0][:5], ids[1], ids[2][:11], ids[3][:3]]
  names = ["second", "default", "__base__", "narrow"]
  kw = dict(max_new_tokens=12, stop_ids=[-1])

  def alone(prompt, name):
    """``prompt`` decoded in a batch of its own with adapter ``name`` active."""
    if name == "__base__":
      with jqlora.disable_adapters(model):
        return generate_ids(model, [prompt], **kw)[0]
    jqlora.set_adapter(model, name)
    out = generate_ids(model, [prompt], **kw)[0]
    jqlora.set_adapter(model, "default")
    return out

  mixed = generate_ids(model, prompts, adapter_names=names, **kw)
  assert mixed == [alone(p, n) for p, n in zip(prompts, names)]
  assert len({tuple(a) for a in mixed}) == 4 and all(len(a) == 12 for a in mixed)
  assert generate_ids(model, prompts, adapter_names=["default"] * 4, **kw) == \
      generate_ids(model, prompts, **kw)
  with compilations() as n:  # other adapters per row are data: the same compiled decode
    again = generate_ids(model, prompts, adapter_names=names[::-1], **kw)
  assert n[0] == 0
  assert again == [alone(p, n) for p, n in zip(prompts, names[::-1])]
  with pytest.raises(ValueError, match=r"no adapter named 'typo'.*\['default', 'second', 'narrow'\]"):
    generate_ids(model, prompts, adapter_names=["typo"] * 4, **kw)
  with pytest.raises(ValueError, match="3 names for 4 prompts"):
    generate_ids(model, prompts, adapter_names=names[:3], **kw)


@pytest.mark.slow
def test_switching_same_shape_adapters_does_not_recompile_the_train_step(data_dir, adapters):
  model = _jqlora(data_dir, adapters, names=("default", "second"))
  ids = jnp.asarray(_ids(data_dir, 2), jnp.int32)
  batch = {"input_ids": ids, "labels": ids}
  optimizer = jqlora.make_optimizer(model, optax.sgd(1e-1))
  logits = lambda: np.asarray(model(ids))
  before = {}
  for name in ("second", "default"):
    jqlora.set_adapter(model, name)
    before[name] = logits()
  with compilations() as first:
    jqlora.train_step(model, optimizer, batch)  # trains "default"
  assert first[0] > 0  # the counter sees compilations
  trained = logits()
  jqlora.set_adapter(model, "second")
  np.testing.assert_array_equal(logits(), before["second"])  # untouched by the step
  with compilations() as n:
    jqlora.train_step(model, optimizer, batch)  # trains "second": the same compiled step
  assert n[0] == 0
  jqlora.set_adapter(model, "default")
  np.testing.assert_array_equal(logits(), trained)  # switching back loses nothing
  with compilations() as n:
    jqlora.train_step(model, optimizer, batch)
  assert n[0] == 0
  jqlora.set_adapter(model, "second")
  assert np.abs(logits() - before["second"]).max() > 1e-4  # the step trained "second"


@pytest.mark.slow
def test_disabled_adapters_inside_a_jitted_function_give_the_base(data_dir, adapters):
  """DPO's reference pass: the same weights with and without adapters in one compiled function,
  and no gradient through the disabled pass."""
  model = _jqlora(data_dir, adapters, names=("default",))
  ids = jnp.asarray(_ids(data_dir, 2), jnp.int32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def both(state):
    m = nnx.merge(graphdef, state)
    with jqlora.disable_adapters(m):
      base = m(ids)
    return base, m(ids)

  def disabled_sum(lora, rest):
    m = nnx.merge(graphdef, lora, rest)
    with jqlora.disable_adapters(m):
      return m(ids).sum()

  base, adapted = both(state)
  bare = jqlora.load_model(data_dir / "hf" / "tiny-llama" / "base", quantize=False,
                           dtype=jnp.float32, progress=False)
  np.testing.assert_allclose(base, bare(ids), atol=1e-5, rtol=0)
  np.testing.assert_allclose(adapted, model(ids), atol=1e-5, rtol=0)
  assert float(jnp.abs(adapted - base).max()) > 1e-2
  _, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  grads = jax.jit(jax.grad(disabled_sum))(lora, rest)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
  assert not any(m.disabled for _, m in jqlora.nn.lora_modules(model))
