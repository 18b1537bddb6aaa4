"""Partition rules: every parameter of every model is covered; gaps and bad meshes raise; FSDP and
tensor parallelism really split the parameters; stacked layers keep their layer axis unsplit."""
import dataclasses

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import clip
from clip import sharding
from clip.formats import files
from clip.formats import open_clip as occ
from clip.formats import timm_trunks
from clip.train import finetune
from tests.test_model import SCAN_CASE

TINY = clip.CLIPConfig(32, clip.VisionConfig('vit', 64, 2, 2, 32, 8),
                       clip.TextConfig(32, 2, 2, context_length=16, vocab_size=128))


def abstract(cfg):
  return jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg)


@pytest.mark.parametrize('name', sorted(clip.MODELS))
def test_rules_cover_every_official_model(name):
  specs = files.flatten(sharding.param_specs(abstract(clip.MODELS[name])))
  assert specs['transformer.resblocks.0.mlp.c_fc.weight'] == P('tensor', 'fsdp')
  assert specs['logit_scale'] == P()
  sharding.check_divisible(sharding.make_mesh(2, 2, 2), abstract(clip.MODELS[name]),
                           sharding.param_specs(abstract(clip.MODELS[name])))


@pytest.mark.parametrize('trunk', ['eva02_base_patch16_clip_224', 'vit_pe_core_base_patch16_224'])
def test_rules_cover_eva_and_perception_encoder_towers(trunk):
  """EVA02's q/v biases and sub-LN norms, PE's class token under the MAP head, both biased
  projections (timm's head, nn.Linear layout)."""
  cfg = occ.config_from_open_clip({
      'embed_dim': 512, 'vision_cfg': {'timm_model_name': trunk, 'timm_pool': timm_trunks.TRUNKS[
          trunk][6], 'timm_proj': None, 'image_size': timm_trunks.TRUNKS[trunk][5]},
      'text_cfg': {'width': 512, 'heads': 8, 'layers': 2}})
  params = abstract(cfg)
  specs = files.flatten(sharding.param_specs(params))
  assert specs['visual.proj.weight'] == P(None, 'fsdp')
  assert finetune.image_feature_dim(params['visual']) == 512
  sharding.check_divisible(sharding.make_mesh(2, 2, 2), params, sharding.param_specs(params))


def test_uncovered_parameter_is_an_error_naming_it():
  params = {**abstract(TINY), 'my_adapter': {'weight': jax.ShapeDtypeStruct((4, 4), np.float32)}}
  with pytest.raises(sharding.ShardingError, match=r'my_adapter\.weight'):
    sharding.param_specs(params)
  rules = ((r'my_adapter\..*', P('fsdp')),) + sharding.DEFAULT_RULES
  assert files.flatten(sharding.param_specs(params, rules))['my_adapter.weight'] == P('fsdp')


def test_indivisible_dimension_is_an_error():
  cfg = clip.CLIPConfig(32, clip.VisionConfig('vit', 64, 2, 2, 32, 8),
                        clip.TextConfig(30, 2, 2, context_length=16, vocab_size=130))
  with pytest.raises(sharding.ShardingError, match='token_embedding.weight'):
    sharding.param_shardings(sharding.make_mesh(1, 4, 2), abstract(cfg))


@pytest.mark.parametrize('sizes,message', [((3, 1, 1), 'needs 3 devices'),
                                           ((-1, 3, 1), 'cannot be split'),
                                           ((-1, -1, 1), 'at most one -1'),
                                           ((0, 1, 1), 'positive')])
def test_bad_mesh_sizes(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(*sizes)


@pytest.mark.parametrize('sizes', [(8, 1, 1), (1, 8, 1), (2, 4, 1), (1, 2, 4)])
def test_sharded_parameters_shrink_per_device_memory(sizes):
  """FSDP x tensor splits the large matrices fsdp*tensor ways; data parallel replicates."""
  _, fsdp, tensor = sizes
  mesh = sharding.make_mesh(*sizes)
  shardings = sharding.param_shardings(mesh, abstract(TINY))
  params = jax.jit(clip.init_params, static_argnames='cfg', out_shardings=shardings)(
      jax.random.PRNGKey(0), cfg=TINY)
  w = params['transformer']['resblocks']['0']['mlp']['c_fc']['weight']  # (4D, D) column-parallel
  chex.assert_shape(w.addressable_shards[0].data, (w.shape[0] // tensor, w.shape[1] // fsdp))
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  on_device0 = sum(s.data.nbytes for x in jax.tree.leaves(params)
                   for s in x.addressable_shards if s.device == jax.devices()[0])
  # Every large leaf is split over fsdp (norms, biases and scalars stay replicated, a few percent
  # of this tiny model); the transformer matrices over tensor as well.
  assert total / (fsdp * tensor) <= on_device0 <= total / fsdp * 1.2 + 2048, (on_device0, total)


def test_stacked_parameters_shard_with_an_unsplit_layer_axis():
  stacked = jax.eval_shape(clip.init, jax.random.PRNGKey(0), dataclasses.replace(SCAN_CASE, scan=True))
  specs = sharding.param_specs(stacked)
  assert specs['visual']['transformer']['resblocks']['attn']['in_proj_weight'] == \
      sharding.P(None, 'tensor', 'fsdp')
  assert specs['transformer']['resblocks']['mlp']['c_proj']['weight'] == \
      sharding.P(None, 'fsdp', 'tensor')
  assert specs['visual']['attn_pool']['attn']['in_proj_weight'] == sharding.P('tensor', 'fsdp')


def test_activation_constraints_refuse_a_mesh_without_the_batch_axes():
  """Without a mesh the towers' batch constraint is a no-op; under a mesh that lacks
  ('data', 'fsdp') it raises instead of silently constraining nothing."""
  params = clip.init(jax.random.PRNGKey(0), TINY)
  images = np.zeros((2, 32, 32, 3), np.float32)
  encode = jax.jit(lambda p, x: clip.model.encode_image(p, x, TINY))
  chex.assert_shape(encode(params, images), (2, 32))
  other = jax.make_mesh((1,), ('batch',), devices=jax.devices()[:1])
  with jax.sharding.use_abstract_mesh(other.abstract_mesh):
    with pytest.raises(sharding.ShardingError, match="has axes \\('batch',\\)"):
      encode(params, images)
  ours = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  with jax.sharding.use_abstract_mesh(ours.abstract_mesh):
    chex.assert_shape(encode(params, images), (2, 32))
