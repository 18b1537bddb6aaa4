"""Which sequence length and how many images each NaFlex training step gets (numpy only).

SigLIP 2's NaFlex variant trains at several sequence lengths (max_num_patches, e.g. 256 to 1024;
Tschannen et al. 2025, "SigLIP 2", sec. 2.4.2); open_clip's NaFlex training batches by a token
budget. A `NaFlexBatching` is that plan as a pure function of the step: the length of step `g` is
drawn from `seq_lengths` by a hash of `(seed, g)`, and its batch size is either fixed
(`batch_size`) or the token budget's (`tokens_per_batch // S`, rounded down to a multiple of
`batch_multiple`, the batch shards). Every pipeline (the built-in data, tfrecord / webdataset
shards, tfds) reads the same plan, so a run's batches do not depend on which one feeds it, and a
resumed run finds its place from the step alone (`examples_before`). Each length is one shape of
the train step: one compile per length (`shapes`).
"""
import dataclasses

import numpy as np

BATCHINGS = ('fixed', 'budget')
_MASK64 = (1 << 64) - 1


def _splitmix64(x_u64):
  """SplitMix64's finaliser (Steele et al. 2014) over uint64 arrays: a well-mixed hash."""
  with np.errstate(over='ignore'):
    z = x_u64 + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _positive_int(value, name):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}')
  return int(value)


@dataclasses.dataclass(frozen=True)
class NaFlexBatching:
  """The per-step plan of a NaFlex run.

  Attributes:
    patch_size: P, pixels per patch side (the model's `cfg.vision.patch_size`).
    seq_lengths: the sequence lengths S (patches per image after padding, max_num_patches) a step
      may get; one is drawn per step, uniformly, by a hash of (seed, step). Sorted, no repeats.
    batch_size: 'fixed' batching: images per step (global), whatever S.
    tokens_per_batch: 'budget' batching: patches per step (global); step g has
      `tokens_per_batch // S(g)` images, rounded down to a multiple of `batch_multiple`.
    batch_multiple: every batch size is a multiple of it (the mesh's batch shards times the
      processes' count where each process holds equal shares).
    seed: the draw of the lengths.

  Raises:
    ValueError (at construction, before anything compiles): no lengths, a length below 1 (a
      patch budget below one patch per image), both or neither of batch_size and
      tokens_per_batch, a fixed batch_size that batch_multiple does not divide, a token budget
      that gives some length fewer than batch_multiple images.
  """
  patch_size: int
  seq_lengths: tuple[int, ...]
  batch_size: int | None = None
  tokens_per_batch: int | None = None
  batch_multiple: int = 1
  seed: int = 0

  def __post_init__(self):
    _positive_int(self.patch_size, 'patch_size')
    _positive_int(self.batch_multiple, 'batch_multiple')
    lengths = self.seq_lengths
    if isinstance(lengths, (int, np.integer)) or not len(lengths):
      raise ValueError(f'seq_lengths must be a non-empty sequence of patch counts per image (e.g. '
                       f'(64, 128, 256)), got {lengths!r}')
    for s in lengths:
      if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
        raise ValueError(f'every sequence length must be an int >= 1 (a budget of at least one '
                         f'patch per image), got {s!r} in seq_lengths {tuple(lengths)}')
    object.__setattr__(self, 'seq_lengths', tuple(sorted({int(s) for s in lengths})))
    if (self.batch_size is None) == (self.tokens_per_batch is None):
      raise ValueError('NaFlexBatching takes exactly one of batch_size (fixed batching) and '
                       f'tokens_per_batch (token-budget batching), got batch_size='
                       f'{self.batch_size!r}, tokens_per_batch={self.tokens_per_batch!r}')
    if self.batch_size is not None:
      _positive_int(self.batch_size, 'batch_size')
      if self.batch_size % self.batch_multiple:
        raise ValueError(f'batch_size {self.batch_size} is not a multiple of batch_multiple '
                         f'{self.batch_multiple} (the batch shards)')
    else:
      _positive_int(self.tokens_per_batch, 'tokens_per_batch')
      longest = self.seq_lengths[-1]
      if self.tokens_per_batch // longest < self.batch_multiple:
        raise ValueError(f'tokens_per_batch {self.tokens_per_batch} fits '
                         f'{self.tokens_per_batch // longest} image(s) of the longest length '
                         f'{longest}; every step needs at least batch_multiple '
                         f'{self.batch_multiple} (the batch shards): give at least '
                         f'{longest * self.batch_multiple}')

  @property
  def batching(self):
    """'fixed' or 'budget'."""
    return 'fixed' if self.batch_size is not None else 'budget'

  def seq_len(self, step):
    """S of step `step` (an int, or an int array of steps -> int64 array)."""
    steps = np.asarray(step, np.int64)
    if (steps < 0).any():
      raise ValueError(f'steps must be >= 0, got {step!r}')
    key = (np.uint64(self.seed & _MASK64) * np.uint64(0x100000001B3)) ^ steps.astype(np.uint64)
    with np.errstate(over='ignore'):
      index = _splitmix64(key) % np.uint64(len(self.seq_lengths))
    out = np.asarray(self.seq_lengths, np.int64)[index.astype(np.int64)]
    return int(out) if np.ndim(step) == 0 else out

  def batch_size_for(self, seq_len):
    """Images in a step of length `seq_len` (int or int array)."""
    s = np.asarray(seq_len, np.int64)
    if self.batch_size is not None:
      out = np.full(s.shape, self.batch_size, np.int64)
    else:
      out = self.tokens_per_batch // s // self.batch_multiple * self.batch_multiple
    return int(out) if np.ndim(seq_len) == 0 else out

  def step_shape(self, step):
    """`(batch_size, seq_len)` of step `step`."""
    s = self.seq_len(step)
    return self.batch_size_for(s), s

  def shapes(self):
    """Every `(batch_size, seq_len)` a step can have, one per length: the train step's shapes,
    hence its compiles."""
    return [(self.batch_size_for(s), s) for s in self.seq_lengths]

  def examples_before(self, step):
    """Images the steps before `step` consume in total (where a resumed run's data starts)."""
    step = int(step)
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    if self.batch_size is not None:
      return step * self.batch_size
    total, chunk = 0, 1 << 20
    for start in range(0, step, chunk):
      steps = np.arange(start, min(step, start + chunk), dtype=np.int64)
      total += int(self.batch_size_for(self.seq_len(steps)).sum())
    return total

  def padding_fraction(self, spatial_shapes_Nx2, seq_len):
    """The share of a batch's S * N patch slots that are padding, given its images' grids."""
    real = np.asarray(spatial_shapes_Nx2, np.int64).prod(-1).sum()
    return 1.0 - float(real) / (seq_len * len(spatial_shapes_Nx2))
