"""Exports carry the model's tokenizer and image preprocessing: open_clip's
`create_model_and_transforms` / `get_tokenizer('local-dir:...')` and transformers' `AutoProcessor`
on our export give the token ids of `clip.get_tokenizer(cfg)` and the pixels of
`clip.preprocess_images(images, cfg)`, `clip.load` reads the same processing back, what a peer
would run differently is refused, and what it would prepare differently on some images (its RGB
conversion and crop, `PreprocessConfig.convert_first` and `crop_rounding`) is an `ExportWarning`.

Small random models in each export's scope, OpenAI's BPE and tiny SentencePiece models trained with
SigLIP's and SigLIP 2's conventions (tests/test_siglip_tokenizer.py), image files of odd sizes in
RGB, grey and modes with transparency or other bands, realistic prompts (transformers matches its
special tokens' strings in the raw text and its CLIP tokenizer runs no ftfy; prompts here hold
neither).
"""
# pylint: disable=redefined-outer-name
import dataclasses
import os
import re
import shutil
import warnings

import jax
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from PIL import Image

import clip
from clip.formats import export
from clip.formats.hf import config_from_hf
from clip.formats.open_clip import config_from_open_clip
from clip.formats.siglip import SIGLIP_PREPROCESS
from clip import preprocess
from clip import tokenizer as openai_tokenizer
from experiments.references import open_clip as open_clip_reference
from tests.test_siglip_tokenizer import SIGLIP2_SPEC
from tests.test_siglip_tokenizer import SIGLIP_SPEC
from tests.test_siglip_tokenizer import training_texts

# PIL's note when OpenAI's order converts a palette image with an alpha per entry to RGB,
# dropping the alpha (as open_clip does).
pytestmark = pytest.mark.filterwarnings('ignore:Palette images with Transparency:UserWarning')

LEVEL = 1.0  # open_clip's pixels within one uint8 level (measured: equal)
HF_LEVELS = 1e-4  # transformers' PIL processors, in uint8 levels (measured: equal)
RTOL = 1e-4  # fp32 features, relative to their largest magnitude
RESOLUTION = 28
# transformers' conventions (RGB on white before the resize, the crop at the floor of the
# overhang), which clip.load records for a Hugging Face folder's image processor.
HF = {'convert_first': True, 'crop_rounding': 'floor'}
HF_SIGLIP = dataclasses.replace(SIGLIP_PREPROCESS, **HF)

PROMPTS = ['a photo of a cat.', 'A photo of the BIG dog, isn\'t it?', 'a bad photo of a ZEBRA',
           'Café Über 123 ok', 'wow!!! great!', 'a  photo   of\ta\ncat', 'snake_case & more',
           'New York City at night, 2024 (color)', 'a ' + 'very ' * 80 + 'long caption']


@pytest.fixture(scope='module')
def oc():
  return open_clip_reference.import_open_clip()


@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
  """{'siglip': path, 'siglip2': path}: SentencePiece models with SigLIP's and SigLIP 2's ids."""
  folder = tmp_path_factory.mktemp('spm')
  corpus = folder / 'corpus.txt'
  corpus.write_text('\n'.join(training_texts(600)), encoding='utf-8')
  for kind, spec in (('siglip', SIGLIP_SPEC), ('siglip2', SIGLIP2_SPEC)):
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / kind), character_coverage=0.995,
        minloglevel=2, **spec)
  return {kind: str(folder / f'{kind}.model') for kind in ('siglip', 'siglip2')}


