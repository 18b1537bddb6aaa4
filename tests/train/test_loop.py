"""The training loop (`clip/train/loop.py`): hooks run after the steps their `every` divides and
after the last, in order, then close; a resumed loop starts after its start step; the progress
bar counts completed steps; the real train step run by the loop, straight or resumed from a
checkpoint its hook saved, equals a hand-rolled loop bit for bit; a profile hook traces exactly
the steps it names."""
import glob
import multiprocessing
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip.train import loop
from clip.train import state_store
from clip.train import training
from tests.train.test_training import TINY
from tests.train.test_training import batches
from tests.train.test_training import single_device_mesh


def add_step(state, batch):
  """A toy step: the state sums the batches; its loss is the new sum."""
  state = state + batch
  return state, {'loss': state}


def recorder(calls, name, every=1, final=True):
  return loop.Hook(lambda step, state, metrics: calls.append((name, step, float(state))),
                   every, final, close=lambda: calls.append((name, 'close', None)))


@pytest.mark.parametrize('start', [0, 4])
def test_hooks_run_at_their_steps_in_order_then_close(start):
  calls = []
  hooks = [recorder(calls, 'each'), recorder(calls, 'three', 3),
           recorder(calls, 'not_final', 3, final=False)]
  sums = {s: s * (s + 1) / 2 for s in range(11)}  # the state after step s sums 1 .. s
  state = loop.train(jnp.float32(sums[start]), add_step, iter(range(start + 1, 11)), steps=10,
                     start_step=start, hooks=hooks)
  assert float(state) == sums[10]
  expected = []
  for s in range(start + 1, 11):
    expected.append(('each', s, sums[s]))
    if s % 3 == 0 or s == 10:
      expected.append(('three', s, sums[s]))
    if s % 3 == 0:
      expected.append(('not_final', s, sums[s]))
  expected += [('each', 'close', None), ('three', 'close', None), ('not_final', 'close', None)]
  assert calls == expected


def test_a_loop_without_progress_or_batches_is_an_error():
  with pytest.raises(ValueError, match='makes no progress'):
    loop.train(jnp.float32(0), add_step, iter(range(5)), steps=3, start_step=3)
  with pytest.raises(ValueError, match='the batches ended after 2 of the 3 steps'):
    loop.train(jnp.float32(0), add_step, iter(range(2)), steps=3)
  with pytest.raises(ValueError, match='every int >= 1'):
    loop.train(jnp.float32(0), add_step, iter(range(3)), steps=3,
               hooks=[loop.Hook(lambda *a: None, every=0)])


class Bar:
  """tqdm's part the progress hook uses."""

  def __init__(self):
    self.n, self.closed = 0, False

  def update(self, n):
    self.n += n

  def close(self):
    self.closed = True


def test_the_bar_counts_completed_steps_lag_behind_then_all():
  bar, seen = Bar(), []
  hooks = [loop.progress(bar, lag=2), loop.Hook(lambda step, state, metrics: seen.append(bar.n))]
  loop.train(jnp.float32(0), add_step, iter(range(5)), steps=5, hooks=hooks)
  assert seen == [0, 0, 1, 2, 3]  # waits on the loss two dispatches back
  assert bar.n == 5 and bar.closed


def test_logged_metrics_are_floats_with_the_throughput_since_the_last_line():
  lines = []
  hook = loop.log_metrics(lambda step, metrics: lines.append((step, metrics)), every=2,
                          batch_size=8, start_step=1)
  loop.train(jnp.float32(0), add_step, iter(range(1, 6)), steps=6, start_step=1, hooks=[hook])
  assert [step for step, _ in lines] == [2, 4, 6]
  assert [m['loss'] for _, m in lines] == [1.0, 6.0, 15.0]
  assert all(type(m['loss']) is float and m['images_per_s'] > 0 for _, m in lines)


def copy(state):
  return jax.tree.map(lambda x: x.copy(), state)  # the step donates its state


def test_the_train_step_in_the_loop_equals_a_hand_rolled_loop_straight_and_resumed(tmp_path):
  """4 steps of the real step: through `train` with a checkpoint every 2 steps, by hand, and
  resumed from the step-2 checkpoint for steps 3..4: the same state, bit for bit."""
  tcfg = training.TrainConfig(batch_size=16, total_steps=4, warmup_steps=1)
  mesh = single_device_mesh()
  run = training.setup(TINY, tcfg, mesh)
  data = [training.global_batch(mesh, b) for b in batches(TINY, 16, 4)]
  start = copy(run.state)
  by_hand = copy(start)
  for batch in data:
    by_hand, _ = run.train_step(by_hand, batch)
  save = loop.save_state(str(tmp_path), 2, meta=lambda step: {'next': step}, keep=5)
  looped = loop.train(copy(start), run.train_step, iter(data), steps=4, hooks=[save])
  assert state_store.steps(str(tmp_path)) == [2, 4]
  halfway, meta = state_store.restore(str(tmp_path), jax.eval_shape(lambda: start),
                                      run.shardings, step=2)
  assert meta == {'step': 2, 'next': 2}
  resumed = loop.train(halfway, run.train_step, iter(data[2:]), steps=4, start_step=2)
  for state in (looped, resumed):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(by_hand))


