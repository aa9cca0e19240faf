"""torch/bitsandbytes CPU arithmetic reproduced bit for bit (jqlora.torch_numerics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.format import nf4, torch_numerics

torch = pytest.importorskip("torch")


@pytest.fixture
def one_thread():
  """torch sums vectors over 32 768 elements in per-thread chunks; pin one thread."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("n", [1, 3, 5, 7, 8, 9, 31, 33, 100, 1000, 8064, 32768, 100_000])
def test_mean_matches_torch(n, one_thread):
  rng = np.random.default_rng(n)
  mean = jax.jit(torch_numerics.mean_f32)
  mismatches = 0
  for _ in range(8):
    x = (rng.random(n) * np.exp(rng.normal(0, 2, n))).astype(np.float32)
    ours = np.asarray(mean(jnp.asarray(x)))
    mismatches += ours.tobytes() != torch.from_numpy(x).mean().numpy().tobytes()
  assert mismatches == 0


def test_mean_differs_from_a_plain_mean():
  # The test above could not fail if any summation order gave torch's bits.
  rng = np.random.default_rng(0)
  differ = 0
  for _ in range(20):
    x = (rng.random(1000) * np.exp(rng.normal(0, 2, 1000))).astype(np.float32)
    differ += (np.asarray(torch_numerics.mean_f32(jnp.asarray(x)))
               != np.float32(np.cumsum(x, dtype=np.float32)[-1] / np.float32(1000)))
  assert differ > 0


def test_dynamic_codes_match_bitsandbytes_quantize_blockwise():
  import bitsandbytes.functional as bnbf

  rng = np.random.default_rng(1)
  x = (rng.standard_normal(256 * 40) * np.exp(rng.normal(0, 1, 256 * 40))).astype(np.float32)
  x[:256] = np.linspace(-1, 1, 256, dtype=np.float32)  # a block on the map's own scale
  code = torch.from_numpy(nf4.DYNAMIC_MAP_SIGNED.copy())
  q, state = bnbf.quantize_blockwise(torch.from_numpy(x), code=code, blocksize=256)
  blocks = x.reshape(-1, 256)
  ours = torch_numerics.dynamic_codes(jnp.asarray(blocks), jnp.asarray(np.abs(blocks).max(1)),
                                      nf4.DYNAMIC_MAP_SIGNED)
  np.testing.assert_array_equal(np.asarray(ours).reshape(-1), q.numpy().reshape(-1))
  np.testing.assert_array_equal(np.abs(blocks).max(1), state.absmax.numpy())


@pytest.mark.parametrize("start,end,steps", [(0.1, 1.0, 65), (-1.0, 1.0, 255), (0.0, 3.3, 1001)])
def test_linspace_matches_torch(start, end, steps):
  ref = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
  assert torch_numerics.linspace_f32(start, end, steps).tobytes() == ref.tobytes()