def _images():
  """(image, file name): noise and smooth RGB images and a grey one, then an RGBA, LA, 1-bit,
  16-bit grey, CMYK and a palette image with an alpha per entry, of odd sizes, portrait and
  landscape, three of them overhanging the 'shortest' crop by 3 mod 4."""
  rng = np.random.default_rng(0)
  sizes = [(37, 53), (61, 29), (45, 45), (99, 35), (33, 47), (40, 71)]  # (height, width)
  noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in sizes[:3]]
  smooth = [Image.fromarray(rng.integers(0, 256, (4, 5, 3), np.uint8)).resize((w, h),
                                                                              Image.BICUBIC)
            for h, w in sizes[3:]]
  grey = Image.fromarray(rng.integers(0, 256, (51, 38), np.uint8), 'L')
  rgba = Image.fromarray(rng.integers(0, 256, (4, 5, 4), np.uint8), 'RGBA').resize((70, 29),
                                                                                   Image.BICUBIC)
  others = [rgba, rgba.resize((39, 64)).convert('LA'), rgba.resize((60, 35)).convert('1'),
            Image.fromarray(rng.integers(0, 700, (43, 31), np.uint16)),
            rgba.resize((50, 50)).convert('RGB').convert('CMYK')]
  palette = rgba.resize((41, 30)).convert('RGB').quantize(16)
  palette.info['transparency'] = bytes(np.linspace(0, 255, 16).astype(np.uint8))
  images = noise + smooth + [grey] + others + [palette]
  return [(image, f'{i}_{image.mode.replace(";", "")}.{"jpg" if image.mode == "CMYK" else "png"}')
          for i, image in enumerate(images)]


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  """The images written to files; their paths."""
  folder = tmp_path_factory.mktemp('images')
  paths = []
  for image, name in _images():
    image.save(folder / name, **({'transparency': image.info['transparency']}
                                 if 'transparency' in image.info else {}))
    paths.append(str(folder / name))
  return paths


def _read(path):
  with Image.open(path) as image:
    image.load()
    return image


def _opaque(image):
  """RGB or grey without transparency: OpenAI's order (resize, then RGB) and transformers' (RGB
  on white, then resize) give the same pixels."""
  return image.mode in ('RGB', 'L') and 'transparency' not in image.info


def _transparent(image):
  return 'A' in image.getbands() or 'transparency' in image.info


def _assert_differ_where_said(levels, paths, cfg, differences):
  """Equal on the opaque files whose crops align; the transparent ones differ by far, and so do
  the opaque ones whose crops do not align (where the crop is a difference). 1-bit, 16-bit and
  CMYK files differ too (they are resized in their own mode or rounded twice): not asserted."""
  images = [_read(p) for p in paths]
  alike = np.array([_opaque(i) and _crops_alike(i, cfg) for i in images])
  assert levels[alike].max() < HF_LEVELS, levels
  assert levels[np.array([_transparent(i) for i in images])].min() > LEVEL, levels
  shifted = np.array([_opaque(i) and not _crops_alike(i, cfg) for i in images])
  assert shifted.any() == ('centre crop' in differences)
  assert levels[shifted].min(initial=np.inf) > LEVEL, levels


def _assert_export_warns(save, cfg, folder, match, messages, differences):
  """`save(params, cfg, folder)` warns with an ExportWarning matching `match` whose text names
  exactly `differences` among `messages` ({difference: pattern})."""
  with pytest.warns(export.ExportWarning, match=match) as record:
    save(_params(cfg), cfg, folder)
  message = ' '.join(str(w.message) for w in record if w.category is export.ExportWarning)
  for what, pattern in messages.items():
    assert bool(re.search(pattern, message)) == (what in differences), (what, message)


def _crop_excess(image, cfg):
  """How far the resized image exceeds the crop, for the 'shortest' resize."""
  return max(preprocess.resized_size(*image.size, cfg.image_resolution)) - cfg.image_resolution


def _crops_alike(image, cfg):
  """torchvision's crop (round(d / 2)) and transformers' (d // 2) start at the same pixel."""
  return cfg.preprocess.resize_mode != 'shortest' or _crop_excess(image, cfg) % 4 != 3


def _tokenizer(kind, model_files, clean):
  if kind == 'openai':
    return clip.TokenizerConfig()
  return clip.TokenizerConfig(kind, model_files[kind], clean)


def _open_clip_cfg(vocab, context, eot, tokenizer, pp):
  """An OpenAI-architecture model, the scope of the open_clip export."""
  model_cfg = {'embed_dim': 32, 'vision_cfg': {'image_size': RESOLUTION, 'layers': 1, 'width': 64,
                                               'head_width': 32, 'patch_size': 14},
               'text_cfg': {'context_length': context, 'vocab_size': vocab, 'width': 32,
                            'heads': 2, 'layers': 1}}
  cfg = config_from_open_clip(model_cfg)
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eot_token_id=eot),
                             tokenizer=tokenizer, preprocess=pp)


