"""Tiny Llama-family checkpoints from ``tests/data/hf`` as in-memory tensor sources."""

import json

import jax.numpy as jnp
import pytest
from safetensors.numpy import load_file

from jqlora.models import DictSource, LlamaConfig, build_model

MODELS = ("tiny-llama", "tiny-qwen2")


@pytest.fixture(scope="session")
def hf_source(data_dir):
  """``hf_source(name)``: the ``base/`` folder of a tiny model as a ``DictSource``."""

  def make(name: str) -> DictSource:
    folder = data_dir / "hf" / name / "base"
    config = json.loads((folder / "config.json").read_text())
    return DictSource(config, load_file(str(folder / "model.safetensors")))

  return make


@pytest.fixture(scope="session")
def tiny_model(hf_source):
  """``tiny_model(name, quantize=False)``: a fresh float32-compute model."""

  def make(name: str, quantize: bool = False):
    source = hf_source(name)
    return build_model(LlamaConfig.from_hf(source.hf_config()), source, quantize=quantize,
                       dtype=jnp.float32, progress=False)

  return make
