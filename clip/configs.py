"""Model configurations: frozen dataclasses, hashable so they can be static arguments of `jit`.

A custom model is just another config object; the nine OpenAI models are entries of `MODELS`.
"""
import dataclasses

import jax
import numpy as np

# OpenAI's normalisation constants (RGB, images in [0, 1]).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

ARCHS = ('vit', 'resnet')
DTYPES = ('float32', 'bfloat16', 'float16')


def _require(ok, message):
  if not ok:
    raise ValueError(message)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Image tower. `arch='vit'`: `layers` is an int; `arch='resnet'`: a 4-tuple of block counts.

  For the ModifiedResNet, `width` is the stem width (64 for RN50) and `heads` those of the
  attention pool over the `32 * width` features.
  """
  arch: str
  width: int
  layers: int | tuple[int, ...]
  heads: int
  image_resolution: int = 224
  patch_size: int | None = None

  def __post_init__(self):
    _require(self.arch in ARCHS, f'VisionConfig.arch must be one of {ARCHS}, got {self.arch!r}')
    _require(self.width > 0 and self.heads > 0,
             f'VisionConfig needs width > 0 and heads > 0, got width={self.width}, heads={self.heads}')
    if self.arch == 'vit':
      _require(isinstance(self.layers, int) and self.layers > 0,
               f'a ViT needs an int number of layers > 0, got {self.layers!r}')
      _require(self.patch_size is not None and self.patch_size > 0,
               f'a ViT needs patch_size > 0, got {self.patch_size!r}')
      _require(self.image_resolution % self.patch_size == 0,
               f'image_resolution {self.image_resolution} is not a multiple of patch_size '
               f'{self.patch_size}')
      _require(self.width % self.heads == 0,
               f'ViT width {self.width} is not divisible by heads {self.heads}')
    else:
      object.__setattr__(self, 'layers', tuple(self.layers))
      _require(len(self.layers) == 4 and all(n > 0 for n in self.layers),
               f'a ModifiedResNet needs 4 positive block counts, got {self.layers!r}')
      _require(self.patch_size is None, f'a ResNet has no patch_size, got {self.patch_size!r}')
      _require(self.image_resolution % 32 == 0,
               f'ResNet image_resolution must be a multiple of 32, got {self.image_resolution}')
      _require(self.width % 2 == 0, f'ResNet stem width must be even, got {self.width}')
      _require(self.feature_width % self.heads == 0,
               f'ResNet feature width {self.feature_width} is not divisible by heads {self.heads}')

  @property
  def grid_size(self):
    """Side of the token grid the position embedding covers (patches, or ResNet output)."""
    step = self.patch_size if self.arch == 'vit' else 32
    return self.image_resolution // step

  @property
  def feature_width(self):
    """Width of the tokens entering the final pooling (ResNet: 32x the stem width)."""
    return self.width if self.arch == 'vit' else self.width * 32


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Causal text transformer, pooled at the end-of-text token (the largest token id)."""
  width: int
  layers: int
  heads: int
  context_length: int = 77
  vocab_size: int = 49408

  def __post_init__(self):
    for name in ('width', 'layers', 'heads', 'context_length', 'vocab_size'):
      _require(getattr(self, name) > 0, f'TextConfig.{name} must be > 0, got {getattr(self, name)}')
    _require(self.width % self.heads == 0,
             f'text width {self.width} is not divisible by heads {self.heads}')


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """The two-tower model. `dtype` is the compute dtype of the forward pass; params stay fp32.
  `remat=True` recomputes each transformer block (ResNet: each bottleneck) in the backward pass
  instead of storing its activations (training memory for compute)."""
  embed_dim: int
  vision: VisionConfig
  text: TextConfig
  dtype: str = 'float32'
  remat: bool = False

  def __post_init__(self):
    _require(self.embed_dim > 0, f'embed_dim must be > 0, got {self.embed_dim}')
    _require(self.dtype in DTYPES, f'CLIPConfig.dtype must be one of {DTYPES}, got {self.dtype!r}')

  @property
  def image_resolution(self):
    return self.vision.image_resolution

  @property
  def context_length(self):
    return self.text.context_length


def openai_config(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                  context_length, vocab_size, transformer_width, transformer_heads,
                  transformer_layers, vision_heads=None):
  """A config from the arguments of OpenAI's `CLIP.__init__`, with its vision head-count rule
  (64-wide heads) unless `vision_heads` is given."""
  if isinstance(vision_layers, (tuple, list)):
    vision = VisionConfig('resnet', vision_width, tuple(vision_layers),
                          vision_heads or vision_width * 32 // 64, image_resolution)
  else:
    vision = VisionConfig('vit', vision_width, vision_layers, vision_heads or vision_width // 64,
                          image_resolution, vision_patch_size)
  text = TextConfig(transformer_width, transformer_layers, transformer_heads, context_length,
                    vocab_size)
  return CLIPConfig(embed_dim, vision, text)


MODELS = {
    'RN50': openai_config(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    'RN101': openai_config(512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    'RN50x4': openai_config(640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    'RN50x16': openai_config(768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    'RN50x64': openai_config(1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    'ViT-B/32': openai_config(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    'ViT-B/16': openai_config(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    'ViT-L/14': openai_config(768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    'ViT-L/14@336px': openai_config(768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
}


def get_config(name):
  """The config of an official model, or a KeyError listing the known names."""
  if name not in MODELS:
    raise KeyError(f'unknown model {name!r}; known models: {sorted(MODELS)}')
  return MODELS[name]


def normalize_image(images):
  """NHWC images in [0, 1] -> normalised with OpenAI's mean and std."""
  images = np.asarray(images) if not hasattr(images, 'dtype') else images
  if images.ndim < 1 or images.shape[-1] != 3:
    raise ValueError(f'normalize_image expects images (..., H, W, 3), got shape {images.shape}')
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f'normalize_image expects float images in [0, 1], got dtype {images.dtype}; '
                    'divide uint8 images by 255 first')
  mean = np.asarray(IMAGE_MEAN, np.float32)
  std = np.asarray(IMAGE_STD, np.float32)
  return (images - mean.astype(images.dtype)) / std.astype(images.dtype)