def _hf_cfg(model_type, vocab, context, tokenizer, pp):
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              vocab_size=vocab, max_position_embeddings=context)
  if model_type == 'clip':
    text['eos_token_id'] = openai_tokenizer.EOT
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=RESOLUTION, patch_size=14)
  cfg = config_from_hf({'model_type': model_type, 'text_config': text,
                                 'vision_config': vision, 'projection_dim': 32})
  return dataclasses.replace(cfg, tokenizer=tokenizer, preprocess=pp)


def _params(cfg, seed=0):
  """Random weights of the model's shapes (numpy: no compilation per config, as init's)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(x.dtype),
                      jax.eval_shape(clip.init_params, jax.random.key(0), cfg))


def _levels(theirs_NxHxWx3, ours_NxHxWx3, cfg):
  """Per image, the largest difference in uint8 levels (before normalisation)."""
  std = np.asarray(cfg.preprocess.std, np.float32)
  return (np.abs(theirs_NxHxWx3 - ours_NxHxWx3) * std * 255).max(axis=(1, 2, 3))


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def _assert_loads_back(folder, cfg):
  back = clip.load(folder)[1]
  assert back.preprocess == cfg.preprocess
  assert (back.tokenizer.kind, back.tokenizer.clean) == (cfg.tokenizer.kind, cfg.tokenizer.clean)
  if cfg.tokenizer.model_file:  # the file is copied beside the weights, and read from there
    assert os.path.dirname(back.tokenizer.model_file) == os.path.abspath(folder)
    with open(back.tokenizer.model_file, 'rb') as a, open(cfg.tokenizer.model_file, 'rb') as b:
      assert a.read() == b.read()
  assert clip.get_tokenizer(back)(PROMPTS, truncate=True).tolist() == (
      clip.get_tokenizer(cfg)(PROMPTS, truncate=True).tolist())


# ---------------------------------------------------------------- open_clip

OPEN_CLIP_CASES = {
    # kind: (vocab, context, eot id, preprocessing)
    'openai': (49408, 77, None, clip.PreprocessConfig()),
    'siglip': (400, 16, 1, SIGLIP_PREPROCESS),
    'siglip2': (700, 16, 1, clip.PreprocessConfig(
        mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), resize_mode='longest',
        interpolation='bilinear', fill_color=7)),
}


def _open_clip_pixels(transform, paths):
  return np.stack([transform(_read(p)).permute(1, 2, 0).numpy() for p in paths])


@pytest.mark.parametrize('kind', list(OPEN_CLIP_CASES))
def test_open_clip_peer_tokenises_and_preprocesses_as_we_do(oc, model_files, image_files,
                                                            tmp_path, kind):
  """open_clip's own preprocessing (no ExportWarning): its transform gives our pixels on every
  file, transparent ones included."""
  vocab, context, eot, pp = OPEN_CLIP_CASES[kind]
  cfg = _open_clip_cfg(vocab, context, eot, _tokenizer(kind, model_files, 'canonicalize'), pp)
  params = _params(cfg)
  with warnings.catch_warnings():
    warnings.simplefilter('error', export.ExportWarning)
    clip.save_open_clip(params, cfg, tmp_path)

  theirs, _, transform = oc.create_model_and_transforms(f'local-dir:{tmp_path}')
  tokens = oc.get_tokenizer(f'local-dir:{tmp_path}')(PROMPTS).numpy()
  ours = clip.get_tokenizer(cfg)(PROMPTS, truncate=True)
  np.testing.assert_array_equal(tokens, ours)
  pixels = _open_clip_pixels(transform, image_files)
  ours_pixels = clip.preprocess_images(image_files, cfg)
  assert _levels(pixels, ours_pixels, cfg).max() <= LEVEL
  # ... and its model reads them as ours does (the end-of-text pooling included)
  with torch.no_grad():
    text = theirs.eval().encode_text(torch.from_numpy(tokens).long()).numpy()
    image = theirs.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
  assert _rel_err(clip.encode_text(params, ours, cfg), text) < RTOL
  assert _rel_err(clip.encode_image(params, ours_pixels, cfg), image) < RTOL
  _assert_loads_back(tmp_path, cfg)


@pytest.mark.parametrize('pp, differences', [
    (clip.PreprocessConfig(**HF), ('transparency', 'centre crop')),
    (dataclasses.replace(SIGLIP_PREPROCESS, convert_first=True), ('transparency',)),
])
def test_open_clip_export_of_transformers_conventions_warns(oc, image_files, tmp_path, pp,
                                                            differences):
  """A model prepared as a Hugging Face folder's (`clip.load`'s for one): open_clip resizes in
  the image's own mode and rounds its crop, which the ExportWarning names; its pixels are ours on
  the opaque files whose crops align, not on the others; the export loads back as what open_clip
  runs."""
  cfg = _open_clip_cfg(49408, 77, None, clip.TokenizerConfig(), pp)
  messages = {'transparency': r'drops transparency after',
              'centre crop': r'centre crop rounds half the overhang'}
  _assert_export_warns(clip.save_open_clip, cfg, tmp_path, 'open_clip prepares some images',
                       messages, differences)
  _, _, transform = oc.create_model_and_transforms(f'local-dir:{tmp_path}')
  levels = _levels(_open_clip_pixels(transform, image_files),
                   clip.preprocess_images(image_files, cfg), cfg)
  _assert_differ_where_said(levels, image_files, cfg, differences)
  back = clip.load(tmp_path)[1].preprocess
  assert back == dataclasses.replace(pp, convert_first=False, crop_rounding='round')


# ---------------------------------------------------------------- Hugging Face

HF_CASES = {
    # name: (model type, kind, clean, vocab, context, preprocessing, image processor)
    'clip': ('clip', 'openai', None, 49408, 77, clip.PreprocessConfig(**HF),
             'CLIPImageProcessor'),
    'clip_squash': ('clip', 'openai', None, 49408, 77,
                    clip.PreprocessConfig(resize_mode='squash', interpolation='bilinear', **HF),
                    'CLIPImageProcessor'),
    'siglip': ('siglip', 'siglip', 'siglip', 400, 16,
               HF_SIGLIP, 'SiglipImageProcessor'),
    'siglip2': ('siglip', 'siglip2', 'lower', 700, 16,
                dataclasses.replace(SIGLIP_PREPROCESS, resize_mode='shortest',
                                    interpolation='bilinear', **HF), 'CLIPImageProcessor'),
}


def _hf_pixels(folder, paths):
  """transformers' `AutoImageProcessor` of `folder` (PIL backend: it resizes PIL images as we
  do; the default torchvision backend resizes tensors, antialiased, a level or more off)."""
  processor = transformers.AutoImageProcessor.from_pretrained(folder, backend='pil')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # transformers' deprecation notes
    pixels = processor(images=[_read(p) for p in paths], return_tensors='np')['pixel_values']
  return pixels.transpose(0, 2, 3, 1)


@pytest.mark.parametrize('name', list(HF_CASES))
def test_transformers_peer_tokenises_and_preprocesses_as_we_do(model_files, image_files,
                                                               tmp_path, name):
  """transformers' conventions (no ExportWarning): its `AutoProcessor` gives our token ids and
  our pixels on every file, transparent ones and crops that torchvision would place a pixel
  further included."""
  model_type, kind, clean, vocab, context, pp, processor = HF_CASES[name]
  cfg = _hf_cfg(model_type, vocab, context, _tokenizer(kind, model_files, clean), pp)
  params = _params(cfg)
  with warnings.catch_warnings():
    warnings.simplefilter('error', export.ExportWarning)
    clip.save_hf(params, cfg, tmp_path)

  peer = transformers.AutoProcessor.from_pretrained(tmp_path, backend='pil')
  assert type(peer.image_processor).__name__.startswith(processor)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # transformers' deprecation notes
    inputs = peer(text=PROMPTS, images=[_read(p) for p in image_files], padding='max_length',
                  max_length=context, truncation=True, return_tensors='np')
  ours = clip.get_tokenizer(cfg)(PROMPTS, truncate=True)
  if kind == 'openai':  # transformers' CLIP pads with the end-of-text id, OpenAI's with 0
    padding = (np.cumsum(ours == openai_tokenizer.EOT, axis=1) > 0) & (ours == 0)
    np.testing.assert_array_equal(inputs['input_ids'],
                                  np.where(padding, openai_tokenizer.EOT, ours))
  else:
    np.testing.assert_array_equal(inputs['input_ids'], ours)
  levels = _levels(inputs['pixel_values'].transpose(0, 2, 3, 1),
                   clip.preprocess_images(image_files, cfg), cfg)
  assert levels.max() < HF_LEVELS, levels
  if pp.resize_mode == 'shortest':  # both crop placements are seen
    assert not all(_crops_alike(_read(p), cfg) for p in image_files)
  _assert_loads_back(tmp_path, cfg)


def _hf_folder(folder, family, model_files):
  """A transformers model saved with its image processor, as a hub folder holds them: a CLIPModel
  with `CLIPImageProcessorPil` (no tokenizer files: OpenAI's BPE), or a SiglipModel with
  `SiglipImageProcessorPil` (bilinear, its own mean and std) and SigLIP's spiece.model."""
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=RESOLUTION, patch_size=14)
  torch.manual_seed(0)
  if family == 'clip':
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(**text, vocab_size=49408, max_position_embeddings=77,
                         eos_token_id=openai_tokenizer.EOT),
        vision_config=vision, projection_dim=32))
    processor = transformers.CLIPImageProcessorPil(
        size={'shortest_edge': RESOLUTION}, crop_size={'height': RESOLUTION, 'width': RESOLUTION})
  else:
    model = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(**text, vocab_size=400, max_position_embeddings=16, pad_token_id=1,
                         eos_token_id=1, bos_token_id=None),
        vision_config=vision))
    processor = transformers.SiglipImageProcessorPil(
        size={'height': RESOLUTION, 'width': RESOLUTION}, resample=2, image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.3, 0.25])
    shutil.copy(model_files['siglip'], os.path.join(folder, 'spiece.model'))
  model.save_pretrained(folder)
  processor.save_pretrained(folder)


