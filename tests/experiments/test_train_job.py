"""The main job as users run it, in subprocesses: a killed run resumes bit-identically, and two
processes with four devices each train exactly as one process with eight. Its data is read as the
model reads (its tokenizer and preprocessing), which its workdir names; its data position is the
next unseen example, so a run resumed at another batch size sees each example once."""
# pylint: disable=redefined-outer-name
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import clip
from clip.formats import files
from clip.formats import workdirs
from clip.train import resume
from clip.train import state_store
from data import synthetic
from experiments import local_processes
from experiments import train
from experiments.configs import tiny
from tests.data.test_tfrecords import siglip_cfg  # pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300
# The tiny config's towers at one block each (a quarter less compile time in every process).
ONE_BLOCK = ('--set', 'model.vision.layers=1', '--set', 'model.text.layers=1')


def one_block_model():
  """The model config the runs train: the tiny config's at one block per tower."""
  model = tiny.get_config().model
  return dataclasses.replace(model, vision=dataclasses.replace(model.vision, layers=1),
                             text=dataclasses.replace(model.text, layers=1))


def env(devices):
  e = dict(os.environ)
  e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  return e


def train_cmd(workdir, *extra, steps=12):
  return [sys.executable, '-m', 'experiments.train', '--config', 'tiny', '--steps', str(steps),
          '--checkpoint-every', '4', '--eval-examples', '0', '--workdir', str(workdir), *extra]


def run(cmd, devices):
  subprocess.run(cmd, env=env(devices), cwd=ROOT, check=True, timeout=TIMEOUT_S,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def final_state(workdir, step=12):
  """{pytree path: array} of the whole train state in checkpoint `step`."""
  tree, _ = state_store.read(os.path.join(workdir, 'checkpoints'),
                             ('params', 'batch_stats', 'opt', 'step', 'rng'), step)
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f) if 'loss' in r]


