"""The processing configs: the tokenizer a model reads and how its images are prepared, both part
of what a model is (`CLIPConfig.tokenizer`, `CLIPConfig.preprocess`); and normalisation by a
mean and std, OpenAI's by default."""
import dataclasses
import os

import jax
import numpy as np

from clip.config_checks import one_of
from clip.config_checks import require

# OpenAI's normalisation constants (RGB, images in [0, 1]).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

TOKENIZER_KINDS = ('openai', 'siglip', 'siglip2', 'xlmr', 'unknown')
# Text cleaning before the tokenizer, per kind: transformers' `SiglipTokenizer` ('siglip'), its
# `Siglip2Tokenizer` ('lower'), open_clip's `clean='canonicalize'` ('canonicalize') and
# `clean='whitespace'` ('whitespace', its HFTokenizer's default), none at all ('none':
# transformers' XLMRobertaTokenizer).
_SENTENCEPIECE_CLEANS = ('siglip', 'lower', 'canonicalize')
TEXT_CLEANS = {'siglip': _SENTENCEPIECE_CLEANS, 'siglip2': _SENTENCEPIECE_CLEANS,
               'xlmr': ('whitespace', 'canonicalize', 'none')}
_DEFAULT_CLEAN = {'siglip': 'siglip', 'siglip2': 'lower', 'xlmr': 'whitespace'}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """The tokenizer a model reads: part of what the model is (`clip.get_tokenizer(cfg)` builds it).

  `kind='openai'`: OpenAI's byte-level BPE (`clip.tokenize`: start and end-of-text tokens 49406 /
  49407, zero padding), the default. `kind='siglip'`: SentencePiece over a T5 vocabulary (SigLIP;
  `</s>` ends and pads each row), `kind='siglip2'`: over Gemma's (SigLIP 2; `<eos>` ends, `<pad>`
  pads), both in `clip/siglip_tokenizer.py`. `model_file` is the SentencePiece `.model` file
  (None: not known, and `get_tokenizer` raises saying how to give it). `clean` is the text
  cleaning before SentencePiece: 'siglip' (transformers' `SiglipTokenizer`: lower case, ASCII
  punctuation removed), 'lower' (transformers' `Siglip2Tokenizer`: lower case only) or
  'canonicalize' (open_clip's `clean='canonicalize'`: ftfy, HTML unescaping, then big_vision's
  `canonicalize_text`); None takes transformers' rule for the kind.

  `kind='xlmr'`: open_clip's `HFTokenizer` over an XLM-RoBERTa-style `tokenizer.json`
  (`model_file`; MetaCLIP 2 worldwide's XLM-V: `<s>` text `</s>`, `<pad>` 1), cleaned
  'whitespace' (open_clip's default, and None's: ftfy, HTML unescaping, single spaces),
  'canonicalize', or not at all ('none': transformers' `XLMRobertaTokenizer`), in
  `clip/xlmr_tokenizer.py`. `kind='unknown'` is a tokenizer this package does not run (`name`
  says what the checkpoint calls it, e.g. open_clip's `hf_tokenizer_name`): the weights load, and
  `get_tokenizer` raises naming it."""
  kind: str = 'openai'
  model_file: str | None = None
  clean: str | None = None
  name: str | None = None

  def __post_init__(self):
    one_of(self.kind, TOKENIZER_KINDS, 'TokenizerConfig.kind')
    if self.kind == 'unknown':
      require(self.name, 'TokenizerConfig(kind="unknown") needs a name (what the checkpoint '
              'calls its tokenizer)')
      return
    if self.kind == 'openai':
      require(self.model_file is None and self.clean is None,
              'OpenAI\'s tokenizer takes no model_file or clean (its vocabulary ships with this '
              f'package), got model_file={self.model_file!r}, clean={self.clean!r}')
      return
    if self.model_file is not None:
      require(isinstance(self.model_file, (str, os.PathLike)),
              f'TokenizerConfig.model_file must be a path, got {self.model_file!r}')
      object.__setattr__(self, 'model_file', os.fspath(self.model_file))
    if self.clean is None:
      object.__setattr__(self, 'clean', _DEFAULT_CLEAN[self.kind])
    allowed = TEXT_CLEANS[self.kind]
    require(self.clean in allowed, f'TokenizerConfig.clean must be one of {allowed} for kind '
            f'{self.kind!r}, got {self.clean!r}')


