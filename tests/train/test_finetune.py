"""Fine-tuning with the pre-training train step: the zero-shot head is the zero-shot classifier,
fine-tuning beats zero-shot on held-out combinations, WiSE-FT reproduces its endpoints, LiT
leaves the image tower bit-identical, layer decay and freezing do what they say, and a text
classifier learns."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

import clip
from clip.train import finetune
from clip.train import optim
from clip.train import state_store
from clip import sharding
from clip.train import training
from clip.formats import files
from clip.eval import zero_shot
from data import synthetic
from experiments import finetune as cli
from experiments.configs import tiny

CFG = tiny.get_config().model
TOKENIZE = clip.get_tokenizer(CFG)  # OpenAI's BPE: tiny's tokenizer
MESH = (4, 2, 1)


def make(tcfg, init_params, objective=None, batch_keys=('image', 'tokens')):
  mesh = sharding.make_mesh(*tcfg.mesh)
  state, step, _, _, _ = training.setup(CFG, tcfg, mesh, init_params=init_params,
                                        objective=objective, batch_keys=batch_keys)
  return mesh, state, step


def images_and_labels(split, n, task='colour', offset=0):
  ds = synthetic.SyntheticCaptions(seed=5, resolution=CFG.image_resolution, split=split)
  sample = ds.get(np.arange(offset, offset + n))
  return (clip.normalize_image(sample['image'].astype(np.float32) / 255),
          ds.labels(sample, task), sample['caption'])


@pytest.fixture(scope='module')
def pretrained():
  """The tiny CLIP after 60 steps of contrastive training on the built-in captions."""
  tcfg = training.TrainConfig(batch_size=64, total_steps=60, warmup_steps=6, learning_rate=2e-3,
                              mesh=MESH)
  mesh, state, step = make(tcfg, None)
  ds = synthetic.SyntheticCaptions(seed=0, resolution=CFG.image_resolution)
  for batch in ds.batches(64, num_steps=60, tokenize=TOKENIZE, preprocess=CFG.preprocess):
    state, _ = step(state, training.global_batch(mesh, batch))
  return jax.device_get(state['params'])


def accuracy(params, images, labels):
  return float(np.mean(np.asarray(finetune.classify_images(params, images, CFG)).argmax(-1)
                       == labels))


def test_finetuning_beats_zero_shot_and_wise_ft_interpolates(pretrained):
  classnames = synthetic.SyntheticCaptions.prompts('colour')
  w = zero_shot.classifier_weights_from_tokens(
      pretrained, clip.tokenize(classnames, CFG.context_length)[:, None], CFG)
  zs_params = finetune.image_classifier_params(pretrained, w)
  test_x, test_y, _ = images_and_labels('heldout', 512)
  # The initial head is the zero-shot classifier: the same top-1 as zero_shot.classify.
  top, _ = zero_shot.classify(pretrained, test_x, w, CFG, k=1)
  zs_accuracy = accuracy(zs_params, test_x, test_y)
  np.testing.assert_allclose(zs_accuracy, np.mean(top[:, 0] == test_y))

  tcfg = training.TrainConfig(batch_size=64, total_steps=40, warmup_steps=4, learning_rate=1e-3,
                              layer_decay=0.8, mesh=MESH)
  mesh, state, step = make(tcfg, lambda key: zs_params,
                           finetune.image_classification_objective(CFG), ('image', 'label'))
  for i in range(40):
    x, y, _ = images_and_labels('train', 64, offset=64 * i)
    state, metrics = step(state, training.global_batch(mesh, {'image': x, 'label': y}))
  ft_params = jax.device_get(state['params'])
  ft_accuracy = accuracy(ft_params, test_x, test_y)
  assert ft_accuracy > zs_accuracy + 0.1, (zs_accuracy, ft_accuracy)

  chex.assert_trees_all_equal(finetune.wise_ft(zs_params, ft_params, 0.0), zs_params)
  chex.assert_trees_all_equal(finetune.wise_ft(zs_params, ft_params, 1.0), ft_params)
  mid = finetune.wise_ft(zs_params, ft_params, 0.5)
  chex.assert_trees_all_close(mid['head']['weight'],
                              (zs_params['head']['weight'] + ft_params['head']['weight']) / 2,
                              rtol=1e-6)
  with pytest.raises(ValueError, match='alpha must be in'):
    finetune.wise_ft(zs_params, ft_params, 1.5)


def test_lit_leaves_the_image_tower_bit_identical(pretrained):
  tcfg = training.TrainConfig(batch_size=32, total_steps=3, warmup_steps=1, learning_rate=1e-3,
                              lock_image_tower=True, mesh=MESH)
  mesh, state, step = make(tcfg, lambda key: pretrained)
  ds = synthetic.SyntheticCaptions(seed=1, resolution=CFG.image_resolution)
  for batch in ds.batches(32, num_steps=3, tokenize=TOKENIZE, preprocess=CFG.preprocess):
    state, _ = step(state, training.global_batch(mesh, batch))
  after = jax.device_get(state['params'])
  chex.assert_trees_all_equal(after['visual'], pretrained['visual'])
  text_keys = sorted(finetune.text_tower(pretrained))
  assert text_keys == ['ln_final', 'positional_embedding', 'text_projection', 'token_embedding',
                       'transformer']
  changed = [k for k in text_keys
             if not all(np.array_equal(a, b) for a, b in
                        zip(jax.tree.leaves(after[k]), jax.tree.leaves(pretrained[k])))]
  assert changed == text_keys


def test_layer_decay_scales_updates_by_depth():
  shapes = jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), CFG)
  ones = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
  scaled, _ = optim.scale_by_layer_decay(0.5).update(ones, None)
  flat = files.flatten(scaled)
  layers = CFG.vision.layers  # 2 blocks: depths 0 (embedding), 1, 2, then 3
  expected = {'visual.conv1.weight': 0.5 ** 3, 'visual.class_embedding': 0.5 ** 3,
              'visual.transformer.resblocks.0.attn.in_proj_weight': 0.5 ** 2,
              f'visual.transformer.resblocks.{layers - 1}.mlp.c_fc.bias': 0.5,
              'visual.ln_post.weight': 1.0, 'visual.proj': 1.0,
              'transformer.resblocks.0.mlp.c_fc.weight': 1.0, 'logit_scale': 1.0}
  for key, factor in expected.items():
    np.testing.assert_array_equal(np.unique(flat[key]), [factor], err_msg=key)


def test_frozen_parameters_get_no_update_not_even_weight_decay():
  tcfg = training.TrainConfig(batch_size=16, total_steps=2, warmup_steps=0, weight_decay=0.5,
                              freeze=(r'visual\.transformer\..*', 'logit_scale'), mesh=(8, 1, 1))
  params = clip.init(jax.random.PRNGKey(3), CFG)
  mesh, state, step = make(tcfg, lambda key: params)
  ds = synthetic.SyntheticCaptions(seed=2, resolution=CFG.image_resolution)
  for batch in ds.batches(16, num_steps=2, tokenize=TOKENIZE, preprocess=CFG.preprocess):
    state, _ = step(state, training.global_batch(mesh, batch))
  after = jax.device_get(state['params'])
  chex.assert_trees_all_equal(after['visual']['transformer'], params['visual']['transformer'])
  np.testing.assert_array_equal(after['logit_scale'], params['logit_scale'])
  assert not np.array_equal(after['visual']['proj'], params['visual']['proj'])
  with pytest.raises(ValueError, match='freeze must be a tuple'):
    dataclasses.replace(tcfg, freeze='visual')


def test_text_classifier_learns_the_colour_word(pretrained):
  params = finetune.text_classifier_params(pretrained, 8, jax.random.PRNGKey(0))
  tcfg = training.TrainConfig(batch_size=64, total_steps=30, warmup_steps=3, learning_rate=3e-3,
                              mesh=MESH)
  mesh, state, step = make(tcfg, lambda key: params,
                           finetune.text_classification_objective(CFG), ('tokens', 'label'))
  for i in range(30):
    _, y, captions = images_and_labels('train', 64, offset=64 * i)
    batch = {'tokens': clip.tokenize(captions, CFG.context_length), 'label': y}
    state, _ = step(state, training.global_batch(mesh, batch))
  _, y, captions = images_and_labels('heldout', 256)
  logits = finetune.classify_texts(jax.device_get(state['params']),
                                   clip.tokenize(captions, CFG.context_length), CFG)
  assert np.mean(np.asarray(logits).argmax(-1) == y) > 0.8  # chance 0.125


@pytest.mark.slow
def test_finetune_cli_runs_every_mode(pretrained, tmp_path):
  model = tmp_path / 'model.npz'
  np.savez(model, **files.flatten(pretrained))
  common = ['--model', str(model), '--config', 'tiny', '--batch-size', '32', '--eval-examples',
            '64', '--mesh', '8,1,1']
  res = cli.main(common + ['--mode', 'classifier', '--dataset', 'synthetic/colour', '--steps', '4',
                           '--lp-steps', '2', '--out', str(tmp_path / 'c')])
  assert set(res['wise_ft_accuracy']) == {'train', 'heldout'}
  for split, by_alpha in res['wise_ft_accuracy'].items():
    assert set(by_alpha) == {str(a) for a in cli.ALPHAS}
    assert by_alpha['0.0'] == res['zero_shot_accuracy'][split]
    assert by_alpha['1.0'] == res['finetuned_accuracy'][split]
  assert [r['step'] for r in res['log']] == [2, 4]
  assert (tmp_path / 'c' / 'wise_ft.png').stat().st_size > 0
  res = cli.main(common + ['--mode', 'lit', '--steps', '2', '--out', str(tmp_path / 'l')])
  assert set(res['before']) == set(res['after'])
  saved, meta = state_store.read(tmp_path / 'l' / 'checkpoints', ('params',))
  assert meta['step'] == 2
  np.testing.assert_array_equal(saved['params']['visual']['conv1']['weight'],
                                pretrained['visual']['conv1']['weight'])
  res = cli.main(common + ['--mode', 'text-classifier', '--dataset', 'synthetic/size', '--steps',
                           '2', '--out', str(tmp_path / 't')])
  assert res['chance'] == 1 / 3 and all(0 <= a <= 1 for a in res['accuracy'].values())
  with pytest.raises(ValueError, match='--lp-steps applies'):
    cli.main(common + ['--mode', 'lit', '--lp-steps', '2'])


@pytest.mark.parametrize('vision', [
    clip.VisionConfig('vit', 32, 1, 2, 16, 8),
    clip.VisionConfig('vit', 24, 1, 2, 16, 8, pool='gap', projection=False),
    clip.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 32)],
    ids=['vit', 'vit-no-projection', 'resnet'])
def test_classifier_heads_fit_the_towers_output(vision):
  cfg = clip.CLIPConfig(24, vision, clip.TextConfig(24, 1, 2, context_length=8, vocab_size=64,
                                                    projection=False))
  params = clip.init(jax.random.PRNGKey(0), cfg)
  images = np.zeros((2, vision.image_resolution, vision.image_resolution, 3), np.float32)
  features = clip.encode_image(params, images, cfg)
  assert finetune.image_feature_dim(params['visual']) == features.shape[1] == 24
  head = finetune.image_classifier_params(params, np.ones((24, 5), np.float32))
  chex.assert_shape(finetune.classify_images(head, images, cfg), (2, 5))
  with pytest.raises(ValueError, match=r'must be \(embed_dim=24, classes\) for this image tower, '
                                       r'got \(32, 5\)'):
    finetune.image_classifier_params(params, np.ones((32, 5), np.float32))
  text_head = finetune.text_classifier_params(params, 3, jax.random.PRNGKey(1))
  assert text_head['head']['weight'].shape == (3, 24)
