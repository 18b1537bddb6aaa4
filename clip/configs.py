"""Model configurations: frozen dataclasses, hashable so they can be static arguments of `jit`.

A custom model is just another config object; the nine OpenAI models are entries of `MODELS`.
"""
import dataclasses
import os
import typing
import warnings

import jax
import numpy as np

# OpenAI's normalisation constants (RGB, images in [0, 1]).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

ARCHS = ('vit', 'resnet')
DTYPES = ('float32', 'bfloat16', 'float16')


NORMS = ('layernorm', 'rmsnorm')
NORM_PLACEMENTS = ('pre', 'normformer')
MLPS = ('quick_gelu', 'gelu', 'gelu_tanh', 'geglu', 'swiglu')
VISION_POOLS = ('cls', 'gap', 'map')
TEXT_POOLS = ('eot', 'first', 'last', 'map')
VISION_POS = ('learned', 'sincos2d')
TEXT_POS = ('learned', 'rope')
REMATS = ('none', 'block', 'dots')


def _require(ok, message):
  if not ok:
    raise ValueError(message)


def _one_of(value, allowed, name):
  _require(value in allowed, f'{name} must be one of {allowed}, got {value!r}')


OPENAI_VOCAB_SIZE = 49408


class ConfigWarning(UserWarning):
  """A config whose meaning rests on an assumption it does not state (the message names it)."""


def _warn_assumed_eot(owner, tower):
  """A vocabulary other than OpenAI's with no stated end-of-text id is ambiguous: its largest id
  may be an added token. Said wherever the tower reads that id."""
  reads_eot = getattr(tower, 'uses_eot', True)
  if tower.eot_token_id is None and tower.vocab_size != OPENAI_VOCAB_SIZE and reads_eot:
    warnings.warn(f'{owner}(vocab_size={tower.vocab_size}) states no eot_token_id: assumed the '
                  f'last id, {tower.vocab_size - 1}, is the end-of-text token (OpenAI\'s rule). '
                  'Set eot_token_id to state it (a vocabulary with tokens added after its '
                  'end-of-text token needs it).', ConfigWarning, stacklevel=4)


DEFAULT_MLP_RATIO = 4  # an MLP's hidden width when mlp_dim is None: 4 x the tower's width (OpenAI's)


def mlp_dim_field(width, hidden):
  """The `mlp_dim` a config states for an MLP `hidden` wide in a tower `width` wide: None where
  `hidden` is the default 4 x width (so configs compare equal to OpenAI's), else `hidden`. The one
  place this rule is written; every checkpoint family's config reader uses it."""
  return None if hidden == DEFAULT_MLP_RATIO * width else hidden


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockOptions:
  """Transformer options shared by the ViT and the text tower (keyword-only; OpenAI's choices by
  default). `norm`: LayerNorm or RMSNorm for every norm of the tower; `norm_placement`: pre-LN, or
  NormFormer (pre-LN plus a norm after attention, a norm after the MLP activation and a learned
  per-head scale); `norm_eps` every norm's epsilon (None: 1e-5 for LayerNorm as torch and
  OpenAI, 1e-6 for RMSNorm; SigLIP and timm use 1e-6); `mlp`: activation ('gelu' exact,
  'gelu_tanh' the tanh approximation), gated ones (GeGLU, SwiGLU) with a second input matrix
  `c_gate`; `mlp_dim` the hidden width (4 x width by default); `qk_norm` normalises queries and
  keys per head; `bias=False` drops every linear and norm bias; `projection=False` drops the
  final projection, allowed when the width already equals `embed_dim`; `pool_heads` the heads of
  a `map` pooling head (the tower's by default). The options hold no width or heads: the methods
  that need them take them from the tower config."""
  norm: str = 'layernorm'
  norm_placement: str = 'pre'
  norm_eps: float | None = None
  mlp: str = 'quick_gelu'
  mlp_dim: int | None = None
  qk_norm: bool = False
  bias: bool = True
  projection: bool = True
  pool_heads: int | None = None

  def _check_block_options(self, owner, width, heads, pool):
    """Validates these options for a tower `width` wide with `heads` heads pooled by `pool`."""
    _one_of(self.norm, NORMS, f'{owner}.norm')
    _one_of(self.norm_placement, NORM_PLACEMENTS, f'{owner}.norm_placement')
    _one_of(self.mlp, MLPS, f'{owner}.mlp')
    _require(self.norm_eps is None or self.norm_eps > 0,
             f'{owner}.norm_eps must be None (the norm\'s default) or > 0, got {self.norm_eps}')
    _require(self.mlp_dim is None or self.mlp_dim > 0,
             f'{owner}.mlp_dim must be None or > 0, got {self.mlp_dim}')
    _require(self.pool_heads is None or self.pool_heads > 0,
             f'{owner}.pool_heads must be None (the tower\'s heads) or > 0, got {self.pool_heads}')
    if pool == 'map':
      map_heads = self.map_heads_for(heads)
      _require(width % map_heads == 0,
               f'{owner} width {width} is not divisible by its {map_heads} map-pooling heads')

  def hidden_dim_for(self, width):
    """The MLP's hidden width in a tower `width` wide: `mlp_dim`, or 4 x width."""
    return self.mlp_dim or DEFAULT_MLP_RATIO * width

  def map_heads_for(self, heads):
    """The MAP head's attention heads in a tower with `heads` heads: `pool_heads`, or `heads`."""
    return self.pool_heads or heads


