"""KV-cache generation equals step-by-step full recomputation; stop tokens and sampling.

Generation on a model sharded over 8 CPU devices runs this file as a script in
a subprocess (``XLA_FLAGS`` must be set before JAX starts), which prints JSON.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

import jqlora
from jqlora.generate import generate, generate_ids

pytestmark = pytest.mark.slow  # decodes the default model; a subprocess on 8 devices


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


# -- subprocess: a model sharded over a (2, 2, 2) mesh of 8 CPU devices --------------------

def _sharded_worker(model_dir: pathlib.Path) -> dict:
  """Greedy and sampled ids from an NF4 + LoRA model, on one device and sharded."""
  import jax
  from flax import nnx

  from jqlora import parallel

  assert len(jax.devices()) == 8, jax.devices()
  model = jqlora.load_model(model_dir, quantize=True, dtype=jnp.float32, progress=False)
  jqlora.apply_lora(model, jqlora.LoraConfig(r=8), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for _, m in jqlora.nn.lora_modules(model):  # B = 0 would leave the adapters unused
    m.lora_b.set_value(jnp.asarray(0.05 * rng.normal(size=m.lora_b.get_value().shape),
                                   jnp.float32))
  model.eval()
  prompts = [[5, 17, 99, 3], [42, 7], list(range(10, 30))]  # widths 16 and 32 after bucketing

  def run():
    greedy = generate_ids(model, prompts, max_new_tokens=6, stop_ids=[2])
    sampled = generate_ids(model, prompts, max_new_tokens=6, stop_ids=[2], temperature=1.0,
                           seed=1)
    return {"greedy": greedy, "sampled": sampled}

  out = {"single": run()}
  parallel.shard_model(model, parallel.make_mesh(data=2, fsdp=2, tensor=2))
  q = model.layers.self_attn.q_proj
  out["weight_shards"] = sorted(parallel.shard_shapes(q.weight.get_value().packed))
  out["sharded"] = run()
  return out


def test_generation_on_a_sharded_model_equals_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["weight_shards"] == [[2, 64, 32]]  # [L, out/tensor, in/2/fsdp] on each device
  assert result["sharded"] == result["single"]
  greedy, sampled = result["single"]["greedy"], result["single"]["sampled"]
  assert [len(g) for g in greedy] == [6, 6, 6] and greedy != sampled


if __name__ == "__main__":
  from training.meshable import write_meshable_model

  with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps(_sharded_worker(write_meshable_model(pathlib.Path(tmp), tokenizer=False))))