@jax.jit
def matmul_step(state_NxN, batch):
  """A step with device work: XLA's CPU client runs it on its own thread, after dispatch."""
  state_NxN = jnp.tanh(state_NxN @ state_NxN) + batch
  return state_NxN, {'loss': state_NxN.sum()}


def profiled(logdir, start, stop, start_step, steps):
  loop.train(jnp.eye(256) / 2, matmul_step, iter(range(steps)), steps=steps,
             start_step=start_step, hooks=[loop.profile(logdir, start, stop)])


def trace_of(logdir):
  """The one trace under `logdir`, read back by `jax.profiler.ProfileData`: the step numbers
  marked `train`, and the number of executions XLA's CPU runtime ran while it recorded (its
  `ThunkExecutor::Execute` events; a newer runtime may rename them: this test then fails)."""
  [path] = glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*.xplane.pb'))
  events = [event for plane in jax.profiler.ProfileData.from_file(path).planes
            for line in plane.lines for event in line.events]
  steps = sorted(dict(event.stats)['step_num'] for event in events if event.name == 'train')
  return steps, sum(event.name.startswith('ThunkExecutor::Execute') for event in events)


CASES = {  # name: (start, stop, start_step, steps)
    'inside': (2, 4, 0, 6), 'first': (1, 1, 0, 3), 'ends_first': (2, 10, 0, 4),
    'resumed_before': (2, 3, 1, 4), 'resumed_inside': (2, 5, 3, 6), 'resumed_past': (2, 4, 4, 6)}


def _trace_all(root):
  """Every case of CASES profiled: {name: (trace or None, its warnings)}. Runs in a process of
  its own (`traces`)."""
  out = {}
  for name, (start, stop, start_step, steps) in CASES.items():
    logdir = os.path.join(root, name)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      profiled(logdir, start, stop, start_step, steps)
    out[name] = (trace_of(logdir) if os.path.exists(logdir) else None,
                 [str(w.message) for w in caught])
  return out


@pytest.fixture(scope='module')
def traces(tmp_path_factory):
  """`_trace_all` in a spawned process: jax's profiler, once started in a pytest worker, stayed
  loaded for its later tests, and CI twice saw a later compile segfault in such a worker; a
  process of its own keeps it apart."""
  with multiprocessing.get_context('spawn').Pool(1) as pool:
    return pool.apply(_trace_all, (str(tmp_path_factory.mktemp('profiles')),))


@pytest.mark.parametrize('name, traced', [
    ('inside', [2, 3, 4]),  # inside the run
    ('first', [1]),  # the first step, from before the loop
    ('ends_first', [2, 3, 4]),  # the run ends first: stopped at close
    ('resumed_before', [2, 3]),  # resumed just before START
])
def test_a_profile_traces_exactly_its_steps_and_their_work(traces, name, traced):
  """The trace marks its steps and holds one execution each: it waited for the steps before it
  to finish before it started and for its last to finish before it stopped."""
  assert traces[name] == ((traced, len(traced)), [])


def test_a_profile_of_a_loop_resumed_past_its_start_warns(traces):
  trace, said = traces['resumed_inside']
  assert trace == ([4, 5], 2)
  assert any(re.search(r'profile of steps 2..5: the loop starts after step 3, steps 4..5 are '
                       r'traced', m) for m in said), said
  trace, said = traces['resumed_past']
  assert trace is None
  assert any('after step 4, nothing is traced' in m for m in said), said


def test_profile_steps_are_checked_and_parsed():
  assert loop.parse_profile_steps('10,15') == (10, 15)
  assert loop.parse_profile_steps('7,7') == (7, 7)
  for text in ('10', '10,15,20', 'a,b', '1.5,3', ''):
    with pytest.raises(ValueError, match=f'--profile takes START,STOP, .* got {text!r}'):
      loop.parse_profile_steps(text)
  with pytest.raises(ValueError, match=r"--profile '15,10': .* got START=15, STOP=10"):
    loop.parse_profile_steps('15,10')
  for start, stop in ((0, 3), (4, 3), ('1', 2), (1.0, 2)):
    with pytest.raises(ValueError, match=rf'1 <= START <= STOP, got START={start!r}, '
                                         rf'STOP={stop!r}'):
      loop.profile('unused', start, stop)
