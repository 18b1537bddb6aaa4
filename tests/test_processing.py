"""A model's own processing (`clip/processing.py`) against each family's peer library.

- `clip.preprocess_images` against open_clip's eval transform (`image_transform`: every resize
  mode and interpolation) and transformers' `CLIPImageProcessor` / `SiglipImageProcessor`, on
  image files of odd sizes and modes (1x1, 7x300, RGBA, LA, palette, 1-bit, CMYK JPEG, 16-bit
  PNG, WebP, PNG transparency chunks on palette, grey and RGB images), PIL images and uint8
  arrays;
- `clip.get_tokenizer(cfg)` against transformers' `SiglipTokenizer` / `Siglip2Tokenizer`,
  open_clip's `HFTokenizer(clean='canonicalize')` and `tokenize`, on prompts built from the
  zero-shot templates and class names with capitals, accents and punctuation;
- `clip.load` recording each family's tokenizer and preprocessing from the files beside the
  weights, and refusing tokenizers that are unknown or not the model's (Hugging Face folders:
  tests/formats/test_hf_processing.py; open_clip folders: tests/formats/test_open_clip_folder.py;
  a given tokenizer file: tests/formats/test_families.py);
- zero-shot probabilities end to end, from image files and class names through our
  `preprocess_images`, `zero_shot.classifier_weights` and `zero_shot.classify`, against each
  peer's whole pipeline (its processor or transforms, its tokenizer, its model), for small models
  (widths 64, 2 layers, every parameter perturbed) whose vocabularies are tiny SentencePiece
  models trained like SigLIP's and SigLIP 2's (`tests/test_siglip_tokenizer.py`).

transformers' image processors differ from open_clip's (and OpenAI's) by design in two ways:
they convert an image to RGB (compositing transparency on white) before resizing it, and
`CLIPImageProcessor` rounds its centre-crop offset down. `clip.PreprocessConfig` states both
(`convert_first=True`, `crop_rounding='floor'`) and `clip.load` records them for Hugging Face
folders, whose own PIL processors then give our pixels bit for bit on every file; OpenAI's default
stays bit for bit open_clip's.
"""
# pylint: disable=redefined-outer-name
import dataclasses
import json
import os
import shutil
import typing
import warnings

import chex
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers import GemmaTokenizerFast
from transformers import SiglipImageProcessorPil
from transformers import T5TokenizerFast

import clip
from clip.formats import open_clip
from clip.formats import siglip
from clip import preprocess
from experiments import zero_shot as zero_shot_cli
from experiments.references import open_clip as open_clip_reference
from experiments.references import openai as reference
from tests.test_siglip_tokenizer import SIGLIP2_SETTINGS
from tests.test_siglip_tokenizer import hf_tokenize
# Fixtures: the tiny SentencePiece models, transformers' tokenizers on them, and a folder
# holding the SigLIP 2 one as tokenizer.model.
from tests.test_siglip_tokenizer import model_files  # pylint: disable=unused-import
from tests.test_siglip_tokenizer import references  # pylint: disable=unused-import
from tests.test_siglip_tokenizer import siglip2_folder  # pylint: disable=unused-import

# PIL's note when OpenAI's order (open_clip's, and our default) converts a palette image with an
# alpha per entry to RGB, dropping the alpha as they do.
pytestmark = pytest.mark.filterwarnings('ignore:Palette images with Transparency:UserWarning')

R = 32  # every model's image resolution
LEVEL = 1 / 255  # one uint8 level, in pixel units of [0, 1]
FLOAT_SLACK = 1e-6  # float32 rounding of the same pixels normalised two ways
PROB_ATOL = 1e-4  # zero-shot probabilities, end to end (measured: under 1e-6)

# ---------------------------------------------------------------- image files

SIZES = [(1, 1), (7, 300), (300, 7), (257, 129), (33, 33), (40, 29)]  # (width, height)
# (mode, extension); '+tRNS': a PNG transparency chunk (an alpha per palette entry, or one grey
# level or colour that is transparent), which PIL reads into `info['transparency']`.
FORMATS = [('RGB', 'png'), ('RGB', 'jpg'), ('RGB', 'webp'), ('L', 'png'), ('CMYK', 'jpg'),
           ('RGBA', 'png'), ('LA', 'png'), ('P', 'png'), ('1', 'png'), ('I;16', 'png'),
           ('P+tRNS', 'png'), ('L+tRNS', 'png'), ('RGB+tRNS', 'png')]


class ImageFile(typing.NamedTuple):
  path: str
  mode: str  # as PIL reads the file back
  size: tuple[int, int]
  transparent: bool  # an alpha band or a transparency chunk


def _pixels(rng, width, height):
  """uint8 (H, W, 4): smooth colour waves with noise; alpha a ramp from corner to corner."""
  y_HxW, x_HxW = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing='ij')
  phase = rng.uniform(0, 2 * np.pi, 3)
  rgb_HxWx3 = np.stack([127 + 100 * np.sin(2 * np.pi * (k + 1) * (x_HxW + y_HxW / 2) + phase[k])
                        for k in range(3)], axis=-1) + rng.normal(0, 12, (height, width, 3))
  alpha_HxW = 255 * (x_HxW + y_HxW) / 2
  return np.clip(np.dstack([rgb_HxWx3, alpha_HxW]), 0, 255).round().astype(np.uint8)