def evaluations(workdir, step):
  """{metric: value} of the evaluators' line of `step` in metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    (line,) = [r for r in map(json.loads, f) if r['step'] == step and 'loss' not in r]
  assert len(line) > 10 and all(k.startswith('eval/synthetic/') for k in line if k != 'step')
  return line


def write_tars(directory):
  """96 built-in samples as img2dataset webdataset shards: 12 steps of 32 cross three epoch ends
  (the step-4 resume lands inside the second epoch)."""
  synthetic.SyntheticCaptions(seed=3, resolution=40).write_webdataset(directory, 96, 4)
  return os.path.join(directory, '*.tar')


@pytest.mark.slow
def test_a_run_killed_during_an_async_save_resumes_bit_identically(tmp_path):
  """SIGKILL while the step-8 checkpoint is being written (orbax's temporary folder exists), rerun:
  the run restarts from step 4, the previous complete checkpoint, and its final state and logged
  losses equal an uninterrupted run's (params, optimizer, EMA, rng and the data position
  restored). The run's export, and the workdir through `clip.load`, are its EMA weights.

  On webdataset tars: the shard pipeline's position is one `state()` for both formats
  (tfrecords resume exactly in tests/data/test_shards.py); the built-in data's position resumes
  across process counts in the test below."""
  extra = ['--mesh=2,2,2', '--ema-decay', '0.9', *ONE_BLOCK,
           '--data', write_tars(tmp_path / 'shards')]
  run(train_cmd(tmp_path / 'straight', *extra, '--export-torch', str(tmp_path / 'final.pt')),
      devices=8)
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(train_cmd(killed, *extra), env=env(8), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + TIMEOUT_S
    while not list((killed / 'checkpoints').glob('8.orbax-checkpoint-tmp*')):
      assert proc.poll() is None and time.time() < deadline, 'no step-8 save before the kill'
      time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  assert state_store.steps(killed / 'checkpoints') == [4], 'killed after the save completed'
  run(train_cmd(killed, *extra), devices=8)
  assert workdirs.load_model_config(str(killed)) == one_block_model()
  straight, resumed = final_state(tmp_path / 'straight'), final_state(killed)
  assert straight.keys() == resumed.keys()
  for k in straight:
    np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
  assert losses(killed) == losses(tmp_path / 'straight')
  # --export-torch wrote the final EMA weights as a torch state dict that loads back exactly, and
  # the workdir loads as those weights.
  exported, _ = clip.load(str(tmp_path / 'final.pt'))
  trained, _ = state_store.read(tmp_path / 'straight' / 'checkpoints', ('ema', 'params'))
  chex.assert_trees_all_equal(files.flatten(exported), files.flatten(trained['ema']))
  assert not np.array_equal(trained['ema']['logit_scale'], trained['params']['logit_scale'])
  loaded, cfg = clip.load(str(tmp_path / 'straight'))
  assert cfg == one_block_model()
  chex.assert_trees_all_equal(files.flatten(loaded), files.flatten(trained['ema']))


def launch(workdir, processes, devices, *extra, steps):
  """The main job as `processes` localhost processes of `devices` CPU devices each."""
  port = local_processes.free_port()
  procs = [subprocess.Popen(
      train_cmd(workdir, *extra, '--num-processes', str(processes), '--process-id', str(i),
                '--coordinator', f'127.0.0.1:{port}', steps=steps),
      env=env(devices), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
      for i in range(processes)]
  try:
    errs = [p.communicate(timeout=2 * TIMEOUT_S)[1] for p in procs]
    failed = [f'process {i} exited {p.returncode}: {err.decode()[-3000:]}'
              for i, (p, err) in enumerate(zip(procs, errs)) if p.returncode]
    assert not failed, '\n\n'.join(failed)  # every process's log: one's failure may be another's
  finally:
    for p in procs:
      p.kill()


@pytest.mark.slow
def test_a_run_of_two_processes_resumes_on_one(tmp_path):
  """A run of 2 processes x 4 devices on an FSDP mesh (data 2 x fsdp 4), resumed from its step-2
  checkpoint of 4 (each process wrote its own shards) on 1 process x 8 devices on another mesh, logs
  the losses of the uninterrupted run (to float32 reduction order) and the evaluator's metrics of
  the uninterrupted run: processes train and evaluate as one. (A resume on 4 processes x 2
  devices passed the same checks when it was added (issue 33); it left this test to keep CI
  under 30 minutes on 2 cores: 4 processes there cost ~70 s. `process_position` maps data
  positions to any count: tests/train/test_resume.py.)

  The ring loss, whose collectives are ppermutes: the all-gather loss's small reduce-scatter makes
  gloo's later large all-reduces ~100x slower (experiments/bench_gloo.py); ring and all-gather
  losses are checked against each other in one process (tests/losses/)."""
  common = (*ONE_BLOCK, '--loss', 'ring_contrastive', '--set', 'run.log_every=1',
            '--checkpoint-every', '2', '--eval-every', '4', '--evaluator',
            'synthetic:examples=48')
  two = tmp_path / 'two'
  launch(two, 2, 4, '--mesh=2,4,1', *common, steps=4)
  straight = losses(two)
  assert [s for s, _ in straight] == [1, 2, 3, 4]
  for name, processes, devices, mesh in (('on_one', 1, 8, '8,1,1'),):
    resumed = tmp_path / name
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '4')  # as if stopped after the step-2 checkpoint
    launch(resumed, processes, devices, f'--mesh={mesh}', *common, steps=4)
    assert [s for s, _ in losses(resumed)] == [1, 2, 3, 4], name
    np.testing.assert_allclose([l for _, l in losses(resumed)], [l for _, l in straight],
                               rtol=1e-5, err_msg=name)
    # The evaluator, each process embedding its share, scores as the others do (weights equal to
    # ~1e-6 across process counts; exact equality of the sharded path: tests/eval/).
    assert evaluations(resumed, 4) == evaluations(two, 4), name


def test_the_data_is_read_as_the_model_reads(siglip_cfg, tmp_path):
  """`make_data` hands both sources the model's tokenizer and preprocessing: a SigLIP model's
  synthetic batches are its SentencePiece tokens and `clip.preprocess_images`' pixels, its shard
  batches hold rows of its tokenizer and pixels normalised with mean and std 0.5."""
  config = train.load_config(train.parse_args(['--config', 'tiny', '--batch-size', '8']))
  tcfg = config.train
  batches, pipeline = train.make_data(config, siglip_cfg, tcfg, {'step': 3})
  raw = synthetic.SyntheticCaptions(tcfg.seed, siglip_cfg.image_resolution).batch(8, step=3)
  batch = next(batches)
  assert pipeline is None
  np.testing.assert_array_equal(batch['tokens'],
                                clip.get_tokenizer(siglip_cfg)(raw['caption'], truncate=True))
  chex.assert_trees_all_close(batch['image'], clip.preprocess_images(raw['image'], siglip_cfg),
                              atol=1e-6)
  ds = synthetic.SyntheticCaptions(seed=3, resolution=40)
  ds.write_webdataset(str(tmp_path), 16, 2)
  shards = dataclasses.replace(config, run=dataclasses.replace(config.run,
                                                               data=str(tmp_path / '*.tar')))
  batches, pipeline = train.make_data(shards, siglip_cfg, tcfg, None)
  batch = next(batches)
  captions = ds.get(np.arange(16))['caption']
  rows = {tuple(r) for r in clip.get_tokenizer(siglip_cfg)(captions, truncate=True)}
  assert {tuple(r) for r in batch['tokens']} <= rows
  assert batch['image'].shape == (8, 64, 64, 3)
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1  # (x - 0.5) / 0.5
  assert pipeline.preprocess == siglip_cfg.preprocess


def _recorded_samples(monkeypatch):
  """The synthetic set's sample indices, in the order the batches draw them."""
  seen, get = [], synthetic.SyntheticCaptions.get
  def recording(self, indices):
    seen.extend(np.asarray(indices).reshape(-1).tolist())
    return get(self, indices)
  monkeypatch.setattr(synthetic.SyntheticCaptions, 'get', recording)
  return seen


