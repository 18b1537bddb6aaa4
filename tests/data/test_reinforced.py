"""Distillation data: reinforced shards (`data.reinforced`, written by `experiments/reinforce.py`)
read back equal to the teacher's outputs for their stored augmentations, in both formats; a
reinforced pipeline replays the stored window whose embedding it yields and resumes bit-exactly;
an online teacher's view is the student's crop window; bad inputs fail before any work.

The teacher is a tiny random-weight CLIP saved as an open_clip folder; its embeddings are
recomputed here with `clip.model.encode_image` / `encode_text` on views cut by the tf crop
functions from the stored windows.
"""
# pylint: disable=redefined-outer-name
import dataclasses
import functools
import hashlib
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
import tensorflow as tf

import clip
from clip import model
from data import model_inputs
from data import naflex_batching
from data import reinforced
from data import reinforced_writer
from data import shards
from data import synthetic
from data import teacher_views
from data import tfrecords
from data import transforms
from data import webdataset_tars
from experiments import reinforce
from tests.data.test_tfrecords import OPENAI
from tests.data.test_tfrecords import SIGLIP
from tests.data.test_tfrecords import fake_tokenize

K = 3
TEACHER = clip.CLIPConfig(16, clip.VisionConfig('vit', 32, 1, 2, 24, 8),
                          clip.TextConfig(32, 1, 2, context_length=12), preprocess=SIGLIP)
FORMATS = ('tar', 'tfrecord')
TIGHT = 2e-6  # the same float32 computation, batched differently


def _digests(folder):
  return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
          for name in sorted(os.listdir(folder))}


def _random_params(cfg, seed=0):
  """Every parameter random (numpy, no compile): weights ~ N(0, 0.05), the logit scale ~ 2.7."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg)
  params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32), shapes)
  params['logit_scale'] = np.float32(2.7 + rng.normal(0, 0.1))
  return params


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """6 synthetic 32 px images in 2 shards of each format, reinforced by the CLI with K=3."""
  root = tmp_path_factory.mktemp('reinforced')
  ds = synthetic.SyntheticCaptions(seed=0, resolution=32)
  ds.write_webdataset(str(root / 'tar'), num_examples=6, num_shards=2)
  ds.write_tfrecords(str(root / 'tfrecord'), num_examples=6, num_shards=2)
  before = {fmt: _digests(root / fmt) for fmt in FORMATS}
  params = _random_params(TEACHER)
  clip.save_open_clip(params, TEACHER, str(root / 'teacher'))
  sidecars = {fmt: reinforce.main(['--data', str(root / fmt), '--teacher', str(root / 'teacher'),
                                   '--augmentations', str(K), '--out', str(root / f'{fmt}-r'),
                                   '--batch-size', '2', '--scale', '0.3', '1.0', '--seed', '5'])
              for fmt in FORMATS}
  assert {fmt: _digests(root / fmt) for fmt in FORMATS} == before  # the sources are untouched
  return root, params, sidecars


def _records(folder, k=K):
  """{key: (caption, image bytes, metadata, arrays)} of every record of a folder's shards."""
  out = {}
  for path in sorted(tf.io.gfile.glob(f'{folder}/*.t*')):
    if path.endswith('.tar'):
      for s in webdataset_tars.read_tar(path):
        arrays = (reinforced.load_npz(s[reinforced.TAR_MEMBER]) if reinforced.TAR_MEMBER in s
                  else {})
        out[s['__key__']] = (s['txt'].decode(), s['jpg'], json.loads(s['json']), arrays)
      continue
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      f = tf.train.Example.FromString(record).features.feature
      flat = reinforced.record_arrays(record)
      arrays = {n: flat[n].reshape(s) for n, s in ((reinforced.IMAGE_EMBEDDING, (k, -1)),
                                                   (reinforced.TEXT_EMBEDDING, (-1,)),
                                                   (reinforced.WINDOWS, (k, 4))) if n in flat}
      meta = {n: f[n].int64_list.value[0] for n in ('width', 'sample_index') if n in f}
      out[f['key'].bytes_list.value[0].decode()] = (
          f['txt'].bytes_list.value[0].decode(), f['jpg'].bytes_list.value[0], meta, arrays)
  return out


