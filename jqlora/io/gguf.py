"""llama.cpp GGUF files as a ``TensorSource``.

Tensors come back under Hugging Face names, dequantized to float32 one at a
time (Q4_0, Q4_1, Q8_0, the K-quants, F16, BF16, F32: whatever
``gguf.quants.dequantize`` handles). llama.cpp stores the query and key
projections of llama-architecture models with the rows of each head permuted
(its RoPE pairs adjacent elements); they are permuted back to Hugging Face's
half-split order. The model config is rebuilt from the GGUF metadata.
``get_slice`` reads and dequantizes only the rows it needs (GGUF blocks run along
rows, so whole rows); every read adds to ``jqlora.io.reads.READS``.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import gguf
import numpy as np

from jqlora.format import NF4Tensor
from jqlora.io.reads import READS
from jqlora.models.source import Index

__all__ = ["GGUFSource", "SUPPORTED_ARCHITECTURES"]

#: GGUF ``general.architecture`` -> (transformers model_type, architecture class, q/k permuted).
SUPPORTED_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED = object()


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face name of a llama.cpp tensor name, or None if it has none."""
  m = _LAYER_RE.fullmatch(gguf_name)
  if m:
    layer, kind, param = m.groups()
    return f"model.layers.{layer}.{_PER_LAYER[kind]}.{param}" if kind in _PER_LAYER else None
  stem, _, param = gguf_name.rpartition(".")
  return f"{_TOP_LEVEL[stem]}.{param}" if stem in _TOP_LEVEL else None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's row order of a query/key projection.

  Within each head llama.cpp interleaves the two RoPE halves (rows ``0, d/2, 1,
  d/2 + 1, …``); Hugging Face keeps them split.

  Args:
    w: ``[n_heads * head_dim, in]`` weight or ``[n_heads * head_dim]`` bias.
    n_heads: heads of this projection (the key/value head count for keys).

  Returns:
    ``w`` with each head's rows back in Hugging Face order.
  """
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
  """A ``TensorSource`` over a llama.cpp ``.gguf`` file (llama or qwen2 architecture).

  Args:
    path: the ``.gguf`` file; it is memory-mapped, and each tensor is
      dequantized only when read.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a GGUF file, an unsupported architecture or tensor, or RoPE scaling.
    KeyError: a required metadata key is missing.
  """

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"{self.path} not found")
    try:
      self._reader = gguf.GGUFReader(self.path, "r")
    except (ValueError, OSError) as e:
      raise ValueError(f"{self.path}: not a readable GGUF file: {e}") from None
    self.arch = self._field("general.architecture")
    if self.arch not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
          f"{self.path}: GGUF architecture {self.arch!r} is not supported "
          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    self._tensors: dict[str, Any] = {}
    for t in self._reader.tensors:
      name = hf_name(t.name)
      if name is None:
        hint = (" (llama 3 RoPE scaling factors: load the Hugging Face folder instead)"
                if t.name.startswith("rope_freqs") else "")
        raise ValueError(f"{self.path}: tensor {t.name!r} has no Hugging Face counterpart{hint}")
      self._tensors[name] = t
    self._config = self._build_config()

  def _field(self, key: str, default: Any = _REQUIRED) -> Any:
    field = self._reader.fields.get(key)
    if field is None:
      if default is _REQUIRED:
        raise KeyError(f"{self.path}: GGUF metadata key {key!r} is missing")
      return default
    return field.contents()

  def _build_config(self) -> dict[str, Any]:
    a = self.arch
    model_type, architecture, _ = SUPPORTED_ARCHITECTURES[a]
    scaling = self._field(f"{a}.rope.scaling.type", "none")
    if scaling != "none":
      raise ValueError(f"{self.path}: RoPE scaling {scaling!r} in GGUF files is not supported")
    hidden = int(self._field(f"{a}.embedding_length"))
    heads = int(self._field(f"{a}.attention.head_count"))
    head_dim = int(self._field(f"{a}.attention.key_length", hidden // heads))
    rotary = int(self._field(f"{a}.rope.dimension_count", head_dim))
    if rotary != head_dim:
      raise ValueError(f"{self.path}: partial RoPE ({rotary} of {head_dim} dims) is not supported")
    tokens = self._reader.fields.get("tokenizer.ggml.tokens")
    embed = self._tensors.get("model.embed_tokens.weight")
    if tokens is not None:
      vocab = len(tokens.data)
    elif embed is not None:
      vocab = int(embed.shape[1])  # GGUF dims are innermost first: [hidden, vocab]
    else:
      raise KeyError(f"{self.path}: GGUF metadata key 'tokenizer.ggml.tokens' is missing "
                     "(it gives the vocabulary size)")
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(self._field(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(self._field(f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(self._field(f"{a}.context_length")),
        "rope_parameters": {"rope_theta": float(self._field(f"{a}.rope.freq_base", 10000.0)),
                            "rope_type": "default"},
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        "hidden_act": "silu",
    }
    for key in ("bos", "eos", "padding"):
      value = self._field(f"tokenizer.ggml.{key}_token_id", None)
      if value is not None:
        config[f"{'pad' if key == 'padding' else key}_token_id"] = int(value)
    return config

  def hf_config(self) -> dict[str, Any]:
    """A transformers ``config.json`` dict rebuilt from the GGUF metadata."""
    return dict(self._config)

  def names(self) -> list[str]:
    """Hugging Face names of every tensor in the file."""
    return sorted(self._tensors)

  def _tensor(self, name: str) -> Any:
    t = self._tensors.get(name)
    if t is None:
      raise KeyError(f"tensor {name!r} is not in {self.path}")
    return t

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    """The Hugging Face shape of ``name`` (``[out, in]``)."""
    return tuple(int(d) for d in reversed(self._tensor(name).shape))  # GGUF: innermost first

  def _rope_heads(self, name: str) -> int | None:
    """Heads whose rows llama.cpp permuted in ``name``, or None."""
    if SUPPORTED_ARCHITECTURES[self.arch][2]:
      if ".q_proj." in name:
        return self._config["num_attention_heads"]
      if ".k_proj." in name:
        return self._config["num_key_value_heads"]
    return None

  def _dequantize(self, t: Any, data: np.ndarray) -> np.ndarray:
    READS.add(data.nbytes)
    try:
      w = gguf.quants.dequantize(data, t.tensor_type)
    except NotImplementedError as e:
      raise ValueError(f"{self.path}: tensor {t.name!r}: {e}") from None
    if np.may_share_memory(w, t.data):  # F32 comes back as a view of the memory-mapped file
      w = w.copy()
    return w.astype(np.float32, copy=False)

  def get(self, name: str) -> np.ndarray:
    """The tensor ``name`` dequantized to float32, in Hugging Face layout (``[out, in]``)."""
    t = self._tensor(name)
    w = self._dequantize(t, t.data).reshape(self.tensor_shape(name))
    heads = self._rope_heads(name)
    return w if heads is None else unpermute_rope_rows(w, heads)

  def get_slice(self, name: str, index: Index) -> np.ndarray:
    """``get(name)[index]``, reading only the (whole) rows in ``index``."""
    t, shape = self._tensor(name), self.tensor_shape(name)
    if len(shape) < 2:
      return self.get(name)[index]
    rows = np.arange(shape[0])
    heads = self._rope_heads(name)
    if heads is not None:  # Hugging Face row r is llama.cpp row perm[r]
      rows = unpermute_rope_rows(rows, heads)
    rows = rows[index[0]]
    data = np.asarray(t.data).reshape(shape[0], -1)  # one row of blocks (or values) per row
    w = self._dequantize(t, data[rows]).reshape(len(rows), *shape[1:])
    return w[(slice(None), *index[1:])]

  def get_nf4(self, name: str) -> NF4Tensor | None:
    """Always None: GGUF quantizations are not NF4, so weights are read as float."""
    return None

  def nf4_info(self, name: str) -> NF4Tensor | None:
    """Always None (see ``get_nf4``)."""
    return None

  def get_nf4_slice(self, name: str, index: Index) -> tuple[np.ndarray, np.ndarray]:
    raise KeyError(f"{self.path}: GGUF files hold no NF4 weights ({name!r})")

  def metadata(self, key: str, default: Any = None) -> Any:
    """A GGUF metadata value (e.g. ``tokenizer.chat_template``), or ``default``."""
    return self._field(key, default)
