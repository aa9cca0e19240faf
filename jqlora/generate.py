"""Batched generation with the KV cache: greedy, temperature and top-p sampling, EOS stop.

Prompts of different lengths are left-padded; padding gets segment id 0 so no
real token attends to it, and each row's positions start at 0 on its first
real token. Prefill and every decoding step run in one compiled function (one per
prompt-width bucket and ``max_new_tokens``), whose loop ends as soon as every row
has produced a stop token.

A model sharded over a mesh (``jqlora.parallel.shard_model``) decodes on that
mesh: the prompts are replicated on it and the generated tokens come back
replicated. With ``jax.distributed`` every process calls ``generate`` with the
same prompts in the same order (the compiled function runs in lockstep) and
each reads all the answers.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.nn import adapter_rows, route_adapters
from jqlora.parallel import replicate

__all__ = ["generate", "generate_ids", "stop_token_ids", "render_prompt"]

#: The prompt of an alpaca record, for tokenizers without a chat template.
_ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
  """EOS plus the end-of-turn tokens of common chat templates that the vocabulary has."""
  vocab = tokenizer.get_vocab()
  ids = {tokenizer.eos_token_id} | {vocab[t] for t in _END_OF_TURN if t in vocab}
  return sorted(i for i in ids if i is not None)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
  """The text that asks the model for the next assistant turn after ``messages``."""
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  user = messages[-1]["content"]
  instruction, _, extra = user.partition("\n\n")
  return _ALPACA_PROMPT.format(instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Next tokens ``[B]`` from float32 logits ``[B, V]``: argmax when temperature is 0."""
  scaled = logits / jnp.maximum(temperature, 1e-6)
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # keep the smallest set of top tokens whose mass reaches top_p (always the first)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  sampled = jax.random.categorical(key, jnp.where(scaled >= cutoff, scaled, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _mesh(state: Any) -> Mesh | None:
  """The mesh of a sharded model's state; None when no array spans several devices."""
  for x in jax.tree.leaves(state):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
      return s.mesh
  return None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(graphdef: nnx.GraphDef, max_new_tokens: int, out_sharding: NamedSharding | None,
              state: Any, ids: jax.Array, lengths: jax.Array, stop_ids: jax.Array,
              key: jax.Array, temperature: jax.Array, top_p: jax.Array,
              pad_id: jax.Array, rows: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Generated ids ``[B, max_new_tokens]`` int32 and the decoding steps run (int32 scalar).

  ``rows``: int32 ``[B]`` adapter slot of each row (``jqlora.nn.adapter_rows``), or None
  for the active adapter; slots are data, so other adapters of the same shapes reuse the
  compiled function.

  The loop stops once every row has produced a stop token; the columns after that hold
  ``pad_id``, as a stopped row's do. Step ``i`` samples with the ``i``-th split of ``key``
  whether or not the loop ends early, so the tokens are those of a full-length decode.
  Both outputs have ``out_sharding`` when given.
  """
  model = nnx.merge(graphdef, state)
  if rows is not None:
    route_adapters(model, rows)
  b, p = ids.shape
  pad = p - lengths[:, None]
  col = jnp.arange(p)[None, :]
  segment_ids = (col >= pad).astype(jnp.int32)
  positions = jnp.maximum(col - pad, 0).astype(jnp.int32)
  cache = model.init_cache(b, p + max_new_tokens)
  logits, cache = model(ids, positions=positions, segment_ids=segment_ids, cache=cache)
  ones = jnp.ones((b, 1), jnp.int32)

  def pick(i, logits, done, key, tokens):
    """Samples step ``i``'s tokens ``[B]`` into column ``i`` of ``tokens``."""
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad_id, _sample(logits, sub, temperature, top_p))
    return token, done | jnp.isin(token, stop_ids), key, tokens.at[:, i].set(token)

  def running(carry):
    i, done = carry[0], carry[3]
    return (i < max_new_tokens) & ~done.all()

  def step(carry):
    """Feeds step ``i - 1``'s tokens to the model and samples step ``i``'s."""
    i, token, cache, done, key, tokens = carry
    logits, cache = model(token[:, None], positions=(lengths + i - 1)[:, None],
                          segment_ids=ones, cache=cache)
    token, done, key, tokens = pick(i, logits[:, -1], done, key, tokens)
    return i + 1, token, cache, done, key, tokens

  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  token, done, key, tokens = pick(0, logits[:, -1], jnp.zeros((b,), bool), key, tokens)
  steps, *_, tokens = jax.lax.while_loop(running, step, (jnp.int32(1), token, cache, done, key, tokens))
  if out_sharding is None:
    return tokens, steps
  return jax.lax.with_sharding_constraint((tokens, steps), out_sharding)


