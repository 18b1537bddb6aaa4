"""The towers' configs: the image tower (ViT or ModifiedResNet), the text tower and the captioning
decoder, the transformer options they share (`BlockOptions`) and how they run (`Execution`).
Frozen dataclasses, registered static so that they can be arguments of `jit`; each validates
itself when built (ValueError naming the field, what it allows and what it got)."""
import dataclasses
import typing
import warnings

import jax

from clip.config_checks import ConfigWarning
from clip.config_checks import one_of
from clip.config_checks import require

ARCHS = ('vit', 'resnet')
DTYPES = ('float32', 'bfloat16', 'float16')
REMATS = ('none', 'block', 'dots')
ATTENTIONS = ('xla', 'cudnn', 'einsum')
NORMS = ('layernorm', 'rmsnorm')
NORM_PLACEMENTS = ('pre', 'normformer', 'subln', 'res_post')
# Placements and biases the image tower alone runs (EVA's): the text tower's and the decoder's
# single-position paths (`causal_block_at`, the KV-cache step) apply only pre-norm blocks.
VISION_ONLY_PLACEMENTS = ('subln', 'res_post')
MLPS = ('quick_gelu', 'gelu', 'gelu_tanh', 'geglu', 'swiglu')
VISION_POOLS = ('cls', 'gap', 'map')
TEXT_POOLS = ('eot', 'first', 'last', 'map')
VISION_POS = ('learned', 'sincos2d')
TEXT_POS = ('learned', 'rope')

OPENAI_VOCAB_SIZE = 49408

