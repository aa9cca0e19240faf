"""``save_merged`` and ``jqlora.cli.export``: the adapter folded into the base the model holds."""

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jqlora
from jqlora.cli import export


@pytest.fixture(scope="module")
def tiny(data_dir, tmp_path_factory):
  """(base folder, adapter folder, input ids [2, T], output dir with both merged exports)."""
  base, adapter = data_dir / "hf" / "tiny-llama" / "base", data_dir / "hf" / "tiny-llama" / "adapter"
  ids = np.load(data_dir / "hf" / "tiny-llama" / "reference_logits.npz")["input_ids"]
  out = tmp_path_factory.mktemp("export")
  export(str(base), str(adapter), out / "nf4", merged=True)  # the default: merge_into="nf4"
  export(str(base), str(adapter), out / "original", merged=True, merge_into="original")
  return base, adapter, ids, out


def _logits(path, ids, *, quantize: bool, adapter=None) -> np.ndarray:
  model = jqlora.load_model(path, quantize=quantize, dtype=jnp.float32, progress=False)
  if adapter is not None:
    jqlora.load_adapter(model, adapter)
  return np.asarray(model(jnp.asarray(ids)))


@pytest.mark.slow  # the two exports of `tiny` take ~9 s
def test_merged_export_is_the_nf4_base_the_adapter_trained_against(tiny):
  base, adapter, ids, out = tiny
  qlora = _logits(base, ids, quantize=True, adapter=adapter)  # as `jqlora train` loads it
  merged = _logits(out / "nf4", ids, quantize=False)
  np.testing.assert_allclose(merged, qlora, rtol=0, atol=1e-4)
  assert sorted(p.name for p in (out / "nf4").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.slow  # the two exports of `tiny` take ~9 s
def test_merge_into_original_is_the_full_precision_base_plus_the_adapter(tiny):
  base, adapter, ids, out = tiny
  lora = _logits(base, ids, quantize=False, adapter=adapter)
  original = _logits(out / "original", ids, quantize=False)
  np.testing.assert_allclose(original, lora, rtol=0, atol=1e-4)
  # NF4 rounding moves the answer far more than float32 arithmetic: the two exports differ
  assert np.abs(original - _logits(out / "nf4", ids, quantize=False)).max() > 1e-2


@pytest.mark.slow  # the two exports of `tiny` take ~9 s
def test_merged_weights_are_bitsandbytes_dequantized_nf4_plus_the_peft_delta(tiny):
  """PEFT's ``merge_and_unload`` on a 4-bit base, before it re-quantizes: dequant(W) + s·BA."""
  torch = pytest.importorskip("torch")
  bnb_f = pytest.importorskip("bitsandbytes.functional")
  base, adapter, _, out = tiny
  weights, merged = load_file(str(base / "model.safetensors")), load_file(
      str(out / "nf4" / "model.safetensors"))
  lora = load_file(str(adapter / "adapter_model.safetensors"))
  scale = 16 / 8  # the adapter's lora_alpha / r
  checked = 0
  for name, w in weights.items():
    a_name = "base_model.model." + name.replace(".weight", ".lora_A.weight")
    if a_name not in lora:
      np.testing.assert_array_equal(merged[name], w)  # embeddings, norms, LM head: as stored
      continue
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                        compress_statistics=True)
    w_nf4 = bnb_f.dequantize_4bit(packed, state).numpy()
    delta = scale * lora[a_name.replace("lora_A", "lora_B")] @ lora[a_name]
    np.testing.assert_allclose(merged[name], w_nf4 + delta, rtol=0, atol=1e-6, err_msg=name)
    assert np.abs(merged[name] - w - delta).max() > 1e-4  # not the full-precision merge
    checked += 1
  assert checked == 3 * 7  # every decoder linear of the 3 layers


def test_export_names_a_bad_merge_into(data_dir, tmp_path):
  base, adapter = data_dir / "hf" / "tiny-llama" / "base", data_dir / "hf" / "tiny-llama" / "adapter"
  with pytest.raises(ValueError, match="merge_into must be one of 'nf4', 'original', got 'fp32'"):
    export(str(base), str(adapter), tmp_path / "x", merged=True, merge_into="fp32")
  assert not (tmp_path / "x").exists()
