"""experiments/evaluate.py: its metrics equal a direct computation (non-finite scores refused, as
the linear probe refuses non-finite features) and its JSON has clip_benchmark's format, for
checkpoint files and training workdirs (a workdir's saved model config is its model)."""
import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

import clip
from clip.formats import workdirs
from clip.train import checkpoint
from clip.eval import linear_probe
from clip.formats import weights
from clip.eval import zero_shot
from data import synthetic
from experiments import evaluate
from experiments.configs import tiny

CFG = tiny.get_config().model


@pytest.fixture(scope='module')
def params():
  """A random tiny model whose biases and norms are perturbed (OpenAI's init zeroes them)."""
  p = clip.init(jax.random.PRNGKey(0), CFG)
  flat = weights.flatten(p)
  rng = np.random.default_rng(0)
  flat = {k: np.asarray(v) + (0.1 * rng.standard_normal(v.shape).astype(np.float32)
                              if v.ndim == 1 else 0) for k, v in flat.items()}
  return weights.nest(flat)


def test_classification_metrics_against_their_definition():
  scores = np.array([[0.9, 0.1, 0.0, 0.2, 0.3, 0.4],
                     [0.1, 0.2, 0.9, 0.0, 0.0, 0.0],
                     [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
                     [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
  labels = np.array([0, 1, 5, 5])
  m = evaluate.classification_metrics(scores, labels)
  assert m['acc1'] == 0.25 + 0.25  # rows 0 and 3
  lp = evaluate.linear_probe_metrics(scores, labels)
  assert lp == {f'lp_{k}': v for k, v in m.items()}  # clip_benchmark's probe names
  assert m['acc5'] == 0.75         # row 2's label 5 ranks last
  assert m['mean_per_class_recall'] == np.mean([1.0, 0.0, 0.5])
  assert m['per_class_acc1'] == {'0': 1.0, '1': 0.0, '5': 0.5}
  named = evaluate.classification_metrics(scores, labels, list('abcdef'))['per_class_acc1']
  assert named == {'a': 1.0, 'b': 0.0, 'f': 0.5}
  assert np.isnan(evaluate.classification_metrics(scores[:, :4], labels % 4)['acc5'])
  # clip_benchmark's probe takes top-5 only where a label >= 5 occurs
  assert np.isnan(evaluate.linear_probe_metrics(scores, labels % 4)['lp_acc5'])
  # equal scores: the lower class first (`zero_shot.top_k`, as torch's first maximum)
  tied = evaluate.classification_metrics(np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([0, 1]))
  assert tied['acc1'] == 0.5 and tied['per_class_acc1'] == {'0': 1.0, '1': 0.0}


def _check_format(result, task, templates=False):
  keys = {'dataset', 'model', 'pretrained', 'task', 'metrics', 'language'}
  assert set(result) == keys | ({'templates'} if templates else set())
  assert result['task'] == task and result['language'] == 'en'
  json.dumps(result)


def test_names_follow_clip_benchmark(tmp_path):
  assert evaluate.model_name('ViT-B/32') == ('ViT-B-32', 'openai')
  assert evaluate.model_name('ViT-L/14@336px') == ('ViT-L-14@336px', 'openai')
  path = str(tmp_path / 'model.npz')
  assert evaluate.model_name(path, 'tiny') == ('tiny', path)
  assert evaluate.model_name(path) == ('model.npz', path)
  args = lambda *a: evaluate.parse_args(['--model', 'x', *a])
  assert evaluate.dataset_name(args('--task', 'zeroshot_retrieval', '--captions', 'c/*.tfr')) == (
      'c/*.tfr')
  assert evaluate.dataset_name(args('--task', 'zeroshot_retrieval')) == 'synthetic'
  assert evaluate.dataset_name(args('--dataset', 'tfds/cifar10')) == 'cifar10'
  assert evaluate.dataset_name(args('--dataset', 'synthetic/shape')) == 'synthetic/shape'


def test_metrics_refuse_non_finite_scores_and_features():
  with pytest.raises(ValueError, match='scores must be finite, got 1 non-finite'):
    evaluate.classification_metrics(np.array([[0.1, np.nan]]), np.array([0]))
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\), got \[0, 2\]'):
    evaluate.linear_probe_metrics(np.zeros((2, 2)), np.array([0, 2]))
  x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match='training features must be finite'):
    linear_probe.fit(np.where(x > 0, np.inf, x), y, 2, 1.0)
  probe = linear_probe.fit(x, y, 2, 1.0)
  with pytest.raises(ValueError, match='features must be finite'):
    linear_probe.accuracy(probe, x * np.nan, y)
  with pytest.raises(ValueError, match='validation features must be finite'):
    linear_probe.sweep(x, y, x * np.nan, y, 2)


def test_zero_shot_json_equals_a_direct_computation(params, tmp_path):
  path = tmp_path / 'model.npz'
  np.savez(path, **weights.flatten(params))
  out = tmp_path / 'zs.json'
  result = evaluate.main(['--model', str(path), '--config', 'tiny', '--dataset',
                          'synthetic/colour', '--examples', '64', '--output', str(out)])
  _check_format(result, 'zeroshot_classification')
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  ds = synthetic.SyntheticCaptions(seed=1, resolution=CFG.image_resolution, split='heldout')
  sample = ds.get(np.arange(64))
  img = np.asarray(clip.encode_image(params, clip.normalize_image(
      sample['image'].astype(np.float32) / 255), CFG))
  txt = np.asarray(clip.encode_text(params, clip.tokenize(ds.prompts('colour'),
                                                          CFG.context_length), CFG))
  scores = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
      txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
  expected = np.mean(scores.argmax(1) == sample['colour'])
  np.testing.assert_allclose(result['metrics']['acc1'], expected)


def test_retrieval_and_probe_from_a_training_workdir(params, tmp_path):
  checkpoint.save(str(tmp_path / 'run' / 'checkpoints'), 5,
                  {'params': params, 'batch_stats': {}, 'step': np.int32(5)})
  result = evaluate.main(['--model', str(tmp_path / 'run'), '--config', 'tiny', '--dataset',
                          'synthetic', '--task', 'zeroshot_retrieval', '--examples', '48',
                          '--output', str(tmp_path / 'r.json')])
  _check_format(result, 'zeroshot_retrieval')
  ds = synthetic.SyntheticCaptions(seed=1, resolution=CFG.image_resolution, split='heldout')
  sample = ds.get(np.arange(48))
  recall = zero_shot.retrieval_metrics(
      clip.encode_image(params, clip.normalize_image(sample['image'].astype(np.float32) / 255),
                        CFG),
      clip.encode_text(params, clip.tokenize(sample['caption'], CFG.context_length), CFG))
  for k in (1, 5, 10):
    np.testing.assert_allclose(result['metrics'][f'image_retrieval_recall@{k}'],
                               recall[f'text_to_image_R@{k}'])
    np.testing.assert_allclose(result['metrics'][f'text_retrieval_recall@{k}'],
                               recall[f'image_to_text_R@{k}'])
  probe = evaluate.main(['--model', str(tmp_path / 'run'), '--config', 'tiny', '--dataset',
                         'synthetic/colour', '--task', 'linear_probe', '--examples', '400',
                         '--output', str(tmp_path / 'p.json')])
  _check_format(probe, 'linear_probe')
  assert probe['metrics']['lp_acc1'] > 0.3  # chance 0.125, random features
  assert probe['model'] == 'tiny' and probe['pretrained'] == str(tmp_path / 'run')
  assert result['dataset'] == 'synthetic'  # the captions, not a label task


def test_bad_model_and_dataset_explain_themselves(tmp_path):
  with pytest.raises(ValueError, match='official model'):
    evaluate.load_model('not-a-model')
  with pytest.raises(FileNotFoundError, match='no checkpoints'):
    (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
    evaluate.load_model(str(tmp_path / 'run'))
  with pytest.raises(ValueError, match='--dataset must be'):
    evaluate.classification_data(evaluate.parse_args(['--model', 'x', '--dataset', 'mnist']),
                                 CFG, None)


def test_a_stacked_sigmoid_workdir_loads_with_its_config(tmp_path):
  """A scan-layout checkpoint with SigLIP's bias loads with its config; without one, the OpenAI
  architecture the shapes suggest is refused, naming the missing keys."""
  from experiments.configs import siglip_small  # pylint: disable=g-import-not-at-top
  cfg = siglip_small.get_config().model
  params = clip.init(jax.random.PRNGKey(0), cfg)
  assert 'attn' in params['transformer']['resblocks']  # stacked
  checkpoint.save(tmp_path / 'checkpoints', 1, {'params': params, 'batch_stats': {}})
  loaded, loaded_cfg = evaluate.load_model(str(tmp_path), 'siglip_small')
  assert loaded_cfg == cfg
  chex.assert_trees_all_equal(loaded, jax.device_get(params))
  with pytest.raises(weights.CheckpointError, match='missing'):  # shapes alone: OpenAI's blocks
    evaluate.load_model(str(tmp_path))


def test_a_workdirs_model_config_is_its_model(params, tmp_path):
  """A workdir holding the `model_config.json` its run saved loads as that model, preprocessing
  included, without --config; a --config of the same architecture loads it too; one of another
  architecture is refused, naming each difference."""
  cfg = dataclasses.replace(CFG, preprocess=clip.PreprocessConfig((0.5,) * 3, (0.5,) * 3,
                                                                  'squash'))
  checkpoint.save(str(tmp_path / 'checkpoints'), 1, {'params': params, 'batch_stats': {}})
  workdirs.save_model_config(str(tmp_path), cfg)
  loaded_params, loaded = evaluate.load_model(str(tmp_path))
  assert loaded == cfg
  chex.assert_trees_all_equal(loaded_params, jax.device_get(params))
  assert evaluate.load_model(str(tmp_path), 'tiny')[1] == cfg  # not tiny's OpenAI preprocessing
  with pytest.raises(ValueError, match=r"--config small is not the model .* trained: embed_dim: "
                     r"--config says 128, the workdir's model_config.json says 32; vision.width: "
                     r"--config says 128, the workdir's model_config.json says 64; .*Leave "
                     r"--config out"):
    evaluate.load_model(str(tmp_path), 'small')


def test_architecture_differences_leave_out_how_a_model_runs_and_reads():
  runs = dataclasses.replace(CFG, dtype='bfloat16', remat='block', scan=True,
                             init_logit_scale=1.0, tokenizer=clip.TokenizerConfig('siglip'),
                             preprocess=clip.PreprocessConfig(resize_mode='squash'))
  assert evaluate.architecture_differences(runs, CFG) == []
  other = dataclasses.replace(CFG, logit_bias=True,
                              text=dataclasses.replace(CFG.text, pool='last', causal=False))
  assert evaluate.architecture_differences(other, CFG) == [
      "text.pool: --config says 'last', the workdir's model_config.json says 'eot'",
      "text.causal: --config says False, the workdir's model_config.json says True",
      "logit_bias: --config says True, the workdir's model_config.json says False"]
