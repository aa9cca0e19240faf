"""gguf_tokenizer against transformers' own GGUF tokenizer (which needs torch to read the file)."""

import pathlib
import unicodedata

import gguf
import pytest
from transformers import AutoTokenizer

from jqlora.io import loading
from jqlora.io.gguf import GGUFSource
from jqlora.io.gguf_tokenizer import gguf_tokenizer

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say we'd've won.",
    "1", "42", "3.14159", "-273.15", "1234567890", "9,876,543,210", "2024-01-31 23:59:59", "v1.2.3",
    "abc123def", "x = 10**6 + 7", "$99.99 (-5%)", "#1 @user !!! ??? ...", "<a href=\"x\">[y]</a>",
    "    four spaces", "tab\there\t\tand  two", "trailing   ", "   ", "\n", "line one\nline two\n\n\nthree",
    "\r\nwindows\r\n", "mixed \t\n whitespace", "café naïve résumé", "Straße ßẞ", "東京は日本の首都です。",
    "Привет, мир", "مرحبا بالعالم", "नमस्ते", "emoji 🙂🚀👨‍👩‍👧 ok", "math: ∑x² ≤ ∞,½¾①", "",
    "def f(x):\n    return x * 2  # double\n", "for (int i = 0; i < n; ++i) { a[i] = i; }",
    "SELECT * FROM t WHERE id=7;", "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>text<|endoftext|>",
    "<repo_name>jqlora<file_sep>a.py", "not<|im_end|>special? <|im_end", "Ġ and Ċ literally",
]
# Whitespace right before a number: llama.cpp and SmolLM2's own tokenizer cut every number
# character off first, so a run of spaces stays one token and " ½" is two; transformers' GGUF
# loader ignores `tokenizer.ggml.pre` "smollm" and splits by GPT-2's rule instead.
NUMBER_AFTER_SPACE = ["x  12", "a   2024", "\n\n1", "total:\t\t7", "  5 apples", "a ½ cup"]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 * 23?"},
     {"role": "assistant", "content": "391"}, {"role": "user", "content": "And 12 +30?\n"}],
    [{"role": "user", "content": "Write code:\n```python\nprint('🙂')\n```"}],
]


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
  return loading.default_model_path()


@pytest.fixture(scope="module")
def source(gguf_path) -> GGUFSource:
  return GGUFSource(gguf_path)


@pytest.fixture(scope="module")
def ours(source):
  return gguf_tokenizer(source)


@pytest.fixture(scope="module")
def reference(gguf_path):
  return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _digits_apart(reference, text: str) -> list[int]:
  """``reference`` run on the text cut before and after every digit (SmolLM2's Digits step)."""
  pieces, current = [], ""
  for c in text:
    if unicodedata.category(c).startswith("N"):
      pieces += [current, c]
      current = ""
    else:
      current += c
  return [i for p in pieces + [current] if p for i in reference.encode(p, add_special_tokens=False)]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, reference, text):
  ids = ours.encode(text)
  assert ids == reference.encode(text)
  assert ids == _digits_apart(reference, text)
  assert ours.decode(ids) == reference.decode(ids) == text
  assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
  assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)


def test_batch_encoding_and_padding_match_transformers(ours, reference):
  got = ours(TEXTS, padding=True)
  want = reference(TEXTS, padding=True)
  assert got["input_ids"] == want["input_ids"]
  assert got["attention_mask"] == want["attention_mask"]
  assert ours.batch_decode(got["input_ids"], skip_special_tokens=True) == \
      reference.batch_decode(want["input_ids"], skip_special_tokens=True)
  assert [ours.decode(ids[:sum(mask)]) for ids, mask in
          zip(got["input_ids"], got["attention_mask"])] == TEXTS


def test_whitespace_before_numbers_is_split_as_smollm(ours, reference):
  for text in NUMBER_AFTER_SPACE:
    ids = ours.encode(text)
    assert ids == _digits_apart(reference, text), text
    assert ids != reference.encode(text), text  # transformers keeps GPT-2's split here
    assert ours.decode(ids) == text
  assert ours.tokenize("x  12") == ["x", "ĠĠ", "1", "2"]
  assert ours.tokenize("12345") == ["1", "2", "3", "4", "5"]