def _image(rng, width, height, mode):
  rgba = Image.fromarray(_pixels(rng, width, height), 'RGBA')
  if mode == 'I;16':  # 16-bit grey, beyond 8 bits
    grey = np.asarray(rgba.convert('L'), np.uint16)
    return Image.fromarray(grey * 3 + rng.integers(0, 3, grey.shape).astype(np.uint16))
  if mode in ('RGBA', 'LA'):
    return rgba.convert(mode)
  return rgba.convert('RGB').convert(mode)


def _transparent_image(rng, width, height, mode):
  """(image, its PNG transparency chunk): a 32-colour palette whose alphas ramp from 0 to 255, or
  grey levels / colours in steps of 64, the centre pixel's transparent (an area, in every crop)."""
  rgb = Image.fromarray(_pixels(rng, width, height)[..., :3])
  if mode == 'P':
    return rgb.quantize(32), bytes(np.linspace(0, 255, 32).round().astype(np.uint8))
  image = Image.fromarray(np.asarray(rgb.convert(mode)) // 64 * 64)
  centre = np.asarray(image)[height // 2, width // 2]
  return image, int(centre) if mode == 'L' else tuple(int(c) for c in centre)


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  """Every size in every mode and format, written by PIL and read back."""
  folder = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  files = []
  for width, height in SIZES:
    for name, ext in FORMATS:
      path = str(folder / f'{width}x{height}_{name.replace(";", "")}.{ext}')
      mode, chunk = name.split('+')[0], name.endswith('+tRNS')
      if chunk:
        image, transparency = _transparent_image(rng, width, height, mode)
        image.save(path, transparency=transparency)
      else:
        _image(rng, width, height, mode).save(path)
      with Image.open(path) as image:
        files.append(ImageFile(path, image.mode, image.size,
                               'A' in image.getbands() or 'transparency' in image.info))
  assert {(f.mode, f.transparent) for f in files} == {
      (name.split('+')[0], name.endswith('+tRNS') or 'A' in name) for name, _ in FORMATS}
  return files


def _read(path):
  with Image.open(path) as image:
    image.load()
    return image


def _config(preprocess_config=clip.PreprocessConfig()):
  """A small CLIP model config with `preprocess_config`: what `preprocess_images` reads."""
  return clip.CLIPConfig(32, clip.VisionConfig('vit', 64, 1, 1, R, 8),
                         clip.TextConfig(64, 1, 1, 77, 49408), preprocess=preprocess_config)


# ---------------------------------------------------------------- open_clip's transforms

@pytest.fixture(scope='module')
def oc():
  return open_clip_reference.import_open_clip()


PREPROCESS = {  # open_clip's options; 'openai' is open_clip's default eval transform
    'openai': clip.PreprocessConfig(),
    'siglip': siglip.SIGLIP_PREPROCESS,
    'shortest_bilinear': clip.PreprocessConfig(interpolation='bilinear'),
    'squash_bilinear': dataclasses.replace(siglip.SIGLIP_PREPROCESS, interpolation='bilinear'),
    'longest_fill': clip.PreprocessConfig(resize_mode='longest', fill_color=128),
    'longest_bilinear': clip.PreprocessConfig(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4),
                                              resize_mode='longest', interpolation='bilinear'),
}


def _open_clip_transform(oc, name):
  if name == 'openai':
    return oc.transform.image_transform(R, is_train=False)
  p = PREPROCESS[name]
  return oc.transform.image_transform(R, False, p.mean, p.std, resize_mode=p.resize_mode,
                                      interpolation=p.interpolation, fill_color=p.fill_color)


def _nhwc(transform, images):
  with torch.no_grad():
    return np.stack([transform(image).permute(1, 2, 0).numpy() for image in images])


@pytest.mark.parametrize('name', sorted(PREPROCESS))
def test_files_equal_open_clip_transform(name, oc, image_files):
  """open_clip's eval transform runs the same PIL calls on the file's image (resize in its own
  mode, crop or pad, convert to RGB): equal bit for bit."""
  paths = [f.path for f in image_files]
  ours = clip.preprocess_images(paths, _config(PREPROCESS[name]))
  chex.assert_shape(ours, (len(paths), R, R, 3))
  chex.assert_type(ours, np.float32)
  np.testing.assert_array_equal(ours, _nhwc(_open_clip_transform(oc, name), map(_read, paths)))


@pytest.mark.parametrize('name', ['openai', 'siglip', 'longest_fill'])
def test_pil_images_and_uint8_arrays_equal_open_clip(name, oc, image_files):
  """PIL images as given, and uint8 RGB arrays (open_clip takes them as `Image.fromarray`), one
  by one, mixed in a list, and as one (N, H, W, 3) array."""
  transform, cfg = _open_clip_transform(oc, name), _config(PREPROCESS[name])
  images = [_read(f.path) for f in image_files]
  arrays = [np.asarray(image.convert('RGB')) for image in images[::3]]
  mixed = [x for pair in zip(images, arrays) for x in pair]
  theirs = _nhwc(transform, [Image.fromarray(x) if isinstance(x, np.ndarray) else x
                             for x in mixed])
  np.testing.assert_array_equal(clip.preprocess_images(mixed, cfg), theirs)
  batch = np.stack([a for a, f in zip(arrays, image_files[::3]) if f.size == (257, 129)])
  assert len(batch) > 1
  np.testing.assert_array_equal(clip.preprocess_images(batch, cfg),
                                _nhwc(transform, map(Image.fromarray, batch)))


# ---------------------------------------------------------------- transformers' processors

# transformers' conventions, which `clip.load` records for a Hugging Face folder's processor.
HF = {'convert_first': True, 'crop_rounding': 'floor'}
HF_ATOL = FLOAT_SLACK  # ours against transformers' PIL processors (measured: 0, bit for bit)
# {name: (processor class, its settings at R, the PreprocessConfig stating them)}
HF_PROCESSORS = {
    'clip': ('CLIPImageProcessorPil', {'size': {'shortest_edge': R},
                                       'crop_size': {'height': R, 'width': R}},
             clip.PreprocessConfig(**HF)),
    'clip_bilinear': ('CLIPImageProcessorPil', {
        'size': {'shortest_edge': R}, 'crop_size': {'height': R, 'width': R}, 'resample': 2,
        'image_mean': [0.4, 0.5, 0.6], 'image_std': [0.2, 0.3, 0.4]},
                      clip.PreprocessConfig((0.4, 0.5, 0.6), (0.2, 0.3, 0.4),
                                            interpolation='bilinear', **HF)),
    'siglip': ('SiglipImageProcessorPil', {'size': {'height': R, 'width': R}},
               dataclasses.replace(siglip.SIGLIP_PREPROCESS, **HF)),
    'siglip_bilinear': ('SiglipImageProcessorPil', {'size': {'height': R, 'width': R},
                                                    'resample': 2},
                        dataclasses.replace(siglip.SIGLIP_PREPROCESS, interpolation='bilinear',
                                            **HF)),
}


def _pil_processor(name):
  """transformers' PIL image processor `name` of HF_PROCESSORS, and its PreprocessConfig."""
  cls, settings, config = HF_PROCESSORS[name]
  return getattr(transformers, cls)(**settings), config


def _hf_nhwc(processor, images, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # transformers' deprecation notes
    pixels = processor(images=list(images), return_tensors='np', **kwargs)['pixel_values']
  return np.asarray(pixels).transpose(0, 2, 3, 1)


def _assert_hf_equal(ours, theirs):
  np.testing.assert_allclose(ours, theirs, atol=HF_ATOL, rtol=0)


def _levels(ours, theirs, config):
  """Per image, the largest difference in uint8 levels."""
  return np.abs(ours - theirs).max(axis=(1, 2, 3)) * min(config.std) / LEVEL


def _crops_alike(size):
  """torchvision centres the crop at round(d / 2) (half to even), transformers at d // 2: one
  pixel apart when the resized long side overhangs the crop by d = 3 mod 4."""
  return (max(preprocess.resized_size(*size, R)) - R) % 4 != 3


@pytest.mark.parametrize('name', sorted(HF_PROCESSORS))
def test_transformers_image_processors_equal_on_every_file(name, image_files):
  """`convert_first=True, crop_rounding='floor'` is transformers' PIL processor with the same
  settings (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`: what a folder loaded with
  backend='pil' runs) on every file: transparent, palette, 1-bit, 16-bit and CMYK ones, and
  the sizes whose crops torchvision places a pixel further; on PIL images in modes no file holds
  (palette with alpha, premultiplied alpha, a palette of RGBA colours, whose alphas both ignore)
  and on uint8 arrays."""
  processor, config = _pil_processor(name)
  ours = clip.preprocess_images([f.path for f in image_files], _config(config))
  _assert_hf_equal(ours, _hf_nhwc(processor, [_read(f.path) for f in image_files]))
  rgba = [_read(f.path) for f in image_files if f.mode == 'RGBA']
  images = [image.convert(mode) for image in rgba for mode in ('PA', 'RGBa', 'P')]
  _assert_hf_equal(clip.preprocess_images(images, _config(config)), _hf_nhwc(processor, images))
  arrays = [np.asarray(_read(f.path)) for f in image_files if f.mode == 'RGB']
  _assert_hf_equal(clip.preprocess_images(arrays, _config(config)),
                   _hf_nhwc(processor, arrays, input_data_format='channels_last'))


@pytest.mark.parametrize('name', ['clip', 'siglip'])
def test_transformers_differs_where_open_clip_order_and_crop_would(name, image_files):
  """Each setting is needed: with `convert_first=False` (resize in the image's own mode, then
  drop alpha) the transparent files differ by far, and the RGB and grey ones do not; with
  `crop_rounding='round'` exactly the files whose crop overhang is 3 mod 4 differ (none when
  squashing)."""
  processor, config = _pil_processor(name)
  paths = [f.path for f in image_files]
  theirs = _hf_nhwc(processor, [_read(p) for p in paths])
  late = dataclasses.replace(config, convert_first=False)
  levels = _levels(clip.preprocess_images(paths, _config(late)), theirs, late)
  transparent = np.array([f.transparent for f in image_files])
  opaque_rgb_or_grey = np.array([f.mode in ('RGB', 'L') and not f.transparent
                                 for f in image_files])
  assert levels[transparent].min() > 50, levels[transparent]
  assert levels[opaque_rgb_or_grey].max() < FLOAT_SLACK
  rounded = dataclasses.replace(config, crop_rounding='round')
  levels = _levels(clip.preprocess_images(paths, _config(rounded)), theirs, rounded)
  shifted = {f.size for f, n in zip(image_files, levels) if n > FLOAT_SLACK}
  assert shifted == ({size for size in SIZES if not _crops_alike(size)} if name == 'clip'
                     else set())


# ---------------------------------------------------------------- tokenizers

CLASSES = ['golden retriever', 'Tabby Cat', 'São Paulo skyline', 'crème brûlée',
           "jack-o'-lantern", 'T-shirt', 'CD player', 'GREAT WHITE SHARK', 'Zürich tram',
           'naïve art', 'rock ’n’ roll band', 'Ångström ruler', 'Mont-Saint-Michel',
           '10% sale sign', 'e-mail (printed)', 'Crêpe, with jam!']
TEMPLATE = 'a photo of a {}.'
# A caption too long for 64 tokens: cut with truncate=True, as the peers' truncation=True.
LONG = ' '.join(['A photo of a Golden Retriever, playing in the São Paulo park!'] * 8)
# The zero-shot prompts, and captions. No special-token strings ('</s>', '<eos>', '<pad>', ...):
# transformers reads them as tokens and this package as text, by design
# (tests/test_siglip_tokenizer.py pins that down).
PROMPTS = clip.zero_shot.prompts(CLASSES, clip.zero_shot.IMAGENET_TEMPLATES) + [LONG]
VOCAB = {'siglip': 400, 'siglip2': 700}  # the tiny SentencePiece models' (SIGLIP*_SPEC)
SENTENCEPIECE_FILE = {'siglip': 'spiece.model', 'siglip2': 'tokenizer.model'}


def _siglip_config(tokenizer, vocab_size):
  """A small SigLIP config reading `tokenizer`'s ids: what `get_tokenizer` checks them against."""
  vision = clip.VisionConfig('vit', 64, 1, 1, R, 8, pool='map', ln_pre=False, patch_bias=True,
                             projection=False)
  text = clip.TextConfig(64, 1, 1, 64, vocab_size, pool='last', causal=False,
                         mask_padding=False)
  return clip.CLIPConfig(64, vision, text, logit_bias=True, tokenizer=tokenizer)


@pytest.mark.parametrize('kind', ['siglip', 'siglip2'])
def test_get_tokenizer_equals_transformers(kind, model_files, references):
  """kind 'siglip' (clean 'siglip') is `SiglipTokenizer`, kind 'siglip2' (clean 'lower') is
  `Siglip2Tokenizer` with open_clip's settings, called as the model cards do
  (`padding='max_length', max_length=64, truncation=True`)."""
  tokenizer = clip.get_tokenizer(_siglip_config(clip.TokenizerConfig(kind, model_files[kind]),
                                                VOCAB[kind]))
  assert tokenizer.config.clean == {'siglip': 'siglip', 'siglip2': 'lower'}[kind]
  ours = tokenizer(PROMPTS, truncate=True)
  chex.assert_shape(ours, (len(PROMPTS), 64))
  chex.assert_type(ours, np.int32)
  np.testing.assert_array_equal(ours, hf_tokenize(references[kind], PROMPTS))
  with pytest.raises(ValueError, match='pass truncate=True'):
    tokenizer([LONG])


def _save_open_clip_tokenizer(kind, model_file, folder):
  """The tokenizer as open_clip's `SigLipTokenizer` builds it (SigLIP: `T5TokenizerFast` with
  no extra ids, padding with `</s>`; SigLIP 2: `GemmaTokenizerFast` without BOS, with EOS,
  padding right with `<pad>`), saved into `folder` with its SentencePiece file beside it, as
  open_clip's hub folders hold them. (open_clip 3.3 passes the file as the first argument, which
  transformers 5 takes as the vocabulary itself; `from_pretrained` on a folder holding the file
  builds the same tokenizer.)"""
  source = os.path.join(folder, 'source')
  os.makedirs(source)
  shutil.copy(model_file, os.path.join(source, SENTENCEPIECE_FILE[kind]))
  if kind == 'siglip':
    tokenizer = T5TokenizerFast.from_pretrained(source, extra_ids=0, legacy=False)
  else:
    tokenizer = GemmaTokenizerFast.from_pretrained(source, legacy=False, **SIGLIP2_SETTINGS)
  tokenizer.pad_token_id = 0 if kind == 'siglip2' else 1
  tokenizer.eos_token_id = 1
  tokenizer.save_pretrained(folder)
  shutil.move(os.path.join(source, SENTENCEPIECE_FILE[kind]), folder)
  os.rmdir(source)


@pytest.fixture(scope='module')
def open_clip_tokenizer_folders(model_files, tmp_path_factory):
  folders = {}
  for kind in VOCAB:
    folders[kind] = str(tmp_path_factory.mktemp(f'open_clip_tokenizer_{kind}'))
    _save_open_clip_tokenizer(kind, model_files[kind], folders[kind])
  return folders


@pytest.mark.parametrize('kind', ['siglip', 'siglip2'])
def test_canonicalize_equals_open_clip(kind, oc, model_files, open_clip_tokenizer_folders):
  """clean 'canonicalize' with either kind is open_clip's SigLIP pipeline: its
  `HFTokenizer(folder, clean='canonicalize')` over the tokenizer its `SigLipTokenizer` builds."""
  # (On tests/test_siglip_tokenizer.py's random unicode corpus, open_clip's T5 fast tokenizer
  # parts from SentencePiece on 4 texts in 1824, each with a combining mark starting a word: the
  # `tokenizers` port of the model, not the cleaning, which is open_clip's on every text.)
  config = clip.TokenizerConfig(kind, model_files[kind], 'canonicalize')
  tokenizer = clip.get_tokenizer(_siglip_config(config, VOCAB[kind]))
  theirs = oc.tokenizer.HFTokenizer(open_clip_tokenizer_folders[kind], 64,
                                    clean='canonicalize')(PROMPTS).numpy()
  np.testing.assert_array_equal(tokenizer(PROMPTS, truncate=True), theirs)


def test_openai_default_equals_clip_tokenize_and_open_clip(oc):
  tokenizer = clip.get_tokenizer(_config())
  assert (tokenizer.config, tokenizer.context_length) == (clip.TokenizerConfig(), 77)
  ours = tokenizer(PROMPTS, truncate=True)
  np.testing.assert_array_equal(ours, clip.tokenize(PROMPTS, truncate=True))
  np.testing.assert_array_equal(ours, oc.tokenize(PROMPTS).numpy())


@pytest.mark.parametrize('kind, other', [('siglip', 'siglip2'), ('siglip2', 'siglip')])
def test_sentencepiece_file_of_the_other_kind_raises(kind, other, model_files):
  config = _siglip_config(clip.TokenizerConfig(kind, model_files[other]), 700)
  with pytest.raises(clip.TokenizerError,
                     match=rf"it is not a {kind} vocabulary.*tokenizer kind '{other}'\?"):
    clip.get_tokenizer(config)


def test_openai_bpe_on_a_small_vocabulary_raises():
  config = _siglip_config(clip.TokenizerConfig(), 100)
  with pytest.raises(clip.TokenizerError,
                     match=r"49408 ids, but the model's vocabulary holds 100 .*unknown"):
    clip.get_tokenizer(config)
  with pytest.raises(clip.TokenizerError, match='49408 ids'):
    clip.zero_shot.classifier_weights({}, ['cat'], config, [TEMPLATE])


# ---------------------------------------------------------------- Hugging Face folders

# Each vocabulary's special ids (SiglipTextConfig's defaults are CLIP's, 49406 and 49407).
_HF_TEXT_IDS = {'siglip': dict(pad_token_id=1, eos_token_id=1, bos_token_id=None),
                'siglip2': dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)}


def _hf_siglip(kind, seed):
  """A transformers SiglipModel (widths 64, 2 layers, experiments.checkpoint_families.hf_siglip's
  shapes) reading the tiny vocabulary of `kind` at SigLIP's 64 tokens, every parameter perturbed;
  logit scale 10 and bias 0, so that its probabilities spread over (0, 1)."""
  config = transformers.SiglipConfig(
      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=VOCAB[kind], max_position_embeddings=64,
                       **_HF_TEXT_IDS[kind]),
      vision_config=dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=2, image_size=R, patch_size=8))
  torch.manual_seed(seed)
  model = reference.perturb(transformers.SiglipModel(config).eval(), seed)
  with torch.no_grad():
    model.logit_scale.fill_(np.log(10.0))
    model.logit_bias.fill_(0.0)
  return model


