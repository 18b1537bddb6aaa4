"""open_clip configs (clip/formats/open_clip.py): every converted config has the parameters (keys,
shapes) and the hyper-parameters (heads, MLP width, activation, norm eps, pooling, masking) of the
torch model open_clip builds from the same model_cfg, built full size on the meta device (no
memory). What we cannot represent raises a ValueError naming the key."""
import copy
import dataclasses
import functools
import inspect

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.formats import families
from clip.formats import open_clip as occ
from clip.formats import open_clip_names as names
from clip.formats import openai
from experiments.references import open_clip as open_clip_reference

STANDARD = ('RN50', 'RN101', 'RN50x4', 'RN50x16', 'RN50x64', 'ViT-B-32', 'ViT-B-16', 'ViT-L-14',
            'ViT-L-14-336', 'ViT-H-14', 'ViT-g-14', 'ViT-bigG-14')
TIMM_NAMES = sorted(n for n, c in names.MODEL_CFGS.items() if 'timm_model_name' in c['vision_cfg'])
SIGLIP_NAMES = [n for n in TIMM_NAMES if 'SigLIP' in n]
OWN_NAMES = sorted(set(names.MODEL_CFGS) - set(TIMM_NAMES))
# One SigLIP name per timm trunk, these also covering every text tower of the table.
SIGLIP_BUILDS = ('ViT-B-32-SigLIP2-256', 'ViT-B-16-SigLIP', 'ViT-B-16-SigLIP2-256',
                 'ViT-B-16-SigLIP-i18n-256', 'ViT-B-16-SigLIP-384', 'ViT-B-16-SigLIP2-512',
                 'ViT-L-16-SigLIP-256', 'ViT-L-16-SigLIP2-384', 'ViT-L-16-SigLIP2-512',
                 'ViT-SO400M-14-SigLIP', 'ViT-SO400M-14-SigLIP-378', 'ViT-SO400M-14-SigLIP-384',
                 'ViT-SO400M-14-SigLIP2-378',
                 'ViT-SO400M-16-SigLIP-i18n-256', 'ViT-SO400M-16-SigLIP2-384',
                 'ViT-SO400M-16-SigLIP2-512', 'ViT-gopt-16-SigLIP2-256', 'ViT-gopt-16-SigLIP2-384')
# open_clip's configs with a timm Eva trunk that we run, one per trunk (full size, on the meta
# device; the '-plus' configs differ only in their text towers, open_clip's own).
EVA_BUILDS = ('EVA01-g-14', 'EVA02-B-16', 'EVA02-L-14', 'EVA02-L-14-336', 'EVA02-E-14',
              'PE-Core-T-16-384', 'PE-Core-S-16-384', 'PE-Core-B-16', 'PE-Core-L-14-336')
OPENAI_NAMES = {'RN50': 'RN50', 'RN101': 'RN101', 'RN50x4': 'RN50x4', 'RN50x16': 'RN50x16',
                'RN50x64': 'RN50x64', 'ViT-B/32': 'ViT-B-32', 'ViT-B/16': 'ViT-B-16',
                'ViT-L/14': 'ViT-L-14', 'ViT-L/14@336px': 'ViT-L-14-336'}


@pytest.fixture(scope='module')
def oc():
  return open_clip_reference.import_open_clip()


def build(oc, model_cfg):
  """open_clip's model of a model_cfg, of the class `create_model` picks, on the meta device."""
  cfg = copy.deepcopy(model_cfg)
  model_class = oc.model.CustomTextCLIP if cfg.pop('custom_text', False) else oc.model.CLIP
  with torch.device('meta'):
    return model_class(**cfg)


_ACTIVATIONS = {
    'quick_gelu': lambda x: x * torch.sigmoid(1.702 * x),
    'gelu': F.gelu,
    'gelu_tanh': functools.partial(F.gelu, approximate='tanh'),
}


def activation(module):
  """Which of our MLP activations a parameter-free torch module computes (by its values)."""
  x = torch.linspace(-5, 5, 201)
  found = [n for n, f in _ACTIVATIONS.items() if torch.allclose(module(x), f(x), rtol=0, atol=1e-6)]
  assert len(found) == 1, (module, found)
  return found[0]


