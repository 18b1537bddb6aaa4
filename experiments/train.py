"""Train a CLIP model from scratch: the main job.

With no arguments it trains the `small` config (a small ViT CLIP) on the built-in synthetic
captions on this machine's CPU, then reports zero-shot accuracy and retrieval recall on held-out
attribute combinations. Configs are Python files in `experiments/configs/`; `--data` takes
img2dataset shards for real data (tfrecord or webdataset tars, e.g. DataComp's download), or a
weighted mixture of several sources ('a/*.tar:0.7,b/*.tfrecord:0.3').

  python -m experiments.train
  python -m experiments.train --config tiny --steps 40 --loss ring_sigmoid --mesh=2,2,2
  python -m experiments.train --config vit_b32_datacomp --data '/data/datacomp/shards/*.tar' \
      --keep-uids /data/datacomp/subset.npy     # DataComp's download and a filtered subset
  # two hosts: the same command on each, with --num-processes 2 --process-id {0,1}
  #            --coordinator host0:1234

  # evaluators during training, an EMA of the weights, a profile of steps 20..25:
  python -m experiments.train --eval-every 100 --evaluator synthetic \
      --evaluator 'zero_shot:tfds=cifar10,data_dir=~/tensorflow_datasets' --ema-decay 0.999 \
      --profile 20,25

Writes into `--workdir` (default results/train/<config>): model_config.json (the architecture, the
tokenizer and the image preprocessing the data was read with, a SentencePiece model copied beside
it), metrics.jsonl and tensorboard/ (training and evaluator metrics), loss.png, checkpoints/
(orbax's, written asynchronously; `--checkpoint-dir` puts them elsewhere, gs:// included),
eval_best.json (the evaluators' last and best), eval.json (the built-in final evaluation),
profile/, and with --export-torch a torch state dict of the final weights (the EMA when kept).
Rerunning with the same workdir resumes from the newest checkpoint (params, optimizer, EMA, step,
rng and data position) on whatever mesh and process count, with the same model, tokenizer and
preprocessing; the data position is the next unseen example (the shards' next record), so a
resume at another --batch-size sees each example once. `clip.load(workdir)` loads the result.
"""
import argparse
import dataclasses
import functools
import importlib
import json
import logging
import os

from experiments import malloc_tuning

if __name__ == '__main__':  # before jax is imported: the setting needs a fresh process
  malloc_tuning.reexec_if_untuned()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import clip
from clip import model
from clip import sharding
from clip.eval import evaluators
from clip.formats import files
from clip.formats import workdirs
from clip.train import loop
from clip.train import metrics_log
from clip.train import objectives
from clip.train import resume
from clip.train import state_store
from clip.train import training
from data import naflex_batching as naflex_batching_lib
from data import synthetic
from data import synthetic_eval
from data import synthetic_layout
from data import synthetic_layout_eval
from experiments import configs
from experiments import train_distillation


