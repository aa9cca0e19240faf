"""KV-cache generation equals step-by-step full recomputation; stop tokens and sampling."""

import jax.numpy as jnp
import numpy as np
import pytest

import jqlora
from jqlora.generate import generate, generate_ids


@pytest.fixture(scope="module")
def model(data_dir):
  m = jqlora.load_model(data_dir / "hf" / "tiny-llama" / "base", quantize=True, dtype=jnp.float32,
                        progress=False)
  m.eval()
  return m


def _greedy_reference(model, prompt, n):
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(jnp.argmax(model(jnp.asarray([ids], jnp.int32))[0, -1])))
  return ids[len(prompt):]


def test_batched_cached_greedy_equals_full_recomputation(model):
  prompts = [[5, 17, 99, 3], [42, 7], [8, 9, 10, 11, 12, 13, 14]]  # left-padded to one width
  out = generate_ids(model, prompts, max_new_tokens=6, stop_ids=[511])
  for p, o in zip(prompts, out):
    assert o == _greedy_reference(model, p, 6)


def test_stops_at_a_stop_token_and_tiny_top_p_is_greedy(model):
  prompt = [[5, 17, 99, 3]]
  greedy = generate_ids(model, prompt, max_new_tokens=6, stop_ids=[511])[0]
  stopped = generate_ids(model, prompt, max_new_tokens=6, stop_ids=[greedy[2]])[0]
  assert stopped == greedy[:greedy.index(greedy[2]) + 1]
  nucleus = generate_ids(model, prompt, max_new_tokens=6, stop_ids=[511], temperature=1.0,
                         top_p=1e-6, seed=3)[0]
  assert nucleus == greedy
  sampled = [generate_ids(model, prompt, max_new_tokens=6, stop_ids=[511], temperature=2.0,
                          seed=s)[0] for s in range(3)]
  assert len({tuple(s) for s in sampled}) > 1  # really samples


def test_text_generation_uses_the_chat_template(model):
  from training.toy import char_tokenizer

  tok = char_tokenizer()
  [answer] = generate(model, tok, ["hi"], max_new_tokens=4)
  prompt = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
               add_special_tokens=False)["input_ids"]
  expected = _greedy_reference(model, prompt, 4)
  assert answer == tok.decode(expected, skip_special_tokens=True).strip()