@pytest.fixture(scope='module')
def hf_siglip_folders(model_files, siglip2_folder, tmp_path_factory):
  """{kind: (folder, model)}: a SiglipModel saved as a hub folder with its processor, saved by
  transformers 5 (`processor_config.json`; the image processor in PIL). SigLIP: `SiglipTokenizer`
  (spiece.model). SigLIP 2 (SigLIP 2's fixed-resolution releases are SiglipModels): Gemma's
  tokenizer without BOS, with EOS, padding right, and its tokenizer.model beside (transformers 5
  saves only tokenizer.json). Both tokenizers return no attention mask, as transformers' own
  conversion scripts save them (SigLIP was trained without one)."""
  folders = {}
  for seed, kind in enumerate(VOCAB):
    folder = tmp_path_factory.mktemp(f'hf_{kind}')
    model = _hf_siglip(kind, seed + 1)
    model.save_pretrained(folder)
    if kind == 'siglip':
      tokenizer = transformers.SiglipTokenizer(vocab_file=model_files[kind],
                                               model_input_names=['input_ids'])
    else:
      tokenizer = transformers.GemmaTokenizerFast.from_pretrained(
          siglip2_folder, model_input_names=['input_ids'], **SIGLIP2_SETTINGS)
      shutil.copy(model_files[kind], folder / 'tokenizer.model')
    image_processor = transformers.SiglipImageProcessorPil(size={'height': R, 'width': R})
    transformers.SiglipProcessor(image_processor=image_processor,
                                 tokenizer=tokenizer).save_pretrained(folder)
    folders[kind] = (folder, model)
  return folders


