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

Writes into `--workdir` (default results/train/<config>): model_config.json (the architecture, the
tokenizer and the image preprocessing the data was read with, a SentencePiece model copied beside
it), metrics.jsonl, loss.png, checkpoints/, eval.json, and with --export-torch a torch state dict
of the final weights. Rerunning with the same workdir resumes from the newest checkpoint (params,
optimizer, step, rng and data position), with the same tokenizer and preprocessing; the data
position is the next unseen example (the shards' next record), so a resume at another
--batch-size sees each example once.
"""
import argparse
import collections
import dataclasses
import filecmp
import functools
import importlib
import json
import logging
import os
import time

import jax


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
  parser.add_argument('--optimizer', default=None, help='adamw | lion | adafactor | muon')
  parser.add_argument('--schedule', default=None, help='after the warmup: cosine | linear | '
                      'constant')
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--batch-size', type=int, default=None)
  parser.add_argument('--mesh', default=None, help='data,fsdp,tensor sizes, e.g. 2,2,2 or -1,1,1')
  parser.add_argument('--checkpoint-every', type=int, default=None)
  parser.add_argument('--eval-examples', type=int, default=None,
                      help='synthetic examples per split for the final zero-shot evaluation (0: '
                      'none; default: the config\'s with the synthetic data, none with shards)')
  parser.add_argument('--export-torch', default=None, help='write the final weights here (.pt)')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--coordinator', default=None, help='host:port of process 0')
  return parser.parse_args(argv)


# The hand-mapped flags, each an alias of `--set <field>=<value>`.
ALIASES = {'loss': 'train.loss', 'optimizer': 'train.optimizer', 'schedule': 'train.schedule',
           'steps': 'train.total_steps', 'batch_size': 'train.batch_size', 'mesh': 'train.mesh',
           'data': 'run.data', 'data_resampled': 'run.data_resampled',
           'checkpoint_every': 'run.checkpoint_every', 'eval_examples': 'run.eval_examples'}


def _assignments(args):
  """[(field path, value)]: the `--set`s, then the aliases given."""
  from experiments import configs  # pylint: disable=g-import-not-at-top
  out = [configs.parse_assignment(text) for text in args.set or ()]
  for flag, path in ALIASES.items():
    value = getattr(args, flag)
    if value is not None:
      out.append((path, tuple(int(s) for s in value.split(',')) if flag == 'mesh' else value))
  return out


def _apply(experiment, assignments):
  """The assignments, with what they imply made explicit and printed: a shorter run shortens the
  warmup to a tenth of it (unless it is set too), and the model's SigLIP bias follows the loss
  (unless it is set too)."""
  from clip.train import objectives  # pylint: disable=g-import-not-at-top
  from experiments import configs  # pylint: disable=g-import-not-at-top
  given = dict(assignments)
  if 'train.total_steps' in given and 'train.warmup_steps' not in given:
    warmup = min(experiment.train.warmup_steps, given['train.total_steps'] // 10)
    if warmup != experiment.train.warmup_steps:
      print(f'train.total_steps={given["train.total_steps"]}: train.warmup_steps '
            f'{experiment.train.warmup_steps} -> {warmup} (at most a tenth of the run)')
      given['train.warmup_steps'] = warmup
  if 'train.loss' in given and 'model.logit_bias' not in given:
    bias = objectives.takes_bias(given['train.loss'])
    if bias != experiment.model.logit_bias:
      print(f'train.loss={given["train.loss"]}: model.logit_bias {not bias} -> {bias} (SigLIP\'s '
            'bias exactly where the loss takes one)')
      given['model.logit_bias'] = bias
  return configs.set_fields(experiment, given)


def load_config(args):
  """The `Experiment` of `--config name[:arg]` with `--set` and the flags applied (each implied
  change printed), validated before anything compiles."""
  from clip.train import objectives  # pylint: disable=g-import-not-at-top
  name, _, arg = args.config.partition(':')
  experiment = importlib.import_module(f'experiments.configs.{name}').get_config(arg or None)
  experiment = _apply(experiment, _assignments(args))
  objectives.check_objective(experiment.model, experiment.train)
  run = experiment.run
  if not run.data:
    raise ValueError(f'config {name!r} has no default data: pass --data with a glob of '
                     'img2dataset shards (output_format "webdataset" or "tfrecord")')
  if run.data == 'synthetic' and run.data_resampled:
    raise ValueError('--data-resampled draws img2dataset shards with replacement; the built-in '
                     'synthetic data has no files (every process reads its own samples)')
  if args.keep_uids or args.min_image_size:
    if run.data == 'synthetic':
      raise ValueError('--keep-uids / --min-image-size filter img2dataset shards, not the '
                       'built-in synthetic data')
    from data import filters  # pylint: disable=g-import-not-at-top
    run = dataclasses.replace(run, keep=filters.MetadataFilter(
        uids=args.keep_uids, min_image_size=args.min_image_size))
  if args.export_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise ValueError("--export-torch needs torch: pip install -e '.[torch]'") from None
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


class MetricsLog:
  """Appends one JSON line per logged step (process 0), and TensorBoard when it is installed."""

  def __init__(self, path):
    self.path = path
    self.writer = None
    if jax.process_index():
      return
    try:
      from torch.utils import tensorboard  # pylint: disable=g-import-not-at-top
      self.writer = tensorboard.SummaryWriter(os.path.dirname(path))
    except ImportError:
      pass

  def write(self, step, metrics):
    if jax.process_index():
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self.writer:
      for k, v in record.items():
        if k != 'step':
          self.writer.add_scalar(k, v, step)


def read_metrics(path, upto):
  """Logged records with step <= `upto`: a resumed run drops what the killed run logged after
  its last checkpoint, so the file never holds a step twice."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r['step'] <= upto]


def plot_losses(records, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
  steps = [r['step'] for r in records]
  losses_shown = [k for k in ('loss', 'contrastive_loss', 'caption_loss') if k in records[0]]
  for key in losses_shown:
    ax_loss.plot(steps, [r[key] for r in records], label=key)
  ax_loss.set(xlabel='step', ylabel='training loss', title=title)
  for key, label in (('accuracy', 'in-batch image-text matching'),
                     ('token_accuracy', 'caption next-token (scored positions)')):
    if key in records[0]:
      ax_acc.plot(steps, [r[key] for r in records], label=label)
  ax_acc.set(xlabel='step', ylabel='training accuracy', ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


class CompletedSteps:
  """Advances a progress bar by the steps the device has finished, not those dispatched (JAX
  dispatches ahead, so a bar of dispatched steps races on and then stalls at every log step).

  It waits on the loss of the step `lag` dispatches back: `lag` steps stay queued on the device,
  so the wait is for work already done and costs no throughput (README: Training, measured)."""

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


def check_resume(meta, run, tcfg, ckpt_dir):
  """A workdir resumes on the data it was trained on, read as it was: its position means nothing
  in another source, or in the draws of another resampling (ValueError). Another length of run
  is allowed (to extend one) and said, as is another batch size (the data continues at the next
  unseen example: `resume_example`, or the shard pipeline's record positions)."""
  source = meta.get('data_source', run.data)
  if source != run.data:
    raise ValueError(f'{ckpt_dir} was trained on --data {source!r}; its data position does not '
                     f'apply to {run.data!r}: use another --workdir (or the same data)')
  resampled = meta.get('data_resampled', False)
  if resampled != run.data_resampled:
    raise ValueError(f'{ckpt_dir} was trained with data_resampled={resampled}; its data position '
                     f'does not apply to data_resampled={run.data_resampled}: use another '
                     '--workdir (or the same setting)')
  batch = meta.get('batch_size')
  if batch is not None and batch != tcfg.batch_size:
    where = (f'example {resume_example(meta["data"], batch)}' if run.data == 'synthetic' else
             'each source\'s next record')
    print(f'resuming a run of global batch {batch} at batch {tcfg.batch_size}: the data '
          f'continues at {where}, each example seen once')
  elif batch is None and run.data == 'synthetic' and 'example' not in meta['data']:
    print(f'{ckpt_dir} holds its data position as a step ({meta["data"]["step"]}), not an '
          f'example: assumed trained at this batch size, {tcfg.batch_size}')
  if meta.get('total_steps', tcfg.total_steps) != tcfg.total_steps:
    print(f'resuming a run of {meta["total_steps"]} steps as one of {tcfg.total_steps}: the '
          'learning-rate schedule follows the new length from here')


def check_processing(workdir, cfg):
  """A workdir resumes with the tokenizer and image preprocessing it was trained with (its
  `model_config.json`; one written before those were saved is taken as it comes): tokens or
  pixels of another kind would continue the run on other inputs (ValueError)."""
  from clip.train import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    saved = workdirs.load_model_config(workdir)
  except FileNotFoundError:
    return
  if saved.preprocess != cfg.preprocess:
    raise ValueError(f'{workdir} was trained with preprocessing {saved.preprocess}, this run\'s '
                     f'model has {cfg.preprocess}: use another --workdir (or the same model)')
  if not _same_tokenizer(saved.tokenizer, cfg.tokenizer):
    raise ValueError(f'{workdir} was trained with tokenizer {saved.tokenizer}, this run\'s model '
                     f'has {cfg.tokenizer}: use another --workdir (or the same model)')


def _same_tokenizer(a, b):
  """Equal settings and model files of equal bytes (the workdir holds a copy of the file)."""
  if dataclasses.replace(a, model_file=None) != dataclasses.replace(b, model_file=None):
    return False
  if a.model_file is None or b.model_file is None:
    return a.model_file == b.model_file
  return filecmp.cmp(a.model_file, b.model_file, shallow=False)


def resume_example(data_state, batch_size):
  """The synthetic set's next unseen example at a checkpoint's data position: its
  `{'example': n}`, or for a checkpoint written before positions were examples, `{'step': s}`,
  s * `batch_size` (assumed trained at this batch size: such a checkpoint does not say)."""
  if data_state is None:
    return 0
  return data_state['example'] if 'example' in data_state else data_state['step'] * batch_size


def data_position(pipeline, start_example, steps, batch_size):
  """The data position a checkpoint stores after `steps` batches of `batch_size` read from
  `start_example` on: the shard pipeline's (or mixture's) own state, record positions whatever
  the batch, or the synthetic set's next unseen example `{'example': n}`."""
  if pipeline is not None:
    return pipeline.state()
  return {'example': start_example + steps * batch_size}


def make_data(config, cfg, tcfg, data_state):
  """(iterator of this process's share of each global batch, pipeline or None), tokenised and
  preprocessed as the model says (`clip.get_tokenizer(cfg)`, `cfg.preprocess`). `data_state` is
  where a resumed run's data continues (None: from the start): for the synthetic set the next
  unseen example (`resume_example`; its samples are functions of their index, so any batch size
  continues exactly), the shard pipeline's (or mixture's) own record state otherwise."""
  import clip  # pylint: disable=g-import-not-at-top
  tokenize = functools.partial(clip.get_tokenizer(cfg), truncate=True)
  if config.run.data == 'synthetic':
    from data import synthetic  # pylint: disable=g-import-not-at-top
    ds = synthetic.SyntheticCaptions(seed=tcfg.seed, resolution=cfg.image_resolution)
    return ds.batches(tcfg.batch_size, tokenize=tokenize, preprocess=cfg.preprocess,
                      start_example=resume_example(data_state, tcfg.batch_size),
                      process_index=jax.process_index(),
                      process_count=jax.process_count()), None
  from data import mixture  # pylint: disable=g-import-not-at-top
  pipeline = mixture.make_pipeline(config.run.data, global_batch_size=tcfg.batch_size,
                                   resolution=cfg.image_resolution, train=True, seed=tcfg.seed,
                                   tokenize=tokenize, preprocess=cfg.preprocess,
                                   keep=config.run.keep, resampled=config.run.data_resampled,
                                   resume=data_state)
  return iter(pipeline), pipeline


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('data').setLevel(logging.INFO)  # epoch lines: samples, skips per source
  init_distributed(args)
  config = load_config(args)
  import tqdm  # pylint: disable=g-import-not-at-top
  from tqdm.contrib.logging import logging_redirect_tqdm  # pylint: disable=g-import-not-at-top
  import clip  # pylint: disable=g-import-not-at-top
  from clip.train import checkpoint  # pylint: disable=g-import-not-at-top
  from clip import model  # pylint: disable=g-import-not-at-top
  from clip import sharding  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  cfg, tcfg, run = config.model, config.train, config.run
  workdir = args.workdir or os.path.join('results', 'train', args.config)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  os.makedirs(workdir, exist_ok=True)

  mesh = sharding.make_mesh(*tcfg.mesh)
  state, train_step, shardings, _, _ = training.setup(cfg, tcfg, mesh)
  start, data_state = 0, None
  if checkpoint.steps(ckpt_dir):
    state, meta = checkpoint.restore(ckpt_dir, jax.eval_shape(lambda: state), shardings)
    start, data_state = meta['step'], meta['data']
    check_resume(meta, run, tcfg, ckpt_dir)
    check_processing(workdir, cfg)
    print(f'resumed from {ckpt_dir} at step {start}')
  workdirs.save_model_config(workdir, cfg)  # the workdir names its tokenizer and preprocessing
  accumulation = (f' ({tcfg.accumulation}: {tcfg.accumulation_steps} x '
                  f'{tcfg.micro_batch_size} per update)' if tcfg.accumulation_steps > 1 else '')
  print(f'{args.config}: {training.param_count(state["params"]) / 1e6:.2f}M parameters, '
        f'loss {tcfg.loss}, global batch {tcfg.batch_size}{accumulation}, '
        f'mesh {dict(mesh.shape)}, {jax.process_count()} process(es)')

  log_path = os.path.join(workdir, 'metrics.jsonl')
  kept = read_metrics(log_path, start)
  if jax.process_index() == 0:
    with open(log_path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
  log = MetricsLog(log_path)
  data_iter, pipeline = make_data(config, cfg, tcfg, data_state)
  start_example = None if pipeline else resume_example(data_state, tcfg.batch_size)
  if run.eval_examples:  # its tokenizer errors now, not after training
    from data import synthetic_eval  # pylint: disable=g-import-not-at-top
    synthetic_eval.model_tokenizer(cfg)
  bar = tqdm.tqdm(initial=start, total=tcfg.total_steps, desc='train', unit='step',
                  disable=jax.process_index() != 0)
  progress = CompletedSteps(bar)
  with logging_redirect_tqdm():  # the data pipeline's epoch lines, above the bar
    tick, images_seen = time.perf_counter(), 0
    for step in range(start, tcfg.total_steps):
      state, metrics = train_step(state, training.global_batch(mesh, next(data_iter)))
      progress.dispatched(metrics['loss'])
      images_seen += tcfg.batch_size
      done = step + 1
      if done % run.log_every == 0 or done == tcfg.total_steps:
        metrics = jax.device_get(metrics)
        metrics['images_per_s'] = images_seen / (time.perf_counter() - tick)
        tick, images_seen = time.perf_counter(), 0
        log.write(done, metrics)
        bar.set_postfix(loss=f'{metrics["loss"]:.3f}',
                        images_per_s=f'{metrics["images_per_s"]:.0f}')
      if done % run.checkpoint_every == 0 or done == tcfg.total_steps:
        data_state = data_position(pipeline, start_example, done - start, tcfg.batch_size)
        checkpoint.save(ckpt_dir, done, state, {'data': data_state, 'data_source': run.data,
                                                 'data_resampled': run.data_resampled,
                                                 'batch_size': tcfg.batch_size,
                                                 'total_steps': tcfg.total_steps},
                        keep=run.keep_checkpoints)
    progress.finish()
  bar.close()
  if pipeline:
    print(f'data: {pipeline.stats.summary()}')

  params = model.update_batch_stats(checkpoint.to_host(state['params']),
                                    checkpoint.to_host(state['batch_stats']))
  if jax.process_index() == 0:
    plot_losses(read_metrics(log_path, tcfg.total_steps), os.path.join(workdir, 'loss.png'),
                f'{args.config} ({tcfg.loss})')
    if args.export_torch:
      import torch  # pylint: disable=g-import-not-at-top
      tmp = args.export_torch + '.tmp'
      torch.save(clip.to_torch_state_dict(params), tmp)
      os.replace(tmp, args.export_torch)
    if run.eval_examples:
      from data import synthetic_eval  # pylint: disable=g-import-not-at-top
      results = synthetic_eval.evaluate(params, cfg, run.eval_examples, tcfg.seed + 1)
      print(json.dumps(results, indent=2))
      with open(os.path.join(workdir, 'eval.json'), 'w') as f:
        json.dump(results, f, indent=2)
  print(f'done: {workdir}')


if __name__ == '__main__':
  main()