@pytest.mark.parametrize('fmt', FORMATS)
def test_reinforced_shards_hold_the_teachers_outputs_of_their_windows(written, fmt):
  root, params, sidecars = written
  originals, stored = _records(root / fmt), _records(root / f'{fmt}-r')
  assert sorted(stored) == sorted(originals) and len(stored) == 6
  for key, (caption, image, meta, arrays) in stored.items():
    assert (caption, image) == originals[key][:2]  # a copy of the original
    assert all(meta[name] == originals[key][2][name] for name in ('width', 'sample_index'))
  keys = sorted(stored)
  windows = np.stack([stored[k][3][reinforced.WINDOWS] for k in keys])  # (6, K, 4)
  assert windows.min() >= 0 and np.all(windows[..., :2] + windows[..., 2:] <= 32)
  assert len({tuple(w) for w in windows.reshape(-1, 4)}) > 6  # K different windows per image
  views = tf.stack([reinforced_writer.view(stored[k][1], w, 24, SIGLIP)
                    for k in keys for w in stored[k][3][reinforced.WINDOWS]]).numpy()
  image_emb = model.l2_normalize(clip.encode_image(params, views, TEACHER)).reshape(6, K, 16)
  tokens = clip.get_tokenizer(TEACHER)([stored[k][0] for k in keys], truncate=True)
  text_emb = model.l2_normalize(clip.encode_text(params, tokens, TEACHER))
  chex.assert_trees_all_close(
      np.stack([stored[k][3][reinforced.IMAGE_EMBEDDING] for k in keys]), image_emb, atol=TIGHT)
  chex.assert_trees_all_close(
      np.stack([stored[k][3][reinforced.TEXT_EMBEDDING] for k in keys]), text_emb, atol=TIGHT)
  sidecar = json.loads((root / f'{fmt}-r' / reinforced.SIDECAR).read_text())
  assert sidecar == sidecars[fmt]
  assert (sidecar['embed_dim'], sidecar['augmentations'], sidecar['records']) == (16, K, 6)
  assert sidecar['logit_scale'] == pytest.approx(float(params['logit_scale']))
  assert (sidecar['scale'], sidecar['seed'], sidecar['skipped']) == ([0.3, 1.0], 5, {})
  assert sorted(sidecar['shards']) == sorted(n for n in os.listdir(root / fmt)
                                             if not n.endswith('.parquet'))
  assert all(os.path.exists(root / f'{fmt}-r' / f'0000{i}.parquet') for i in range(2))


def _pipeline(files, **kwargs):
  kwargs = {'global_batch_size': 2, 'resolution': 16, 'train': True, 'tokenize': fake_tokenize,
            'preprocess': OPENAI, 'process_index': 0, 'process_count': 1,
            'shuffle_buffer': 4, 'fields': ('key',), **kwargs}
  return shards.Pipeline(files, **kwargs)


def _take(pipeline, n):
  it = iter(pipeline)
  return [next(it) for _ in range(n)]


def test_a_reinforced_pipeline_replays_the_stored_window_and_resumes_exactly(written):
  root, _, _ = written
  stored = _records(root / 'tar-r')
  spec = reinforced.ReinforcedSpec(16, K, return_index=True)
  reference = _take(_pipeline(str(root / 'tar-r'), reinforced=spec), 5)  # epochs of 3 batches
  partial = _pipeline(str(root / 'tar-r'), reinforced=spec)
  _take(partial, 2)
  assert partial.state() == {'epoch': 0, 'record': 4, 'step': 2}
  resumed = _take(_pipeline(str(root / 'tar-r'), reinforced=spec, resume=partial.state()), 3)
  chex.assert_trees_all_equal(resumed, reference[2:])
  for batch in reference:
    for key, j, image, embedding, text in zip(
        batch['key'], batch['augmentation_index'], batch['image'],
        batch[reinforced.IMAGE_EMBEDDING], batch[reinforced.TEXT_EMBEDDING]):
      _, data, _, arrays = stored[key.decode()]
      window = arrays[reinforced.WINDOWS][j]
      replay = transforms.normalize_image(transforms.resize_crop(
          transforms.crop_at(data, window), 16), OPENAI.mean, OPENAI.std)
      np.testing.assert_array_equal(image, replay.numpy())
      np.testing.assert_array_equal(embedding, arrays[reinforced.IMAGE_EMBEDDING][j])
      np.testing.assert_array_equal(text, arrays[reinforced.TEXT_EMBEDDING])
  assert len({int(j) for b in reference for j in b['augmentation_index']}) > 1
  assert set(reference[0]) == {'image', 'tokens', 'key', 'augmentation_index',
                               reinforced.IMAGE_EMBEDDING, reinforced.TEXT_EMBEDDING}


