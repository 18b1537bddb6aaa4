"""data/transforms.py: the tf.data image transforms against their PIL / torchvision twins."""
import io
import itertools

import chex
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import clip
from clip import configs
from clip import preprocess
from data import transforms
from tests.data.test_tfrecords import one_level
from tests.data.test_tfrecords import smooth_image

# Shrinking, growing, square, one side at the size, odd halves (crop and pad offsets round).
SIZES_HW = [(20, 33), (57, 21), (24, 24), (100, 37), (13, 90), (31, 32), (7, 5), (123, 124)]


def test_resized_size_is_the_preprocess_rule_on_tensors():
  """One rule, one argument order: torchvision's Resize(n) as `clip.preprocess` computes it."""
  sizes = list(itertools.product(range(1, 90, 7), range(1, 90, 11)))
  for (width, height), n_px in itertools.product(sizes, (16, 24, 224)):
    got = tuple(int(x) for x in transforms.resized_size(width, height, n_px))
    assert got == preprocess.resized_size(width, height, n_px), (width, height, n_px)
  assert tuple(np.asarray(transforms.resized_size(640, 427, 224))) == (335, 224)


@pytest.mark.parametrize('mode, interpolation, crop_rounding', list(itertools.product(
    configs.RESIZE_MODES, configs.INTERPOLATIONS, configs.CROP_ROUNDINGS)))
def test_eval_transform_is_pil_preprocess_within_one_level(mode, interpolation, crop_rounding):
  """Every resize mode, interpolation and crop rounding, normalised with another mean and std,
  equals `clip.preprocess.preprocess_image` (PIL) of the same image within one uint8 level."""
  config = clip.PreprocessConfig((0.3, 0.5, 0.7), (0.5, 0.25, 0.4), mode, interpolation,
                                 fill_color=114, crop_rounding=crop_rounding)
  rng = np.random.default_rng(0)
  for (height, width), n_px in itertools.product(SIZES_HW, (16, 23)):
    image = smooth_image(rng, height, width)
    got = transforms.normalize_image(transforms.eval_transform(tf.constant(image), n_px, config),
                                     config.mean, config.std)
    chex.assert_trees_all_close(got.numpy(), preprocess.preprocess_image(image, n_px, config),
                                atol=one_level(config))


def transparent_pngs(rng):
  """PNG bytes of an RGBA image (a photo-like one, alpha from opaque to clear) and of a palette
  image with a transparent colour."""
  alpha = np.linspace(0, 255, 19)[None, :, None] * np.linspace(1, 0, 30)[:, None, None]
  rgba = np.concatenate([smooth_image(rng, 30, 19), alpha.astype(np.uint8)], -1)
  palette = Image.fromarray(smooth_image(rng, 21, 34)).convert('P', palette=Image.ADAPTIVE,
                                                                colors=16)
  out = []
  for image, options in ((Image.fromarray(rgba, 'RGBA'), {}), (palette, {'transparency': 3})):
    buffer = io.BytesIO()
    image.save(buffer, 'PNG', **options)
    out.append(buffer.getvalue())
  return out


@pytest.mark.parametrize('mode', configs.RESIZE_MODES)
def test_convert_first_composites_transparency_onto_white_as_pil(mode):
  """`convert_first` (transformers' `convert_to_rgb`): transparency onto white before the
  resize, as `clip.preprocess` does, within one uint8 level; exactly PIL's before resizing."""
  config = clip.PreprocessConfig(resize_mode=mode, convert_first=True, crop_rounding='floor')
  for data in transparent_pngs(np.random.default_rng(3)):
    image = Image.open(io.BytesIO(data))
    decoded = transforms.decode(tf.constant(data), on_white=True).numpy()
    np.testing.assert_array_equal(decoded, np.asarray(preprocess.rgb_on_white(image)))
    assert not np.array_equal(decoded, transforms.decode(tf.constant(data)).numpy())  # on white
    got = transforms.normalize_image(transforms.eval_transform(decoded, 16, config), config.mean,
                                     config.std)
    chex.assert_trees_all_close(got.numpy(), preprocess.preprocess_image(image, 16, config),
                                atol=one_level(config))


def test_the_modes_differ_where_they_should():
  """A wide image: the centre crop, the squash and the padded resize are three images; one of
  the model's size is left as it is by each."""
  image = tf.constant(smooth_image(np.random.default_rng(1), 20, 40))
  out = {mode: transforms.eval_transform(image, 16, clip.PreprocessConfig(resize_mode=mode,
                                                                          fill_color=7)).numpy()
         for mode in configs.RESIZE_MODES}
  for a, b in itertools.combinations(configs.RESIZE_MODES, 2):
    assert np.abs(out[a].astype(int) - out[b]).max() > 20, (a, b)
  np.testing.assert_array_equal(out['longest'][:4], 7)  # 40x20 -> 16x8, 4 rows of fill above
  np.testing.assert_array_equal(out['longest'][12:], 7)
  same = smooth_image(np.random.default_rng(2), 16, 16)
  for mode, interpolation in itertools.product(configs.RESIZE_MODES, configs.INTERPOLATIONS):
    config = clip.PreprocessConfig(resize_mode=mode, interpolation=interpolation)
    np.testing.assert_array_equal(transforms.eval_transform(tf.constant(same), 16, config), same)


def test_normalize_image_is_the_models_normalisation():
  """uint8 -> float32 with the model's mean and std: `clip.processing.normalize(x / 255, cfg)`."""
  image = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  cfg = clip.CLIPConfig(16, clip.VisionConfig('vit', 5, 1, 1, 8, 4), clip.TextConfig(8, 1, 1, 8),
                        preprocess=clip.PreprocessConfig((0.1, 0.2, 0.3), (0.5, 0.4, 0.3)))
  got = transforms.normalize_image(tf.constant(image), cfg.preprocess.mean, cfg.preprocess.std)
  chex.assert_trees_all_close(got.numpy(), clip.processing.normalize(image / np.float32(255), cfg),
                              atol=1e-6)
