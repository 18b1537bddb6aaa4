"""SigLIP 2 NaFlex (`clip/naflex.py`, `clip/vit_naflex.py`) against transformers: `naflex_preprocess` against
`Siglip2ImageProcessorPil` (pixels, masks and grids, images of three aspect ratios and one larger
than the patch budget, two `max_num_patches`), the per-image position resize against torch's
antialiased bilinear `F.interpolate`, and `encode_image_naflex` against
`Siglip2Model.get_image_features` (a small model, every parameter perturbed, a batch mixing
aspect ratios, at two `max_num_patches`, one compile each)."""
# pylint: disable=redefined-outer-name
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.siglip2 import image_processing_pil_siglip2 as hf_naflex

import clip
from clip import naflex
from clip import vit_naflex
from clip.formats import files
from clip.formats import hf
from experiments import checkpoint_families_recent
from experiments.checkpoint_families_recent import NAFLEX_PATCH as PATCH
from experiments.checkpoint_families_recent import NAFLEX_SIZES as SIZES
from experiments.checkpoint_families_recent import naflex_images as _images

RTOL = 1e-4  # fp32 features, relative to their largest magnitude


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


# ---------------------------------------------------------------- preprocessing

def test_target_size_is_transformers():
  for h, w in [(1, 1), (1, 500), (37, 5), (224, 224), (480, 640), (999, 17)]:
    for p, s in [(4, 16), (8, 25), (16, 256), (14, 729), (16, 1)]:
      assert naflex.target_size(h, w, p, s) == hf_naflex.get_image_size_for_max_num_patches(
          h, w, p, s), (h, w, p, s)


@pytest.mark.parametrize('patch,max_num_patches', [(8, 16), (8, 25), (4, 16)])
def test_preprocess_equals_siglip2_image_processor(tmp_path, patch, max_num_patches):
  """Pixels bit for bit, masks and grids equal; images given as arrays, PIL images and paths."""
  arrays = _images(1)
  Image.fromarray(arrays[2]).save(tmp_path / 'square.png')
  given = [arrays[0], Image.fromarray(arrays[1]), tmp_path / 'square.png', arrays[3]]
  pixels, mask, shapes = clip.naflex_preprocess(given, patch, max_num_patches)
  processor = transformers.Siglip2ImageProcessorPil(patch_size=patch,
                                                    max_num_patches=max_num_patches)
  ref = processor([Image.fromarray(a) for a in arrays], return_tensors='np')
  assert pixels.dtype == np.float32 and mask.dtype == shapes.dtype == np.int32
  np.testing.assert_array_equal(pixels, ref['pixel_values'])
  np.testing.assert_array_equal(mask, ref['pixel_attention_mask'])
  np.testing.assert_array_equal(shapes, ref['spatial_shapes'])
  assert len({tuple(s) for s in shapes.tolist()}) >= 3  # the aspect ratios stay apart


def test_preprocess_refuses_bad_arguments():
  image = _images(0)[0]
  with pytest.raises(TypeError, match='sequence of images'):
    clip.naflex_preprocess(image, 8, 16)
  with pytest.raises(ValueError, match='max_num_patches must be a positive int'):
    clip.naflex_preprocess([image], 8, 0)
  with pytest.raises(ValueError, match='patch_size must be a positive int'):
    clip.naflex_preprocess([image], 8.0, 16)
  with pytest.raises(ValueError, match='no images'):
    clip.naflex_preprocess([], 8, 16)
  with pytest.raises(ValueError, match='needs max_num_patches'):
    clip.naflex_preprocess([image], 8, None, clip.PreprocessConfig())  # not a NaFlex model's
  with pytest.raises(TypeError, match='PreprocessConfig or a clip.CLIPConfig'):
    clip.naflex_preprocess([image], 8, 16, 'siglip')


# ---------------------------------------------------------------- positions

def test_resized_positions_equal_torch_antialiased_bilinear():
  """Up- and down-sampling each axis (1 to 2x the grid), padding rows at the first position."""
  grid, length, width = 5, 40, 6
  table = np.random.default_rng(2).normal(size=(grid * grid, width)).astype(np.float32)
  shapes = np.array([[1, 1], [2, 9], [9, 2], [5, 5], [3, 7], [6, 6], [10, 4]], np.int32)
  ours = np.asarray(jax.jit(vit_naflex.resized_positions, static_argnums=2)(table, shapes, length))
  image = torch.from_numpy(table.reshape(1, grid, grid, width)).permute(0, 3, 1, 2)
  for (h, w), got in zip(shapes.tolist(), ours):
    want = torch.nn.functional.interpolate(image, size=(h, w), mode='bilinear',
                                           align_corners=False, antialias=True)
    want = want[0].permute(1, 2, 0).reshape(h * w, width).numpy()
    np.testing.assert_allclose(got[:h * w], want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got[h * w:], np.broadcast_to(want[0], got[h * w:].shape),
                               rtol=0, atol=2e-6)


# ---------------------------------------------------------------- the image tower

@pytest.fixture(scope='module')
def model():
  """(transformers Siglip2Model, our params, our config) with the same weights."""
  m = checkpoint_families_recent.hf_siglip2_model(seed=3)
  flat = {k: v.detach().numpy() for k, v in m.state_dict().items()}
  params = jax.tree.map(jnp.asarray, files.nest(hf.to_ours(flat, 'siglip2')))
  return m, params, hf.config_from_hf(m.config.to_dict())