def test_lone_siglip_file_needs_its_tokenizer(hf_siglip_folders, model_files, references,
                                              tmp_path):
  """A lone weights file ships no tokenizer: loading works, tokenising raises saying how to give
  it, and `tokenizer=` (the .model path) gives it."""
  folder, _ = hf_siglip_folders['siglip']
  lone = tmp_path / 'siglip.safetensors'
  shutil.copy(folder / 'model.safetensors', lone)
  with pytest.warns(clip.CheckpointWarning):
    params, cfg = clip.load(lone)
  assert cfg.tokenizer == clip.TokenizerConfig('siglip')
  assert cfg.tokenizer.model_file is None
  how = r'did not come with the checkpoint.*clip\.load\(path, tokenizer=clip\.TokenizerConfig\('
  with pytest.raises(clip.TokenizerError, match=how):
    clip.get_tokenizer(cfg)
  with pytest.raises(clip.TokenizerError, match=how):
    clip.zero_shot.classifier_weights(params, CLASSES, cfg, [TEMPLATE])
  with pytest.warns(clip.CheckpointWarning):
    _, cfg = clip.load(lone, tokenizer=model_files['siglip'])
  assert cfg.tokenizer == clip.TokenizerConfig('siglip', os.path.abspath(model_files['siglip']),
                                               'siglip')
  np.testing.assert_array_equal(clip.get_tokenizer(cfg)(PROMPTS, truncate=True),
                                hf_tokenize(references['siglip'], PROMPTS))