def test_vocabulary_and_special_tokens_match_transformers(ours, reference):
  assert ours.get_vocab() == reference.get_vocab()
  assert len(ours) == len(reference) == 49152
  for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
    assert getattr(ours, name) == getattr(reference, name), name
    assert getattr(ours, f"{name}_id") == getattr(reference, f"{name}_id"), name
  assert (ours.bos_token, ours.eos_token, ours.pad_token_id) == ("<|im_start|>", "<|im_end|>", 2)
  assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == \
      {i: str(t) for i, t in reference.added_tokens_decoder.items()}
  assert all(t.special for t in ours.added_tokens_decoder.values())
  # every control token is special (transformers lists only the named ones here)
  assert sorted(ours.all_special_ids) == list(range(17))
  assert set(reference.all_special_ids) <= set(ours.all_special_ids)
  assert ours.add_bos_token is False and ours.add_eos_token is False
  assert ours.encode("Hi", add_special_tokens=True) == ours.encode("Hi", add_special_tokens=False)


@pytest.mark.parametrize("chat", CHATS, ids=["one-turn", "multi-turn", "code"])
def test_chat_template_matches_transformers(ours, reference, source, chat):
  assert ours.chat_template == reference.chat_template == source.metadata("tokenizer.chat_template")
  text = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  assert text == reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
  got = ours.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
  want = reference.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
  assert got == want == _digits_apart(reference, text)
  assert got.count(1) == len(chat) + 1 + (chat[0]["role"] != "system")  # <|im_start|> per turn


# -- other tokenizer kinds, on small files written here ---------------------------------------

