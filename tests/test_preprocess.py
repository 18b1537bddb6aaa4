"""OpenAI's preprocessing (`clip.preprocess`) against an independent PIL + numpy reimplementation
and against torchvision's own transforms (OpenAI's `_transform`), for many image sizes and modes."""
import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

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


def reference(image, n):
  """Short side to n with integer floor for the long side, bicubic in the image's own mode,
  then RGB, crop by numpy slicing at round-half-even offsets, [0, 1], normalise (float64)."""
  w, h = image.size
  size = (n, n * h // w) if w <= h else (n * w // h, n)
  if size != image.size:
    image = image.resize(size, Image.BICUBIC)
  x = np.asarray(image.convert('RGB'), np.float64) / 255
  top, left = (int(np.round((d - n) / 2)) for d in x.shape[:2])
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