def _decode(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            stop_ids: Sequence[int], pad_id: int, temperature: float, top_p: float,
            seed: int, adapter_names: Sequence[str] | None = None) -> tuple[list[list[int]], int]:
  """``generate_ids``' answers and the number of decoding steps run (at most ``max_new_tokens``)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt and no empty prompt")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must not be negative, got {max_new_tokens}")
  rows = None
  if adapter_names is not None:
    if len(adapter_names) != len(prompts):
      raise ValueError(f"adapter_names has {len(adapter_names)} names for {len(prompts)} prompts; "
                       "give one per prompt ('__base__': no adapter)")
    rows = adapter_rows(model, adapter_names)
  if max_new_tokens == 0:
    return [[] for _ in prompts], 0
  width = -(-max(len(p) for p in prompts) // 16) * 16  # bucketed: fewer compilations
  ids = np.full((len(prompts), width), pad_id, np.int32)
  for row, p in enumerate(prompts):
    ids[row, width - len(p):] = p
  graphdef, state = nnx.split(model)
  args = (ids, np.asarray([len(p) for p in prompts], np.int32), np.asarray(stop_ids, np.int32),
          jax.random.key(seed), np.float32(temperature), np.float32(top_p), np.int32(pad_id), rows)
  mesh, replicated = _mesh(state), None
  if mesh is not None:  # global arrays, the same on every process
    replicated = NamedSharding(mesh, P())
    args = replicate(args, mesh)
  # one device, or replicated: every process reads its first local copy
  tokens, steps = _generate(graphdef, max_new_tokens, replicated, state, *args)
  tokens, steps = np.asarray(tokens.addressable_data(0)), int(steps.addressable_data(0))
  stop, out = set(stop_ids), []
  for row in tokens.tolist():
    stops = [i for i, t in enumerate(row) if t in stop]
    out.append(row[:stops[0] + 1] if stops else row)
  return out, steps


def generate_ids(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_ids: Sequence[int], pad_id: int = 0, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, verbose: bool = False,
                 adapter_names: Sequence[str] | None = None) -> list[list[int]]:
  """Continues each token prompt until a stop token or ``max_new_tokens``.

  Decoding ends as soon as every sequence has stopped.

  Args:
    model: a jqlora model (``init_cache`` and ``cache=`` support), on one device
      or sharded over a mesh (multi-process: every process passes the same prompts).
    prompts: token ids, one list per sequence (lengths may differ).
    max_new_tokens: the most tokens generated per sequence.
    stop_ids: tokens that end a sequence (kept in the output).
    pad_id: filler after a sequence has stopped.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_p: nucleus sampling mass (1.0: the whole distribution).
    seed: sampling seed.
    verbose: print the tokens generated, the seconds taken (compilation included) and the
      tokens per second to stderr.
    adapter_names: one adapter name per prompt (PEFT's mixed batch; ``"__base__"``: no
      adapter), or None for the model's active adapter. Each row's tokens are those of
      decoding it alone with that adapter active (``jqlora.nn.set_adapter``).

  Returns:
    The generated ids of each sequence, up to and including its stop token.
  """
  start = time.perf_counter()
  out, steps = _decode(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                       pad_id=pad_id, temperature=temperature, top_p=top_p, seed=seed,
                       adapter_names=adapter_names)
  if verbose:
    seconds, n = time.perf_counter() - start, sum(len(o) for o in out)
    print(f"generated {n} tokens for {len(out)} prompt{'s' * (len(out) != 1)} in {seconds:.2f} s "
          f"({n / seconds:.1f} tokens/s; {steps} of at most {max_new_tokens} decoding steps)",
          file=sys.stderr)
  return out


def generate(model: nnx.Module, tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]], *,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, chat: bool = True, verbose: bool = False,
             adapter_names: Sequence[str] | None = None) -> list[str]:
  """Answers each prompt (a user message, or a list of chat messages) as text.

  Args:
    model: a jqlora model, in eval mode.
    tokenizer: its transformers tokenizer (the chat template formats prompts).
    prompts: user messages, or full message lists ending with a user turn.
    max_new_tokens, temperature, top_p, seed, verbose, adapter_names: see ``generate_ids``.
    chat: format prompts with the chat template (False: use the text as is).

  Returns:
    The decoded answers, special tokens removed.
  """
  texts = []
  for p in prompts:
    if chat:
      messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
      texts.append(render_prompt(tokenizer, messages))
    else:
      texts.append(p)
  add_special = not (chat and getattr(tokenizer, "chat_template", None))
  ids = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = generate_ids(model, ids, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer),
                     pad_id=pad_id, temperature=temperature, top_p=top_p, seed=seed, verbose=verbose,
                     adapter_names=adapter_names)
  return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