def ours(tower):
  """(layers, heads, MLP hidden, activation, norm eps) of one of our towers."""
  return tower.layers, tower.heads, tower.hidden_dim, tower.mlp, tower.norm_eps or 1e-5


def open_clip_blocks(transformer, final_norm):
  """The same numbers of an open_clip Transformer, its eps read from `final_norm` too."""
  block = transformer.resblocks[0]
  assert {type(b) for b in transformer.resblocks} == {type(block)}
  assert block.ln_1.eps == block.ln_2.eps == final_norm.eps
  return (len(transformer.resblocks), block.attn.num_heads, block.mlp.c_fc.out_features,
          activation(block.mlp.gelu), block.ln_1.eps)


def shapes(state_dict, prefix=''):
  return {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items() if k.startswith(prefix)}


def expected(cfg):
  return {k: shape for k, (shape, _) in openai.expected_shapes(cfg).items()}


# ------------------------------------------------------------------ the converter

def test_keys_and_defaults_are_open_clips(oc):
  """Our key lists name every field open_clip's configs have, and our defaults are its."""
  # pylint: disable=protected-access
  for known, defaults, cfg_class in ((occ._VISION_KEYS, occ._VISION_DEFAULTS, oc.CLIPVisionCfg),
                                     (occ._TEXT_KEYS, occ._TEXT_DEFAULTS, oc.CLIPTextCfg)):
    fields = {f.name: f.default for f in dataclasses.fields(cfg_class)}
    assert known == set(fields)
    assert defaults == {k: fields[k] for k in defaults}
  arguments = set(inspect.signature(oc.model.CLIP).parameters) - {'cast_dtype'}
  assert occ._TOP_KEYS == arguments | {'custom_text', 'multimodal_cfg'}


def test_a_config_of_every_default_is_read(oc):
  model_cfg = {'embed_dim': 512, 'vision_cfg': dataclasses.asdict(oc.CLIPVisionCfg()),
               'text_cfg': dataclasses.asdict(oc.CLIPTextCfg())}
  assert occ.config_from_open_clip(model_cfg) == names.open_clip_config('ViT-B-16')
  check_own_towers(oc, model_cfg)


# ------------------------------------------------------------------ against open_clip's models

def check_own_towers(oc, model_cfg):
  """A CLIP-class model_cfg: same state dict {key: shape} and block hyper-parameters."""
  cfg = occ.config_from_open_clip(model_cfg)
  model = build(oc, model_cfg)
  assert expected(cfg) == shapes(model.state_dict())
  v, t = cfg.vision, cfg.text
  if v.arch == 'resnet':
    assert model.visual.attnpool.num_heads == v.heads
  else:
    assert open_clip_blocks(model.visual.transformer, model.visual.ln_post) == ours(v)
    assert isinstance(model.visual.ln_pre, torch.nn.Identity) != v.ln_pre
  assert open_clip_blocks(model.transformer, model.ln_final) == ours(t)
  assert (model.attn_mask is not None) == t.causal
  # CLIP.encode_text passes this attn_mask only: without it every position is attended.
  assert t.causal or not t.mask_padding
  assert {'argmax': 'eot', 'eos': 'eot'}.get(model.text_pool_type, model.text_pool_type) == t.pool
  if model.text_pool_type == 'eos':  # the first `eos_id` of each row, as our eot pooling
    assert t.eot_id == model.text_eos_id
  assert (model.logit_bias is not None) == cfg.logit_bias


# A `-quickgelu` config is its base's plus quick_gelu=True (the table test): the 'quick_gelu'
# case of OPTIONS below covers that switch, so the full-size builds skip those names.
@pytest.mark.parametrize('name', [n for n in OWN_NAMES if not n.endswith('-quickgelu')])
def test_open_clips_model_has_our_parameters(oc, name):
  check_own_towers(oc, names.MODEL_CFGS[name])