_DEFAULT_BLOCK = BlockOptions()


class Execution(typing.NamedTuple):
  """How a tower runs, not what it computes: the forward pass's compute dtype, rematerialisation
  ('none', 'block', 'dots') and scanned blocks. Every tower's `apply` takes one, from
  `CLIPConfig.execution`; each casts its inputs and weights to `dtype` itself."""
  dtype: str = 'float32'
  remat: str = 'none'
  scan: bool = False


# What a CLIPConfig holds besides the architecture its weights compute: how it runs (Execution's
# fields, also CLIPConfig's) and how its inputs are prepared. Loaders compare configs without them.
NON_ARCHITECTURE_FIELDS = Execution._fields + ('tokenizer', 'preprocess')


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VisionConfig(BlockOptions):
  """Image tower. `arch='vit'`: `layers` is an int; `arch='resnet'`: a 4-tuple of block counts.

  For the ModifiedResNet, `width` is the stem width (64 for RN50) and `heads` those of the
  attention pool over the `32 * width` features; the transformer options apply to ViTs only.
  ViT options: `pool` 'cls' (OpenAI: the class token), 'gap' (mean of the patch tokens) or 'map'
  (SigLIP's attention pooling with a learned probe), the class token existing only for 'cls';
  `pos_embedding` learned or a fixed 2-D sin-cos table (computed, not stored); `registers`
  learned tokens after the class token, without positions, kept in the 'gap'/'map' pooling only
  when `pool_registers`; `ln_pre=False` drops the norm before the blocks (SigLIP) and
  `patch_bias=True` gives the patch embedding a bias `conv1.bias` (SigLIP, timm).
  `patch_dropout` is FLIP's patch dropout (Li et al. 2023, "Scaling Language-Image Pre-training
  via Masking"; open_clip's `patch_dropout`): in training, that fraction of the patch tokens of
  each image (a random subset per image, after the position embedding; the class token and the
  registers always kept) is dropped before the blocks; evaluation sees every patch.
  """
  arch: str
  width: int
  layers: int | tuple[int, ...]
  heads: int
  image_resolution: int = 224
  patch_size: int | None = None
  pool: str = 'cls'
  pos_embedding: str = 'learned'
  registers: int = 0
  pool_registers: bool = False
  ln_pre: bool = True
  patch_bias: bool = False
  patch_dropout: float = 0.0

  def __post_init__(self):
    _require(self.arch in ARCHS, f'VisionConfig.arch must be one of {ARCHS}, got {self.arch!r}')
    _require(self.width > 0 and self.heads > 0,
             'VisionConfig needs width > 0 and heads > 0, '
             f'got width={self.width}, heads={self.heads}')
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
      _one_of(self.pool, VISION_POOLS, 'VisionConfig.pool')
      _one_of(self.pos_embedding, VISION_POS, 'VisionConfig.pos_embedding')
      _require(self.pos_embedding != 'sincos2d' or self.width % 4 == 0,
               f'a 2-D sin-cos position table needs a width divisible by 4, got {self.width}')
      _require(self.registers >= 0, f'registers must be >= 0, got {self.registers}')
      _require(0.0 <= self.patch_dropout < 1.0 and self.kept_patches >= 1,
               f'patch_dropout must be in [0, 1) and keep at least one of the '
               f'{self.grid_size ** 2} patches, got {self.patch_dropout}')
      _require(not self.pool_registers or (self.registers and self.pool != 'cls'),
               'pool_registers=True needs registers > 0 and pool "gap" or "map" (the class '
               f'token alone is pooled with "cls"); got registers={self.registers}, '
               f'pool={self.pool!r}')
      self._check_block_options('VisionConfig', self.width, self.heads, self.pool)
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
      vit_only = [f'{f.name}={getattr(self, f.name)!r}' for f in dataclasses.fields(BlockOptions)
                  if getattr(self, f.name) != getattr(_DEFAULT_BLOCK, f.name)]
      vit_only += [f'{name}={getattr(self, name)!r}' for name, default in
                   (('pool', 'cls'), ('pos_embedding', 'learned'), ('registers', 0),
                    ('pool_registers', False), ('ln_pre', True), ('patch_bias', False),
                    ('patch_dropout', 0.0))
                   if getattr(self, name) != default]
      _require(not vit_only, f'transformer options apply to ViTs, not to a ResNet: {vit_only}')

  @property
  def hidden_dim(self):
    """The MLP's hidden width (`mlp_dim`, or 4 x width)."""
    return self.hidden_dim_for(self.width)

  @property
  def map_heads(self):
    """The MAP pooling head's attention heads (`pool_heads`, or `heads`)."""
    return self.map_heads_for(self.heads)

  @property
  def grid_size(self):
    """Side of the token grid the position embedding covers (patches, or ResNet output)."""
    step = self.patch_size if self.arch == 'vit' else 32
    return self.image_resolution // step

  @property
  def kept_patches(self):
    """Patch tokens a training image keeps under `patch_dropout`: round((1 - p) * patches)."""
    return int(round((1.0 - self.patch_dropout) * self.grid_size ** 2))

  @property
  def feature_width(self):
    """Width of the tokens entering the final pooling (ResNet: 32x the stem width)."""
    return self.width if self.arch == 'vit' else self.width * 32


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TextConfig(BlockOptions):
  """Text transformer. OpenAI's: causal, learned positions, pooled at the end-of-text token.
  `eot_token_id` is that token's id (None: OpenAI's rule, the last id `vocab_size - 1`, 49407 for
  OpenAI's vocabulary); set it for a vocabulary with tokens added after it. `pool` 'eot' pools at
  the first occurrence of `eot_token_id` in each row (a row without it is an error, as is an id
  outside [0, vocab_size), wherever the tokens are concrete), 'first' (needs bidirectional
  attention), 'last' (the last position: SigLIP, whose text is padded to the full context; a tower
  that reads the padding takes rows of exactly `context_length`, `clip.text.reads_padding`) or
  'map'; `pos_embedding` learned or rotary (RoPE on queries and keys,
  `rope_theta`); `causal=False` attends in both directions, with the padding after the (first)
  end-of-text token masked out unless `mask_padding=False` (SigLIP attends to every position);
  `projection_bias=True` makes the projection a biased linear layer,
  `text_projection.{weight (embed_dim, width), bias}` in torch's nn.Linear layout (open_clip's
  `proj_bias`, SigLIP's text head)."""
  width: int
  layers: int
  heads: int
  context_length: int = 77
  vocab_size: int = 49408
  pool: str = 'eot'
  pos_embedding: str = 'learned'
  causal: bool = True
  rope_theta: float = 10000.0
  mask_padding: bool = True
  projection_bias: bool = False
  eot_token_id: int | None = None

  def __post_init__(self):
    for name in ('width', 'layers', 'heads', 'context_length', 'vocab_size'):
      _require(getattr(self, name) > 0, f'TextConfig.{name} must be > 0, got {getattr(self, name)}')
    _require(self.eot_token_id is None or 0 <= self.eot_token_id < self.vocab_size,
             f'TextConfig.eot_token_id must be None (vocab_size - 1) or in [0, {self.vocab_size}), '
             f'got {self.eot_token_id}')
    _warn_assumed_eot('TextConfig', self)
    _require(self.width % self.heads == 0,
             f'text width {self.width} is not divisible by heads {self.heads}')
    _one_of(self.pool, TEXT_POOLS, 'TextConfig.pool')
    _one_of(self.pos_embedding, TEXT_POS, 'TextConfig.pos_embedding')
    _require(not (self.pool == 'first' and self.causal),
             'pool="first" with causal attention would see the first token only; use '
             'causal=False or another pool')
    _require(self.causal or self.pool != 'eot' or self.mask_padding,
             'pool="eot" with bidirectional attention and mask_padding=False would let the pooled '
             'token see the padding; mask it or pool elsewhere')
    _require(self.projection or not self.projection_bias,
             'projection_bias=True needs projection=True')
    head_dim = self.width // self.heads
    _require(self.pos_embedding != 'rope' or head_dim % 2 == 0,
             f'RoPE rotates pairs of dimensions: the head dimension {head_dim} '
             f'(width {self.width} / {self.heads} heads) must be even')
    self._check_block_options('TextConfig', self.width, self.heads, self.pool)

  @property
  def hidden_dim(self):
    """The MLP's hidden width (`mlp_dim`, or 4 x width)."""
    return self.hidden_dim_for(self.width)

  @property
  def map_heads(self):
    """The MAP pooling head's attention heads (`pool_heads`, or `heads`)."""
    return self.map_heads_for(self.heads)

  @property
  def eot_id(self):
    """The end-of-text token id: `eot_token_id`, or OpenAI's `vocab_size - 1` when it is None."""
    return self.vocab_size - 1 if self.eot_token_id is None else self.eot_token_id

  @property
  def uses_eot(self):
    """Whether the forward pass reads the end-of-text position (to pool, or to mask padding)."""
    return self.pool == 'eot' or (self.mask_padding and (not self.causal or self.pool == 'map'))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DecoderConfig(BlockOptions):
  """Captioning text decoder (CapPa, Tschannen et al. 2023; CoCa's multimodal decoder): causal
  self-attention over the caption, cross-attention to the image tower's tokens, MLP, per block.
  The block options (norm, MLP kind, qk-norm, biases) are the text tower's; `pool_heads` and
  `projection` do not apply. `image_projection` maps the image tokens (the vision width) to
  `width` with a linear layer; without it the widths must be equal. `tie_embedding` scores the
  vocabulary with the token embedding (CapPa ties nothing: `False` adds `head.{weight, bias}`).
  `eot_token_id` as in `TextConfig` (None: `vocab_size - 1`): generation stops there, and the
  loss covers the caption up to it. `output_ids` (sorted, unique, with the end-of-text id) is a
  vocabulary shortlist: the decoder scores only these ids (the rows of the tied embedding, or a
  head that many rows tall), as a smaller tokenizer would, at a fraction of the cost of scoring
  the whole vocabulary; None scores all `vocab_size` ids."""
  width: int
  layers: int
  heads: int
  context_length: int = 77
  vocab_size: int = 49408
  eot_token_id: int | None = None
  tie_embedding: bool = True
  image_projection: bool = True
  output_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ('width', 'layers', 'heads', 'vocab_size'):
      _require(getattr(self, name) > 0,
               f'DecoderConfig.{name} must be > 0, got {getattr(self, name)}')
    _require(self.context_length > 1, 'DecoderConfig.context_length must be > 1 (a start token '
             f'and one to predict), got {self.context_length}')
    _require(self.width % self.heads == 0,
             f'decoder width {self.width} is not divisible by heads {self.heads}')
    _require(self.eot_token_id is None or 0 <= self.eot_token_id < self.vocab_size,
             f'DecoderConfig.eot_token_id must be None (vocab_size - 1) or in '
             f'[0, {self.vocab_size}), got {self.eot_token_id}')
    _warn_assumed_eot('DecoderConfig', self)
    _require(self.pool_heads is None and self.projection,
             'pool_heads and projection do not apply to a decoder, got '
             f'pool_heads={self.pool_heads}, projection={self.projection}')
    self._check_block_options('DecoderConfig', self.width, self.heads, None)
    if self.output_ids is not None:
      ids = tuple(int(i) for i in self.output_ids)
      object.__setattr__(self, 'output_ids', ids)
      _require(ids == tuple(sorted(set(ids))) and 0 <= ids[0] and ids[-1] < self.vocab_size,
               f'DecoderConfig.output_ids must be sorted unique ids in [0, {self.vocab_size}), '
               f'got {ids[:10]}{"..." if len(ids) > 10 else ""}')
      _require(self.eot_id in ids, f'DecoderConfig.output_ids must hold the end-of-text id '
               f'{self.eot_id}: generation ends there')

  @property
  def num_outputs(self):
    """How many ids the decoder scores: `len(output_ids)`, or `vocab_size`."""
    return self.vocab_size if self.output_ids is None else len(self.output_ids)

  @property
  def hidden_dim(self):
    """The MLP's hidden width (`mlp_dim`, or 4 x width)."""
    return self.hidden_dim_for(self.width)

  @property
  def eot_id(self):
    """The end-of-text token id: `eot_token_id`, or `vocab_size - 1` when it is None."""
    return self.vocab_size - 1 if self.eot_token_id is None else self.eot_token_id


