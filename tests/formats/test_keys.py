"""The key-table engine (clip/formats/keys.py): packed rows split as torch splits a packed
projection (`Tensor.chunk`, timm's `kv` halves), both directions invert each other, and a key no
row places, or a pack with a part missing, raises."""
import re

import numpy as np
import pytest
import torch

from clip.formats import keys

TABLE = (('blocks.{i}.in_proj_weight', ('layers.{i}.q', 'layers.{i}.k', 'layers.{i}.v'), keys.QKV),
         ('pool.in_proj_weight', ('pool.q', 'pool.kv'), keys.Q_KV),
         ('probe', ('latent',), keys.LEAD1),
         ('proj', ('head.weight',), keys.TRANSPOSE))


def _ours(seed=0):
  rng = np.random.default_rng(seed)
  return {'blocks.0.in_proj_weight': rng.normal(size=(12, 4)),
          'blocks.1.in_proj_weight': rng.normal(size=(12, 4)),
          'pool.in_proj_weight': rng.normal(size=(12, 4)),
          'probe': rng.normal(size=(2, 4)), 'proj': rng.normal(size=(4, 3))}


def test_packs_split_as_torch_and_timm_split_them():
  ours = _ours()
  theirs = keys.to_theirs(ours, TABLE)
  for i in (0, 1):  # nn.MultiheadAttention: q, k, v = in_proj_weight.chunk(3)
    q, k, v = torch.from_numpy(ours[f'blocks.{i}.in_proj_weight']).chunk(3)
    for name, part in zip('qkv', (q, k, v)):
      np.testing.assert_array_equal(theirs[f'layers.{i}.{name}'], part.numpy())
  # timm's AttentionPoolLatent: q from its own Linear, k and v the halves of one `kv` Linear
  q, k, v = torch.from_numpy(ours['pool.in_proj_weight']).chunk(3)
  np.testing.assert_array_equal(theirs['pool.q'], q.numpy())
  np.testing.assert_array_equal(theirs['pool.kv'], torch.cat([k, v]).numpy())
  assert theirs['latent'].shape == (1, 2, 4) and theirs['head.weight'].shape == (3, 4)
  back = keys.to_ours(theirs, TABLE)
  assert back.keys() == ours.keys()
  for key, value in ours.items():
    np.testing.assert_array_equal(back[key], value)


def test_unplaced_keys_and_missing_parts_raise():
  theirs = keys.to_theirs(_ours(), TABLE)
  with pytest.raises(keys.ConversionError, match=r"1 keys with no place.*'layers.0.rotary'"):
    keys.to_ours({**theirs, 'layers.0.rotary': np.zeros(2)}, TABLE)
  passed = keys.to_ours({**theirs, 'layers.0.rotary': np.zeros(2)}, TABLE, strict=False)
  assert 'layers.0.rotary' in passed  # not strict: passed through unchanged
  ignored = re.compile(r'layers\.\d+\.rotary')  # e.g. a constant buffer: dropped
  assert 'layers.0.rotary' not in keys.to_ours(
      {**theirs, 'layers.0.rotary': np.zeros(2)}, TABLE, ignored=ignored)
  del theirs['layers.1.v']
  with pytest.raises(keys.ConversionError, match=r"layers.1.q needs \['layers.1.v'\]"):
    keys.to_ours(theirs, TABLE)
  with pytest.raises(keys.ConversionError, match='leading axis of 1'):
    keys.to_ours({'latent': np.zeros((2, 4))}, TABLE)