def _small(**changes):
  """A small open_clip model_cfg (real head widths and ratios need no full size here)."""
  model_cfg = {'embed_dim': 64,
               'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'head_width': 16,
                              'mlp_ratio': 3.0, 'patch_size': 8},
               'text_cfg': {'context_length': 16, 'vocab_size': 100, 'width': 64, 'heads': 4,
                            'layers': 2}}
  for section, values in changes.items():
    (model_cfg[section] if section.endswith('_cfg') else model_cfg).update(values)
  return model_cfg


OPTIONS = {
    'vision options': _small(vision_cfg=dict(no_ln_pre=True, act_kwargs={'approximate': 'tanh'},
                                             norm_kwargs={'eps': 1e-6}, final_ln_after_pool=True)),
    'siglip-like text': _small(text_cfg=dict(no_causal_mask=True, pool_type='last',
                                             proj_bias=True, act_kwargs={'approximate': 'tanh'},
                                             norm_kwargs={'eps': 1e-6}, mlp_ratio=2.5),
                               top=dict(init_logit_bias=-10.0)),
    'first token, no projection': _small(text_cfg=dict(no_causal_mask=True, pool_type='first',
                                                       proj_type='none')),
    'quick_gelu': _small(top=dict(quick_gelu=True), text_cfg=dict(act_kwargs={})),
    'resnet heads': _small(vision_cfg=dict(layers=[1, 1, 2, 1], width=16, head_width=32)),
}


@pytest.mark.parametrize('case', sorted(OPTIONS))
def test_options_build_open_clips_model(oc, case):
  model_cfg = OPTIONS[case]
  check_own_towers(oc, model_cfg)
  if case == 'siglip-like text':  # the same text tower as CustomTextCLIP's, pad mask included
    text = build(oc, {**model_cfg, 'custom_text': True}).text
    assert text.use_pad_mask == occ.config_from_open_clip(model_cfg).text.mask_padding


def test_every_open_clip_config_converts_exactly_or_names_the_key(oc):
  """Beyond our table: each of open_clip's configs is refused naming a key, or is exact."""
  for name in oc.list_models():
    model_cfg = oc.get_model_config(name)
    try:
      occ.config_from_open_clip(model_cfg)
    except ValueError as e:
      assert str(e).startswith('open_clip ') and "['" in str(e), (name, str(e))
      continue
    if (name.removesuffix('-quickgelu') not in names.MODEL_CFGS
        and 'timm_model_name' not in model_cfg['vision_cfg']):
      check_own_towers(oc, model_cfg)


def timm_numbers(model):
  """Our VisionConfig's fields as open_clip's TimmModel and its timm trunk hold them."""
  trunk, block = model.visual.trunk, model.visual.trunk.blocks[0]
  pool = trunk.attn_pool
  assert isinstance(block.ls1, torch.nn.Identity) and isinstance(trunk.fc_norm, torch.nn.Identity)
  assert block.norm1.eps == block.norm2.eps == trunk.norm.eps == pool.norm.eps
  assert pool.mlp.fc1.out_features == block.mlp.fc1.out_features
  assert activation(pool.mlp.act) == activation(block.mlp.act)
  (patch, _), (resolution, _) = trunk.patch_embed.patch_size, trunk.patch_embed.img_size
  projected = len(model.visual.head) or not isinstance(trunk.head, torch.nn.Identity)
  return dict(width=trunk.embed_dim, layers=len(trunk.blocks), heads=block.attn.num_heads,
              hidden_dim=block.mlp.fc1.out_features, mlp=activation(block.mlp.act),
              norm_eps=trunk.norm.eps, patch_size=patch, image_resolution=resolution,
              patch_bias=trunk.patch_embed.proj.bias is not None, pool=trunk.global_pool,
              map_heads=pool.num_heads, ln_pre=not isinstance(trunk.norm_pre, torch.nn.Identity),
              registers=trunk.num_prefix_tokens, projection=bool(projected))