# ---------------------------------------------------------------- open_clip folders

# A timm SigLIP trunk at our small widths, registered in timm (open_clip builds it by name) and in
# the converter's table of timm trunks (clip.load reads the name from open_clip_config.json).
TRUNK_SHAPES = (64, 2, 2, 1.75, 8, R, 'gelu')  # width, depth, heads, mlp ratio, patch, size, act


def vit_test_patch8_siglip_32(pretrained=False, **kwargs):
  """timm's model function for the small trunk (timm registers it under its name)."""
  # Local: timm comes with open_clip's reference, installed on first use (the `oc` fixture).
  import timm  # pylint: disable=g-import-not-at-top
  del pretrained
  kwargs = {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg',
                                                         'pretrained_cfg_overlay', 'cache_dir')}
  width, depth, heads, ratio, patch, size, _ = TRUNK_SHAPES
  return timm.models.vision_transformer.VisionTransformer(**{
      'img_size': size, 'patch_size': patch, 'embed_dim': width, 'depth': depth,
      'num_heads': heads, 'mlp_ratio': ratio, 'class_token': False, 'global_pool': 'map',
      **kwargs})


TRUNK = vit_test_patch8_siglip_32.__name__


@pytest.fixture(scope='module')
def small_timm_trunk(oc):
  del oc  # timm comes with open_clip's reference
  # Local: timm is importable only once the `oc` fixture has installed open_clip's reference.
  import timm  # pylint: disable=g-import-not-at-top
  if not timm.is_model(TRUNK):
    timm.models.register_model(vit_test_patch8_siglip_32)
  trunks = open_clip._TIMM_TRUNKS  # pylint: disable=protected-access
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(trunks, TRUNK, TRUNK_SHAPES)
    yield TRUNK


