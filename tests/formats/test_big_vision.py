"""big_vision's `.npz` (clip/formats/big_vision.py): a scanned encoder (`scan=True`: each block
parameter stored once, with a leading layer axis) loads as its per-layer checkpoint, and the head
counts are read from the attention kernels of either. Parity of the per-layer layout with
transformers' SiglipModel: tests/formats/test_checkpoint_families.py."""
import re
import warnings

import chex
import numpy as np

import clip
from clip.formats import big_vision
from experiments import checkpoint_families


def _scanned(per_layer):
  """big_vision's scanned layout of a per-layer checkpoint: `encoderblock_{i}/x` -> one
  `encoderblock/x` stacked over i."""
  out, blocks = {}, {}
  for key, value in per_layer.items():
    m = re.fullmatch(r'(.*/)encoderblock_(\d+)/(.*)', key)
    if m:
      blocks.setdefault(f'{m.group(1)}encoderblock/{m.group(3)}', {})[int(m.group(2))] = value
    else:
      out[key] = value
  out.update({key: np.stack([layers[i] for i in sorted(layers)])
              for key, layers in blocks.items()})
  return out


def test_a_scanned_encoder_loads_as_its_layers(tmp_path):
  hf = checkpoint_families.hf_siglip(seed=4)
  checkpoint_families.big_vision_npz(hf, tmp_path / 'layers.npz')
  with np.load(tmp_path / 'layers.npz') as z:
    per_layer = dict(z)
  scanned = _scanned(per_layer)
  assert any('/encoderblock/' in k for k in scanned) and len(scanned) < len(per_layer)
  np.savez(tmp_path / 'scanned.npz', **scanned)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', clip.CheckpointWarning)  # its processing: SigLIP's, assumed
    params, cfg = clip.load(tmp_path / 'layers.npz')
    scanned_params, scanned_cfg = clip.load(tmp_path / 'scanned.npz')
  assert scanned_cfg == cfg
  chex.assert_trees_all_equal(scanned_params, params)
  heads = (hf.config.vision_config.num_attention_heads, hf.config.text_config.num_attention_heads)
  for raw in (per_layer, scanned):
    assert big_vision.heads({k.removeprefix('params/'): v for k, v in raw.items()}) == heads
