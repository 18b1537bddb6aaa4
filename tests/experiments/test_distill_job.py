"""The main job distilling (in this process). Online: a `tiny` student at another resolution and
context length than its teacher (a `tiny` workdir) logs the KD term and a zero teacher gradient,
and a run resumed from its step-2 checkpoint ends bit-identical to the uninterrupted one. Offline:
the same teacher's reinforced shards (`experiments.reinforce`) train the student without it, and
shards of two teachers in one run are refused. A teacher is refused before compiling when it
cannot read the captions, or when the built-in data is asked for stored embeddings."""
import json
import os
import shutil

import chex
import numpy as np
import pytest

from data import synthetic
from data import synthetic_shards
from experiments import reinforce
from experiments import train
from tests.experiments.test_naflex_job import _state

SMALL = ['--eval-examples', '0', '--set', 'model.vision.layers=1', '--set', 'model.text.layers=1',
         '--set', 'model.vision.width=32', '--set', 'model.text.width=32']
TEACHER = ['--config', 'tiny:batch=8,steps=2'] + SMALL
STUDENT = ['--config', 'tiny:batch=8,steps=4', '--checkpoint-every', '2', '--set',
           'model.vision.image_resolution=16', '--set', 'model.text.context_length=16',
           '--distill-weight', '0.5'] + SMALL


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train.main(TEACHER + ['--workdir', workdir])
  return workdir


@pytest.mark.slow
def test_a_resumed_distilling_run_is_bit_identical(tmp_path, teacher_dir):
  whole, part = str(tmp_path / 'whole'), str(tmp_path / 'part')
  args = STUDENT + ['--teacher', teacher_dir]
  train.main(args + ['--workdir', whole])
  final, meta = _state(whole, 4)
  with open(os.path.join(whole, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f if '"loss"' in line]
  assert lines and all(line['teacher_grad_norm'] == 0 for line in lines)
  assert all(np.isfinite(line['distill_loss']) and line['distill_loss'] > 0 for line in lines)
  os.makedirs(part)
  shutil.copytree(os.path.join(whole, 'checkpoints', '2'), os.path.join(part, 'checkpoints', '2'))
  for name in os.listdir(whole):
    if name.endswith('.json'):
      shutil.copy(os.path.join(whole, name), part)
  train.main(args + ['--workdir', part])
  resumed, resumed_meta = _state(part, 4)
  chex.assert_trees_all_equal(resumed, final)
  assert resumed_meta['data'] == meta['data']


def test_bad_teachers_are_refused_before_compiling(tmp_path, teacher_dir):
  config = os.path.join(teacher_dir, 'model_config.json')
  with open(config) as f:
    saved = json.load(f)
  unknown = str(tmp_path / 'unknown')
  shutil.copytree(teacher_dir, unknown)
  saved['tokenizer'] = {'kind': 'unknown', 'name': 'bert-base-uncased'}
  with open(os.path.join(unknown, 'model_config.json'), 'w') as f:
    json.dump(saved, f)
  with pytest.raises(ValueError, match='its tokenizer is unknown.*bert-base-uncased'):
    train.main(STUDENT + ['--teacher', unknown, '--workdir', str(tmp_path / 'a')])
  with pytest.raises(ValueError, match='the built-in data has none: give --teacher'):
    train.main(STUDENT + ['--workdir', str(tmp_path / 'b')])
  with pytest.raises(ValueError, match='distill_weight must be a finite number >= 0'):
    train.main(STUDENT + ['--teacher', teacher_dir, '--distill-weight', '-1', '--workdir',
                          str(tmp_path / 'c')])


def test_an_offline_run_reads_the_teachers_reinforced_shards(tmp_path, teacher_dir):
  shards = str(tmp_path / 'shards')
  synthetic_shards.write_tfrecords(synthetic.SyntheticCaptions(seed=5, resolution=32), shards,
                                   num_examples=32, num_shards=2)
  reinforce.main(['--data', os.path.join(shards, '*.tfrecord'), '--teacher', teacher_dir,
                  '--augmentations', '2', '--out', str(tmp_path / 'k2'), '--batch-size', '16'])
  workdir = str(tmp_path / 'student')
  args = STUDENT[:1] + ['tiny:batch=8,steps=2'] + STUDENT[2:]
  train.main(args + ['--data', str(tmp_path / 'k2' / '*.tfrecord'), '--workdir', workdir])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f if '"loss"' in line]
  assert lines and all(line['distill_loss'] > 0 and 'teacher_grad_norm' not in line
                       for line in lines)
  # Another teacher's shards (a copy whose sidecar says K=3) beside them in a mixture.
  shutil.copytree(tmp_path / 'k2', tmp_path / 'k3')
  with open(tmp_path / 'k3' / 'reinforced.json') as f:
    sidecar = json.load(f)
  _write_json(tmp_path / 'k3' / 'reinforced.json', {**sidecar, 'augmentations': 3})
  mixed = f'{tmp_path / "k2" / "*.tfrecord"}:0.5,{tmp_path / "k3" / "*.tfrecord"}:0.5'
  with pytest.raises(ValueError, match='reinforced shards of two teachers in one run'):
    train.main(args + ['--data', mixed, '--workdir', str(tmp_path / 'mixed')])
  # The run's shards rewritten by another teacher: its resume is refused.
  _write_json(tmp_path / 'k2' / 'reinforced.json', {**sidecar, 'logit_scale': 1.5})
  with pytest.raises(ValueError, match='was trained on reinforced shards of .embed_dim'):
    train.main(STUDENT + ['--data', str(tmp_path / 'k2' / '*.tfrecord'), '--workdir', workdir])
  with pytest.raises(ValueError, match='holds no reinforced.json.*give --teacher to distil'):
    train.main(args + ['--data', os.path.join(shards, '*.tfrecord'), '--workdir',
                       str(tmp_path / 'plain')])


def _write_json(path, value):
  with open(path, 'w') as f:
    json.dump(value, f)
