"""KV-cache generation equals step-by-step full recomputation; stop tokens and sampling.

Generation on a model sharded over 8 CPU devices runs this file as a script in
a subprocess (``XLA_FLAGS`` must be set before JAX starts), which prints JSON.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

import jqlora
from jqlora import cli
from jqlora.generate import _decode, generate, generate_ids

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


def _truncated(rows, stop_ids):
  """Each row up to and including its first stop token."""
  out = []
  for row in rows:
    stops = [i for i, t in enumerate(row) if t in stop_ids]
    out.append(row[:stops[0] + 1] if stops else row)
  return out


def test_greedy_decoding_ends_when_every_row_has_stopped(model):
  prompts = [[5, 17, 99, 3], [42, 7], [8, 9, 10, 11, 12, 13, 14]]
  full = [_greedy_reference(model, p, 16) for p in prompts]
  stop_ids = sorted({row[1] for row in full} | {full[0][3]})  # every row stops by step 2
  expected = _truncated(full, stop_ids)
  out, steps = _decode(model, prompts, max_new_tokens=16, stop_ids=stop_ids, pad_id=0,
                       temperature=0.0, top_p=1.0, seed=0)
  assert out == expected
  assert steps == max(len(e) for e in expected) <= 2  # not 16: the loop ended early
  # a row that never stops runs the loop to the end
  never, steps = _decode(model, prompts, max_new_tokens=16, stop_ids=[-1], pad_id=0,
                         temperature=0.0, top_p=1.0, seed=0)
  assert never == full and steps == 16


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (2.0, 0.9)])
def test_sampling_ends_early_with_the_tokens_of_a_full_length_decode(model, temperature, top_p):
  prompts = [[5, 17, 99, 3], [42, 7], list(range(10, 30))]  # two width buckets: 16 and 32
  kw = {"max_new_tokens": 20, "pad_id": 0, "temperature": temperature, "top_p": top_p, "seed": 7}
  full, steps = _decode(model, prompts, stop_ids=[-1], **kw)
  assert steps == 20 and [len(f) for f in full] == [20, 20, 20]
  stop_ids = sorted({row[4] for row in full})
  expected = _truncated(full, stop_ids)
  out, steps = _decode(model, prompts, stop_ids=stop_ids, **kw)
  assert out == expected  # the same per-step keys whether or not the loop ends early
  assert steps == max(len(e) for e in expected) <= 5


def test_max_new_tokens_zero_generates_nothing(model):
  assert generate_ids(model, [[5, 17], [3]], max_new_tokens=0, stop_ids=[2]) == [[], []]


def test_cli_generate_verbose_reports_tokens_and_speed(data_dir, tmp_path, capsys):
  from training.toy import tiny_model_dir

  model_dir = tiny_model_dir(data_dir, tmp_path)
  assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hi", "--prompt", "ho",
                   "--max-new-tokens", "5", "--verbose"]) == 0
  out, err = capsys.readouterr()
  assert len(out.splitlines()) == 2  # one answer per prompt on stdout; the report on stderr
  [report] = [l for l in err.splitlines() if l.startswith("generated ")]
  m = re.fullmatch(r"generated (\d+) tokens for 2 prompts in ([\d.]+) s \(([\d.]+) tokens/s; "
                   r"(\d+) of at most 5 decoding steps\)", report)
  assert m, report
  n, seconds, tokens_per_s, steps = int(m[1]), float(m[2]), float(m[3]), int(m[4])
  assert 2 <= n <= 10 and 1 <= steps <= 5 and seconds > 0
  assert tokens_per_s == pytest.approx(n / seconds, rel=0.05, abs=0.1)
  capsys.readouterr()
  assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hi",
                   "--max-new-tokens", "5"]) == 0
  assert "tokens/s" not in capsys.readouterr().err  # quiet without --verbose


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