EVAL_BEST = 'eval_best.json'  # the evaluators' last and best metrics, in the workdir
# The built-in data sets (`run.data`): square scenes, and scenes of several aspect ratios whose
# captions say their layout (for NaFlex).
SYNTHETIC = {'synthetic': synthetic.SyntheticCaptions,
             'synthetic_layout': synthetic_layout.LayoutCaptions}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='small',
                      help='a file in experiments/configs/, with its arguments after a colon: '
                           'small:loss=sigmoid,batch=256')
  parser.add_argument('--set', action='append', default=None, metavar='FIELD=VALUE',
                      help='any config field, e.g. train.learning_rate=3e-4, '
                           'model.vision.layers=6, run.log_every=10 (repeatable); the flags '
                           'below are aliases of some')
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--data', default=None,
                      help='"synthetic", a glob of img2dataset shards (.tar or .tfrecord), or a '
                           'weighted mixture "a/*.tar:0.7,b/*.tfrecord:0.3"')
  parser.add_argument('--data-resampled', action='store_true', default=None,
                      help='each process draws its shards with replacement from all of them '
                           '(webdataset\'s resampled=True, open_clip\'s --dataset-resampled): '
                           'for a shard count the process count does not divide, which is '
                           'refused otherwise')
  parser.add_argument('--keep-uids', default=None,
                      help='DataComp-style subset: a .npy of uids (dtype u8,u8 as DataComp writes '
                           'them, or strings) or a text file, matched against the parquet beside '
                           'each shard')
  parser.add_argument('--min-image-size', type=int, default=None,
                      help='keep images whose shorter original side is at least this (parquet)')
  parser.add_argument('--loss', default=None, help='contrastive | sigmoid | ring_contrastive | '
                      'ring_sigmoid')
  parser.add_argument('--teacher', default=None,
                      help='distil from this frozen teacher (what clip.load takes: a file, a '
                           'training workdir, a name), run inside each step with its own '
                           'tokenizer and preprocessing; with --distill-weight')
  parser.add_argument('--distill-weight', type=float, default=None,
                      help='loss = contrastive + this x KD from the teacher (open_clip\'s '
                           'DistillClipLoss); on reinforced shards (experiments/reinforce.py) '
                           'without --teacher, from their stored teacher embeddings')
  parser.add_argument('--optimizer', default=None, help='adamw | lion | adafactor | muon')
  parser.add_argument('--schedule', default=None, help='after the warmup: cosine | linear | '
                      'constant')
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--batch-size', type=int, default=None)
  parser.add_argument('--mesh', default=None, help='data,fsdp,tensor sizes, e.g. 2,2,2 or -1,1,1')
  parser.add_argument('--checkpoint-every', type=int, default=None)
  parser.add_argument('--ema-decay', type=float, default=None,
                      help='keep an EMA of the parameters with this decay in (0, 1), e.g. 0.9999; '
                           'it is what the run evaluates and exports')
  parser.add_argument('--checkpoint-dir', default=None,
                      help='where checkpoints go, any path orbax takes (gs://bucket/run); '
                           'default: <workdir>/checkpoints')
  parser.add_argument('--eval-examples', type=int, default=None,
                      help='synthetic examples per split for the final zero-shot evaluation (0: '
                      'none; default: the config\'s with the synthetic data, none with shards)')
  parser.add_argument('--eval-every', type=int, default=None,
                      help='run the evaluators every N steps and after the last (default: 0, '
                           'never); metrics.jsonl, TensorBoard and eval_best.json keep them')
  parser.add_argument('--evaluator', action='append', default=None, metavar='SPEC',
                      help='an evaluator (repeatable): ' + '; '.join(evaluators.FORMS))
  parser.add_argument('--export-torch', default=None, help='write the final weights here (.pt)')
  parser.add_argument('--profile', default=None, metavar='START,STOP',
                      help='write a jax.profiler trace of steps START..STOP (inclusive, from 1) '
                           'to <workdir>/profile (TensorBoard\'s profile plugin or XProf read it)')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--coordinator', default=None, help='host:port of process 0')
  return parser.parse_args(argv)


# The hand-mapped flags, each an alias of `--set <field>=<value>`.
ALIASES = {'loss': 'train.loss', 'optimizer': 'train.optimizer', 'schedule': 'train.schedule',
           'steps': 'train.total_steps', 'batch_size': 'train.batch_size', 'mesh': 'train.mesh',
           'data': 'run.data', 'data_resampled': 'run.data_resampled',
           'checkpoint_every': 'run.checkpoint_every', 'checkpoint_dir': 'run.checkpoint_dir',
           'eval_examples': 'run.eval_examples', 'ema_decay': 'train.ema_decay',
           'eval_every': 'run.eval_every', 'evaluator': 'run.evaluators',
           'teacher': 'train.teacher', 'distill_weight': 'train.distill_weight'}


def _assignments(args):
  """[(field path, value)]: the `--set`s, then the aliases given."""
  out = [configs.parse_assignment(text) for text in args.set or ()]
  for flag, path in ALIASES.items():
    value = getattr(args, flag)
    if value is not None:
      if flag == 'mesh':
        value = tuple(int(s) for s in value.split(','))
      elif flag == 'evaluator':
        value = tuple(value)
      out.append((path, value))
  return out


