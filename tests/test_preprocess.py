"""OpenAI's preprocessing (`clip.preprocess`) against an independent PIL + numpy reimplementation
and against torchvision's own transforms (OpenAI's `_transform`), for many image sizes and modes;
transformers' two conventions (`PreprocessConfig.convert_first`: transparency composited onto
white before the resize; `crop_rounding='floor'`) against the same reimplementation."""
import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import dataclasses

import chex
import numpy as np
import pytest
from PIL import Image

import clip
from clip import preprocess

# Normalised units; one grey level is 1/255/std ~ 0.015, so this asks for the same pixels.
TOL = 1e-5
TORCHVISION = 'torchvision==0.28.0'
TORCHVISION_DIR = os.environ.get(
    'TORCHVISION_REFERENCE_DIR', os.path.join(tempfile.gettempdir(), 'jaxclip-torchvision-0.28.0'))

# (width, height): landscape, portrait, smaller than the crop, odd, extreme, already the size.
SIZES = [(64, 43), (33, 50), (20, 13), (37, 35), (200, 9), (32, 32), (32, 77), (45, 32)]
MODES = ['RGB', 'L', 'RGBA', 'P']


def random_image(rng, width, height, mode):
  pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
  image = Image.fromarray(pixels, 'RGBA')
  return image if mode == 'RGBA' else image.convert(mode)