def test_reinforced_shards_that_do_not_match_the_run_fail_before_training(written, tmp_path):
  root, _, _ = written
  for fmt in FORMATS:
    with pytest.raises(ValueError, match='hold embed_dim=16, the run expects embed_dim=32'):
      _pipeline(str(root / f'{fmt}-r'), reinforced=reinforced.ReinforcedSpec(32, K))
    with pytest.raises(ValueError, match='hold augmentations=3, the run expects augmentations=5'):
      _pipeline(str(root / f'{fmt}-r'), reinforced=reinforced.ReinforcedSpec(16, 5))
    with pytest.raises(ValueError, match='holds no reinforced.json: these are not reinforced'):
      _pipeline(str(root / fmt), reinforced=reinforced.ReinforcedSpec(16, K))
  # Original shards with a reinforced sidecar beside them: the first record has no outputs.
  shutil.copytree(root / 'tfrecord', tmp_path / 'fake')
  shutil.copy(root / 'tfrecord-r' / reinforced.SIDECAR, tmp_path / 'fake')
  with pytest.raises(ValueError, match='not a reinforced record, it holds no teacher_image_emb'):
    _pipeline(str(tmp_path / 'fake'), reinforced=reinforced.ReinforcedSpec(16, K))
  with pytest.raises(SystemExit, match='would write over the source shards'):
    reinforce.main(['--data', str(root / 'tar'), '--teacher', 'unused', '--augmentations', '1',
                    '--out', str(root / 'tar')])
  with pytest.raises(SystemExit, match='holds reinforced shards already.*--overwrite'):
    reinforce.main(['--data', str(root / 'tar'), '--teacher', 'unused', '--augmentations', '1',
                    '--out', str(root / 'tfrecord-r')])
  # Reinforced shards reinforced again: refused, not written as empty shards.
  params = written[1]
  for fmt in FORMATS:
    with pytest.raises(ValueError, match='is reinforced already: give the original shards'):
      reinforce.reinforce(params, TEACHER, str(root / f'{fmt}-r'), str(tmp_path / f'{fmt}-rr'),
                          augmentations=1, teacher='t', progress=False)
    assert not (tmp_path / f'{fmt}-rr' / reinforced.SIDECAR).exists()


def test_a_teacher_whose_tokenizer_is_unknown_is_refused_before_any_work(written, monkeypatch):
  root, params, _ = written
  unknown = dataclasses.replace(TEACHER, tokenizer=clip.TokenizerConfig('unknown',
                                                                        name='mystery-bpe'))
  out = root / 'never-written'
  with pytest.raises(clip.TokenizerError, match='mystery-bpe'):
    reinforce.reinforce(params, unknown, str(root / 'tar'), str(out), augmentations=K,
                        teacher='mystery')
  monkeypatch.setattr(clip.formats.load, 'load', lambda spec: (params, unknown))
  with pytest.raises(SystemExit, match='reinforce: error: .*mystery-bpe'):
    reinforce.main(['--data', str(root / 'tar'), '--teacher', 'mystery', '--augmentations', '2',
                    '--out', str(out)])
  assert not out.exists()