def test_siglip_builds_cover_every_trunk_and_text_tower():
  trunk = lambda n: names.MODEL_CFGS[n]['vision_cfg']['timm_model_name']
  assert {trunk(n) for n in SIGLIP_BUILDS} == {trunk(n) for n in SIGLIP_NAMES}
  text = lambda n: names.open_clip_config(n).text
  assert {text(n) for n in SIGLIP_BUILDS} == {text(n) for n in SIGLIP_NAMES}
  # The EVA builds cover every Eva trunk of the table (the '-plus' names: other text towers).
  assert {trunk(n) for n in EVA_BUILDS} == {trunk(n) for n in TIMM_NAMES if n not in SIGLIP_NAMES}


@pytest.mark.parametrize('name', SIGLIP_BUILDS)
def test_open_clips_siglip_model_has_our_numbers(oc, name):
  cfg = names.open_clip_config(name)
  model = build(oc, names.MODEL_CFGS[name])
  numbers = timm_numbers(model)
  assert numbers == {k: getattr(cfg.vision, k) for k in numbers}
  ours_flat = expected(cfg)
  assert ours_flat['visual.positional_embedding'] == model.visual.trunk.pos_embed.shape[1:]
  # The text tower is open_clip's own: its keys are ours under `text.`.
  text = model.text
  assert shapes(model.state_dict(), 'text.') == {
      k: s for k, s in ours_flat.items() if not k.startswith(('visual.', 'logit_'))}
  assert open_clip_blocks(text.transformer, text.ln_final) == ours(cfg.text)
  assert (text.context_length, text.vocab_size, text.attn_mask is not None, text.pool_type) == (
      cfg.text.context_length, cfg.text.vocab_size, cfg.text.causal, cfg.text.pool)
  assert isinstance(text.text_projection, torch.nn.Linear) == cfg.text.projection_bias
  assert text.use_pad_mask == cfg.text.mask_padding
  assert (model.logit_bias is not None) == cfg.logit_bias


def eva_numbers(model):
  """Our VisionConfig's fields as open_clip's TimmModel and its timm Eva trunk hold them."""
  trunk, block = model.visual.trunk, model.visual.trunk.blocks[0]
  attn, mlp, rope, identity = block.attn, block.mlp, trunk.rope, torch.nn.Identity
  swiglu, pool = hasattr(mlp, 'fc1_g'), trunk.attn_pool
  assert isinstance(trunk.fc_norm, identity) and trunk.global_pool in ('token', 'map')
  assert not len(model.visual.head) and block.norm1.eps == block.norm2.eps == trunk.norm.eps
  assert isinstance(getattr(attn, 'norm', identity()), identity) == isinstance(mlp.norm, identity)
  assert rope is None or (not rope.rotate_half and len(set(rope.ref_feat_shape)) == 1)
  assert pool is None or (pool.mlp.fc1.out_features == mlp.fc1.out_features
                          and activation(pool.mlp.act) == activation(mlp.act))
  names_ = set(dict(block.named_parameters()))
  post = type(block).__name__ == 'EvaBlockPostNorm'
  inner = not isinstance(getattr(attn, 'norm', identity()), identity)
  return dict(
      pool='map' if pool else 'cls', class_token=pool is not None,
      pool_heads=pool.num_heads if pool else None,
      rope_grid_offset=rope.grid_offset if rope else 0.0,
      rope_xy=bool(rope) and rope.grid_indexing == 'xy',
      width=trunk.embed_dim, layers=len(trunk.blocks), heads=attn.num_heads,
      hidden_dim=(mlp.fc1_g if swiglu else mlp.fc1).out_features,
      mlp='swiglu' if swiglu else activation(mlp.act), norm_eps=trunk.norm.eps,
      patch_size=trunk.patch_embed.patch_size[0], image_resolution=trunk.patch_embed.img_size[0],
      patch_bias=trunk.patch_embed.proj.bias is not None,
      ln_pre=not isinstance(trunk.norm_pre, identity),
      norm_placement='res_post' if post else 'subln' if inner else 'pre',
      k_bias=bool({'attn.k_proj.bias', 'attn.qkv.bias'} & names_), rope_2d=rope is not None,
      rope_ref_grid=rope.ref_feat_shape[0] if rope else None,
      rope_theta=rope.temperature if rope else 10000.0,
      projection_bias=trunk.head.bias is not None)


