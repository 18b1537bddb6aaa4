"""Model configurations: frozen dataclasses, hashable so they can be static arguments of `jit`.

A custom model is just another config object; the nine OpenAI models are entries of `MODELS`.
`CLIPConfig` is the two-tower model: its towers' configs are `clip.tower_configs`'s, its
tokenizer's and image preprocessing's `clip.processing_configs`'s (all reachable from here too).
"""
import dataclasses

import jax
import numpy as np

from clip.config_checks import ConfigWarning
from clip.config_checks import one_of
from clip.config_checks import require
from clip.processing_configs import CROP_ROUNDINGS
from clip.processing_configs import IMAGE_MEAN
from clip.processing_configs import IMAGE_STD
from clip.processing_configs import INTERPOLATIONS
from clip.processing_configs import PreprocessConfig
from clip.processing_configs import RESIZE_MODES
from clip.processing_configs import TokenizerConfig
from clip.processing_configs import normalize_image
from clip.processing_configs import normalize_with
from clip.tower_configs import ATTENTIONS
from clip.tower_configs import BlockOptions
from clip.tower_configs import DEFAULT_MLP_RATIO
from clip.tower_configs import DTYPES
from clip.tower_configs import DecoderConfig
from clip.tower_configs import Execution
from clip.tower_configs import OPENAI_VOCAB_SIZE
from clip.tower_configs import REMATS
from clip.tower_configs import TextConfig
from clip.tower_configs import VisionConfig
from clip.tower_configs import mlp_dim_field

# What a CLIPConfig holds besides the architecture its weights compute: how it runs (Execution's
# fields, also CLIPConfig's) and how its inputs are prepared. Loaders compare configs without them.
NON_ARCHITECTURE_FIELDS = Execution._fields + ('tokenizer', 'preprocess')


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """The two-tower model. `dtype` is the compute dtype of the forward pass; params stay fp32.

  `scan=True` holds each transformer's blocks stacked (one leading layer axis, under
  `resblocks.<key>`) and runs them with `lax.scan`: one block to compile, whatever the depth
  (`clip.stack_layers` / `clip.unstack_layers` convert, exports unstack). `remat` recomputes in the
  backward pass: 'none', 'block' (keep only each block's input; ResNet: each bottleneck) or
  'dots' (keep the matmul outputs without batch dimensions, recompute the rest); `True`/`False`
  mean 'block'/'none'. `logit_bias=True` adds SigLIP's learnable bias. `init_logit_scale` is the
  logit scale's start, a log temperature (None: CLIP's ln(1/0.07), or SigLIP's ln 10 with a bias),
  `init_logit_bias` the bias's start (None: SigLIP's -10); open_clip's names for both.
  `attention` is how every attention runs: 'xla' (`jax.nn.dot_product_attention`), 'cudnn'
  (its cuDNN flash-attention kernel, NVIDIA GPUs, fp16/bf16) or 'einsum' (`Execution`).

  `decoder` adds a captioning text decoder (`clip/decoder.py`) over the image tower's tokens
  (SigLIP 2 / CoCa with a text tower; CapPa with `text=None`, which has no text tower, no
  contrastive embedding and no logit scale). A decoder needs a ViT image tower, and with a text
  tower it reads the same tokens: equal context lengths and vocabularies.

  A model is its weights, its tokenizer and its image preprocessing: `tokenizer` (a
  `TokenizerConfig`, OpenAI's BPE by default) and `preprocess` (a `PreprocessConfig`, OpenAI's
  resize, centre crop and normalisation by default) are what `clip.get_tokenizer(cfg)` and
  `clip.preprocess_images(images, cfg)` use, set by `clip.load` from the checkpoint's family and
  files, and written into every export."""
  embed_dim: int
  vision: VisionConfig
  text: TextConfig | None
  dtype: str = 'float32'
  remat: str = 'none'
  scan: bool = False
  logit_bias: bool = False
  decoder: DecoderConfig | None = None
  init_logit_scale: float | None = None
  init_logit_bias: float | None = None
  tokenizer: TokenizerConfig = TokenizerConfig()
  preprocess: PreprocessConfig = PreprocessConfig()
  attention: str = 'xla'

  def __post_init__(self):
    require(isinstance(self.tokenizer, TokenizerConfig),
            f'CLIPConfig.tokenizer must be a TokenizerConfig, got {self.tokenizer!r}')
    require(isinstance(self.preprocess, PreprocessConfig),
            f'CLIPConfig.preprocess must be a PreprocessConfig, got {self.preprocess!r}')
    require(self.embed_dim > 0, f'embed_dim must be > 0, got {self.embed_dim}')
    require(self.dtype in DTYPES, f'CLIPConfig.dtype must be one of {DTYPES}, got {self.dtype!r}')
    if isinstance(self.remat, bool):
      object.__setattr__(self, 'remat', 'block' if self.remat else 'none')
    one_of(self.remat, REMATS, 'CLIPConfig.remat')
    one_of(self.attention, ATTENTIONS, 'CLIPConfig.attention')
    require(self.text is not None or self.decoder is not None,
            'a CLIPConfig needs a text tower, a decoder, or both; got text=None, decoder=None')
    require(self.text is not None or not self.logit_bias,
            'logit_bias=True needs a text tower (the bias is the image-text logits\')')
    self._check_logit_inits()
    towers = (('vision', self.vision),) + ((('text', self.text),) if self.text else ())
    for name, tower in towers:
      if not tower.projection:
        width = tower.feature_width if name == 'vision' else tower.width
        require(width == self.embed_dim,
                f'{name}.projection=False needs the {name} width {width} to equal embed_dim '
                f'{self.embed_dim}')
    if self.decoder is not None:
      self._check_decoder()

  def _check_logit_inits(self):
    for name in ('init_logit_scale', 'init_logit_bias'):
      value = getattr(self, name)
      require(value is None or (isinstance(value, (int, float)) and np.isfinite(value)),
              f'{name} must be None or a finite number, got {value!r}')
    require(self.init_logit_scale is None or self.text is not None,
            f'init_logit_scale={self.init_logit_scale} needs a text tower (a captioner without '
            'one has no logit scale)')
    require(self.init_logit_bias is None or self.logit_bias,
            f'init_logit_bias={self.init_logit_bias} needs logit_bias=True')

  def _check_decoder(self):
    d, v, t = self.decoder, self.vision, self.text
    require(v.arch == 'vit', 'a captioning decoder cross-attends to ViT tokens; got a '
            f'{v.arch} image tower')
    require(d.image_projection or d.width == v.width,
            f'decoder width {d.width} does not fit the image tokens of width {v.width}: set '
            'DecoderConfig.image_projection=True or make the widths equal')
    if t is not None:
      require((d.context_length, d.vocab_size, d.eot_id)
              == (t.context_length, t.vocab_size, t.eot_id),
              'the decoder reads the text tower\'s tokens: context_length, vocab_size and the '
              f'end-of-text id must match, got decoder {d.context_length}, {d.vocab_size}, '
              f'{d.eot_id} and text {t.context_length}, {t.vocab_size}, {t.eot_id}')

  @property
  def image_resolution(self):
    return self.vision.image_resolution

  @property
  def context_length(self):
    return (self.text or self.decoder).context_length

  @property
  def execution(self):
    """The towers' `Execution`: this config's dtype, remat, scan and attention."""
    return Execution(*(getattr(self, name) for name in Execution._fields))

  @property
  def logit_scale_range(self):
    """`(low, high)`, the range training clamps `logit_scale` to after each update, or None for
    none; it is the model family's. CLIP (OpenAI, open_clip): [0, ln 100], their
    `logit_scale.clamp(0, ln 100)`. SigLIP (`logit_bias=True`): none, as big_vision trains it
    (`big_vision/models/proj/image_text/two_towers.py` uses `exp(t)` of the raw parameter; its
    released checkpoints hold t of about ln 110 to ln 118, kornia#3481), so a SigLIP
    checkpoint is not pulled to ln 100 by fine-tuning. (open_clip's trainer clamps every model,
    its SigLIP ones included.) A frozen logit scale is never clamped (`clip.train.freezing`)."""
    return None if self.logit_bias else (0.0, float(np.log(100.0)))


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


