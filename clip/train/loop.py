"""The training loop: `train_step` run from a start step to the last, with hooks between steps.

The main job (`experiments/train.py`), fine-tuning (`experiments/finetune.py`) and the loss
ablation run their steps through `train`; what each does besides stepping (log metrics, evaluate,
save the state, advance a progress bar) is a `Hook`:

  state = loop.train(state, run.train_step, batches, steps=tcfg.total_steps, start_step=start,
                     hooks=[loop.progress(bar), loop.log_metrics(write, every=25),
                            loop.save_state(ckpt_dir, 500, meta), evaluation_hook])
"""
import collections
import time
import typing
import warnings

import jax

from clip.train import state_store


class Hook(typing.NamedTuple):
  """What the loop does between steps: `run(step, state, metrics)` after every step `every`
  divides (`step` counts the steps done, 1 after the first) and, where `final`, after the loop's
  last step whatever `every`; then `close()` once after the loop (None: nothing to close).
  `metrics` are the step's own, still on the device. `begin(start_step, state)`, where given, runs
  once before the first step."""
  run: typing.Callable[[int, typing.Any, dict], None]
  every: int = 1
  final: bool = True
  close: typing.Callable[[], None] | None = None
  begin: typing.Callable[[int, typing.Any], None] | None = None


def train(state, train_step, batches, *, steps, start_step=0, hooks=()):
  """Runs `state, metrics = train_step(state, batch)` for steps `start_step + 1` .. `steps`, one
  batch from the iterator `batches` each (inside a `jax.profiler.StepTraceAnnotation('train')`:
  a profile's step marks), the `hooks`' `begin` before the first step, the hooks in their order
  after each step, then their `close` (also when a step raises); returns the final state. A loop
  that makes no progress (`start_step >= steps`), a hook with `every < 1` and batches that end
  before the last step raise ValueError."""
  if not 0 <= start_step < steps:
    raise ValueError(f'a loop from step {start_step} to {steps} makes no progress: need '
                     f'0 <= start_step < steps')
  for hook in hooks:
    if not isinstance(hook.every, int) or hook.every < 1:
      raise ValueError(f'a hook runs every int >= 1 steps, got every={hook.every!r}')
  try:
    for hook in hooks:
      if hook.begin is not None:
        hook.begin(start_step, state)
    for step in range(start_step + 1, steps + 1):
      try:
        batch = next(batches)
      except StopIteration:
        raise ValueError(f'the batches ended after {step - 1 - start_step} of the '
                         f'{steps - start_step} steps from step {start_step}') from None
      with jax.profiler.StepTraceAnnotation('train', step_num=step):  # a profile's step marks
        state, metrics = train_step(state, batch)
      for hook in hooks:
        if step % hook.every == 0 or (hook.final and step == steps):
          hook.run(step, state, metrics)
  finally:  # also when a step or hook raises: a checkpoint in flight is finished
    for hook in hooks:
      if hook.close is not None:
        hook.close()
  return state


class CompletedSteps:
  """Advances a progress bar by the steps the device has finished, not those dispatched (JAX
  dispatches ahead, so a bar of dispatched steps races on and then stalls at every log step).

  It waits on the loss of the step `lag` dispatches back: `lag` steps stay queued on the device,
  so the wait is for work already done and costs no throughput (docs/training.md, measured by
  `python -m experiments.bench_progress`)."""

  def __init__(self, bar, lag=2):
    self.bar, self.lag, self.queue = bar, lag, collections.deque()

  def dispatched(self, loss):
    self.queue.append(loss)
    if len(self.queue) > self.lag:
      self.queue.popleft().block_until_ready()
      self.bar.update(1)

  def finish(self):
    while self.queue:
      self.queue.popleft().block_until_ready()
      self.bar.update(1)


def progress(bar, lag=2):
  """A hook advancing the tqdm `bar` by completed steps (`CompletedSteps`, waiting on the
  `'loss'` metric `lag` steps back), then finishing and closing it after the loop."""
  completed = CompletedSteps(bar, lag)

  def close():
    completed.finish()
    bar.close()
  return Hook(lambda step, state, metrics: completed.dispatched(metrics['loss']), close=close)


