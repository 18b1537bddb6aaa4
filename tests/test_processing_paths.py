"""Every evaluation entry point feeds a model its own processing: a SigLIP-configured model
(SentencePiece tokens, squashed images normalised with mean and std 0.5) runs through zero-shot
classification, retrieval, the linear probe, `experiments.evaluate`, `experiments.zero_shot`,
`experiments.finetune` and `data.synthetic_eval` with OpenAI's tokenizer and normalisation made
to raise, and the tokens and pixels each one hands the model equal the model's own (its
SentencePiece tokenizer, read independently; PIL's squash and its mean and std). The same model
whose SentencePiece file is unknown is refused at every entry point that tokenises, saying how to
give it, never run on OpenAI's tokens.
"""
# pylint: disable=redefined-outer-name
import dataclasses

import jax
import numpy as np
import pytest
import sentencepiece
from PIL import Image

import clip
from clip.formats import workdirs
from clip.train import state_store
from clip.train import training
from clip.eval import generation
from clip.eval import linear_probe
from clip import model
from clip import preprocess
from clip import siglip_tokenizer
from clip import tokenizer as openai_tokenizer
from clip.eval import zero_shot
from data import synthetic
from data import synthetic_eval
from experiments import evaluate
from experiments import finetune
from experiments import zero_shot as zero_shot_cli
from experiments.configs import siglip_small
from tests.test_siglip_tokenizer import SIGLIP_SPEC
from tests.test_siglip_tokenizer import training_texts

SIGLIP_PREPROCESS = clip.PreprocessConfig((0.5,) * 3, (0.5,) * 3, 'squash')
RESOLUTION = siglip_small.get_config().model.image_resolution
ATOL = 1e-5  # fp32 features of unit norm, computed in other batch sizes
PIXEL_ATOL = 1e-6  # the same float32 arithmetic, perhaps in another order


@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
  """A tiny SentencePiece model with SigLIP's conventions (`</s>` ends and pads, no BOS),
  trained on generated text and the built-in set's captions and prompts."""
  folder = tmp_path_factory.mktemp('spm')
  ds = synthetic.SyntheticCaptions(seed=0, resolution=16)
  texts = training_texts(600) + ds.get(np.arange(400))['caption'] + [
      p for task in synthetic.TASKS for p in ds.prompts(task)]
  (folder / 'corpus.txt').write_text('\n'.join(texts), encoding='utf-8')
  sentencepiece.SentencePieceTrainer.train(
      input=str(folder / 'corpus.txt'), model_prefix=str(folder / 'siglip'),
      character_coverage=0.995, minloglevel=2, **SIGLIP_SPEC)
  return str(folder / 'siglip.model')


@pytest.fixture(scope='module')
def cfg(model_file):
  """`siglip_small`'s model over the tiny vocabulary, pooled at the last position as SigLIP."""
  base = siglip_small.get_config().model
  text = dataclasses.replace(base.text, vocab_size=SIGLIP_SPEC['vocab_size'],
                             eot_token_id=SIGLIP_SPEC['eos_id'], pool='last', mask_padding=False)
  return dataclasses.replace(base, text=text,
                             tokenizer=clip.TokenizerConfig('siglip', model_file=model_file),
                             preprocess=SIGLIP_PREPROCESS)


@pytest.fixture(scope='module')
def unknown_cfg(cfg):
  """The same model, its SentencePiece file not known."""
  return dataclasses.replace(cfg, tokenizer=clip.TokenizerConfig('siglip'))


@pytest.fixture(scope='module')
def params(cfg):
  return jax.device_get(clip.init(jax.random.PRNGKey(0), cfg))


def _workdir(path, params, cfg):
  state_store.save(str(path / 'checkpoints'), 1, {'params': params, 'batch_stats': {}})
  workdirs.save_model_config(str(path), cfg)
  return str(path)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, params, cfg):
  """A training workdir of the model: its checkpoint and `model_config.json`."""
  return _workdir(tmp_path_factory.mktemp('run'), params, cfg)


@pytest.fixture(scope='module')
def unknown_workdir(tmp_path_factory, params, unknown_cfg):
  return _workdir(tmp_path_factory.mktemp('run_unknown'), params, unknown_cfg)


