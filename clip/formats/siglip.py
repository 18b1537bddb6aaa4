"""What every SigLIP release shares, whichever library carries it (Hugging Face, open_clip's timm
trunks, big_vision's `.npz`): its image preprocessing, its SentencePiece tokenizer's kind, and its
architecture read from our-keyed shapes."""
import os

from clip import configs
from clip import siglip_tokenizer
from clip.formats.openai import count_layers

# open_clip's SigLIP preprocessing (`pretrained._slpcfg`), Hugging Face's `SiglipImageProcessor`
# defaults: squash to the resolution, bicubic, pixels to [-1, 1].
SIGLIP_PREPROCESS = configs.PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                             resize_mode='squash', interpolation='bicubic')
# SentencePiece files a folder may hold: transformers' `SiglipTokenizer` (spiece.model) and
# Gemma's (tokenizer.model); open_clip's hub folders hold what transformers saved.
SENTENCEPIECE_FILES = ('spiece.model', 'tokenizer.model')
# Gemma's vocabulary size (SigLIP 2); T5's are 32000 (c4_en) and 250000 (mc4).
_GEMMA_VOCAB = 256000


def sentencepiece_in(folder):
  """The first of `SENTENCEPIECE_FILES` in `folder`, or None."""
  for name in SENTENCEPIECE_FILES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def kind_from_vocab(vocab_size):
  """The tokenizer kind of a SigLIP vocabulary: Gemma's (SigLIP 2) or T5's."""
  return 'siglip2' if vocab_size == _GEMMA_VOCAB else 'siglip'


def tokenizer_from_file(model_file, clean=None):
  """A TokenizerConfig for a SentencePiece `.model` path, its kind read from the file."""
  kind = siglip_tokenizer.kind_of(model_file)
  return configs.TokenizerConfig(kind, os.path.abspath(model_file), clean)


def siglip_from_shapes(flat, vision_heads, text_heads, vision_mlp, text_mlp, norm_eps=1e-6):
  """A SigLIP config from our-keyed shapes: MAP head, no ln_pre, patch bias, bidirectional text
  pooled at the last position with a biased projection. Head counts and activations are not in
  the shapes: the caller says them."""
  shape = lambda k: tuple(flat[k].shape)
  width, _, patch, _ = shape('visual.conv1.weight')
  grid = round(shape('visual.positional_embedding')[0] ** 0.5)
  vision = configs.VisionConfig(
      'vit', width, count_layers(flat, r'visual\.transformer\.resblocks\.(\d+)\.'), vision_heads,
      patch * grid, patch, pool='map', ln_pre=False, patch_bias=True, projection=False,
      mlp=vision_mlp, norm_eps=norm_eps, mlp_dim=configs.mlp_dim_field(
          width, shape('visual.transformer.resblocks.0.mlp.c_fc.weight')[0]))
  t_width = shape('ln_final.weight')[0]
  text = configs.TextConfig(
      t_width, count_layers(flat, r'transformer\.resblocks\.(\d+)\.'), text_heads,
      shape('positional_embedding')[0], shape('token_embedding.weight')[0], pool='last',
      causal=False, mask_padding=False, projection_bias=True, mlp=text_mlp, norm_eps=norm_eps,
      mlp_dim=configs.mlp_dim_field(t_width, shape('transformer.resblocks.0.mlp.c_fc.weight')[0]))
  return configs.CLIPConfig(shape('text_projection.weight')[0], vision, text, logit_bias=True)
