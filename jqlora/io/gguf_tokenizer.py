"""The tokenizer a llama.cpp ``.gguf`` file describes, rebuilt without PyTorch.

A GGUF carries no ``tokenizer.json``: its metadata holds the vocabulary
(``tokenizer.ggml.tokens``), each token's type, the BPE merges or SentencePiece
scores, the special token ids, and which pre-tokenizer (text splitting) the
vocabulary was trained with (``tokenizer.ggml.pre``). From those this module
builds a ``tokenizers`` pipeline and wraps it in transformers'
``PreTrainedTokenizerFast``; neither imports torch.

Supported ``tokenizer.ggml.model`` values:

* ``gpt2``: byte-level BPE. The text is split as ``tokenizer.ggml.pre`` says
  (see ``BYTE_LEVEL_PRE_TOKENIZERS``), then each piece is spelled in GPT-2's
  byte alphabet and merged.
* ``llama``: SentencePiece-style BPE over ``▁``-spelled text with byte fallback
  (``<0xNN>`` tokens) and, unless ``tokenizer.ggml.add_space_prefix`` is false,
  a space put before the text; merges come from the file or, when absent, from
  the token scores (the higher the merged token's score, the earlier it merges).

Tokens typed control (and unknown) become special added tokens, user-defined
ones plain added tokens: both are matched whole in the text, never split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gguf
from tokenizers import (
  AddedToken,
  Regex,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
)
from transformers import PreTrainedTokenizerFast

from jqlora.io.gguf import GGUFSource

__all__ = ["BYTE_LEVEL_PRE_TOKENIZERS", "SUPPORTED_TOKENIZER_MODELS", "gguf_tokenizer"]

_K = gguf.Keys.Tokenizer
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# Text splitting of Llama 3 style vocabularies: contractions, letters with one leading
# non-letter, 1-3 digits, punctuation runs, newline runs, other whitespace.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: as Llama 3, but every digit on its own.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2() -> pre_tokenizers.PreTokenizer:
  """GPT-2's own split (contractions, `` ?letters``, `` ?digits``, `` ?symbols``, spaces)."""
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
  """Every digit on its own, then GPT-2's split on the rest (StarCoder, SmolLM)."""
  return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
  def build() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  return build


#: ``tokenizer.ggml.pre`` -> (builder of the pre-tokenizer, BPE ``ignore_merges``), as
#: llama.cpp reads these names. A file without the key is split as ``gpt-2``.
BYTE_LEVEL_PRE_TOKENIZERS: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool]] = {
    **dict.fromkeys(("gpt-2", "phi-2"), (_gpt2, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), (_digits_then_gpt2, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"),
                    (_split_then_bytes(_LLAMA3_SPLIT), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"),
                    (_split_then_bytes(_QWEN2_SPLIT), False)),
}

#: ``tokenizer.ggml.model`` values this module builds.
SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")


def _merges(source: GGUFSource) -> list[tuple[str, str]] | None:
  """``tokenizer.ggml.merges`` (``"left right"`` strings) as pairs, or None if absent."""
  raw = source.metadata(_K.MERGES)
  if raw is None:
    return None
  pairs = [tuple(m.split(" ")) for m in raw]
  bad = next((m for m, p in zip(raw, pairs) if len(p) != 2), None)
  if bad is not None:
    raise ValueError(f"{source.path}: {_K.MERGES} entry {bad!r} is not two tokens "
                     "separated by one space")
  return pairs


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float],
                        mergeable: Sequence[bool]) -> list[tuple[str, str]]:
  """BPE merges of a SentencePiece vocabulary: every split of a mergeable token into two
  vocabulary tokens, the highest-scoring merged token first (ties: lower id first)."""
  ids = {t: i for i, t in enumerate(tokens)}
  ranked = []
  for i, (token, score, ok) in enumerate(zip(tokens, scores, mergeable)):
    if not ok:
      continue
    for k in range(1, len(token)):
      left, right = token[:k], token[k:]
      if left in ids and right in ids:
        ranked.append((-score, i, k, (left, right)))
  return [pair for *_, pair in sorted(ranked)]


def _byte_level_backend(source: GGUFSource, vocab: dict[str, int]) -> Tokenizer:
  pre = source.metadata(_K.PRE, "gpt-2")
  if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
    raise ValueError(
        f"{source.path}: {_K.PRE} {pre!r} is not supported (supported: "
        f"{', '.join(sorted(BYTE_LEVEL_PRE_TOKENIZERS))})")
  merges = _merges(source)
  if merges is None:
    raise KeyError(f"{source.path}: GGUF metadata key {_K.MERGES!r} is missing "
                   "(a byte-level BPE vocabulary needs its merges)")
  build_pre, ignore_merges = BYTE_LEVEL_PRE_TOKENIZERS[pre]
  backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
  backend.pre_tokenizer = build_pre()
  backend.decoder = decoders.ByteLevel()
  return backend