@pytest.fixture(scope='module')
def own_tokens(model_file, cfg):
  """The model's tokens of `texts`, by SigLIP's tokenizer read afresh from the file."""
  tok = siglip_tokenizer.SentencePieceTokenizer(model_file, cfg.context_length, kind='siglip')
  return lambda texts, truncate=False: tok.tokenize(list(texts), truncate=truncate)


def own_pixels(images):
  """The model's pixels of PIL images or uint8 arrays: PIL's bicubic squash to the resolution,
  then (x / 255 - 0.5) / 0.5."""
  out = []
  for image in images:
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if image.size != (RESOLUTION, RESOLUTION):
      image = image.resize((RESOLUTION, RESOLUTION), Image.BICUBIC)
    out.append(np.asarray(image.convert('RGB'), np.float32) / np.float32(255))
  return (np.stack(out) - np.float32(0.5)) / np.float32(0.5)


def _refuse(what):
  def refused(*args, **kwargs):
    raise AssertionError(f'{what} called for a SigLIP model')
  return refused


@pytest.fixture(autouse=True)
def no_openai_processing(monkeypatch):
  """OpenAI's tokenizer and normalisation raise: no path may reach them for this model."""
  for owner, name in ((openai_tokenizer.Tokenizer, 'tokenize'),
                      (openai_tokenizer.Tokenizer, 'encode'), (openai_tokenizer, 'tokenize'),
                      (openai_tokenizer, 'default_tokenizer'), (clip, 'tokenize'),
                      (clip.configs, 'normalize_image'), (clip, 'normalize_image')):
    monkeypatch.setattr(owner, name, _refuse(f'OpenAI\'s {name}'))
  for name in ('preprocess', 'preprocess_image'):
    original = getattr(preprocess, name)

    def stated_only(images, resolution, config=None, _original=original, _name=name):
      if config is None:
        raise AssertionError(f'clip.preprocess.{_name} called without the model\'s config')
      return _original(images, resolution, config)
    monkeypatch.setattr(preprocess, name, stated_only)


@pytest.fixture
def seen(monkeypatch):
  """What the paths hand the model, recorded where the arrays are concrete: class prompt tokens
  (C, T, L), text tokens, and images classified, probed or encoded (`clip.encode_image`)."""
  record = {'class_tokens': [], 'text_tokens': [], 'classified': [], 'probed': [], 'encoded': []}

  def spy(owner, name, key, index):
    original = getattr(owner, name)

    def recorded(*args, **kwargs):
      x = args[index]
      if not isinstance(x, jax.core.Tracer):
        record[key].append(np.asarray(x))
      return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, recorded)

  spy(zero_shot, 'classifier_weights_from_tokens', 'class_tokens', 1)
  spy(zero_shot, 'classify', 'classified', 1)
  spy(linear_probe, 'image_features', 'probed', 1)
  spy(clip, 'encode_image', 'encoded', 1)
  for owner in (model, clip):
    spy(owner, 'encode_text', 'text_tokens', 1)
  return record


def _sample(split, n, offset=0, seed=1):
  ds = synthetic.SyntheticCaptions(seed=seed, resolution=RESOLUTION, split=split)
  return ds, ds.get(np.arange(offset, offset + n))


def _cosines(params, cfg, pixels, tokens):
  img = np.asarray(clip.encode_image(params, pixels, cfg), np.float64)
  txt = np.asarray(clip.encode_text(params, tokens, cfg), np.float64)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  return img @ txt.T


# ---------------------------------------------------------------- the library's paths

def test_zero_shot_weights_and_classify_use_the_models_processing(params, cfg, own_tokens, seen):
  names, templates = ['red circle', 'blue square', 'green star'], ('a photo of a {}.', 'art: {}!')
  weights = zero_shot.classifier_weights(params, names, cfg, templates)
  expected = own_tokens(zero_shot.prompts(names, templates)).reshape(3, 2, -1)
  np.testing.assert_array_equal(seen['class_tokens'][-1], expected)
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
            for h, w in ((40, 90), (64, 64), (100, 30))]
  pixels = clip.preprocess_images(images, cfg)
  np.testing.assert_allclose(pixels, own_pixels(images), atol=PIXEL_ATOL)
  idx, probs = zero_shot.classify(params, pixels, weights, cfg, k=3)
  logits = np.exp(float(params['logit_scale'])) * np.asarray(
      model.l2_normalize(clip.encode_image(params, own_pixels(images), cfg))) @ weights
  sigmoid = 1 / (1 + np.exp(-(logits + float(params['logit_bias']))))  # SigLIP's, not softmax
  np.testing.assert_array_equal(idx, np.argsort(-sigmoid, axis=1, kind='stable'))
  np.testing.assert_allclose(probs, np.sort(sigmoid, axis=1)[:, ::-1], rtol=1e-4)