@pytest.mark.parametrize('name', EVA_BUILDS)
def test_open_clips_eva_model_has_our_parameters_and_numbers(oc, name):
  model_cfg = oc.get_model_config(name)
  cfg = occ.config_from_open_clip(model_cfg)
  model = build(oc, model_cfg)
  numbers = eva_numbers(model)
  want = {k: getattr(cfg.vision, k) for k in numbers}
  assert numbers == {**want, 'norm_eps': want['norm_eps'] or 1e-5}  # None: torch's LayerNorm
  # Their keys through our key table, shapes only (zero-stride arrays: no memory).
  theirs = {k: np.broadcast_to(np.bool_(0), v.shape) for k, v in model.state_dict().items()}
  assert families.detect(theirs) == families.OPEN_CLIP_TIMM
  assert shapes(families.to_ours(theirs, families.OPEN_CLIP_TIMM)) == expected(cfg)
  assert open_clip_blocks(model.text.transformer, model.text.ln_final) == ours(cfg.text)


# ------------------------------------------------------------------ refusals

def _set(section, key, value, base='ViT-B-32'):
  model_cfg = copy.deepcopy(names.MODEL_CFGS[base])
  (model_cfg[section] if section else model_cfg)[key] = value
  return model_cfg


REFUSED = {
    'layer scale': (_set('vision_cfg', 'ls_init_value', 1e-4), 'ls_init_value'),
    'text layer scale': (_set('text_cfg', 'ls_init_value', 1e-4), 'ls_init_value'),
    'attentional pool': (_set('vision_cfg', 'attentional_pool', True), 'attentional_pool'),
    'average pool': (_set('vision_cfg', 'pool_type', 'avg'), 'pool_type'),
    'sin-cos positions': (_set('vision_cfg', 'pos_embed_type', 'sin_cos_2d'), 'pos_embed_type'),
    'patch dropout': (_set('vision_cfg', 'patch_dropout', 0.5), 'patch_dropout'),
    'custom block': (_set('vision_cfg', 'block_type', 'custom'), 'block_type'),
    'qk norm': (_set('text_cfg', 'qk_norm', True), 'qk_norm'),
    'gelu arguments': (_set('vision_cfg', 'act_kwargs', {'approximate': 'sigmoid'}),
                       'act_kwargs'),
    'quick_gelu arguments': (_set('text_cfg', 'act_kwargs', {'approximate': 'tanh'},
                                  'ViT-B-32-quickgelu'), 'act_kwargs'),
    'norm arguments': (_set('vision_cfg', 'norm_kwargs', {'elementwise_affine': False}),
                       'norm_kwargs'),
    'non-square images': (_set('vision_cfg', 'image_size', [224, 256]), 'image_size'),
    'mlp text projection': (_set('text_cfg', 'proj_type', 'mlp'), 'proj_type'),
    'bidirectional eot pool': (_set('text_cfg', 'no_causal_mask', True), 'no_causal_mask'),
    'causal first pool': (_set('text_cfg', 'pool_type', 'first'), 'pool_type'),
    'HF text tower': (_set('text_cfg', 'hf_model_name', 'roberta-base'), 'hf_model_name'),
    'CoCa class token': (_set('text_cfg', 'embed_cls', True), 'embed_cls'),
    'CoCa': (_set(None, 'multimodal_cfg', {'width': 512}), 'multimodal_cfg'),
    'logit scale (1,)': (_set(None, 'nonscalar_logit_scale', True), 'nonscalar_logit_scale'),
    'unknown vision key': (_set('vision_cfg', 'frobnicate', 1), 'frobnicate'),
    'unknown key': (_set(None, 'frobnicate', 1), 'frobnicate'),
    'ConvNeXt': (_set('vision_cfg', 'timm_model_name', 'convnext_base'), 'timm_model_name'),
    'PE-Core G': (_set('vision_cfg', 'timm_model_name', 'vit_pe_core_gigantic_patch14_448'),
                  'timm_model_name'),
    'MCi': (_set('vision_cfg', 'timm_model_name', 'fastvit_mci2'), 'timm_model_name'),
    'EVA average pool': (_set('vision_cfg', 'timm_model_name', 'eva02_base_patch16_clip_224'),
                         'timm_pool'),
    'timm avg pool': (_set('vision_cfg', 'timm_pool', 'avg', 'ViT-B-16-SigLIP'), 'timm_pool'),
    'timm mlp head': (_set('vision_cfg', 'timm_proj', 'mlp', 'ViT-B-16-SigLIP'), 'timm_proj'),
    'timm projection bias': (_set('vision_cfg', 'timm_proj_bias', True, 'ViT-B-16-SigLIP'),
                             'timm_proj_bias'),
    'timm resolution': (_set('vision_cfg', 'image_size', 256, 'ViT-B-16-SigLIP'), 'image_size'),
    'timm drop path': (_set('vision_cfg', 'timm_drop_path', 0.1, 'ViT-B-16-SigLIP'),
                       'timm_drop_path'),
    'unprojected width': (_set(None, 'embed_dim', 512, 'ViT-B-16-SigLIP'), 'timm_proj'),
}