def _sentencepiece_backend(source: GGUFSource, vocab: dict[str, int], tokens: list[str],
                           types: list[int], unk: str | None) -> Tokenizer:
  merges = _merges(source)
  if merges is None:
    scores = source.metadata(_K.SCORES)
    if scores is None:
      raise KeyError(f"{source.path}: GGUF metadata keys {_K.MERGES!r} and {_K.SCORES!r} are "
                     "missing (a SentencePiece vocabulary needs one of them)")
    merges = _merges_from_scores(tokens, scores, [t == gguf.TokenType.NORMAL for t in types])
  backend = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  prefix = bool(source.metadata(_K.ADD_PREFIX, True))
  # SentencePiece's dummy prefix: every stretch of text (the whole text, or the text after
  # an added token) starts with a space, even one that already does; spaces become "▁".
  backend.normalizer = normalizers.Sequence(
      ([normalizers.Prepend(_SPACE)] if prefix else []) + [normalizers.Replace(" ", _SPACE)])
  steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  return backend


def _token(source: GGUFSource, tokens: list[str], key: str) -> str | None:
  """The token whose id is stored under ``key``, or None if the key is absent."""
  index = source.metadata(key)
  if index is None:
    return None
  if not 0 <= int(index) < len(tokens):
    raise ValueError(f"{source.path}: {key} = {index} is outside the vocabulary "
                     f"(0..{len(tokens) - 1})")
  return tokens[int(index)]


def gguf_tokenizer(source: GGUFSource) -> PreTrainedTokenizerFast:
  """The tokenizer ``source``'s metadata describes (see the module docstring).

  Args:
    source: an open GGUF file.

  Returns:
    A ``PreTrainedTokenizerFast`` whose ids are the file's token ids, with its
    bos/eos/unk/pad tokens, the file's ``add_bos_token``/``add_eos_token``
    behaviour for ``add_special_tokens=True``, and its chat template (if any).

  Raises:
    ValueError: an unsupported ``tokenizer.ggml.model`` or ``tokenizer.ggml.pre``, or a
      malformed merge or special token id (naming the file and key).
    KeyError: a required key is missing (named).
  """
  kind = source.metadata(_K.MODEL)
  if kind not in SUPPORTED_TOKENIZER_MODELS:
    found = "missing" if kind is None else repr(kind)
    raise ValueError(f"{source.path}: {_K.MODEL} is {found}; supported tokenizer models: "
                     f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}")
  tokens = list(source.metadata(_K.LIST))
  types = list(source.metadata(_K.TOKEN_TYPE, [gguf.TokenType.NORMAL] * len(tokens)))
  if len(types) != len(tokens):
    raise ValueError(f"{source.path}: {_K.TOKEN_TYPE} has {len(types)} entries for "
                     f"{len(tokens)} tokens")
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"{source.path}: {_K.LIST} holds the same token more than once")
  special = {name: _token(source, tokens, key) for name, key in
             (("bos_token", _K.BOS_ID), ("eos_token", _K.EOS_ID), ("unk_token", _K.UNK_ID),
              ("pad_token", _K.PAD_ID))}
  if kind == "gpt2":
    backend = _byte_level_backend(source, vocab)
  else:
    backend = _sentencepiece_backend(source, vocab, tokens, types, special["unk_token"])

  special_types = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
  controls = [t for t, k in zip(tokens, types) if k in special_types]
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
  backend.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED])

  add_bos = bool(source.metadata(_K.ADD_BOS, kind == "llama")) and special["bos_token"] is not None
  add_eos = bool(source.metadata(_K.ADD_EOS, False)) and special["eos_token"] is not None
  bos = [special["bos_token"]] if add_bos else []
  eos = [special["eos_token"]] if add_eos else []
  backend.post_processor = processors.TemplateProcessing(
      single=[*bos, "$A", *eos], pair=[*bos, "$A", *eos, *[f"{t}:1" for t in bos], "$B:1",
                                       *[f"{t}:1" for t in eos]],
      special_tokens=list({t: vocab[t] for t in bos + eos}.items()))

  kwargs: dict[str, Any] = {k: v for k, v in special.items() if v is not None}
  return PreTrainedTokenizerFast(
      tokenizer_object=backend, add_bos_token=add_bos, add_eos_token=add_eos,
      chat_template=source.metadata(_K.CHAT_TEMPLATE), clean_up_tokenization_spaces=False,
      additional_special_tokens=controls, **kwargs)
