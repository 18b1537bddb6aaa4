"""Fixed-shape batching for the evaluation loops: every row mapped once, in order, by one compiled
program whatever the last batch's size; bad batch sizes and empty inputs refused."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip import batching


def test_batches_cover_the_rows_in_order():
  assert list(batching.batches(7, 3, 'rows')) == [(0, 3), (3, 6), (6, 7)]
  assert list(batching.batches(3, 8, 'rows')) == [(0, 3)]


def test_padded_repeats_the_first_row_to_a_fixed_size():
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(batching.padded(x, 4), [[0, 1, 2], [3, 4, 5], [0, 1, 2],
                                                        [0, 1, 2]])
  assert batching.padded(x, 2) is x


@pytest.mark.parametrize('n, batch_size', [(10, 4), (8, 4), (3, 16), (1, 1)])
def test_map_batches_equals_the_function_on_all_rows_and_compiles_once(n, batch_size):
  x_NxD = np.random.default_rng(n).standard_normal((n, 5)).astype(np.float32)
  w_DxK = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
  chex.clear_trace_counter()  # the counter is per function's code, shared by the parameters
  fn = jax.jit(chex.assert_max_traces(lambda x: jnp.tanh(x @ w_DxK), n=1))
  got = batching.map_batches(fn, x_NxD, batch_size, 'rows')
  assert got.shape == (n, 2) and isinstance(got, np.ndarray)
  np.testing.assert_allclose(got, np.tanh(x_NxD @ w_DxK), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('batch_size', [0, -1, 2.0, True])
def test_bad_batch_sizes_and_no_rows_are_refused(batch_size):
  with pytest.raises(ValueError, match=f'positive int, got {batch_size!r}'):
    batching.check_batch(4, batch_size, 'images')
  with pytest.raises(ValueError, match='no images given'):
    batching.check_batch(0, 4, 'images')
  assert batching.check_batch(3, 8, 'images') == 3 and batching.check_batch(9, 8, 'images') == 8