@pytest.mark.parametrize('family', ['clip', 'siglip'])
def test_hugging_face_folder_round_trips_through_save_hf(model_files, image_files, tmp_path,
                                                         family):
  """A model loaded from a Hugging Face folder and exported with save_hf: no ExportWarning, the
  export's `AutoImageProcessor` gives our pixels (and the source folder's) on every file, and the
  export loads back with the same processing."""
  source = tmp_path / 'source'
  source.mkdir()
  _hf_folder(source, family, model_files)
  params, cfg = clip.load(source)
  assert (cfg.preprocess.convert_first, cfg.preprocess.crop_rounding) == (True, 'floor')
  with warnings.catch_warnings():
    warnings.simplefilter('error', export.ExportWarning)
    clip.save_hf(params, cfg, tmp_path / 'out')
  ours = clip.preprocess_images(image_files, cfg)
  for folder in (tmp_path / 'out', source):
    levels = _levels(_hf_pixels(folder, image_files), ours, cfg)
    assert levels.max() < HF_LEVELS, (folder, levels)
  assert clip.load(tmp_path / 'out')[1].preprocess == cfg.preprocess


@pytest.mark.parametrize('pp, differences', [
    (clip.PreprocessConfig(), ('transparency', 'centre crop')),
    (SIGLIP_PREPROCESS, ('transparency',)),
])
def test_hugging_face_export_of_open_clip_conventions_warns(image_files, tmp_path, pp,
                                                            differences):
  """OpenAI's default (or open_clip's SigLIP squash) on a Hugging Face export: transformers
  converts to RGB on white first and floors its crop, which the ExportWarning names; its pixels
  are ours on the opaque files whose crops align, not on the others; the export loads back as
  what transformers runs."""
  cfg = _hf_cfg('clip', 49408, 77, clip.TokenizerConfig(), pp)
  messages = {'transparency': r'converts to RGB on white before resizing',
              'centre crop': r'centre-crops at the floor of half the overhang'}
  _assert_export_warns(clip.save_hf, cfg, tmp_path, 'Hugging Face prepares some images',
                       messages, differences)
  levels = _levels(_hf_pixels(tmp_path, image_files), clip.preprocess_images(image_files, cfg),
                   cfg)
  _assert_differ_where_said(levels, image_files, cfg, differences)
  assert clip.load(tmp_path)[1].preprocess == dataclasses.replace(pp, **HF)