@pytest.mark.parametrize('case', sorted(REFUSED))
def test_unsupported_keys_raise_naming_the_key(case):
  model_cfg, key = REFUSED[case]
  with pytest.raises(ValueError, match=key):
    occ.config_from_open_clip(model_cfg)


def test_keys_without_effect_are_accepted():
  model_cfg = _set('text_cfg', 'tokenizer_kwargs', {'clean': 'whitespace'})
  model_cfg.update(output_dict=True)  # init_logit_scale now has an effect: tested above
  model_cfg['vision_cfg'].update(output_tokens=True, timm_proj='mlp', final_ln_after_pool=True)
  model_cfg['text_cfg'].update(pad_id=1, eos_id=3, hf_tokenizer_name='x')
  assert occ.config_from_open_clip(model_cfg) == names.open_clip_config('ViT-B-32')


def test_open_clip_config_json_is_read_under_model_cfg():
  model_cfg = names.MODEL_CFGS['ViT-B-16-SigLIP']
  assert occ.config_from_open_clip({'model_cfg': model_cfg, 'preprocess_cfg': {}}) == (
      names.open_clip_config('ViT-B-16-SigLIP'))


def test_bad_inputs_raise():
  with pytest.raises(TypeError, match='dict'):
    occ.config_from_open_clip('ViT-B-32')
  with pytest.raises(ValueError, match='text_cfg'):
    occ.config_from_open_clip({'embed_dim': 512, 'vision_cfg': {}})
  with pytest.raises(KeyError, match='ViT-B-32'):
    names.open_clip_config('ViT-B/32')
  with pytest.raises(KeyError, match="known tags: \\['laion2b_s12b_b42k'"):
    names.open_clip_config('ViT-g-14', 'openai')
  with pytest.raises(KeyError, match='known tags'):
    names.open_clip_config('ViT-B-32-quickgelu/laion2b_s34b_b79k')  # a GELU tag
  with pytest.raises(ValueError, match='not both'):
    names.open_clip_config('ViT-B-32/openai', pretrained='openai')


@pytest.mark.parametrize('top', [{}, {'init_logit_bias': -5.0, 'init_logit_scale': 1.5},
                                 {'init_logit_scale': 0.0}])
def test_logit_scale_and_bias_start_as_open_clips_model(oc, top):
  """Our init's logit scale and bias equal open_clip's model built from the same model_cfg."""
  model_cfg = _small(top=top)
  cfg = occ.config_from_open_clip(model_cfg)
  params = clip.init(jax.random.PRNGKey(0), cfg)
  model = oc.model.CLIP(**copy.deepcopy(model_cfg))
  np.testing.assert_allclose(float(params['logit_scale']), model.logit_scale.item(), rtol=1e-6)
  assert ('logit_bias' in params) == (model.logit_bias is not None)
  if model.logit_bias is not None:
    np.testing.assert_allclose(float(params['logit_bias']), model.logit_bias.item(), rtol=1e-6)