def test_evaluate_data_and_scores_are_the_models(params, cfg, own_tokens, seen):
  args = evaluate.parse_args(['--model', 'x', '--dataset', 'synthetic/colour', '--examples',
                              '16'])
  images, labels, classnames, prompts = evaluate.classification_data(args, cfg, None)
  ds, sample = _sample('heldout', 16)
  np.testing.assert_allclose(images, own_pixels(sample['image']), atol=PIXEL_ATOL)
  np.testing.assert_array_equal(labels, ds.labels(sample, 'colour'))
  scores = evaluate.zero_shot_scores(params, images, prompts, cfg, 8)
  tokens = own_tokens([p for ps in prompts for p in ps])
  np.testing.assert_array_equal(seen['class_tokens'][-1][:, 0], tokens)
  np.testing.assert_allclose(scores, _cosines(params, cfg, own_pixels(sample['image']), tokens),
                             atol=ATOL)
  assert len(classnames) == len(prompts)
  retrieval = evaluate.parse_args(['--model', 'x', '--dataset', 'synthetic', '--task',
                                   'zeroshot_retrieval', '--examples', '16'])
  images, tokens = evaluate.retrieval_data(retrieval, cfg)
  np.testing.assert_allclose(images, own_pixels(sample['image']), atol=PIXEL_ATOL)
  np.testing.assert_array_equal(tokens, own_tokens(sample['caption']))


def test_retrieval_shards_are_read_with_the_models_processing(cfg, own_tokens, tmp_path,
                                                              monkeypatch):
  """img2dataset shards (`--captions`): captions truncated to the context by the model's
  tokenizer, images (lossless PNGs at the model's resolution) normalised with its mean and std
  (the tf transform is within one uint8 level of PIL's)."""
  # Local: data.transforms imports tensorflow, which no other test here needs.
  from data import transforms  # pylint: disable=g-import-not-at-top
  original = transforms.normalize_image

  def model_stats(image_u8, mean, std):
    assert (tuple(mean), tuple(std)) == ((0.5,) * 3, (0.5,) * 3), (mean, std)
    return original(image_u8, mean, std)
  monkeypatch.setattr(transforms, 'normalize_image', model_stats)
  ds = synthetic.SyntheticCaptions(seed=3, resolution=cfg.image_resolution)
  ds.write_tfrecords(str(tmp_path), num_examples=6, num_shards=1, image_format='png')
  args = evaluate.parse_args(['--model', 'x', '--task', 'zeroshot_retrieval', '--captions',
                              str(tmp_path / '*.tfrecord'), '--batch-size', '6'])
  images, tokens = evaluate.retrieval_data(args, cfg)
  sample = ds.get(np.arange(6))  # one shard, read in order
  np.testing.assert_array_equal(tokens, own_tokens(sample['caption'], truncate=True))
  np.testing.assert_allclose(images, own_pixels(sample['image']), atol=2 / 255 + PIXEL_ATOL)


def _decoder(cfg):
  """A captioning decoder reading the text tower's tokens."""
  t = cfg.text
  return clip.DecoderConfig(width=128, layers=1, heads=2, context_length=t.context_length,
                            vocab_size=t.vocab_size, eot_token_id=t.eot_token_id,
                            image_projection=False)


def test_generative_scores_need_a_start_token(cfg):
  """Our captioning decoder reads a start token first; SigLIP's tokenizer has none."""
  captioner = dataclasses.replace(cfg, decoder=_decoder(cfg))
  with pytest.raises(clip.TokenizerError, match='no start-of-text token'):
    generation.start_token_id(captioner)
  with pytest.raises(clip.TokenizerError, match='no start-of-text token'):
    evaluate.generative_scores(None, None, [['a red circle']], captioner, 8)