def test_transformers_clip_padding_does_not_change_the_text_features(tmp_path):
  """transformers' CLIP rows pad with the end-of-text id, ours with 0: its model's features of
  its rows are ours of ours (both pool at the first end-of-text token; causal attention)."""
  cfg = _hf_cfg('clip', 49408, 77, clip.TokenizerConfig(), clip.PreprocessConfig(**HF))
  params = _params(cfg, seed=1)
  clip.save_hf(params, cfg, tmp_path)
  peer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  inputs = peer(PROMPTS, padding='max_length', max_length=77, truncation=True, return_tensors='pt')
  with torch.no_grad():
    out = transformers.CLIPModel.from_pretrained(tmp_path).eval().get_text_features(**inputs)
  theirs = getattr(out, 'pooler_output', out).numpy()
  ours = clip.encode_text(params, clip.get_tokenizer(cfg)(PROMPTS, truncate=True), cfg)
  assert _rel_err(ours, theirs) < RTOL


# ---------------------------------------------------------------- refusals

def _refused(save, cfg, folder, match):
  with pytest.raises(export.ExportError, match=match):
    save(_params(cfg), cfg, folder)
  assert not os.path.exists(folder) or not os.listdir(folder)  # nothing written


def test_open_clip_refuses_a_cleaning_open_clip_does_not_run(model_files, tmp_path):
  cfg = _open_clip_cfg(400, 16, 1, _tokenizer('siglip', model_files, 'siglip'),
                       clip.PreprocessConfig())
  _refused(clip.save_open_clip, cfg, tmp_path / 'out', "clean='siglip'.*canonicalize")