def transparent_image(rng, width, height, mode):
  """A palette image with an alpha per entry, or a grey / RGB image in 4 levels a channel with
  one transparent level or colour, the centre pixel's (as PNG's transparency chunk gives them)."""
  image = random_image(rng, width, height, 'RGB').convert(mode)
  if mode == 'P':
    image.info['transparency'] = bytes(rng.integers(0, 256, 256, dtype=np.uint8))
  else:
    image = Image.fromarray(np.asarray(image) // 64 * 64, mode)
    image.info['transparency'] = image.getpixel((width // 2, height // 2))
  return image


def on_white(image):
  """RGB uint8 of `image`, over white where it says it is transparent (an alpha band or
  `info['transparency']`; not a palette's own alphas, as transformers' `convert_to_rgb`), in
  numpy: c * a + 255 * (1 - a), rounded (alpha from PIL's RGBA conversion, which turns a
  transparent colour or palette entry into alpha)."""
  if 'A' not in image.getbands() and 'transparency' not in image.info:
    return np.asarray(image.convert('RGB'))
  rgba = np.asarray(image.convert('RGBA'), np.float64)
  alpha = rgba[..., 3:] / 255
  return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def reference(image, n, convert_first=False, floor=False):
  """Short side to n with integer floor for the long side, bicubic in the image's own mode,
  then RGB, crop by numpy slicing at round-half-even offsets, [0, 1], normalise (float64).
  `convert_first`: RGB over white first (`on_white`), then the rest; `floor`: crop at the floor of
  half the overhang."""
  if convert_first:
    image = Image.fromarray(on_white(image), 'RGB')
  w, h = image.size
  size = (n, n * h // w) if w <= h else (n * w // h, n)
  if size != image.size:
    image = image.resize(size, Image.BICUBIC)
  x = np.asarray(image.convert('RGB'), np.float64) / 255
  top, left = ((d - n) // 2 if floor else int(np.round((d - n) / 2)) for d in x.shape[:2])
  x = x[top:top + n, left:left + n]
  return (x - np.array(clip.IMAGE_MEAN)) / np.array(clip.IMAGE_STD)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('n', [32, 31])
def test_matches_reference(mode, n):
  rng = np.random.default_rng(n)
  for width, height in SIZES:
    image = random_image(rng, width, height, mode)
    ours = preprocess.preprocess_image(image, n)
    assert ours.dtype == np.float32
    chex.assert_shape(ours, (n, n, 3))
    chex.assert_trees_all_close(ours, reference(image, n).astype(np.float32), atol=TOL, rtol=0)


HF = clip.PreprocessConfig(convert_first=True, crop_rounding='floor')  # transformers' conventions


# PIL's note when OpenAI's order converts a palette with an alpha per entry to RGB, dropping it.
@pytest.mark.filterwarnings('ignore:Palette images with Transparency:UserWarning')
@pytest.mark.parametrize('mode', MODES + ['LA', '1', 'P+alpha', 'L+alpha', 'RGB+alpha'])
@pytest.mark.parametrize('n', [32, 31])
def test_convert_first_and_floor_match_reference(mode, n):
  """Converted to RGB over white before the resize, cropped at the floor: the reference with both
  settings; a setting alone changes what it says it changes (the crop one pixel along the long
  side where the overhang is 3 mod 4; the pixels of transparent images)."""
  rng = np.random.default_rng(n)
  shifted = transparent = 0
  for width, height in SIZES:
    if mode.endswith('+alpha'):
      image = transparent_image(rng, width, height, mode.split('+')[0])
    else:
      image = random_image(rng, width, height, mode)
    ours = preprocess.preprocess_image(image, n, HF)
    chex.assert_trees_all_close(ours, reference(image, n, True, True).astype(np.float32),
                                atol=TOL, rtol=0)
    floor_only = dataclasses.replace(HF, convert_first=False)
    chex.assert_trees_all_close(preprocess.preprocess_image(image, n, floor_only),
                                reference(image, n, False, True).astype(np.float32),
                                atol=TOL, rtol=0)
    convert_only = dataclasses.replace(HF, crop_rounding='round')
    chex.assert_trees_all_close(preprocess.preprocess_image(image, n, convert_only),
                                reference(image, n, True, False).astype(np.float32),
                                atol=TOL, rtol=0)
    overhang = max(preprocess.resized_size(width, height, n)) - n
    shifted += overhang % 4 == 3
    transparent += np.abs(ours - preprocess.preprocess_image(image, n, floor_only)).max() > TOL
  assert shifted > 0  # the sizes exercise both crop placements
  if mode in ('RGBA', 'LA') or mode.endswith('+alpha'):
    assert transparent == len(SIZES)


@pytest.mark.parametrize('mode', MODES + ['LA', '1', 'I;16', 'CMYK'])
def test_rgb_on_white_is_plain_conversion_without_transparency(mode):
  """Opaque images are `convert('RGB')` (a palette image from RGBA keeps its alphas in an RGBA
  palette, which transformers ignores too); those with alpha are composited onto white
  (`on_white`)."""
  rng = np.random.default_rng(3)
  if mode == 'I;16':
    image = Image.fromarray(rng.integers(0, 700, (9, 11), dtype=np.uint16))
  else:
    image = random_image(rng, 11, 9, mode)
  rgb = preprocess.rgb_on_white(image)
  assert rgb.mode == 'RGB'
  np.testing.assert_array_equal(np.asarray(rgb), on_white(image))
  if 'A' not in image.getbands():
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(image.convert('RGB')))


def test_full_resolution_and_batch():
  rng = np.random.default_rng(0)
  images = [random_image(rng, 640, 427, 'RGB'), random_image(rng, 300, 500, 'L')]
  batch = preprocess.preprocess(images, 224)
  chex.assert_shape(batch, (2, 224, 224, 3))
  for image, row in zip(images, batch):
    chex.assert_trees_all_close(row, reference(image, 224).astype(np.float32), atol=TOL, rtol=0)


def test_resize_rule():
  """torchvision's sizes: short side n, long side floor(n * long / short)."""
  assert preprocess.resized_size(640, 427, 224) == (335, 224)
  assert preprocess.resized_size(427, 640, 224) == (224, 335)
  assert preprocess.resized_size(13, 20, 32) == (32, 49)
  for w, h in SIZES:
    r = 224
    expected = (r, r * h // w) if w <= h else (r * w // h, r)
    assert preprocess.resized_size(w, h, r) == expected


def test_paths_arrays_and_pil_agree(tmp_path):
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (41, 57, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'a.png')
  Image.fromarray(pixels).convert('L').save(tmp_path / 'gray.png')
  expected = reference(Image.fromarray(pixels), 32).astype(np.float32)
  batch = preprocess.preprocess([pixels, Image.fromarray(pixels), tmp_path / 'a.png',
                                 str(tmp_path / 'a.png')], 32)
  for row in batch:
    chex.assert_trees_all_close(row, expected, atol=TOL, rtol=0)
  from_batch = preprocess.preprocess(pixels[None], 32)[0]
  chex.assert_trees_all_close(from_batch, expected, atol=TOL, rtol=0)
  gray = reference(Image.fromarray(pixels).convert('L'), 32).astype(np.float32)
  chex.assert_trees_all_close(preprocess.preprocess_image(tmp_path / 'gray.png', 32), gray,
                              atol=TOL, rtol=0)


def test_bad_input(tmp_path):
  (tmp_path / 'not_an_image.png').write_bytes(b'hello')
  with pytest.raises(ValueError, match='not_an_image.png.* as an image'):
    preprocess.preprocess_image(tmp_path / 'not_an_image.png', 32)
  with pytest.raises(FileNotFoundError, match='missing.png'):
    preprocess.preprocess_image(tmp_path / 'missing.png', 32)
  with pytest.raises(TypeError, match='uint8 RGB .* got dtype float32'):
    preprocess.preprocess_image(np.zeros((8, 8, 3), np.float32), 32)
  with pytest.raises(ValueError, match=r'got shape \(8, 8, 4\)'):
    preprocess.preprocess_image(np.zeros((8, 8, 4), np.uint8), 32)
  with pytest.raises(ValueError, match=r'got shape \(8, 8\)'):
    preprocess.preprocess_image(np.zeros((8, 8), np.uint8), 32)
  with pytest.raises(TypeError, match='PIL image, a file path .* got list'):
    preprocess.preprocess_image([1, 2], 32)
  with pytest.raises(TypeError, match='use preprocess_image for a single image'):
    preprocess.preprocess(Image.new('RGB', (8, 8)), 32)
  with pytest.raises(ValueError, match='no images'):
    preprocess.preprocess([], 32)
  with pytest.raises(ValueError, match='positive int .* got 0'):
    preprocess.preprocess_image(Image.new('RGB', (8, 8)), 0)


def _install_torchvision():
  """torchvision's pure-Python transforms, pip-installed --no-deps beside the venv (its wheel's
  compiled ops need a matching CUDA torch, and torch must stay as it is)."""
  if os.path.isdir(os.path.join(TORCHVISION_DIR, 'torchvision', 'transforms')):
    return
  os.makedirs(os.path.dirname(TORCHVISION_DIR), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(TORCHVISION_DIR), prefix='.torchvision-')
  result = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
                           tmp, TORCHVISION], capture_output=True, text=True, check=False)
  if result.returncode:
    shutil.rmtree(tmp, ignore_errors=True)
    pytest.skip(f'could not pip install {TORCHVISION}: {result.stderr[-500:]}')
  try:
    os.rename(tmp, TORCHVISION_DIR)
  except OSError:  # another worker won the race
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope='module')
def torchvision_transforms():
  """`torchvision.transforms` imported under a private package name, without running
  torchvision's `__init__` (which loads the compiled ops); transforms import only PIL and torch."""
  pytest.importorskip('torch')
  _install_torchvision()
  name = '_torchvision_reference'
  if name not in sys.modules:
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [os.path.join(TORCHVISION_DIR, 'torchvision')]
    sys.modules[name] = importlib.util.module_from_spec(spec)
  return importlib.import_module(f'{name}.transforms')


@pytest.mark.parametrize('n', [224, 33])
def test_matches_torchvision(torchvision_transforms, n):
  """OpenAI's `_transform(n)` from clip/clip.py, built from torchvision's real transforms."""
  t = torchvision_transforms
  openai = t.Compose([t.Resize(n, interpolation=t.InterpolationMode.BICUBIC), t.CenterCrop(n),
                      lambda image: image.convert('RGB'), t.ToTensor(),
                      t.Normalize(clip.IMAGE_MEAN, clip.IMAGE_STD)])
  rng = np.random.default_rng(2)
  sizes = [(640, 427), (333, 500), (20, 13), (225, 224), (1000, 51), (224, 224), (35, 37)]
  for (width, height), mode in zip(sizes, MODES * 2):
    image = random_image(rng, width, height, mode)
    expected = openai(image).permute(1, 2, 0).numpy()
    chex.assert_trees_all_close(preprocess.preprocess_image(image, n), expected, atol=TOL, rtol=0)