def test_the_online_teachers_view_is_the_students_crop_window(written):
  root, _, _ = written
  files = [str(root / 'tfrecord' / '00000.tfrecord')]  # one file: positions are file order
  teacher_tokenize = functools.partial(clip.get_tokenizer(TEACHER), truncate=True)
  same = model_inputs.TeacherInputs(teacher_tokenize, OPENAI, 16)
  [batch] = _take(_pipeline(files, shuffle_buffer=1, teacher=same, global_batch_size=3), 1)
  np.testing.assert_array_equal(batch['teacher_image'], batch['image'])
  chex.assert_trees_all_equal(batch['teacher_tokens'], teacher_tokenize(
      [c for c, *_ in map(_records(root / 'tfrecord').get, [k.decode() for k in batch['key']])]))
  other = model_inputs.TeacherInputs(teacher_tokenize, SIGLIP, 24)
  originals = _records(root / 'tfrecord')
  for train in (True, False):
    [batch] = _take(_pipeline(files, shuffle_buffer=1, teacher=other, global_batch_size=3,
                              train=train), 1)
    assert batch['teacher_image'].shape == (3, 24, 24, 3) and batch['image'].shape[1] == 16
    for i, key in enumerate(batch['key']):
      data = originals[key.decode()][1]
      if train:
        crop, _ = transforms.random_crop(data, teacher_views.crop_seed(0, 0, i))
        views = [transforms.resize_crop(crop, n) for n in (16, 24)]
      else:
        views = [transforms.eval_transform(transforms.decode(data), n, p)
                 for n, p in ((16, OPENAI), (24, SIGLIP))]
      for name, view, p in (('image', views[0], OPENAI), ('teacher_image', views[1], SIGLIP)):
        np.testing.assert_array_equal(
            batch[name][i], transforms.normalize_image(view, p.mean, p.std).numpy())


def test_distillation_options_that_cannot_combine_are_refused(written):
  root, _, _ = written
  teacher = model_inputs.TeacherInputs(fake_tokenize, OPENAI, 16)
  with pytest.raises(ValueError, match='not both'):
    _pipeline(str(root / 'tar-r'), teacher=teacher, reinforced=reinforced.ReinforcedSpec(16, K))
  with pytest.raises(ValueError, match='NaFlex pipeline'):
    _pipeline(str(root / 'tar'), teacher=teacher, global_batch_size=None, resolution=None,
              naflex=naflex_batching.NaFlexBatching(patch_size=8, seq_lengths=(16,), batch_size=2))
  with pytest.raises(TypeError, match='TeacherInputs'):
    _pipeline(str(root / 'tar'), teacher=(fake_tokenize, OPENAI, 16))


def test_the_writer_counts_and_reports_the_records_it_cannot_use(tmp_path):
  """Every record is read in order; unusable ones are counted by reason and left out, the rest
  written in their order (embedding functions here: numpy stand-ins, no teacher)."""
  rng = np.random.default_rng(0)
  image = tfrecords.encode_image(rng.integers(0, 255, (20, 28, 3), np.uint8))
  records = [('k0', image, 'a good one'), ('k1', b'not an image', 'undecodable'),
             ('k2', image, '  '), ('k3', image, 'another good one')]
  os.makedirs(tmp_path / 'src')
  tfrecords.write_tfrecord(tmp_path / 'src' / '00000.tfrecord',
                           [tfrecords.serialize_example(*r) for r in records])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  embed_images = lambda v: unit(v.reshape(len(v), -1)[:, :4] + 3)
  embed_texts = lambda texts: unit(np.array([[len(t), 1, 2, 3] for t in texts], np.float32))
  sidecar, stats = reinforced_writer.write(
      str(tmp_path / 'src'), str(tmp_path / 'out'), embed_images, embed_texts, embed_dim=4,
      resolution=8, preprocess=OPENAI, augmentations=2, batch_size=3, progress=False)
  assert sidecar['skipped'] == {'undecodable_image': 1, 'empty_caption': 1} == stats.skipped
  assert sidecar['skipped_examples']['undecodable_image'][0].startswith('k1 in ')
  written = _records(tmp_path / 'out', k=2)
  assert list(written) == ['k0', 'k3'] and sidecar['records'] == 2
  np.testing.assert_allclose(written['k3'][3][reinforced.TEXT_EMBEDDING],
                             embed_texts(['another good one'])[0])
