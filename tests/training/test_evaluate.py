"""Held-out loss: padding rows added for batch shards leave it unchanged."""

import numpy as np
from flax import nnx

from jqlora.training.data import Example
from jqlora.training.evaluate import eval_loss

from .toy import ToyLM


def _examples(n: int, seed: int = 0) -> list[Example]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(0, 32, size=int(rng.integers(4, 12))).astype(np.int32)
    labels = np.where(rng.random(ids.shape) < 0.3, -100, ids).astype(np.int32)
    out.append(Example(ids, labels))
  return out


def test_rounding_batches_up_to_the_batch_shards_keeps_the_loss():
  model = ToyLM(rngs=nnx.Rngs(0))
  examples = _examples(7)
  plain, plain_ppl = eval_loss(model, examples, batch_size=3, sequence_len=16)
  sizes = []
  padded, padded_ppl = eval_loss(model, examples, batch_size=3, sequence_len=16, multiple_of=4,
                                 place=lambda b: sizes.append(b["input_ids"].shape[0]) or b)
  assert sizes == [4, 4]  # 3 rounded up to 4 rows per batch: 7 examples in 2 batches
  np.testing.assert_allclose(padded, plain, rtol=1e-6)
  np.testing.assert_allclose(padded_ppl, plain_ppl, rtol=1e-6)
  assert np.isfinite(plain) and plain > 0