def _reference(m, pixels, mask, shapes):
  with torch.no_grad():
    out = m.get_image_features(pixel_values=torch.from_numpy(pixels),
                               pixel_attention_mask=torch.from_numpy(mask),
                               spatial_shapes=torch.from_numpy(shapes))
  return out.pooler_output.numpy()


def test_features_equal_siglip2_model_one_compile_per_length(model):
  """Two batches per max_num_patches (other aspect ratios, noise in the padding of the second)
  compile once per max_num_patches: the grids are traced."""
  m, params, cfg = model
  compiled = naflex._features._cache_size()  # pylint: disable=protected-access
  for max_num_patches in (16, 25):
    for seed, sizes in ((4, SIZES), (5, ((16, 48), (48, 16), (24, 24), (9, 70)))):
      pixels, mask, shapes = clip.naflex_preprocess(_images(seed, sizes), PATCH, max_num_patches)
      if seed == 5:  # the padding must not matter: not in attention, nor in the pooling
        pixels = np.where(mask[..., None] == 0, 3.0, pixels).astype(np.float32)
      ours = clip.encode_image_naflex(params, pixels, mask, shapes, cfg)
      assert ours.shape == (len(sizes), cfg.embed_dim)
      assert _rel_err(ours, _reference(m, pixels, mask, shapes)) < RTOL
    compiled += 1
    assert naflex._features._cache_size() == compiled  # pylint: disable=protected-access


def test_encode_refuses_bad_inputs(model):
  _, params, cfg = model
  pixels, mask, shapes = clip.naflex_preprocess(_images(6), PATCH, 16)
  with pytest.raises(ValueError, match=r'\(N, S, 192\).*patch_size 8'):
    clip.encode_image_naflex(params, pixels[..., :48], mask, shapes, cfg)
  with pytest.raises(ValueError, match='real patches first, then its padding'):
    clip.encode_image_naflex(params, pixels, mask[:, ::-1], shapes, cfg)
  too_many = shapes.copy()
  too_many[0] = (4, 5)
  with pytest.raises(ValueError, match='more patches .* than the 16'):
    clip.encode_image_naflex(params, pixels, mask, too_many, cfg)
  other = shapes.copy()
  other[0] = shapes[0][::-1] - (1, 0)
  with pytest.raises(ValueError, match='spatial_shapes say h \\* w'):
    clip.encode_image_naflex(params, pixels, mask, other, cfg)
  with pytest.raises(ValueError, match=r'spatial_shapes must be \(4, 2\)'):
    clip.encode_image_naflex(params, pixels, mask, shapes[:2], cfg)
  resnet = dataclasses.replace(cfg, vision=clip.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 32))
  with pytest.raises(ValueError, match="NaFlex runs a ViT image tower.*'resnet'"):
    clip.encode_image_naflex(params, pixels, mask, shapes, resnet)
  fields = {f.name: getattr(cfg.vision, f.name) for f in dataclasses.fields(cfg.vision)}
  newer = dataclasses.replace(cfg, vision=_WithNewOption(**fields, new_option=True))
  with pytest.raises(ValueError, match="others only at their defaults.*'new_option'"):
    clip.encode_image_naflex(params, pixels, mask, shapes, newer)


@dataclasses.dataclass(frozen=True)
class _WithNewOption(clip.VisionConfig):
  """A ViT option NaFlex does not know (as a later one would be)."""
  new_option: bool = False


def test_loaded_folder_runs_naflex_as_its_processor(model, tmp_path):
  """clip.load of a Siglip2Model folder with its processor: the processor's mean, std and filter
  recorded, its pixels and the model's features equal transformers' from the same folder."""
  m, _, _ = model
  m.save_pretrained(tmp_path)
  settings = dict(patch_size=PATCH, max_num_patches=25, image_mean=[0.4, 0.5, 0.6],
                  image_std=[0.2, 0.3, 0.25])
  transformers.Siglip2ImageProcessorPil(**settings).save_pretrained(tmp_path)
  with pytest.warns(clip.CheckpointWarning, match='naflex_preprocess keeps their aspect ratio'):
    params, cfg = clip.load(tmp_path)
  assert cfg.preprocess.mean == (0.4, 0.5, 0.6) and cfg.preprocess.std == (0.2, 0.3, 0.25)
  assert cfg.preprocess.max_num_patches == 25
  images = _images(7)
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend='pil')
  ref = processor([Image.fromarray(a) for a in images], return_tensors='np')
  # the folder's patch budget, stated by its processor, is the default
  pixels, mask, shapes = clip.naflex_preprocess(images, cfg.vision.patch_size, None, cfg)
  np.testing.assert_array_equal(pixels, ref['pixel_values'])
  ours = clip.encode_image_naflex(params, pixels, mask, shapes, cfg)
  assert _rel_err(ours, _reference(m, pixels, mask, shapes)) < RTOL
  transformers.Siglip2ImageProcessorPil(**dict(settings, patch_size=16)).save_pretrained(tmp_path)
  with pytest.raises(clip.CheckpointError, match='patch_size 16 is not the model\'s 8'):
    clip.load(tmp_path)
