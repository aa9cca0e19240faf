"""A bitsandbytes FP4 folder saved by transformers loads in jqlora as stored and gives its logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jqlora
from jqlora.io.hf import HFSource

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.slow  # quantizes and saves a model with transformers


@pytest.fixture(scope="module", params=[True, False], ids=["double_quant", "plain"])
def fp4_folder(request, data_dir, tmp_path_factory):
  """(folder saved by transformers + bitsandbytes FP4 on the CPU, before any forward; dense float32
  logits over bitsandbytes' own ``dequantize_4bit`` weights; bitsandbytes' own logits; input ids)."""
  base = data_dir / "hf/tiny-llama/base"
  ids = np.load(data_dir / "hf/tiny-llama/reference_logits.npz")["input_ids"]
  config = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=request.param,
      bnb_4bit_compute_dtype=torch.float32)
  quantized = transformers.AutoModelForCausalLM.from_pretrained(
      base, dtype=torch.float32, quantization_config=config)
  folder = tmp_path_factory.mktemp("bnb-fp4")
  quantized.save_pretrained(folder)

  dense = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
  modules = dict(dense.named_modules())
  count = 0
  for name, module in quantized.named_modules():
    if isinstance(module, bnb.nn.Linear4bit):
      module.support_avx512bf16_for_cpu = False  # bitsandbytes' float32 CPU path
      w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
      modules[name].weight.data = w.float().reshape(modules[name].weight.shape)
      count += 1
  assert count == 7 * 3
  with torch.no_grad():
    ref = dense.eval()(input_ids=torch.as_tensor(ids)).logits.numpy()
    theirs = quantized.eval()(input_ids=torch.as_tensor(ids)).logits.float().numpy()
  return folder, ref, theirs, ids


def test_folder_is_fp4_as_transformers_saves_it(fp4_folder, data_dir):
  folder, *_ = fp4_folder
  qc = json.loads((folder / "config.json").read_text())["quantization_config"]
  assert qc["bnb_4bit_quant_type"] == "fp4" and qc["load_in_4bit"]
  saved = load_file(str(folder / "model.safetensors"))
  name = "model.layers.1.mlp.down_proj.weight"
  state = json.loads(bytes(saved[f"{name}.quant_state.bitsandbytes__fp4"]))
  assert state["quant_type"] == "fp4" and state["shape"] == [128, 320]
  assert not any(k.endswith("bitsandbytes__nf4") for k in saved)

  t = HFSource(folder).get_nf4(name)
  assert t.quant_type == "fp4" and t.double_quant == qc["bnb_4bit_use_double_quant"]
  assert np.asarray(t.packed).reshape(-1).tobytes() == saved[name].tobytes()
  # bitsandbytes quantized on the CPU: jqlora's FP4 of the float weight is the same bytes.
  w = load_file(str(data_dir / "hf/tiny-llama/base/model.safetensors"))[name]
  ours = jqlora.quantize_4bit(jnp.asarray(w), "fp4", state["blocksize"], t.double_quant)
  assert ours.to_bnb(name).keys() == {k for k in saved if k.startswith(name + ".") or k == name}
  for key, value in ours.to_bnb(name).items():
    if key.endswith("bitsandbytes__fp4"):
      assert json.loads(bytes(value)) == {**state, "dtype": "float32"}
    else:
      np.testing.assert_array_equal(value, saved[key], err_msg=key)


def test_logits_match_a_dense_forward_over_bitsandbytes_weights(fp4_folder):
  folder, ref, theirs, ids = fp4_folder
  model = jqlora.load_model(folder, dtype=jnp.float32, progress=False)
  leaves = jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, jqlora.NF4Tensor))
  kinds = [leaf.quant_type for leaf in leaves if isinstance(leaf, jqlora.NF4Tensor)]
  assert kinds == ["fp4"] * 7  # the seven stacked linear weights, kept as stored
  got = np.asarray(model(jnp.asarray(ids)))
  assert got.shape == ref.shape
  assert np.abs(got - ref).max() < 1e-3
  assert np.abs(theirs - ref).max() < 1e-3  # bitsandbytes' own FP4 forward agrees too