def _write(path: pathlib.Path, tokenizer: dict) -> pathlib.Path:
  """A GGUF holding a tiny llama model's required keys, no tensors, and ``tokenizer`` metadata."""
  w = gguf.GGUFWriter(path, "llama")
  for key, value in {"block_count": 1, "context_length": 8, "embedding_length": 64,
                     "feed_forward_length": 128, "attention.head_count": 2}.items():
    w.add_uint32(f"llama.{key}", value)
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
  for key, value in tokenizer.items():
    if isinstance(value, bool):
      w.add_bool(key, value)
    elif isinstance(value, int):
      w.add_uint32(key, value)
    elif isinstance(value, str):
      w.add_string(key, value)
    else:
      w.add_array(key, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def byte_level_metadata(source) -> dict:
  """SmolLM2's tokenizer metadata cut to its first 3000 tokens (and the merges among them)."""
  keys = ("model", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
  metadata = {f"tokenizer.ggml.{k}": source.metadata(f"tokenizer.ggml.{k}") for k in keys}
  tokens = source.metadata("tokenizer.ggml.tokens")[:3000]
  known = set(tokens)
  merges = [m for m in source.metadata("tokenizer.ggml.merges")
            if m.replace(" ", "") in known and set(m.split(" ")) <= known]
  return {**metadata, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": source.metadata("tokenizer.ggml.token_type")[:3000]}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, byte_level_metadata, pre):
  path = _write(tmp_path / "t.gguf", {**byte_level_metadata, "tokenizer.ggml.pre": pre,
                                      "tokenizer.ggml.add_bos_token": True})
  ours = gguf_tokenizer(GGUFSource(path))
  reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
  for text in TEXTS + NUMBER_AFTER_SPACE:
    assert ours.encode(text) == reference.encode(text), text
  assert ours.encode("Hi")[0] == 1  # add_bos_token: <|im_start|> first


@pytest.mark.parametrize("pre,pieces", [
    ("smollm", ["x", "ĠĠ", "1", "2", "3", "4", "5", "Ġit", "'s"]),
    ("gpt-2", ["x", "Ġ", "Ġ12345", "Ġit", "'s"]),
    ("llama-bpe", ["x", "Ġ", "Ġ", "123", "45", "Ġit", "'s"]),
    ("qwen2", ["x", "Ġ", "Ġ", "1", "2", "3", "4", "5", "Ġit", "'s"]),
])
def test_pre_tokenizer_splits(tmp_path, byte_level_metadata, pre, pieces):
  path = _write(tmp_path / "t.gguf", {**byte_level_metadata, "tokenizer.ggml.pre": pre})
  split = gguf_tokenizer(GGUFSource(path)).backend_tokenizer.pre_tokenizer.pre_tokenize_str
  assert [p for p, _ in split("x  12345 it's")] == pieces


def _sentencepiece_vocab() -> dict:
  """A tiny Llama-style vocabulary: <unk> <s> </s>, 256 byte tokens, scored pieces, one user token."""
  pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "n", "▁h", "he", "ll", "▁he", "llo",
            "▁hell", "▁hello", "▁w", "or", "▁wor", "▁world", "th", "▁th", "▁the", "in", "▁in",
            "▁t", "ld", "<tool>"]
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
  T = gguf.TokenType
  types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * (len(pieces) - 1) + [
      T.USER_DEFINED]
  scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
  return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [int(t) for t in types], "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0, "tokenizer.chat_template": "{{ messages[0]['content'] }}"}


def test_sentencepiece_matches_transformers(tmp_path):
  path = _write(tmp_path / "sp.gguf", _sentencepiece_vocab())
  ours = gguf_tokenizer(GGUFSource(path))
  reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
  texts = ["hello world", "the hello in the world", "hello\nworld", "hello  world ", "héllo 🙂!",
           "the", "hello</s>", ""]
  for text in texts:
    ids = ours.encode(text)
    assert ids == reference.encode(text), text
    assert ours.decode(ids) == reference.decode(ids), text
    assert ours.decode(ids, skip_special_tokens=True) == text.replace("</s>", "")
  assert ours.tokenize("hello world") == ["▁hello", "▁world"]
  assert ours.encode("é", add_special_tokens=False) == [259, 3 + 0xC3, 3 + 0xA9]  # ▁, byte fallback
  assert ours.encode("hi")[0] == 1 and ours.add_bos_token  # llama vocabularies add BOS by default
  assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
  assert ours.chat_template == "{{ messages[0]['content'] }}"


def test_sentencepiece_space_prefix_as_llama_cpp(tmp_path):
  """Like SentencePiece and llama.cpp, a space goes before the text even when it starts with
  one, and before the text after an added token (transformers' GGUF loader does neither)."""
  ours = gguf_tokenizer(GGUFSource(_write(tmp_path / "sp.gguf", _sentencepiece_vocab())))
  assert ours.tokenize("  hello") == ["▁", "▁", "▁hello"]
  assert ours.decode(ours.encode("  hello"), skip_special_tokens=True) == "  hello"
  assert ours.tokenize("hello<tool>world") == ["▁hello", "<tool>", "▁world"]
  assert ours.tokenize("<s>the") == ["<s>", "▁the"]

  path = _write(tmp_path / "np.gguf", {**_sentencepiece_vocab(),
                                       "tokenizer.ggml.add_space_prefix": False,
                                       "tokenizer.ggml.add_bos_token": False,
                                       "tokenizer.ggml.add_eos_token": True})
  ours = gguf_tokenizer(GGUFSource(path))
  assert ours.tokenize("hello world") == ["he", "llo", "▁world"]
  ids = ours.encode("hello world")
  assert ids[-1] == 2 and ids[0] != 1
  assert ours.decode(ids, skip_special_tokens=True) == "hello world"


def test_unsupported_or_broken_metadata_is_named(tmp_path, byte_level_metadata):
  cases = [
      ({**byte_level_metadata, "tokenizer.ggml.model": "bert"}, ValueError,
       r"t\.gguf: tokenizer\.ggml\.model is 'bert'; supported tokenizer models: gpt2, llama"),
      ({k: v for k, v in byte_level_metadata.items() if k != "tokenizer.ggml.model"}, ValueError,
       r"tokenizer\.ggml\.model is missing"),
      ({**byte_level_metadata, "tokenizer.ggml.pre": "tekken"}, ValueError,
       r"tokenizer\.ggml\.pre 'tekken' is not supported \(supported: .*smollm"),
      ({k: v for k, v in byte_level_metadata.items() if k != "tokenizer.ggml.merges"}, KeyError,
       r"'tokenizer\.ggml\.merges' is missing"),
      ({**byte_level_metadata, "tokenizer.ggml.eos_token_id": 50000}, ValueError,
       r"tokenizer\.ggml\.eos_token_id = 50000 is outside the vocabulary \(0\.\.2999\)"),
      ({**byte_level_metadata, "tokenizer.ggml.merges": ["Ġ t", "a b c"]}, ValueError,
       r"tokenizer\.ggml\.merges entry 'a b c' is not two tokens"),
      ({**byte_level_metadata, "tokenizer.ggml.token_type": [1, 1]}, ValueError,
       r"tokenizer\.ggml\.token_type has 2 entries for 3000 tokens"),
      ({**byte_level_metadata, "tokenizer.ggml.tokens": ["a", "b", "a"],
        "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 1}, ValueError,
       r"tokenizer\.ggml\.tokens holds the same token more than once"),
      ({k: v for k, v in _sentencepiece_vocab().items() if k != "tokenizer.ggml.scores"}, KeyError,
       r"'tokenizer\.ggml\.merges' and 'tokenizer\.ggml\.scores' are missing"),
  ]
  for metadata, error, message in cases:
    path = _write(tmp_path / "t.gguf", metadata)
    with pytest.raises(error, match=message):
      gguf_tokenizer(GGUFSource(path))