def _save_open_clip_folder(folder, model, model_cfg, preprocess_cfg):
  with open(os.path.join(folder, 'open_clip_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'model_cfg': model_cfg, 'preprocess_cfg': preprocess_cfg}, f)
  safetensors.torch.save_file(model.state_dict(),
                              os.path.join(folder, 'open_clip_model.safetensors'))


@pytest.fixture(scope='module')
def open_clip_siglip_folders(oc, small_timm_trunk, model_files, tmp_path_factory):
  """{kind: folder}: open_clip's ViT-B-16-SigLIP / ViT-B-16-SigLIP2 configs at small widths,
  saved as open_clip hub folders: open_clip_config.json (model_cfg, SigLIP's preprocess_cfg),
  open_clip_model.safetensors, and the tokenizer hf_tokenizer_name names, whose files open_clip
  reads from the folder itself ('local-dir:')."""
  folders = {}
  for seed, kind in enumerate(VOCAB):
    folder = str(tmp_path_factory.mktemp(f'open_clip_{kind}'))
    model_cfg = oc.get_model_config({'siglip': 'ViT-B-16-SigLIP',
                                     'siglip2': 'ViT-B-16-SigLIP2'}[kind])
    model_cfg.update(embed_dim=64)
    model_cfg['vision_cfg'].update(image_size=R, timm_model_name=small_timm_trunk)
    model_cfg['text_cfg'].update(width=64, heads=4, layers=2, mlp_ratio=1.5,
                                 vocab_size=VOCAB[kind])
    torch.manual_seed(seed + 3)
    model = oc.model.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != 'custom_text'})
    model = reference.perturb(model.eval(), seed + 3)
    with torch.no_grad():
      model.logit_scale.fill_(np.log(10.0))
      model.logit_bias.fill_(0.0)
    _save_open_clip_tokenizer(kind, model_files[kind], folder)
    preprocess_cfg = {'mean': [0.5] * 3, 'std': [0.5] * 3, 'interpolation': 'bicubic',
                      'resize_mode': 'squash'}  # open_clip's SigLIP releases'
    _save_open_clip_folder(folder, model, model_cfg, preprocess_cfg)
    folders[kind] = folder
  return folders


OPEN_CLIP_PREPROCESS = {'mean': [0.45, 0.5, 0.55], 'std': [0.2, 0.25, 0.3],
                        'interpolation': 'bilinear', 'resize_mode': 'longest', 'fill_color': 128}


@pytest.fixture(scope='module')
def open_clip_vit_folder(oc, tmp_path_factory):
  """An open_clip ViT CLIP (OpenAI's keys and tokenizer) with a preprocess_cfg other than the
  default: long side to the resolution, bilinear, padded with grey, its own mean and std."""
  folder = str(tmp_path_factory.mktemp('open_clip_vit'))
  model_cfg = {'embed_dim': 32,
               'vision_cfg': {'image_size': R, 'layers': 2, 'width': 64, 'head_width': 32,
                              'patch_size': 8},
               'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 2,
                            'layers': 2}}
  torch.manual_seed(6)
  model = reference.perturb(oc.model.CLIP(**model_cfg).eval(), 6)
  with torch.no_grad():
    model.logit_scale.fill_(np.log(100.0))  # OpenAI's trained scale: the softmax spreads
  _save_open_clip_folder(folder, model, model_cfg, OPEN_CLIP_PREPROCESS)
  return folder


