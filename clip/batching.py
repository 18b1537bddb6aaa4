"""Fixed-shape batching for the evaluation loops (zero-shot, retrieval, linear-probe features):
consecutive batches with a progress bar, the last one padded so that one compiled program serves
every batch."""
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm


def check_batch(n, batch_size, what):
  """The padded batch size: `batch_size`, or `n` when all fits in one batch."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
  if n == 0:
    raise ValueError(f'no {what} given')
  return min(batch_size, n)

def batches(n, batch_size, desc):
  """`(start, stop)` of consecutive batches, with a progress bar when there are several."""
  starts = range(0, n, batch_size)
  bar = tqdm(starts, desc=desc, unit='batch', disable=len(starts) < 2, leave=False)
  return ((s, min(s + batch_size, n)) for s in bar)

def padded(x, size):
  """`x` with its first axis padded to `size` by repeating its first row (shapes stay fixed)."""
  pad = size - x.shape[0]
  return x if pad == 0 else jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])


def map_batches(fn, x_N, batch_size, desc, what='inputs'):
  """`fn` over consecutive fixed-size batches of the rows of `x_N` (the last one padded, the
  padding's outputs dropped): the outputs' rows concatenated as numpy, one compiled `fn` for
  every batch. Raises ValueError for a bad `batch_size` or no rows."""
  n = x_N.shape[0]
  size = check_batch(n, batch_size, what)
  return np.concatenate([np.asarray(fn(padded(jnp.asarray(x_N[start:stop]), size)))[:stop - start]
                         for start, stop in batches(n, batch_size, desc)])