def _train_data(batch_size, steps, data_state):
  """What the main job does with its data for `steps` steps from `data_state` (a checkpoint's
  position, None: the start): the batches read, and the position its next checkpoint stores."""
  config = train.load_config(train.parse_args(['--config', 'tiny', '--batch-size',
                                               str(batch_size)]))
  batches, pipeline = train.make_data(config, config.model, config.train, data_state)
  for _ in range(steps):
    next(batches)
  start = resume.resume_example(data_state, batch_size)
  return resume.data_position(pipeline, start, steps, batch_size), config


@pytest.mark.parametrize('batch_size', [4, 12])
def test_a_run_resumed_at_another_batch_size_sees_each_example_once(monkeypatch, capsys,
                                                                    batch_size):
  """3 steps at batch 8, resumed for 4 at `batch_size`, then for 2 at 8 again: the checkpoints
  hold the next unseen example (24, ...), so the run draws samples 0, 1, 2, ... each once, in
  order (a step position would resume at 3 x 4 = 12, repeating 12..23, or at 3 x 12 = 36,
  skipping 24..35)."""
  seen = _recorded_samples(monkeypatch)
  state, _ = _train_data(8, 3, None)
  assert state == {'example': 24}
  _, config = _train_data(batch_size, 0, state)
  capsys.readouterr()
  meta = {'step': 3, 'data': state, 'data_source': 'synthetic', 'batch_size': 8,
          'total_steps': 50}
  resume.check_resume(meta, config.run, config.train, 'w/checkpoints')
  assert (f'resuming a run of global batch 8 at batch {batch_size}: the data continues at '
          'example 24') in capsys.readouterr().out
  state, _ = _train_data(batch_size, 4, state)
  state, _ = _train_data(8, 2, state)
  total = 24 + 4 * batch_size + 16
  assert state == {'example': total}
  assert seen == list(range(total))