# ---------------------------------------------------------------- the scripts

def test_evaluate_main_on_a_siglip_workdir(params, cfg, workdir, own_tokens, seen, tmp_path):
  loaded_params, loaded = evaluate.load_model(workdir)
  assert loaded.tokenizer.kind == 'siglip' and loaded.preprocess == SIGLIP_PREPROCESS
  assert dataclasses.replace(loaded, tokenizer=cfg.tokenizer) == cfg
  np.testing.assert_array_equal(loaded_params['logit_bias'], params['logit_bias'])

  run = lambda *a: evaluate.main(['--model', workdir, '--examples', '32', '--batch-size', '16',
                                  '--output', str(tmp_path / 'out.json'), *a])
  result = run('--dataset', 'synthetic/colour')
  ds, sample = _sample('heldout', 32)
  np.testing.assert_array_equal(seen['class_tokens'][-1][:, 0], own_tokens(ds.prompts('colour')))
  np.testing.assert_allclose(seen['probed'][-1], own_pixels(sample['image']), atol=PIXEL_ATOL)
  assert 0 <= result['metrics']['acc1'] <= 1  # the scores themselves: test_evaluate_data_...

  seen['text_tokens'].clear()
  run('--task', 'zeroshot_retrieval')
  np.testing.assert_array_equal(np.concatenate(seen['text_tokens']),
                                own_tokens(sample['caption']))
  np.testing.assert_allclose(seen['probed'][-1], own_pixels(sample['image']), atol=PIXEL_ATOL)

  result = run('--task', 'linear_probe', '--dataset', 'synthetic/colour')
  _, fit = _sample('all', 32, synthetic.UNSEEN_START)
  _, test = _sample('all', 32)
  np.testing.assert_allclose(seen['probed'][-2], own_pixels(fit['image']), atol=PIXEL_ATOL)
  np.testing.assert_allclose(seen['probed'][-1], own_pixels(test['image']), atol=PIXEL_ATOL)
  assert 0 <= result['metrics']['lp_acc1'] <= 1


def test_zero_shot_cli_on_an_image_folder(workdir, own_tokens, seen, tmp_path):
  rng = np.random.default_rng(1)
  (tmp_path / 'images').mkdir()
  images = []
  for i, (h, w) in enumerate(((50, 120), (64, 64), (90, 20))):
    images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)))
    images[-1].save(tmp_path / 'images' / f'{i}.png')
  classes = ['red circle', 'green square']
  predictions = zero_shot_cli.main(['--model', workdir, '--images', str(tmp_path / 'images'),
                                    '--classes', ','.join(classes), '--out', str(tmp_path / 'out')])
  assert [p['image'] for p in predictions] == ['0.png', '1.png', '2.png']
  expected = own_tokens(zero_shot.prompts(classes, zero_shot.DEFAULT_TEMPLATES))
  np.testing.assert_array_equal(seen['class_tokens'][-1], expected.reshape(2, 7, -1))
  np.testing.assert_allclose(seen['classified'][-1], own_pixels(images), atol=PIXEL_ATOL)