def _apply(experiment, assignments):
  """The assignments, with what they imply made explicit and printed: a shorter run shortens the
  warmup to a tenth of it (unless it is set too), and the model's SigLIP bias follows the loss
  (unless it is set too)."""
  given = dict(assignments)
  if 'train.total_steps' in given and 'train.warmup_steps' not in given:
    warmup = min(experiment.train.warmup_steps, given['train.total_steps'] // 10)
    if warmup != experiment.train.warmup_steps:
      print(f'train.total_steps={given["train.total_steps"]}: train.warmup_steps '
            f'{experiment.train.warmup_steps} -> {warmup} (at most a tenth of the run)')
      given['train.warmup_steps'] = warmup
  experiment = configs.set_fields(experiment, given)
  if 'train.loss' in given and 'model.logit_bias' not in given:
    bias = experiment.train.trains_logit_bias
    if bias != experiment.model.logit_bias:
      print(f'train.loss={given["train.loss"]}: model.logit_bias {not bias} -> {bias} (SigLIP\'s '
            'bias exactly where the loss takes one)')
      experiment = configs.set_field(experiment, 'model.logit_bias', bias)
  return experiment


def load_config(args):
  """The `Experiment` of `--config name[:arg]` with `--set` and the flags applied (each implied
  change printed), validated before anything compiles."""
  name, _, arg = args.config.partition(':')
  experiment = importlib.import_module(f'experiments.configs.{name}').get_config(arg or None)
  experiment = _apply(experiment, _assignments(args))
  objectives.check_objective(experiment.model, experiment.train)
  run = experiment.run
  if not run.data:
    raise ValueError(f'config {name!r} has no default data: pass --data with a glob of '
                     'img2dataset shards (output_format "webdataset" or "tfrecord")')
  if run.data in SYNTHETIC and run.data_resampled:
    raise ValueError('--data-resampled draws img2dataset shards with replacement; the built-in '
                     'synthetic data has no files (every process reads its own samples)')
  if args.keep_uids or args.min_image_size:
    if run.data in SYNTHETIC:
      raise ValueError('--keep-uids / --min-image-size filter img2dataset shards, not the '
                       'built-in synthetic data')
    from data import filters  # pylint: disable=g-import-not-at-top  # TensorFlow: shards only
    run = dataclasses.replace(run, keep=filters.MetadataFilter(
        uids=args.keep_uids, min_image_size=args.min_image_size))
  if args.export_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise ValueError("--export-torch needs torch: pip install -e '.[torch]'") from None
  if experiment.train.distills and run.data == 'synthetic_layout':
    raise ValueError('distillation reads fixed-resolution batches: use --data synthetic or '
                     'img2dataset shards, not synthetic_layout')
  specs = [evaluators.parse_evaluator(text) for text in run.evaluators]
  evaluators.require_evaluators(run.eval_every, specs)
  if specs and not run.eval_every:
    raise ValueError(f'--evaluator {run.evaluators[0]!r} runs every --eval-every N steps: give N')
  if run.data != 'synthetic' and run.eval_examples and args.eval_examples is None:
    print('run.eval_examples 0: the built-in evaluation says nothing about a model of real data')
    run = dataclasses.replace(run, eval_examples=0)
  return dataclasses.replace(experiment, run=run)


def init_distributed(args):
  if args.num_processes > 1:
    if not args.coordinator:
      raise ValueError('--num-processes > 1 needs --coordinator host:port (process 0)')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    if jax.default_backend() == 'cpu' and jax.process_index() == 0:
      print('note: CPU processes talk through gloo, whose large all-reduces run ~100x slower '
            'after a small reduce-scatter (python -m experiments.bench_gloo): multi-process CPU '
            'runs are for testing, not speed')


def naflex_batching(cfg, tcfg, mesh):
  """The NaFlex run's plan of step shapes (`data.naflex_batching`), None without NaFlex: the
  config's lengths, fixed batch_size or token budget, batches a multiple of the mesh's batch
  shards, lengths drawn by the run's seed."""
  if not tcfg.naflex:
    return None
  budget = tcfg.naflex_tokens_per_batch
  return naflex_batching_lib.NaFlexBatching(
      patch_size=cfg.vision.patch_size, seq_lengths=tcfg.naflex_seq_lengths,
      batch_size=None if budget else tcfg.batch_size, tokens_per_batch=budget,
      batch_multiple=mesh.shape['data'] * mesh.shape['fsdp'], seed=tcfg.seed)


def make_data(config, cfg, tcfg, data_state, batching=None, start_step=0,
              distill=train_distillation.Distillation()):
  """(iterator of this process's share of each global batch, pipeline or None), tokenised and
  preprocessed as the model says (`clip.get_tokenizer(cfg)`, `cfg.preprocess`). `data_state` is
  where a resumed run's data continues (None: from the start): for the synthetic sets the next
  unseen example (`resume_example`; its samples are functions of their index, so any batch size
  continues exactly), the shard pipeline's (or mixture's) own record state otherwise. With a
  NaFlex `batching`, batches are NaFlex patches, step `start_step` on. A `distill`ing run's
  teacher adds what it reads (`train_distillation.pipeline_options`): its own view of each
  sample, or the stored embeddings of reinforced shards."""
  tokenize = functools.partial(clip.get_tokenizer(cfg), truncate=True)
  share = dict(process_index=jax.process_index(), process_count=jax.process_count())
  extra = train_distillation.pipeline_options(cfg, distill)
  if config.run.data in SYNTHETIC:
    ds = SYNTHETIC[config.run.data](seed=tcfg.seed, resolution=cfg.image_resolution)
    if batching is not None:
      start = resume.resume_example(data_state, tcfg.batch_size)
      if start != batching.examples_before(start_step):
        raise ValueError(f'the checkpoint\'s data position (example {start}) is not where the '
                         f'NaFlex plan puts step {start_step} (example '
                         f'{batching.examples_before(start_step)}): the lengths, batch size or '
                         'token budget changed since it was written')
      return ds.batches_naflex(batching, tokenize=tokenize, preprocess=cfg.preprocess,
                               start_step=start_step, **share), None
    return ds.batches(tcfg.batch_size, tokenize=tokenize, preprocess=cfg.preprocess,
                      start_example=resume.resume_example(data_state, tcfg.batch_size),
                      **share, **extra), None
  from data import mixture  # pylint: disable=g-import-not-at-top  # TensorFlow: shards only
  # NaFlex: the plan gives each step's batch size and length, no square resolution.
  images = (dict(global_batch_size=tcfg.batch_size, resolution=cfg.image_resolution)
            if batching is None else dict(naflex=batching))
  pipeline = mixture.make_pipeline(config.run.data, train=True, seed=tcfg.seed,
                                   tokenize=tokenize, preprocess=cfg.preprocess,
                                   keep=config.run.keep, resampled=config.run.data_resampled,
                                   resume=data_state, **images, **extra)
  return iter(pipeline), pipeline


def checkpoint_dir(workdir, run):
  """Where the run's checkpoints go: `run.checkpoint_dir` (any path orbax takes: a local folder,
  gs://...) or the workdir's `checkpoints/`."""
  return run.checkpoint_dir or os.path.join(workdir, workdirs.CHECKPOINTS)


def restore(workdir, config, setup, reinforced=None):
  """(state, step, data position): the newest checkpoint's where the run has one (checked to
  continue the same run: `resume.check_model`, `resume.check_resume`, `resume.check_processing`,
  and on the same `reinforced` shards' teacher: `train_distillation.check_reinforced`), placed on
  this run's mesh whatever mesh or process count wrote it; else the fresh state's, at step 0
  with no position."""
  ckpt_dir = checkpoint_dir(workdir, config.run)
  if not state_store.steps(ckpt_dir):
    return setup.state, 0, None
  resume.check_processing(workdir, config.model)
  meta = state_store.meta(ckpt_dir)
  resume.check_model(meta, config.model, ckpt_dir)
  resume.check_resume(meta, config.run, config.train, ckpt_dir)
  train_distillation.check_reinforced(meta, reinforced, config.run.data, ckpt_dir)
  state, meta = state_store.restore(ckpt_dir, jax.eval_shape(lambda: setup.state),
                                    setup.shardings, step=meta['step'])
  print(f'resumed from {ckpt_dir} at step {meta["step"]}')
  return state, meta['step'], resume.process_position(meta)


def hooks(config, workdir, start, data_state, pipeline, profile_steps=None, evals=(),
          batching=None, reinforced=None):
  """(hooks, metrics log): the main job's hooks: its progress bar; a metrics.jsonl line and
  TensorBoard scalars (and the bar's loss and throughput) every run.log_every steps; a checkpoint
  holding the data position every run.checkpoint_every steps, written while the next steps run;
  each after the last step too; the evaluators `evals` every run.eval_every steps (and after the
  last); a profiler trace of `profile_steps` (START, STOP) if given. A NaFlex `batching`'s steps
  hold its varying batch sizes. Checkpoints record the `reinforced` shards' teacher where given
  (`train_distillation.Distillation.reinforced`)."""
  tcfg, run = config.train, config.run
  images_before = tcfg.batch_size if batching is None else batching.examples_before
  bar = tqdm.tqdm(initial=start, total=tcfg.total_steps, desc='train', unit='step',
                  disable=jax.process_index() != 0)
  log = metrics_log.MetricsLog(os.path.join(workdir, 'metrics.jsonl'), start)

  def write(step, metrics):
    log.write(step, metrics)
    bar.set_postfix(loss=f'{metrics["loss"]:.3f}', images_per_s=f'{metrics["images_per_s"]:.0f}')
  start_example = None if pipeline else resume.resume_example(data_state, tcfg.batch_size)

  def meta(step):
    if batching is not None and pipeline is None:
      position = {'example': batching.examples_before(step)}
    else:
      position = resume.data_position(pipeline, start_example, step - start, tcfg.batch_size)
    return {**resume.checkpoint_meta(position, run, tcfg, config.model),
            **({'reinforced': reinforced} if reinforced is not None else {})}
  out = [loop.progress(bar), loop.log_metrics(write, run.log_every, images_before, start)]
  if evals:
    out.append(evaluation(evals, log, workdir, run.eval_every))
  out.append(loop.save_state(checkpoint_dir(workdir, run), run.checkpoint_every, meta,
                             keep=run.keep_checkpoints))
  if profile_steps:
    out.append(loop.profile(profile_dir(workdir), *profile_steps))
  return out, log


def evaluation(evals, log, workdir, every):
  """A hook running the evaluators on the run's weights (`weights`: the EMA where kept) on every
  process; process 0 logs their metrics (metrics.jsonl, TensorBoard: eval/<evaluator>/<metric>)
  and keeps the last and the best of each in eval_best.json."""
  path = os.path.join(workdir, EVAL_BEST)
  tracker = evaluators.BestAndLast.load(path)

  def run(step, state, metrics):
    del metrics
    results = evaluators.run_evaluators(
        evals, model.update_batch_stats(weights(state), state['batch_stats']))
    if jax.process_index() == 0:
      for e in evals:
        log.write_eval(step, e.name, {k[len(e.name) + 1:]: v for k, v in results.items()
                                      if k.startswith(e.name + '/')})
      tracker.update(step, results)
      tracker.write(path)
  return loop.Hook(run, every)


def profile_dir(workdir):
  """Where --profile's trace goes: <workdir>/profile, one folder per process in a run of several
  (jax names its file after the host, which the processes of one host share)."""
  if jax.process_count() == 1:
    return os.path.join(workdir, 'profile')
  return os.path.join(workdir, 'profile', f'process_{jax.process_index()}')


def weights(state):
  """The weights a run evaluates and exports: the EMA of the parameters where it keeps one."""
  return state['ema'] if 'ema' in state else state['params']


def report(args, config, workdir, params):
  """Process 0's outputs of a finished run: loss.png, the torch export and eval.json."""
  cfg, tcfg, run = config.model, config.train, config.run
  metrics_log.plot_losses(
      metrics_log.read_metrics(os.path.join(workdir, 'metrics.jsonl'), tcfg.total_steps),
      os.path.join(workdir, 'loss.png'), f'{args.config} ({tcfg.loss})')
  if args.export_torch:
    import torch  # pylint: disable=g-import-not-at-top  # optional: the [torch] extra
    state_dict = clip.to_torch_state_dict(params)
    files.atomic_write(args.export_torch, lambda tmp: torch.save(state_dict, tmp))
  if run.eval_examples and run.data == 'synthetic_layout':
    results = synthetic_layout_eval.evaluate(params, cfg, run.eval_examples, tcfg.seed + 1,
                                             tcfg.naflex_seq_lengths or None)
  elif run.eval_examples:
    results = synthetic_eval.evaluate(params, cfg, run.eval_examples, tcfg.seed + 1)
  if run.eval_examples:
    print(json.dumps(results, indent=2))
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(results, f, indent=2)


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('data').setLevel(logging.INFO)  # epoch lines: samples, skips per source
  init_distributed(args)
  config = load_config(args)
  profile_steps = loop.parse_profile_steps(args.profile) if args.profile else None
  cfg, tcfg, run = config.model, config.train, config.run
  workdir = args.workdir or os.path.join('results', 'train', args.config)
  os.makedirs(workdir, exist_ok=True)

  mesh = sharding.make_mesh(*tcfg.mesh)
  tcfg.check_mesh(mesh)
  batching = naflex_batching(cfg, tcfg, mesh)  # NaFlex's lengths and budget checked here
  # The evaluators' data is read and checked now, before anything compiles.
  evals = evaluators.make_evaluators(run.evaluators, cfg, mesh, tcfg.batch_size)
  distill = train_distillation.load(config, SYNTHETIC)
  teacher = distill.teacher
  setup = training.setup(cfg, tcfg, mesh, teacher=teacher)
  state, start, data_state = restore(workdir, config, setup, distill.reinforced)
  workdirs.save_model_config(workdir, cfg)  # the workdir names its tokenizer and preprocessing
  accumulation = (f' ({tcfg.accumulation}: {tcfg.accumulation_steps} x '
                  f'{tcfg.micro_batch_size} per update)' if tcfg.accumulation_steps > 1 else '')
  batches = (f'global batch {tcfg.batch_size}{accumulation}' if batching is None else
             f'NaFlex steps (images, patches per image) {batching.shapes()}')
  distils = ('' if teacher is None else f' + {tcfg.distill_weight} x KD from ' + (
      f'{tcfg.teacher} (online, {tcfg.teacher_dtype})' if teacher.online else
      'the reinforced shards\' stored teacher'))
  print(f'{args.config}: {training.param_count(state["params"]) / 1e6:.2f}M parameters, '
        f'loss {tcfg.loss}{distils}, {batches}, mesh {dict(mesh.shape)}, '
        f'{jax.process_count()} process(es)')

  data_iter, pipeline = make_data(config, cfg, tcfg, data_state, batching, start, distill)
  if run.eval_examples:  # its tokenizer errors now, not after training
    synthetic_eval.model_tokenizer(cfg)
  if start < tcfg.total_steps:
    run_hooks, log = hooks(config, workdir, start, data_state, pipeline, profile_steps, evals,
                           batching, distill.reinforced)
    with logging_redirect_tqdm():  # the data pipeline's epoch lines, above the bar
      state = loop.train(state, setup.train_step,
                         (training.global_batch(mesh, batch) for batch in data_iter),
                         steps=tcfg.total_steps, start_step=start, hooks=run_hooks)
    log.close()
  else:
    print(f'{workdir} holds step {start} of {tcfg.total_steps}: nothing to train')
  if pipeline:
    print(f'data: {pipeline.stats.summary()}')

  params = model.update_batch_stats(state_store.to_host(weights(state)),
                                    state_store.to_host(state['batch_stats']))
  if jax.process_index() == 0:
    report(args, config, workdir, params)
  print(f'done: {workdir}')


if __name__ == '__main__':
  main()
