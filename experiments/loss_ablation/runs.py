"""The study's training runs: one run of a spec (its learning curve, evaluation, step time and
memory) and the run cache, one JSON record per run under --out/runs, reused while its spec is
unchanged."""
import dataclasses
import functools
import itertools
import json
import math
import os
import time

import jax

import clip
from clip import sharding
from clip.formats import files
from clip.train import loop
from clip.train import training
from data import synthetic
from data import synthetic_eval
from experiments.configs import tiny
from experiments.loss_ablation import settings

TIMING = ('step_s', 'compile_s', 'wall_s')  # run fields a repeated run may change


def model_config(loss='contrastive', init_logit_bias=None, init_logit_scale=None, layers=2):
  """The fixed model of the study: the `tiny` config's towers (ViT 2x64 on 32px images, 8px
  patches; text 2x64; `layers` blocks each, 1 in the --smoke study) with 64-wide embeddings,
  SigLIP's bias where the loss takes one."""
  cfg = tiny.get_config(f'loss={loss}').model
  return dataclasses.replace(cfg, embed_dim=64, init_logit_bias=init_logit_bias,
                             init_logit_scale=init_logit_scale,
                             vision=dataclasses.replace(cfg.vision, layers=layers),
                             text=dataclasses.replace(cfg.text, layers=layers))


def setup_run(s, devices_available):
  """Spec `s`'s model config, mesh, initial state, its built-in data (seeded by the run's
  seed), the first global batch and the train step compiled for it (with its compile time)."""
  cfg = model_config(s['loss'], s['init_logit_bias'], s['init_logit_scale'],
                     s.get('layers', 2))
  steps = s['steps']
  tcfg = training.TrainConfig(batch_size=s['batch'], total_steps=steps,
                              warmup_steps=steps // 10,
                              loss=settings.IMPLEMENTATIONS[s['implementation']].format(s['loss']),
                              learning_rate=s['learning_rate'], weight_decay=0.1,
                              mesh=(s['devices'], 1, 1), seed=s['seed'])
  if s['devices'] > len(devices_available):
    raise ValueError(f'run {settings.run_name(s)} needs {s["devices"]} devices, jax has '
                     f'{len(devices_available)}')
  mesh = sharding.make_mesh(*tcfg.mesh, devices=devices_available[:s['devices']])
  state, step_fn, _, _, _ = training.setup(cfg, tcfg, mesh)
  data = synthetic.SyntheticCaptions(seed=s['seed'], resolution=cfg.image_resolution).batches(
      s['batch'], tokenize=functools.partial(clip.get_tokenizer(cfg), truncate=True),
      preprocess=cfg.preprocess)
  batch = training.global_batch(mesh, next(data))
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  return cfg, mesh, state, data, batch, compiled, time.perf_counter() - start