TOKENIZER_KINDS = ('openai', 'siglip', 'siglip2', 'unknown')
# Text cleaning before SentencePiece: transformers' `SiglipTokenizer` ('siglip'), its
# `Siglip2Tokenizer` ('lower'), open_clip's `clean='canonicalize'` ('canonicalize').
TEXT_CLEANS = ('siglip', 'lower', 'canonicalize')
_DEFAULT_CLEAN = {'siglip': 'siglip', 'siglip2': 'lower'}


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
  `canonicalize_text`); None takes transformers' rule for the kind. `kind='unknown'` is a
  tokenizer this package does not run (`name` says what the checkpoint calls it, e.g. open_clip's
  `hf_tokenizer_name`): the weights load, and `get_tokenizer` raises naming it."""
  kind: str = 'openai'
  model_file: str | None = None
  clean: str | None = None
  name: str | None = None

  def __post_init__(self):
    _one_of(self.kind, TOKENIZER_KINDS, 'TokenizerConfig.kind')
    if self.kind == 'unknown':
      _require(self.name, 'TokenizerConfig(kind="unknown") needs a name (what the checkpoint '
               'calls its tokenizer)')
      return
    if self.kind == 'openai':
      _require(self.model_file is None and self.clean is None,
               'OpenAI\'s tokenizer takes no model_file or clean (its vocabulary ships with this '
               f'package), got model_file={self.model_file!r}, clean={self.clean!r}')
      return
    if self.model_file is not None:
      _require(isinstance(self.model_file, (str, os.PathLike)),
               f'TokenizerConfig.model_file must be a path, got {self.model_file!r}')
      object.__setattr__(self, 'model_file', os.fspath(self.model_file))
    if self.clean is None:
      object.__setattr__(self, 'clean', _DEFAULT_CLEAN[self.kind])
    _one_of(self.clean, TEXT_CLEANS, 'TokenizerConfig.clean')


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
  pixel apart when the overhang is 3 modulo 4. `clip.load` sets both for Hugging Face folders."""
  mean: tuple[float, float, float] = IMAGE_MEAN
  std: tuple[float, float, float] = IMAGE_STD
  resize_mode: str = 'shortest'
  interpolation: str = 'bicubic'
  fill_color: int = 0
  convert_first: bool = False
  crop_rounding: str = 'round'

  def __post_init__(self):
    for name in ('mean', 'std'):
      value = tuple(float(x) for x in getattr(self, name))
      object.__setattr__(self, name, value)
      _require(len(value) == 3 and all(np.isfinite(value)),
               f'PreprocessConfig.{name} must be 3 finite numbers (RGB), got {value}')
    _require(all(s > 0 for s in self.std), f'PreprocessConfig.std must be > 0, got {self.std}')
    _one_of(self.resize_mode, RESIZE_MODES, 'PreprocessConfig.resize_mode')
    _one_of(self.interpolation, INTERPOLATIONS, 'PreprocessConfig.interpolation')
    _require(isinstance(self.fill_color, int) and 0 <= self.fill_color <= 255,
             f'PreprocessConfig.fill_color must be an int in [0, 255], got {self.fill_color!r}')
    _require(isinstance(self.convert_first, bool),
             f'PreprocessConfig.convert_first must be a bool, got {self.convert_first!r}')
    _one_of(self.crop_rounding, CROP_ROUNDINGS, 'PreprocessConfig.crop_rounding')


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

  def __post_init__(self):
    _require(isinstance(self.tokenizer, TokenizerConfig),
             f'CLIPConfig.tokenizer must be a TokenizerConfig, got {self.tokenizer!r}')
    _require(isinstance(self.preprocess, PreprocessConfig),
             f'CLIPConfig.preprocess must be a PreprocessConfig, got {self.preprocess!r}')
    _require(self.embed_dim > 0, f'embed_dim must be > 0, got {self.embed_dim}')
    _require(self.dtype in DTYPES, f'CLIPConfig.dtype must be one of {DTYPES}, got {self.dtype!r}')
    if isinstance(self.remat, bool):
      object.__setattr__(self, 'remat', 'block' if self.remat else 'none')
    _one_of(self.remat, REMATS, 'CLIPConfig.remat')
    _require(self.text is not None or self.decoder is not None,
             'a CLIPConfig needs a text tower, a decoder, or both; got text=None, decoder=None')
    _require(self.text is not None or not self.logit_bias,
             'logit_bias=True needs a text tower (the bias is the image-text logits\')')
    self._check_logit_inits()
    towers = (('vision', self.vision),) + ((('text', self.text),) if self.text else ())
    for name, tower in towers:
      if not tower.projection:
        width = tower.feature_width if name == 'vision' else tower.width
        _require(width == self.embed_dim,
                 f'{name}.projection=False needs the {name} width {width} to equal embed_dim '
                 f'{self.embed_dim}')
    if self.decoder is not None:
      self._check_decoder()

  def _check_logit_inits(self):
    for name in ('init_logit_scale', 'init_logit_bias'):
      value = getattr(self, name)
      _require(value is None or (isinstance(value, (int, float)) and np.isfinite(value)),
               f'{name} must be None or a finite number, got {value!r}')
    _require(self.init_logit_scale is None or self.text is not None,
             f'init_logit_scale={self.init_logit_scale} needs a text tower (a captioner without '
             'one has no logit scale)')
    _require(self.init_logit_bias is None or self.logit_bias,
             f'init_logit_bias={self.init_logit_bias} needs logit_bias=True')

  def _check_decoder(self):
    d, v, t = self.decoder, self.vision, self.text
    _require(v.arch == 'vit', 'a captioning decoder cross-attends to ViT tokens; got a '
             f'{v.arch} image tower')
    _require(d.image_projection or d.width == v.width,
             f'decoder width {d.width} does not fit the image tokens of width {v.width}: set '
             'DecoderConfig.image_projection=True or make the widths equal')
    if t is not None:
      _require((d.context_length, d.vocab_size, d.eot_id)
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
    """The towers' `Execution`: this config's dtype, remat and scan."""
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
