"""How the processes share the input: each yields its share of every global batch, and reads its
own share of the files, or draws its own when resampled.

Training cycles each process's own files, so the processes must share them evenly: a file count
the process count does not divide would have the processes with fewer files see their examples
more often (webdataset#434); it is refused with the numbers, unless `resampled=True` draws each
process's files with replacement from all of them (webdataset's `resampled=True`, open_clip's
`--dataset-resampled`: every example equally likely in every process).
"""
import jax
import numpy as np


def process_share(process_index=None, process_count=None):
  """`(process_index, process_count)` as given, or jax's own when either is None."""
  if process_index is None or process_count is None:
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def local_batch_size(global_batch_size, process_count):
  """Each process's share of a global batch, `global_batch_size // process_count`. Raises
  ValueError naming both unless the batch is a positive multiple of the process count."""
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size must be a positive multiple of the process count '
                     f'{process_count}, got {global_batch_size}')
  return global_batch_size // process_count


def process_files(files, process_index, process_count, train=False):
  """This process's share of the files: every `process_count`-th one from `process_index`. In
  training (endless epochs, each process cycling its own share) the shares must be equal: a
  process with fewer files would see each of its examples more often (ValueError)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}')
  if len(files) < process_count:
    raise ValueError(f'{len(files)} files cannot feed {process_count} processes: each process '
                     'reads whole files; write at least one shard per process, or draw them '
                     'with resampled=True (--data-resampled)')
  more = len(files) % process_count
  if train and more:
    fewer = len(files) // process_count
    raise ValueError(
        f'{len(files)} files cannot be shared evenly by {process_count} processes: '
        f'{_processes(0, more - 1)} would read {fewer + 1} files, '
        f'{_processes(more, process_count - 1)} {fewer}; as each process cycles its own files in '
        f'training, the examples of the latter would be seen {(fewer + 1) / fewer:.2f}x as often '
        '(for files of equal size). Write a multiple of the process count in shards, or pass '
        'resampled=True (--data-resampled) to draw each process\'s files with replacement '
        'from all of them')
  return files[process_index::process_count]


def _processes(first, last):
  return f'process {first}' if first == last else f'processes {first}..{last}'


def resampled_files(files, seed, epoch, process_index, process_count):
  """A resampled epoch of one process: ceil(len(files) / process_count) files drawn uniformly with
  replacement from all `files`, a function of (seed, epoch, process_index), so that the
  processes' epochs draw about as many files as there are, each file equally likely in each."""
  rng = np.random.default_rng([seed, epoch, process_index, 0x5A3D])
  draws = -(-len(files) // process_count)
  return [files[i] for i in rng.integers(len(files), size=draws)]