def train_one(s):
  """One run of spec `s`: its learning curve (mean training loss of each logged interval, the
  scale exp(t') and bias b at its end), evaluation, step time and per-device temp memory."""
  wall = time.perf_counter()
  cfg, mesh, state, data, batch, compiled, compile_s = setup_run(s, jax.devices())
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  steps, curve, timer = s['steps'], [], {}
  batches = itertools.chain([batch], (training.global_batch(mesh, b) for b in data))
  state = loop.train(state, compiled, batches, steps=steps,
                     hooks=[_curve_hook(curve, steps // s['log_points']), _timer_hook(timer)])
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - timer['start']) / (steps - 1)
  params = jax.device_get(state['params'])
  results = synthetic_eval.evaluate(params, cfg, s['eval_examples'], seed=10_000 + s['seed'])
  return {'spec': s, 'name': settings.run_name(s), 'curve': curve,
          'final_loss': curve[-1]['loss'], 'last_quarter_drop': last_quarter_drop(curve),
          'zero_shot_heldout': results['heldout/colour_shape_top1'],
          'zero_shot_seen': results['train/colour_shape_top1'],
          'zero_shot_chance': results['heldout/colour_shape_chance'],
          'recall_at_1_heldout': results['heldout/image_to_text_R@1'],
          'evaluation': {k: float(v) for k, v in results.items()},  # per attribute too
          'step_s': step_s, 'compile_s': compile_s, 'wall_s': time.perf_counter() - wall,
          'temp_mib_per_device': temp_bytes / 2**20}


def _curve_hook(curve, every):
  """Appends to `curve`, every `every` steps, the mean training loss of those steps (summed on
  the device: no sync per step) and the scale and bias after the last of them."""
  interval = {'loss': 0.0}

  def run(step, state, metrics):
    del state
    interval['loss'] = interval['loss'] + metrics['loss']
    if step % every == 0:
      m = jax.device_get({**metrics, 'interval_loss': interval['loss']})
      curve.append({'step': step, 'loss': float(m['interval_loss']) / every,
                    'logit_scale': float(m['logit_scale']),
                    'logit_bias': float(m['logit_bias']) if 'logit_bias' in m else None})
      interval['loss'] = 0.0
  return loop.Hook(run)


def _timer_hook(timer):
  """Notes in `timer['start']` when the first step is done: it includes one-off work, so the
  step time is taken over the others."""
  def run(step, state, metrics):
    del state, metrics
    if step == 1:
      timer['start'] = time.perf_counter()
  return loop.Hook(run)


def last_quarter_drop(curve):
  """How much the logged training loss still fell over the last quarter of the run, relative to
  its value there: (L(3/4) - L(end)) / |L(3/4)|; ~0 once the curve has flattened."""
  quarter = curve[(3 * len(curve)) // 4 - 1]['loss']
  return (quarter - curve[-1]['loss']) / max(abs(quarter), 1e-12)


def diverged(run):
  """Whether a run's logged training loss went non-finite: such a run is left out of every
  table and statistic and named under the tables."""
  return any(not math.isfinite(c['loss']) for c in run['curve'])


def identical(a, b):
  """Whether two records of one run agree exactly outside their timings."""
  return ({k: v for k, v in a.items() if k not in TIMING}
          == {k: v for k, v in b.items() if k not in TIMING})


# ------------------------------------------------------------------ the run cache

def write_json(path, value):
  """`value` as indented JSON at `path`, written atomically (an interrupted study leaves no
  half record)."""
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(value, f, indent=1)
  files.atomic_write(path, write)


def load_record(path, key, value):
  """The stored record at `path` if its `key` equals `value` (a rerun with other settings
  recomputes it), else None."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  return record if record.get(key) == value else None


def run_all(specs, runs_dir, progress):
  """{name: run record} of every spec: stored records reused, the others trained."""
  unique = list({settings.run_name(s): s for s in specs}.values())  # stages share runs
  runs = {}
  for s in progress(unique, desc='training runs'):
    name = settings.run_name(s)
    path = os.path.join(runs_dir, name + '.json')
    run = load_record(path, 'spec', s)
    if run is None:
      run = train_one(s)
      write_json(path, run)
      progress.write(('DIVERGED (left out of the tables) ' if diverged(run) else '')
                     + f'{name}: zero-shot held-out {100 * run["zero_shot_heldout"]:.1f}%, '
                     f'R@1 {100 * run["recall_at_1_heldout"]:.1f}%, loss '
                     f'{run["final_loss"]:.3f}, {1000 * run["step_s"]:.0f} ms/step, '
                     f'{run["wall_s"]:.0f} s')
    runs[name] = run
  return runs


def repeat_stage(first, by_name, runs_dir):
  """Whether the run of spec `first`, trained again, reproduces its record exactly."""
  path = os.path.join(runs_dir, 'repeat-' + settings.run_name(first) + '.json')
  repeat = load_record(path, 'spec', first)
  if repeat is None:
    repeat = train_one(first)
    write_json(path, repeat)
  return identical(repeat, by_name[settings.run_name(first)])