@pytest.mark.parametrize('kind, clean', [('siglip', 'canonicalize'), ('siglip2', 'canonicalize'),
                                         ('siglip2', 'siglip')])
def test_hugging_face_refuses_a_cleaning_its_tokenizer_does_not_run(model_files, tmp_path, kind,
                                                                    clean):
  cfg = _hf_cfg('siglip', 700, 16, _tokenizer(kind, model_files, clean),
                HF_SIGLIP)
  _refused(clip.save_hf, cfg, tmp_path / 'out', f"clean='{clean}'")


def test_hugging_face_refuses_the_longest_side_resize(tmp_path):
  cfg = _hf_cfg('clip', 49408, 77, clip.TokenizerConfig(),
                clip.PreprocessConfig(resize_mode='longest'))
  _refused(clip.save_hf, cfg, tmp_path / 'out', 'longest')


@pytest.mark.parametrize('tokenizer, match', [
    (clip.TokenizerConfig('unknown', name='a BERT WordPiece'), 'a BERT WordPiece'),
    (clip.TokenizerConfig('siglip', None, 'canonicalize'), 'SentencePiece model file is not known'),
])
def test_exports_refuse_a_tokenizer_they_cannot_write(tmp_path, tokenizer, match):
  oc_cfg = _open_clip_cfg(400, 16, 1, tokenizer, clip.PreprocessConfig())
  _refused(clip.save_open_clip, oc_cfg, tmp_path / 'open_clip', match)
  hf_cfg = _hf_cfg('siglip', 400, 16, tokenizer, HF_SIGLIP)
  _refused(clip.save_hf, hf_cfg, tmp_path / 'hf', match)


def test_an_export_replaces_the_tokenizer_files_in_its_folder(model_files, tmp_path):
  siglip = _hf_cfg('siglip', 400, 16, _tokenizer('siglip', model_files, 'siglip'),
                   HF_SIGLIP)
  clip.save_hf(_params(siglip), siglip, tmp_path)
  (tmp_path / 'tokenizer.json').write_text('{}')  # as a save_pretrained folder holds
  openai = _hf_cfg('clip', 49408, 77, clip.TokenizerConfig(), clip.PreprocessConfig(**HF))
  clip.save_hf(_params(openai), openai, tmp_path)
  assert not any((tmp_path / name).exists() for name in ('spiece.model', 'tokenizer.json'))
  assert clip.load(tmp_path)[1].tokenizer == clip.TokenizerConfig()