@pytest.mark.slow  # three train steps to compile
def test_finetune_script_every_mode(workdir, own_tokens, seen, tmp_path, monkeypatch):
  """Each mode's training batches and evaluation inputs are the model's own."""
  batches, original = [], training.global_batch
  monkeypatch.setattr(training, 'global_batch',
                      lambda mesh, b: batches.append(dict(b)) or original(mesh, b))
  common = ['--model', workdir, '--batch-size', '8', '--eval-examples', '8', '--steps', '1',
            '--mesh', '8,1,1']
  train = synthetic.SyntheticCaptions(seed=0, resolution=RESOLUTION, split='train')
  first = train.get(np.arange(synthetic.UNSEEN_START, synthetic.UNSEEN_START + 8))
  _, heldout = _sample('heldout', 8)

  res = finetune.main(common + ['--mode', 'classifier', '--dataset', 'synthetic/colour', '--out',
                           str(tmp_path / 'c')])
  prompts = synthetic.SyntheticCaptions.prompts('colour')
  np.testing.assert_array_equal(seen['class_tokens'][0][:, 0], own_tokens(prompts))
  np.testing.assert_allclose(batches[-1]['image'], own_pixels(first['image']), atol=PIXEL_ATOL)
  assert set(res['finetuned_accuracy']) == {'train', 'heldout'}

  seen['text_tokens'].clear()
  res = finetune.main(common + ['--mode', 'text-classifier', '--dataset', 'synthetic/colour',
                           '--out', str(tmp_path / 't')])
  np.testing.assert_array_equal(batches[-1]['tokens'], own_tokens(first['caption']))
  np.testing.assert_array_equal(seen['text_tokens'][-1], own_tokens(heldout['caption']))
  assert set(res['accuracy']) == {'train', 'heldout'}

  res = finetune.main(common + ['--mode', 'lit', '--loss', 'sigmoid', '--out', str(tmp_path / 'l')])
  lit = train.get(np.arange(8) + synthetic.LIT_START_STEP * 8)
  np.testing.assert_array_equal(batches[-1]['tokens'], own_tokens(lit['caption']))
  np.testing.assert_allclose(batches[-1]['image'], own_pixels(lit['image']), atol=PIXEL_ATOL)
  assert set(res['before']) == set(res['after'])


def test_synthetic_eval(params, cfg, own_tokens, seen):
  results = synthetic_eval.evaluate(params, cfg, 8, 1)
  ds, sample = _sample('heldout', 8)
  # Every task's prompts in one pass, the images once for every task and retrieval.
  every_prompt = [p for task in synthetic_eval.TASKS for p in ds.prompts(task)]
  assert len(seen['class_tokens']) == len(seen['encoded']) == 2  # a pass of each per split
  np.testing.assert_array_equal(seen['class_tokens'][-1][:, 0], own_tokens(every_prompt))
  np.testing.assert_allclose(seen['encoded'][-1], own_pixels(sample['image']), atol=PIXEL_ATOL)
  np.testing.assert_array_equal(seen['text_tokens'][-1], own_tokens(sample['caption']))
  assert 0 <= results['heldout/colour_top1'] <= 1


# ---------------------------------------------------------------- an unknown tokenizer

def test_an_unknown_tokenizer_is_refused_at_every_entry_point(params, unknown_cfg,
                                                              unknown_workdir, tmp_path):
  how = 'model_file'  # the message says how to give the SentencePiece file
  raises = lambda: pytest.raises(clip.TokenizerError, match=how)
  with raises():
    zero_shot.classifier_weights(params, ['red circle'], unknown_cfg)
  images = own_pixels(synthetic.SyntheticCaptions(resolution=RESOLUTION).get(np.arange(2))['image'])
  with raises():
    evaluate.zero_shot_scores(params, images, [['a'], ['b']], unknown_cfg, 8)
  with raises():
    evaluate.retrieval_data(evaluate.parse_args(['--model', 'x', '--task', 'zeroshot_retrieval',
                                                 '--examples', '2']), unknown_cfg)
  out = str(tmp_path / 'out.json')
  for task in ('zeroshot_classification', 'zeroshot_retrieval'):
    with raises():
      evaluate.main(['--model', unknown_workdir, '--task', task, '--examples', '8', '--output',
                     out])
  (tmp_path / 'images').mkdir()
  Image.new('RGB', (20, 30)).save(tmp_path / 'images' / 'a.png')
  with pytest.raises(SystemExit, match=how) as error:
    zero_shot_cli.main(['--model', unknown_workdir, '--images', str(tmp_path / 'images'),
                        '--classes', 'a,b', '--out', str(tmp_path / 'zs')])
  assert isinstance(error.value.__cause__, clip.TokenizerError)
  for mode in finetune.MODES:
    with raises():
      finetune.main(['--model', unknown_workdir, '--mode', mode, '--steps', '1', '--batch-size',
                     '8', '--eval-examples', '8', '--mesh', '8,1,1', '--out',
                     str(tmp_path / mode)])
  with raises():
    synthetic_eval.evaluate(params, unknown_cfg, 8, 1)
  with raises():
    generation.start_token_id(dataclasses.replace(unknown_cfg, decoder=_decoder(unknown_cfg)))
  assert not (tmp_path / 'zs').exists()