# An MLP's hidden width when mlp_dim is None: 4 x the tower's width (OpenAI's).
DEFAULT_MLP_RATIO = 4


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
  per-head scale), or, in image towers only, 'subln' (sub-LN, Wang et al. 2022 "Foundation
  Transformers", EVA02's `scale_attn_inner` + `scale_mlp`: pre-LN plus a norm of the heads'
  concatenated output before `out_proj`, `attn.ln_inner`, and one of the MLP's hidden activations
  before `c_proj`, `mlp.ln`) or 'res_post' (EVA02-E's residual post-norm, Liu et al. 2022 "Swin
  Transformer V2": `x + ln_1(attn(x))`, `x + ln_2(mlp(x))`); `norm_eps` every norm's epsilon
  (None: 1e-5 for LayerNorm as torch and OpenAI, 1e-6 for RMSNorm; SigLIP and timm use 1e-6);
  `mlp`: activation ('gelu' exact, 'gelu_tanh' the tanh approximation), gated ones (GeGLU,
  SwiGLU) with a second input matrix `c_gate`; `mlp_dim` the hidden width (4 x width by
  default); `qk_norm` normalises queries and keys per head; `bias=False` drops every linear and
  norm bias; `k_bias=False` (image towers: EVA's attention) gives the blocks' queries and values
  a bias but not their keys, `attn.{q_bias, v_bias}` (D,) in place of `attn.in_proj_bias`;
  `projection=False` drops the final projection, allowed when the width already equals
  `embed_dim`; `pool_heads` the heads of a `map` pooling head (the tower's by default). The
  options hold no width or heads: `hidden_dim` and `map_heads` read the tower config's `width`
  and `heads`."""
  norm: str = 'layernorm'
  norm_placement: str = 'pre'
  norm_eps: float | None = None
  mlp: str = 'quick_gelu'
  mlp_dim: int | None = None
  qk_norm: bool = False
  bias: bool = True
  k_bias: bool = True
  projection: bool = True
  pool_heads: int | None = None

  def _check_block_options(self, owner, pool):
    """Validates these options for the tower they are part of, pooled by `pool`."""
    one_of(self.norm, NORMS, f'{owner}.norm')
    one_of(self.norm_placement, NORM_PLACEMENTS, f'{owner}.norm_placement')
    one_of(self.mlp, MLPS, f'{owner}.mlp')
    require(self.norm_eps is None or self.norm_eps > 0,
            f'{owner}.norm_eps must be None (the norm\'s default) or > 0, got {self.norm_eps}')
    require(self.mlp_dim is None or self.mlp_dim > 0,
            f'{owner}.mlp_dim must be None or > 0, got {self.mlp_dim}')
    require(owner == 'VisionConfig' or (self.norm_placement not in VISION_ONLY_PLACEMENTS
                                         and self.k_bias),
            f'{owner}: norm_placement {self.norm_placement!r} and k_bias=False are image-tower '
            f'options, got norm_placement={self.norm_placement!r}, k_bias={self.k_bias}')
    require(self.bias or self.k_bias, f'{owner}.k_bias=False needs bias=True (without biases '
            'there is no key bias to drop)')
    require(self.pool_heads is None or self.pool_heads > 0,
            f'{owner}.pool_heads must be None (the tower\'s heads) or > 0, got {self.pool_heads}')
    if pool == 'map':
      require(self.width % self.map_heads == 0, f'{owner} width {self.width} is not divisible '
              f'by its {self.map_heads} map-pooling heads')

  @property
  def hidden_dim(self):
    """The MLP's hidden width (`mlp_dim`, or 4 x the tower's width)."""
    return self.mlp_dim or DEFAULT_MLP_RATIO * self.width

  @property
  def map_heads(self):
    """The MAP pooling head's attention heads (`pool_heads`, or the tower's heads)."""
    return self.pool_heads or self.heads


_DEFAULT_BLOCK = BlockOptions()


class Execution(typing.NamedTuple):
  """How a tower runs, not what it computes: the forward pass's compute dtype, rematerialisation
  ('none', 'block', 'dots'), scanned blocks and the attention's implementation. Every tower's
  `apply` takes one, from `CLIPConfig.execution`; each casts its inputs and weights to `dtype`
  itself.

  `attention` (one of `ATTENTIONS`) picks how every attention of every tower runs (the blocks,
  the decoder's self- and cross-attention and its KV-cache step, the MAP and ResNet attention
  pools); all compute the same function, softmax in fp32 (`clip.layers.attention_heads`):
  'xla' is `jax.nn.dot_product_attention` lowered by XLA, on any device (the default); 'cudnn'
  the same call through cuDNN's fused flash-attention kernel, on NVIDIA GPUs only, for fp16 /
  bf16 and head dimensions that are multiples of 8 up to 128 (256 from Hopper on): JAX raises
  (RuntimeError on a machine without cuDNN, NotImplementedError for shapes the kernel lacks),
  it never falls back; 'einsum' the explicit einsum-softmax-einsum, the tests' reference."""
  dtype: str = 'float32'
  remat: str = 'none'
  scan: bool = False
  attention: str = 'xla'


class EndOfText:
  """The end-of-text token of a tower that reads tokens (the text tower, the decoder): its
  `eot_token_id`, or OpenAI's rule, the last id of `vocab_size`."""

  @property
  def eot_id(self):
    """The end-of-text token id: `eot_token_id`, or OpenAI's `vocab_size - 1` when it is None."""
    return self.vocab_size - 1 if self.eot_token_id is None else self.eot_token_id

  def _check_eot(self, owner):
    """Validates `eot_token_id`. A vocabulary other than OpenAI's with no stated end-of-text id
    is ambiguous (its largest id may be an added token): a ConfigWarning says what is assumed,
    wherever the tower reads that id."""
    require(self.eot_token_id is None or 0 <= self.eot_token_id < self.vocab_size,
            f'{owner}.eot_token_id must be None (vocab_size - 1) or in [0, {self.vocab_size}), '
            f'got {self.eot_token_id}')
    if self.eot_token_id is None and self.vocab_size != OPENAI_VOCAB_SIZE and getattr(
        self, 'uses_eot', True):
      warnings.warn(f'{owner}(vocab_size={self.vocab_size}) states no eot_token_id: assumed the '
                    f'last id, {self.vocab_size - 1}, is the end-of-text token (OpenAI\'s rule). '
                    'Set eot_token_id to state it (a vocabulary with tokens added after its '
                    'end-of-text token needs it).', ConfigWarning, stacklevel=4)


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
  The patch grid is `image_resolution // patch_size` a side: a resolution that is no multiple of
  the patch floors as torch's stride-`patch_size` conv does, dropping the last
  `image_resolution % patch_size` pixel rows and columns (SigLIP So400m/14 at 384 px: a 27 x 27
  grid over the first 378 pixels, as timm and transformers run it). The input image is still the
  full `image_resolution` square.
  `rope_2d=True` adds EVA's 2-D rotary position embedding (Heo et al. 2024, "Rotary Position
  Embedding for Vision Transformer"; timm's `RotaryEmbeddingCat` as its `Eva` applies it) to the
  blocks' queries and keys: of each head's pairs (2i, 2i+1) the first half turn with the patch's
  row (with `rope_xy`, timm's 'xy' indexing: its column), the second with the other, at
  frequencies `rope_theta^(-k / (head_dim/4))`, row and column taken as `(index +
  rope_grid_offset) * rope_ref_grid / grid_size` (timm's `grid_offset`, `ref_feat_shape`; None:
  unscaled); the class token and registers are not rotated (`clip.rope2d`). `class_token=True`
  gives a 'map' pooled tower a class token, which its MAP head attends to (Perception Encoder).
  `projection_bias=True` makes the projection nn.Linear's `proj.{weight (embed_dim, width), bias}`.
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
  rope_2d: bool = False
  rope_theta: float = 10000.0
  rope_ref_grid: int | None = None
  rope_grid_offset: float = 0.0
  rope_xy: bool = False
  class_token: bool = False
  projection_bias: bool = False

  def __post_init__(self):
    require(self.arch in ARCHS, f'VisionConfig.arch must be one of {ARCHS}, got {self.arch!r}')
    require(self.width > 0 and self.heads > 0,
            'VisionConfig needs width > 0 and heads > 0, '
            f'got width={self.width}, heads={self.heads}')
    if self.arch == 'vit':
      require(isinstance(self.layers, int) and self.layers > 0,
              f'a ViT needs an int number of layers > 0, got {self.layers!r}')
      require(self.patch_size is not None and self.patch_size > 0,
              f'a ViT needs patch_size > 0, got {self.patch_size!r}')
      require(self.image_resolution >= self.patch_size,
              f'image_resolution {self.image_resolution} is smaller than patch_size '
              f'{self.patch_size}')
      require(self.width % self.heads == 0,
              f'ViT width {self.width} is not divisible by heads {self.heads}')
      one_of(self.pool, VISION_POOLS, 'VisionConfig.pool')
      one_of(self.pos_embedding, VISION_POS, 'VisionConfig.pos_embedding')
      require(self.pos_embedding != 'sincos2d' or self.width % 4 == 0,
              f'a 2-D sin-cos position table needs a width divisible by 4, got {self.width}')
      require(self.registers >= 0, f'registers must be >= 0, got {self.registers}')
      require(0.0 <= self.patch_dropout < 1.0 and self.kept_patches >= 1,
              f'patch_dropout must be in [0, 1) and keep at least one of the '
              f'{self.grid_size ** 2} patches, got {self.patch_dropout}')
      require(not self.pool_registers or (self.registers and self.pool != 'cls'),
              'pool_registers=True needs registers > 0 and pool "gap" or "map" (the class '
              f'token alone is pooled with "cls"); got registers={self.registers}, '
              f'pool={self.pool!r}')
      self._check_rope_2d()
      require(not self.class_token or (self.pool == 'map' and not self.registers),
              'class_token=True is for a "map" pooled tower without registers ("cls" pooling '
              f'always has one), got pool={self.pool!r}, registers={self.registers}')
      require(self.projection or not self.projection_bias,
              'projection_bias=True needs projection=True')
      self._check_block_options('VisionConfig', self.pool)
    else:
      object.__setattr__(self, 'layers', tuple(self.layers))
      require(len(self.layers) == 4 and all(n > 0 for n in self.layers),
              f'a ModifiedResNet needs 4 positive block counts, got {self.layers!r}')
      require(self.patch_size is None, f'a ResNet has no patch_size, got {self.patch_size!r}')
      require(self.image_resolution % 32 == 0,
              f'ResNet image_resolution must be a multiple of 32, got {self.image_resolution}')
      require(self.width % 2 == 0, f'ResNet stem width must be even, got {self.width}')
      require(self.feature_width % self.heads == 0,
              f'ResNet feature width {self.feature_width} is not divisible by heads {self.heads}')
      vit_only = [f'{f.name}={getattr(self, f.name)!r}' for f in dataclasses.fields(BlockOptions)
                  if getattr(self, f.name) != getattr(_DEFAULT_BLOCK, f.name)]
      vit_only += [f'{name}={getattr(self, name)!r}' for name, default in
                   (('pool', 'cls'), ('pos_embedding', 'learned'), ('registers', 0),
                    ('pool_registers', False), ('ln_pre', True), ('patch_bias', False),
                    ('patch_dropout', 0.0), ('rope_2d', False), ('rope_ref_grid', None),
                    ('rope_grid_offset', 0.0), ('rope_xy', False), ('class_token', False),
                    ('projection_bias', False))
                   if getattr(self, name) != default]
      require(not vit_only, f'transformer options apply to ViTs, not to a ResNet: {vit_only}')

  def _check_rope_2d(self):
    head_dim = self.width // self.heads
    require(not self.rope_2d or (head_dim % 4 == 0 and not self.patch_dropout),
            '2-D RoPE needs a head dimension (width / heads) divisible by 4 and no patch_dropout, '
            f'got {head_dim} and {self.patch_dropout}')
    require(self.rope_2d or (self.rope_ref_grid, self.rope_grid_offset, self.rope_xy) == (
        None, 0.0, False), 'rope_ref_grid, rope_grid_offset and rope_xy need rope_2d=True')
    require(self.rope_ref_grid is None or self.rope_ref_grid > 0,
            f'rope_ref_grid must be None or > 0, got {self.rope_ref_grid}')

  @property
  def has_class_token(self):
    """Whether the tokens start with a class token ('cls' pooling, or `class_token`)."""
    return self.pool == 'cls' or self.class_token

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
class TextConfig(BlockOptions, EndOfText):
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
      require(getattr(self, name) > 0, f'TextConfig.{name} must be > 0, got {getattr(self, name)}')
    self._check_eot('TextConfig')
    require(self.width % self.heads == 0,
            f'text width {self.width} is not divisible by heads {self.heads}')
    one_of(self.pool, TEXT_POOLS, 'TextConfig.pool')
    one_of(self.pos_embedding, TEXT_POS, 'TextConfig.pos_embedding')
    require(not (self.pool == 'first' and self.causal),
            'pool="first" with causal attention would see the first token only; use '
            'causal=False or another pool')
    require(self.causal or self.pool != 'eot' or self.mask_padding,
            'pool="eot" with bidirectional attention and mask_padding=False would let the pooled '
            'token see the padding; mask it or pool elsewhere')
    require(self.projection or not self.projection_bias,
            'projection_bias=True needs projection=True')
    head_dim = self.width // self.heads
    require(self.pos_embedding != 'rope' or head_dim % 2 == 0,
            f'RoPE rotates pairs of dimensions: the head dimension {head_dim} '
            f'(width {self.width} / {self.heads} heads) must be even')
    self._check_block_options('TextConfig', self.pool)

  @property
  def uses_eot(self):
    """Whether the forward pass reads the end-of-text position (to pool, or to mask padding)."""
    return self.pool == 'eot' or (self.mask_padding and (not self.causal or self.pool == 'map'))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DecoderConfig(BlockOptions, EndOfText):
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
      require(getattr(self, name) > 0,
              f'DecoderConfig.{name} must be > 0, got {getattr(self, name)}')
    require(self.context_length > 1, 'DecoderConfig.context_length must be > 1 (a start token '
            f'and one to predict), got {self.context_length}')
    require(self.width % self.heads == 0,
            f'decoder width {self.width} is not divisible by heads {self.heads}')
    self._check_eot('DecoderConfig')
    require(self.pool_heads is None and self.projection,
            'pool_heads and projection do not apply to a decoder, got '
            f'pool_heads={self.pool_heads}, projection={self.projection}')
    self._check_block_options('DecoderConfig', None)
    if self.output_ids is not None:
      ids = tuple(int(i) for i in self.output_ids)
      object.__setattr__(self, 'output_ids', ids)
      require(ids == tuple(sorted(set(ids))) and 0 <= ids[0] and ids[-1] < self.vocab_size,
              f'DecoderConfig.output_ids must be sorted unique ids in [0, {self.vocab_size}), '
              f'got {ids[:10]}{"..." if len(ids) > 10 else ""}')
      require(self.eot_id in ids, f'DecoderConfig.output_ids must hold the end-of-text id '
              f'{self.eot_id}: generation ends there')

  @property
  def num_outputs(self):
    """How many ids the decoder scores: `len(output_ids)`, or `vocab_size`."""
    return self.vocab_size if self.output_ids is None else len(self.output_ids)