def test_a_checkpoint_holding_a_step_resumes_at_its_batch_size(monkeypatch, capsys):
  """Checkpoints written before positions were examples hold {'step': s} and no batch size:
  they resume at example s x batch, assuming the batch is the one they were trained at (said)."""
  seen = _recorded_samples(monkeypatch)
  state, config = _train_data(8, 2, {'step': 3})
  assert state == {'example': 40} and seen == list(range(24, 40))
  resume.check_resume({'step': 3, 'data': {'step': 3}, 'data_source': 'synthetic'}, config.run,
                     config.train, 'w/checkpoints')
  assert ('holds its data position as a step (3), not an example: assumed trained at this batch '
          'size, 8') in capsys.readouterr().out


def test_resampled_shards_are_a_run_setting(tmp_path):
  """--data-resampled reaches the shard pipeline (files drawn with replacement per process); the
  synthetic set has no files to draw; a workdir resumes only with the setting it was trained
  with (its data position is a place in those draws)."""
  synthetic.SyntheticCaptions(seed=3, resolution=32).write_webdataset(str(tmp_path), 12, 3)
  data = str(tmp_path / '*.tar')
  for flags, resampled in (([], False), (['--data-resampled'], True)):
    config = train.load_config(train.parse_args(['--config', 'tiny', '--data', data, *flags]))
    assert config.run.data_resampled is resampled
    _, pipeline = train.make_data(config, config.model, config.train, None)
    assert pipeline.resampled is resampled
    meta = {'step': 3, 'data': pipeline.state(), 'data_source': data,
            'data_resampled': not resampled}
    with pytest.raises(ValueError, match=f'trained with data_resampled={not resampled}'):
      resume.check_resume(meta, config.run, config.train, 'w/checkpoints')
  with pytest.raises(ValueError, match='--data-resampled draws img2dataset shards'):
    train.load_config(train.parse_args(['--config', 'tiny', '--data-resampled']))


@pytest.mark.parametrize('flags, error', [
    (['--eval-every', '10'], '--eval-every 10 needs at least one --evaluator'),
    (['--evaluator', 'synthetic'], 'runs every --eval-every N steps: give N'),
    (['--eval-every', '10', '--evaluator', 'zero_shot:folder=/nonexistent/val'],
     '/nonexistent/val'),
    (['--eval-every', '10', '--evaluator', 'zero_shot:kind=x'], 'zero_shot:tfds=NAME'),
    (['--ema-decay', '1.0'], r'ema_decay must be a number in \(0, 1\).*got 1.0'),
    (['--ema-decay', '0'], r'ema_decay must be a number in \(0, 1\).*got 0.0'),
])
def test_bad_run_settings_are_refused_before_training(tmp_path, flags, error):
  """Evaluation without an evaluator or its data, an EMA decay outside (0, 1): errors naming
  them before anything compiles or trains (no checkpoint, no metrics)."""
  with pytest.raises((ValueError, FileNotFoundError), match=error):
    train.main(['--config', 'tiny', '--steps', '4', '--workdir', str(tmp_path), *flags])
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'metrics.jsonl').exists()


def test_a_checkpoint_folder_of_another_model_is_refused_before_training(tmp_path):
  """A workdir whose checkpoint holds another model: the fields that differ are named before
  anything trains; the checkpoint is left as it was."""
  config = train.load_config(train.parse_args(['--config', 'tiny']))
  wider = dataclasses.replace(config.model, embed_dim=2 * config.model.embed_dim)
  meta = resume.checkpoint_meta({'example': 0}, config.run, config.train, wider)
  state_store.save(tmp_path / 'checkpoints', 4, {'step': np.zeros((), np.int32)}, meta)
  with pytest.raises(ValueError, match=r"holds another model: embed_dim: this run's model says "
                     r"32, the checkpoint's says 64"):
    train.main(['--config', 'tiny', '--steps', '8', '--workdir', str(tmp_path)])
  assert state_store.steps(tmp_path / 'checkpoints') == [4]
  assert not (tmp_path / 'metrics.jsonl').exists()