# ---------------------------------------------------------------- zero-shot, end to end

def _zero_shot(params, cfg, paths, classes):
  """Our pipeline: image files -> `preprocess_images`; class names -> `classifier_weights` with
  one template; -> `classify`'s probabilities of every class, (N, C)."""
  images = clip.preprocess_images(paths, cfg)
  weights_DxC = clip.zero_shot.classifier_weights(params, classes, cfg, templates=[TEMPLATE])
  idx_NxC, probs_NxC = clip.zero_shot.classify(params, images, weights_DxC, cfg,
                                               k=len(classes))
  out_NxC = np.zeros(probs_NxC.shape, np.float32)
  np.put_along_axis(out_NxC, np.asarray(idx_NxC), np.asarray(probs_NxC), axis=1)
  return out_NxC


def _assert_probabilities_close(ours, theirs):
  assert theirs.std() > 0.05, 'the probabilities barely vary: the comparison would say little'
  chex.assert_trees_all_close(ours, theirs, atol=PROB_ATOL, rtol=0)


@pytest.mark.parametrize('kind', ['siglip', 'siglip2'])
def test_zero_shot_equals_transformers_pipeline(kind, hf_siglip_folders, image_files):
  """The folder's own pipeline as SigLIP's model cards run it: `AutoProcessor` (its image
  processor in PIL) with `padding='max_length', max_length=64`, the model,
  sigmoid(logits_per_image); on every file, whose pixels are ours."""
  folder, _ = hf_siglip_folders[kind]
  processor = transformers.AutoProcessor.from_pretrained(folder, backend='pil')
  model = transformers.SiglipModel.from_pretrained(folder).eval()
  paths = [f.path for f in image_files]
  texts = [TEMPLATE.format(c) for c in CLASSES]
  if kind == 'siglip2':  # SigLIP 2 read lower-cased text; transformers' docs ask the caller to
    texts = [t.lower() for t in texts]  # lower-case it, as Gemma's tokenizer keeps case
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    inputs = processor(text=texts, images=[_read(p) for p in paths], padding='max_length',
                       max_length=64, truncation=True, return_tensors='pt')
  assert set(inputs) == {'input_ids', 'pixel_values'}
  with torch.no_grad():
    theirs = torch.sigmoid(model(**inputs).logits_per_image).numpy()
  params, cfg = clip.load(folder)
  _assert_hf_equal(clip.preprocess_images(paths, cfg),
                   inputs['pixel_values'].numpy().transpose(0, 2, 3, 1))
  _assert_probabilities_close(_zero_shot(params, cfg, paths, CLASSES), theirs)


@pytest.mark.parametrize('kind', ['siglip', 'siglip2'])
def test_zero_shot_equals_open_clip_siglip_pipeline(kind, oc, open_clip_siglip_folders,
                                                    image_files):
  """open_clip's pipeline for its hub folders, as its README runs SigLIP models:
  `create_model_and_transforms('local-dir:...')`, `get_tokenizer('local-dir:...')`,
  sigmoid(exp(logit_scale) * cos + logit_bias); on every file."""
  folder = open_clip_siglip_folders[kind]
  model, _, transform = oc.create_model_and_transforms(f'local-dir:{folder}')
  tokenizer = oc.get_tokenizer(f'local-dir:{folder}')
  paths = [f.path for f in image_files]
  with torch.no_grad():
    img_NxD = model.eval().encode_image(torch.stack([transform(_read(p)) for p in paths]),
                                        normalize=True)
    txt_CxD = model.encode_text(tokenizer([TEMPLATE.format(c) for c in CLASSES]),
                                normalize=True)
    theirs = torch.sigmoid(img_NxD @ txt_CxD.T * model.logit_scale.exp() +
                           model.logit_bias).numpy()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    params, cfg = clip.load(folder)
  assert cfg.tokenizer == clip.TokenizerConfig(
      kind, os.path.join(folder, SENTENCEPIECE_FILE[kind]), 'canonicalize')
  assert cfg.preprocess == siglip.SIGLIP_PREPROCESS
  _assert_probabilities_close(_zero_shot(params, cfg, paths, CLASSES), theirs)


def test_zero_shot_equals_open_clip_clip_pipeline(oc, open_clip_vit_folder, image_files):
  """A CLIP model (softmax over the classes) with 'longest' preprocessing, every file."""
  model, _, transform = oc.create_model_and_transforms(f'local-dir:{open_clip_vit_folder}')
  tokenizer = oc.get_tokenizer(f'local-dir:{open_clip_vit_folder}')
  paths = [f.path for f in image_files]
  with torch.no_grad():
    img_NxD = model.eval().encode_image(torch.stack([transform(_read(p)) for p in paths]),
                                        normalize=True)
    txt_CxD = model.encode_text(tokenizer([TEMPLATE.format(c) for c in CLASSES]),
                                normalize=True)
    theirs = (img_NxD @ txt_CxD.T * model.logit_scale.exp()).softmax(dim=-1).numpy()
  params, cfg = clip.load(open_clip_vit_folder)
  _assert_probabilities_close(_zero_shot(params, cfg, paths, CLASSES), theirs)


