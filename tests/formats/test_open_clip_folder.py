"""clip/formats/open_clip_folder.py: `clip.load` of an open_clip folder records its
preprocess_cfg (against open_clip's own transform), open_clip's timm-trunk SigLIP classes load
equal to open_clip, and `clip.save_open_clip` writes a folder open_clip loads equal to ours."""
# pylint: disable=redefined-outer-name
import warnings

import numpy as np
import pytest
import torch

import clip
from clip.formats import export
from clip.formats import openai
from clip.formats.open_clip import config_from_open_clip
from experiments import checkpoint_families
from tests.formats.test_checkpoint_families import _assert_open_clip_equal
from tests.formats.test_checkpoint_families import _inputs
from tests.formats.test_checkpoint_families import _open_clip_vit
from tests.formats.test_checkpoint_families import _siglip_cfg
from tests.test_processing import OPEN_CLIP_PREPROCESS
from tests.test_processing import _nhwc
from tests.test_processing import _read
# Fixtures: open_clip (installed on first use), image files of every size and mode, and an
# open_clip ViT folder with a preprocess_cfg other than the default.
from tests.test_processing import image_files  # pylint: disable=unused-import
from tests.test_processing import oc  # pylint: disable=unused-import
from tests.test_processing import open_clip_vit_folder  # pylint: disable=unused-import

# PIL's note when a palette image with an alpha per entry is converted to RGB.
pytestmark = pytest.mark.filterwarnings('ignore:Palette images with Transparency:UserWarning')


def test_load_open_clip_folder_records_its_preprocess_cfg(oc, open_clip_vit_folder, image_files):
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _, cfg = clip.load(open_clip_vit_folder)
  assert cfg.tokenizer == clip.TokenizerConfig()
  assert cfg.preprocess == clip.PreprocessConfig(**{
      k: tuple(v) if isinstance(v, list) else v for k, v in OPEN_CLIP_PREPROCESS.items()})
  _, _, transform = oc.create_model_and_transforms(f'local-dir:{open_clip_vit_folder}')
  paths = [f.path for f in image_files]
  np.testing.assert_array_equal(clip.preprocess_images(paths, cfg),
                                _nhwc(transform, map(_read, paths)))


def test_open_clip_timm_siglip_equals_open_clip(oc, tmp_path):
  """open_clip's ViT-B-16-SigLIP classes (timm's VisionTransformer with MAP pooling as the trunk,
  the custom text tower), small."""
  m = checkpoint_families.timm_siglip(oc)
  torch.save(m.state_dict(), tmp_path / 'siglip.pt')
  with pytest.warns(clip.CheckpointWarning, match='heads'):
    clip.load(tmp_path / 'siglip.pt')
  cfg = _siglip_cfg(act_vision='gelu', act_text='gelu')
  params, cfg = clip.load(tmp_path / 'siglip.pt', config=cfg)
  images, _ = _inputs(cfg)
  tokens = np.random.default_rng(4).integers(0, 100, (3, 16), np.int32)
  _assert_open_clip_equal(m, params, cfg, tokens)


def test_export_open_clip_folder_loads_in_open_clip(oc, tmp_path):
  m, model_cfg = _open_clip_vit(oc, quick_gelu=False, seed=5)
  cfg = config_from_open_clip(model_cfg)
  params = openai.from_state_dict({k: v.numpy() for k, v in m.state_dict().items()}, cfg)[0]
  with warnings.catch_warnings():
    warnings.simplefilter('error', export.ExportWarning)  # open_clip's own preprocessing
    clip.save_open_clip(params, cfg, tmp_path)
  theirs = oc.create_model(f'local-dir:{tmp_path}').eval()
  _assert_open_clip_equal(theirs, params, cfg)
  again, again_cfg = clip.load(tmp_path)
  assert again_cfg == cfg