RESIZE_MODES = ('shortest', 'squash', 'longest')
INTERPOLATIONS = ('bicubic', 'bilinear')
CROP_ROUNDINGS = ('round', 'floor')


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How a model's images are prepared (`clip.preprocess_images(images, cfg)`), to the model's
  `image_resolution`; open_clip's `PreprocessCfg` names. `resize_mode`: 'shortest' (short side to
  the resolution, then the centre crop: OpenAI's, open_clip's default, Hugging Face's
  `CLIPImageProcessor`), 'squash' (both sides to the resolution, aspect ratio not kept: SigLIP,
  `SiglipImageProcessor`) or 'longest' (long side to the resolution, then centre padding with
  `fill_color`: open_clip's `ResizeKeepRatio(longest=1)` + `CenterCropOrPad`); `interpolation`
  PIL's bicubic or bilinear filter; then the pixels in [0, 1] are normalised with `mean` and `std`
  (RGB; OpenAI's by default, SigLIP's are 0.5: pixels in [-1, 1]).

  Two settings say where transformers' image processors differ from OpenAI's and open_clip's
  transforms: `convert_first=True` converts to RGB before resizing, compositing transparency onto
  white (their `do_convert_rgb`); OpenAI and open_clip resize in the image's own mode and convert
  after, dropping the alpha. `crop_rounding='floor'` places the centre crop at `(side - n) // 2`
  (transformers' `center_crop`) instead of torchvision's `round((side - n) / 2)`: the two are a
  pixel apart when the overhang is 3 modulo 4. `clip.load` sets both for Hugging Face folders.

  `max_num_patches` is SigLIP 2 NaFlex's patch budget per image (`Siglip2ImageProcessor`'s
  setting, which `clip.naflex_preprocess` takes when given none); None: not a NaFlex model's."""
  mean: tuple[float, float, float] = IMAGE_MEAN
  std: tuple[float, float, float] = IMAGE_STD
  resize_mode: str = 'shortest'
  interpolation: str = 'bicubic'
  fill_color: int = 0
  convert_first: bool = False
  crop_rounding: str = 'round'
  max_num_patches: int | None = None

  def __post_init__(self):
    for name in ('mean', 'std'):
      value = tuple(float(x) for x in getattr(self, name))
      object.__setattr__(self, name, value)
      require(len(value) == 3 and all(np.isfinite(value)),
              f'PreprocessConfig.{name} must be 3 finite numbers (RGB), got {value}')
    require(all(s > 0 for s in self.std), f'PreprocessConfig.std must be > 0, got {self.std}')
    one_of(self.resize_mode, RESIZE_MODES, 'PreprocessConfig.resize_mode')
    one_of(self.interpolation, INTERPOLATIONS, 'PreprocessConfig.interpolation')
    require(isinstance(self.fill_color, int) and 0 <= self.fill_color <= 255,
            f'PreprocessConfig.fill_color must be an int in [0, 255], got {self.fill_color!r}')
    require(isinstance(self.convert_first, bool),
            f'PreprocessConfig.convert_first must be a bool, got {self.convert_first!r}')
    one_of(self.crop_rounding, CROP_ROUNDINGS, 'PreprocessConfig.crop_rounding')
    require(self.max_num_patches is None or (
        isinstance(self.max_num_patches, int) and self.max_num_patches > 0),
            'PreprocessConfig.max_num_patches must be None or an int > 0, got '
            f'{self.max_num_patches!r}')


def normalize_image(images):
  """NHWC images in [0, 1] -> normalised with OpenAI's mean and std (a model's own:
  `clip.processing.normalize(images, cfg)`)."""
  return normalize_with(images, IMAGE_MEAN, IMAGE_STD, 'normalize_image')


def normalize_with(images, mean, std, caller='normalize'):
  """NHWC float images in [0, 1] -> `(images - mean) / std` per RGB channel, in their dtype."""
  images = np.asarray(images) if not hasattr(images, 'dtype') else images
  if images.ndim < 1 or images.shape[-1] != 3:
    raise ValueError(f'{caller} expects images (..., H, W, 3), got shape {images.shape}')
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f'{caller} expects float images in [0, 1], got dtype {images.dtype}; '
                    'divide uint8 images by 255 first')
  mean = np.asarray(mean, np.float32).astype(images.dtype)
  std = np.asarray(std, np.float32).astype(images.dtype)
  return (images - mean) / std
