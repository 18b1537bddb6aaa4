"""The processes' shares: of a global batch (a positive multiple of the process count), of the
files (disjoint, complete, and even in training), and of resampled epochs (every file equally
likely in every process)."""
import jax
import numpy as np
import pytest

from data import processes


def test_process_share_is_jax_s_unless_given():
  assert processes.process_share() == (jax.process_index(), jax.process_count())
  assert processes.process_share(None, 4) == (jax.process_index(), jax.process_count())
  assert processes.process_share(2, 4) == (2, 4)


@pytest.mark.parametrize('global_batch_size, process_count, local', [(8, 1, 8), (8, 4, 2),
                                                                     (12, 3, 4)])
def test_local_batch_size_divides_the_global_batch(global_batch_size, process_count, local):
  assert processes.local_batch_size(global_batch_size, process_count) == local


@pytest.mark.parametrize('global_batch_size, process_count', [(6, 4), (0, 1), (-2, 2)])
def test_local_batch_size_names_the_counts_it_refuses(global_batch_size, process_count):
  with pytest.raises(ValueError, match=f'positive multiple of the process count {process_count}, '
                                       f'got {global_batch_size}'):
    processes.local_batch_size(global_batch_size, process_count)


def test_process_files_are_disjoint_complete_and_even_in_training():
  files = [f'{i:05d}.tar' for i in range(6)]
  shares = [processes.process_files(files, i, 3, train=True) for i in range(3)]
  assert sorted(f for share in shares for f in share) == files
  assert [len(share) for share in shares] == [2, 2, 2]
  # uneven: allowed in evaluation (each file read once), refused in training with the numbers
  assert [len(processes.process_files(files, i, 4)) for i in range(4)] == [2, 2, 1, 1]
  with pytest.raises(ValueError, match=r'processes 0\.\.1 would read 2 files, processes 2\.\.3 1; '
                                       r'.* seen 2\.00x as often'):
    processes.process_files(files, 0, 4, train=True)
  with pytest.raises(ValueError, match='6 files cannot feed 7 processes'):
    processes.process_files(files, 0, 7)
  with pytest.raises(ValueError, match=r'process_index must be in \[0, 3\), got 3'):
    processes.process_files(files, 3, 3)


def test_resampled_files_draw_uniformly_and_reproducibly():
  files = [f'{i}.tar' for i in range(5)]
  epoch = processes.resampled_files(files, seed=0, epoch=0, process_index=1, process_count=2)
  assert len(epoch) == 3 and set(epoch) <= set(files)  # ceil(5 / 2)
  assert epoch == processes.resampled_files(files, 0, 0, 1, 2)
  assert epoch != processes.resampled_files(files, 0, 0, 0, 2) or epoch != (
      processes.resampled_files(files, 0, 1, 1, 2))
  draws = [f for e in range(2000) for f in processes.resampled_files(files, 0, e, 0, 2)]
  counts = np.array([draws.count(f) for f in files])
  # 6000 draws of 5 files: each about 1200 (binomial sd ~31), within 5 sd
  assert np.all(np.abs(counts - 1200) < 5 * np.sqrt(6000 * 0.2 * 0.8)), counts
