"""Reading weights files (clip/formats/files.py): nest/flatten, torch / safetensors / .npz /
scenic's .npy, wrappers stripped, pickled code refused, truncated and foreign files named."""
import os

import numpy as np
import pytest
import safetensors.numpy
import torch

import clip
from clip.formats import files

from tests.formats.test_openai import CFG
from tests.formats.test_openai import assert_same_params
from tests.formats.test_openai import state_dict  # pylint: disable=unused-import
from tests.formats.test_openai import torch_model  # pylint: disable=unused-import

def test_nest_flatten_round_trip(state_dict):
  assert files.flatten(files.nest(state_dict)).keys() == state_dict.keys()


def test_open_clip_checkpoint(tmp_path, state_dict):
  wrapped = {'epoch': 3, 'name': 'run', 'state_dict': {
      f'module.{k}': torch.from_numpy(v) for k, v in state_dict.items()}}
  torch.save(wrapped, tmp_path / 'epoch_3.pt')
  params, _ = clip.load(tmp_path / 'epoch_3.pt')
  assert_same_params(params, state_dict)


def test_safetensors_npz_and_scenic_npy(tmp_path, state_dict):
  safetensors.numpy.save_file(state_dict, str(tmp_path / 'm.safetensors'))
  np.savez(tmp_path / 'm.npz', **state_dict)
  np.save(tmp_path / 'm.npy', state_dict, allow_pickle=True)  # scenic's conversion recipe
  for name in ('m.safetensors', 'm.npz', 'm.npy'):
    params, cfg = clip.load(tmp_path / name)
    assert cfg == CFG
    assert_same_params(params, state_dict)


def test_npy_with_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  np.save(tmp_path / 'evil.npy', np.array({'x': Evil()}, dtype=object), allow_pickle=True)
  with pytest.raises(clip.CheckpointError, match='refusing to unpickle'):
    clip.load(tmp_path / 'evil.npy')


def test_truncated_and_foreign_files(tmp_path, state_dict):
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / 'm.pt')
  data = (tmp_path / 'm.pt').read_bytes()
  (tmp_path / 'truncated.pt').write_bytes(data[:len(data) // 2])
  with pytest.raises(clip.CheckpointError, match='not a readable torch checkpoint'):
    clip.load(tmp_path / 'truncated.pt')
  torch.save({'fc.weight': torch.zeros(3, 3)}, tmp_path / 'resnet18.pt')
  with pytest.raises(clip.CheckpointError, match='not a CLIP checkpoint of a known family'):
    clip.load(tmp_path / 'resnet18.pt')
  torch.save(torch.zeros(3), tmp_path / 'tensor.pt')
  with pytest.raises(clip.CheckpointError, match='not a state dict'):
    clip.load(tmp_path / 'tensor.pt')
  with pytest.raises(FileNotFoundError):
    clip.load(tmp_path / 'absent.pt')


def test_atomic_write_replaces_whole_with_open_permissions(tmp_path):
  path = tmp_path / 'sub' / 'f.txt'
  files.atomic_write(str(path), lambda tmp: open(tmp, 'w').write('old'))
  reference = tmp_path / 'plain.txt'
  reference.write_text('x')  # what a plain open() gives under this umask
  assert path.read_text() == 'old'
  assert os.stat(path).st_mode & 0o777 == os.stat(reference).st_mode & 0o777

  def fail(tmp):
    open(tmp, 'w').write('half')
    raise OSError('disk full')
  with pytest.raises(OSError, match='disk full'):
    files.atomic_write(str(path), fail)
  assert path.read_text() == 'old'
  assert sorted(os.listdir(path.parent)) == ['f.txt']  # no temporary left behind