# OpenAI's nine models, in the arguments of its `CLIP.__init__` (all: context_length=77,
# vocab_size=49408, transformer_layers=12).
_OPENAI = dict(context_length=77, vocab_size=49408, transformer_layers=12)
MODELS = {
    'RN50': openai_config(
        embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
        vision_patch_size=None, transformer_width=512, transformer_heads=8, **_OPENAI),
    'RN101': openai_config(
        embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3), vision_width=64,
        vision_patch_size=None, transformer_width=512, transformer_heads=8, **_OPENAI),
    'RN50x4': openai_config(
        embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80,
        vision_patch_size=None, transformer_width=640, transformer_heads=10, **_OPENAI),
    'RN50x16': openai_config(
        embed_dim=768, image_resolution=384, vision_layers=(6, 8, 18, 8), vision_width=96,
        vision_patch_size=None, transformer_width=768, transformer_heads=12, **_OPENAI),
    'RN50x64': openai_config(
        embed_dim=1024, image_resolution=448, vision_layers=(3, 15, 36, 10), vision_width=128,
        vision_patch_size=None, transformer_width=1024, transformer_heads=16, **_OPENAI),
    'ViT-B/32': openai_config(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
        vision_patch_size=32, transformer_width=512, transformer_heads=8, **_OPENAI),
    'ViT-B/16': openai_config(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
        vision_patch_size=16, transformer_width=512, transformer_heads=8, **_OPENAI),
    'ViT-L/14': openai_config(
        embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
        vision_patch_size=14, transformer_width=768, transformer_heads=12, **_OPENAI),
    'ViT-L/14@336px': openai_config(
        embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
        vision_patch_size=14, transformer_width=768, transformer_heads=12, **_OPENAI),
}


def get_config(name):
  """The config of an official model, or a KeyError listing the known names."""
  if name not in MODELS:
    raise KeyError(f'unknown model {name!r}; known models: {sorted(MODELS)}')
  return MODELS[name]


# ---------------------------------------------------------------- to and from JSON-ready dicts

_NESTED = {'vision': VisionConfig, 'text': TextConfig, 'decoder': DecoderConfig,
           'tokenizer': TokenizerConfig, 'preprocess': PreprocessConfig}


def to_dict(cfg):
  """A CLIPConfig -> nested dicts of plain values (JSON-ready; tuples become lists)."""
  if not isinstance(cfg, CLIPConfig):
    raise TypeError(f'to_dict takes a CLIPConfig, got {type(cfg).__name__}')
  return dataclasses.asdict(cfg)


def _from_fields(cls, values, where):
  if not isinstance(values, dict):
    raise ValueError(f'{where} must be a dict of {cls.__name__} fields, got {values!r}')
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f'{where}: {cls.__name__} has no fields {unknown}; its fields: '
                     f'{sorted(names)}')
  kwargs = {}
  for name, value in values.items():
    if cls is CLIPConfig and name in _NESTED and value is not None:
      value = _from_fields(_NESTED[name], value, f'{where}.{name}')
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  return cls(**kwargs)


def from_dict(values):
  """`to_dict`'s result (e.g. read from JSON) -> the CLIPConfig; an unknown field is a
  ValueError naming it, and every field is validated as the config's constructor does."""
  return _from_fields(CLIPConfig, values, 'config')