def log_metrics(write, every, batch_size=None, start_step=0):
  """A hook calling `write(step, metrics)` every `every` steps and after the last, with the
  step's metrics fetched as floats; given the global `batch_size` (an int, or for batches whose
  size varies, a function `images_before(step)` of the images all steps before `step` hold), plus
  `images_per_s`: the images of the steps since the previous call (or since `start_step`, when
  this hook was made) over the seconds they took."""
  last = {'time': time.perf_counter(), 'step': start_step}
  images_before = batch_size if callable(batch_size) else lambda step: step * batch_size

  def run(step, state, metrics):
    del state
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if batch_size is not None:
      now = time.perf_counter()
      images = images_before(step) - images_before(last['step'])
      metrics['images_per_s'] = images / (now - last['time'])
      last.update(time=now, step=step)
    write(step, metrics)
  return Hook(run, every)


def save_state(directory, every, meta=None, keep=3):
  """A hook saving the train state to `directory` every `every` steps and after the last, with
  `meta(step)`'s entries (e.g. the data position) beside it: asynchronously (`state_store.Store`:
  the next steps run while it writes); a save waits for the one before it, and the loop's end
  for the last."""
  store = state_store.Store(directory, keep=keep)

  def run(step, state, metrics):
    del metrics
    store.save(step, state, meta(step) if meta else None)
  return Hook(run, every, close=store.close)


def profile(logdir, start, stop):
  """A hook recording a `jax.profiler` trace of steps `start` .. `stop` (inclusive; steps count
  from 1, a fresh run's first step compiles) into `logdir`, as
  `logdir/plugins/profile/<time>/<host>.xplane.pb` (TensorBoard's profile plugin and XProf read
  it; each step is marked `train` with its number). The trace starts once the device has finished
  step `start - 1` and stops once it has finished step `stop`, so it holds those steps' work and
  no other's; a loop that ends before `stop` stops it in `close`. A loop resumed at or past
  `start` traces from its first step, and past `stop` not at all, each with a warning.
  ValueError unless `1 <= start <= stop` (ints)."""
  check_profile_steps(start, stop)
  trace = {'on': False, 'last': None}

  def start_trace(state):
    jax.block_until_ready(state)
    jax.profiler.start_trace(logdir)
    trace['on'] = True

  def stop_trace(outputs):
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    trace.update(on=False, last=None)

  def begin(start_step, state):
    if start_step >= stop:
      warnings.warn(f'profile of steps {start}..{stop}: the loop starts after step '
                    f'{start_step}, nothing is traced')
    elif start_step >= start:
      warnings.warn(f'profile of steps {start}..{stop}: the loop starts after step '
                    f'{start_step}, steps {start_step + 1}..{stop} are traced')
    if start - 1 <= start_step < stop:
      start_trace(state)

  def run(step, state, metrics):
    if step == start - 1:
      start_trace(state)
    elif trace['on']:
      trace['last'] = metrics  # the loop's last outputs (a state is donated to the next step)
      if step == stop:
        stop_trace((state, metrics))

  def close():
    if trace['on']:
      stop_trace(trace['last'])
  return Hook(run, close=close, begin=begin)


def check_profile_steps(start, stop):
  """ValueError unless `start` and `stop` are ints with `1 <= start <= stop`."""
  if not (isinstance(start, int) and isinstance(stop, int) and 1 <= start <= stop):
    raise ValueError(f'a profile traces steps START..STOP, ints with 1 <= START <= STOP, got '
                     f'START={start!r}, STOP={stop!r}')


def parse_profile_steps(text):
  """`(start, stop)` from the text `'START,STOP'` (the `--profile` flag, e.g. `'10,15'`: steps
  10 to 15 inclusive); ValueError naming `text` unless two ints with `1 <= START <= STOP`."""
  try:
    start, stop = (int(part) for part in text.split(','))
  except ValueError:
    raise ValueError(f'--profile takes START,STOP, two step numbers such as 10,15, got '
                     f'{text!r}') from None
  try:
    check_profile_steps(start, stop)
  except ValueError as e:
    raise ValueError(f'--profile {text!r}: {e}') from None
  return start, stop