def test_zero_shot_cli_equals_transformers_pipeline(hf_siglip_folders, image_files, tmp_path):
  """`python -m experiments.zero_shot` on a Hugging Face SigLIP folder and a folder of image
  files: its probabilities are transformers' own pipeline's (processor in PIL, the model), with
  the CLI's 7 templates ensembled as OpenAI's notebook does (mean of the normalised text
  features, normalised) and SigLIP's sigmoid(exp(t) cos + b)."""
  folder, _ = hf_siglip_folders['siglip']
  images = tmp_path / 'images'
  images.mkdir()
  for f in image_files:
    shutil.copy(f.path, images / os.path.basename(f.path))
  classes = CLASSES[:5]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # PIL's note on palette transparency
    predictions = zero_shot_cli.main(['--model', str(folder), '--images', str(images), '--classes',
                            ','.join(classes), '--top-k', str(len(classes)), '--out',
                            str(tmp_path / 'out')])
  paths, _ = zero_shot_cli.list_images(str(images))
  ours = np.zeros((len(paths), len(classes)), np.float32)
  for i, row in enumerate(predictions):
    assert row['image'] == os.path.basename(paths[i])
    for top in row['top']:
      ours[i, classes.index(top['class'])] = top['probability']
  processor = transformers.AutoProcessor.from_pretrained(folder, backend='pil')
  model = transformers.SiglipModel.from_pretrained(folder).eval()
  templates = clip.zero_shot.DEFAULT_TEMPLATES
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter('ignore')
    pixels = processor(images=[_read(p) for p in paths], return_tensors='pt')['pixel_values']
    # transformers 5's get_*_features return the tower's output; the features are its pooled one
    img_NxD = torch.nn.functional.normalize(
        model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    weights = []
    for c in classes:
      ids = processor(text=[t.format(c) for t in templates], padding='max_length', max_length=64,
                      truncation=True, return_tensors='pt')['input_ids']
      txt_TxD = torch.nn.functional.normalize(
          model.get_text_features(input_ids=ids).pooler_output, dim=-1)
      weights.append(torch.nn.functional.normalize(txt_TxD.mean(0), dim=-1))
    logits = img_NxD @ torch.stack(weights).T * model.logit_scale.exp() + model.logit_bias
    theirs = torch.sigmoid(logits).numpy()
  _assert_probabilities_close(ours, theirs)


# ---------------------------------------------------------------- from a fresh user's trial

def test_siglip_export_runs_in_transformers_standard_pipeline(hf_siglip_folders, image_files,
                                                              tmp_path):
  """`save_hf` of a SigLIP model: `AutoProcessor` returns no attention mask (SigLIP attends to
  its padding, as released folders state with model_input_names), so
  `model(**processor(text=..., images=...))` gives our probabilities; config.json's text ids are
  the tokenizer's."""
  folder, _ = hf_siglip_folders['siglip']
  params, cfg = clip.load(folder)
  clip.save_hf(params, cfg, tmp_path / 'out')
  text_config = json.loads((tmp_path / 'out' / 'config.json').read_text())['text_config']
  tok = clip.get_tokenizer(cfg)
  assert (text_config['eos_token_id'], text_config['pad_token_id']) == (tok.eot_id, tok.pad_id)
  processor = transformers.AutoProcessor.from_pretrained(tmp_path / 'out', backend='pil')
  model = transformers.SiglipModel.from_pretrained(tmp_path / 'out').eval()
  paths = [f.path for f in image_files]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    inputs = processor(text=[TEMPLATE.format(c) for c in CLASSES],
                       images=[_read(p) for p in paths], padding='max_length', max_length=64,
                       truncation=True, return_tensors='pt')
  assert set(inputs) == {'input_ids', 'pixel_values'}
  with torch.no_grad():
    theirs = torch.sigmoid(model(**inputs).logits_per_image).numpy()
  _assert_probabilities_close(_zero_shot(params, cfg, paths, CLASSES), theirs)


def test_classifier_weights_truncate_long_prompts_on_request(hf_siglip_folders):
  folder, _ = hf_siglip_folders['siglip']
  params, cfg = clip.load(folder)
  long = [LONG]
  with pytest.raises(ValueError, match='pass truncate=True'):
    clip.zero_shot.classifier_weights(params, long, cfg, ['{}'])
  weights = clip.zero_shot.classifier_weights(params, long, cfg, ['{}'], truncate=True)
  tokens = clip.get_tokenizer(cfg)(long, truncate=True)
  chex.assert_trees_all_close(
      weights, clip.zero_shot.classifier_weights_from_tokens(params, tokens[:, None], cfg))


def test_zero_shot_cli_takes_the_tokenizer_of_a_lone_file(hf_siglip_folders, model_files,
                                                          image_files, tmp_path):
  folder, _ = hf_siglip_folders['siglip']
  shutil.copy(folder / 'model.safetensors', tmp_path / 'siglip.safetensors')
  images = tmp_path / 'images'
  images.mkdir()
  shutil.copy(image_files[0].path, images / os.path.basename(image_files[0].path))
  args = ['--model', str(tmp_path / 'siglip.safetensors'), '--images', str(images),
          '--classes', 'cat,dog', '--out', str(tmp_path / 'out')]
  with pytest.warns(clip.CheckpointWarning), pytest.raises(SystemExit, match='did not come'):
    zero_shot_cli.main(args)
  with pytest.warns(clip.CheckpointWarning):
    predictions = zero_shot_cli.main(args + ['--tokenizer', model_files['siglip']])
  assert len(predictions) == 1
