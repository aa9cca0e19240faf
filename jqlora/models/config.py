"""``LlamaConfig``: the hyper-parameters of a Llama-family model, to and from ``config.json``.

Llama 2/3/3.1 (llama3 RoPE scaling), Mistral (sliding window), Qwen2 (q/k/v
biases) and SmolLM2 share one config; ``from_hf`` reads transformers' keys (old
and new RoPE styles), ``to_hf`` writes a dict transformers loads.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

__all__ = ["LlamaConfig", "SUPPORTED_MODEL_TYPES", "LINEARS", "NORMS", "LINEAR_AXES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}

#: (submodule, linear) of each decoder layer, in Hugging Face naming.
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
           ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
           ("mlp", "down_proj"))
NORMS = ("input_layernorm", "post_attention_layernorm")
#: Logical axes ``(out, in)`` of each decoder-layer linear (``jqlora.nn.variables.axes``):
#: q/k/v and gate/up are column-parallel, o and down row-parallel under the default rules.
LINEAR_AXES = {"self_attn.q_proj": ("heads", "embed"), "self_attn.k_proj": ("kv_heads", "embed"),
               "self_attn.v_proj": ("kv_heads", "embed"), "self_attn.o_proj": ("embed", "heads"),
               "mlp.gate_proj": ("mlp", "embed"), "mlp.up_proj": ("mlp", "embed"),
               "mlp.down_proj": ("embed", "mlp")}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama-family model (transformers' names).

  Attributes:
    rope_scaling: None, or ``{"rope_type": "linear", "factor": f}`` or
      ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}``.
    qkv_bias / o_bias / mlp_bias: which linears have a bias (Qwen2: qkv only).
    sliding_window: attend to at most this many previous tokens (Mistral), or None.
    hf: the original ``config.json`` dict, kept for ``to_hf``.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  hf: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LlamaConfig: {name} must be a positive integer, got {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_key_value_heads})")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")

  @classmethod
  def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
    """Reads a transformers ``config.json`` dict (rope settings old or new style).

    Raises:
      ValueError: unsupported ``model_type``, activation or RoPE type, or a missing key.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r}: jqlora supports "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.1, Mistral, Qwen2, "
                       "SmolLM2)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")

    def need(key):
      if cfg.get(key) is None:
        raise ValueError(f"config.json: missing required key {key!r} for model_type {model_type!r}")
      return cfg[key]

    heads = int(need("num_attention_heads"))
    rope = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    scaling = rope or legacy
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in _ROPE_TYPES:
      raise ValueError(f"config.json: rope_type {rope_type!r} is not supported; jqlora supports "
                       f"{', '.join(_ROPE_TYPES)}")
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
      raise ValueError("config.json: Qwen2 with use_sliding_window=True is not supported")
    sliding = cfg.get("sliding_window") if model_type == "mistral" else None
    attention_bias = bool(cfg.get("attention_bias", False))
    return cls(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or need("hidden_size") // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
        rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **scaling},
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=None if sliding is None else int(sliding),
        hf=dict(cfg),
    )

  def to_hf(self) -> dict[str, Any]:
    """A ``config.json`` dict that transformers loads (old and new rope keys both written)."""
    out = {k: v for k, v in copy.deepcopy(self.hf).items()
           if k not in ("rope_scaling", "rope_parameters")}
    rope = {"rope_type": "default", **(self.rope_scaling or {})}
    out.update(
        architectures=[_ARCHITECTURES[self.model_type]],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.head_dim,
        hidden_act="silu",
        rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta,
        rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
        rope_parameters={**rope, "rope_theta": self.rope_theta},
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings,
    )
    if self.model_type == "llama":
      out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    if self.model_type == "mistral":
      out.update(sliding_window=self.sliding_window)
    return out

  def linear_shapes(self) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each decoder-layer linear, keyed ``"self_attn.q_proj"`` etc."""
    d, i, dh = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_attention_heads * dh, self.num_key_value_heads * dh
    return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (i, d), "mlp.up_proj": (i, d),
            "mlp.down_proj": (d, i)}

  def has_bias(self, linear: str) -> bool:
    """Whether the decoder-layer linear ``"self_attn.q_proj"`` etc. has a bias."""
    if linear.startswith("mlp."):
      return self.mlp_bias
    return self.o_bias if linear.endswith("o_proj") else self.qkv_bias
