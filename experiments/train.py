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

Writes into `--workdir` (default results/train/<config>): metrics.jsonl, loss.png, checkpoints/,
eval.json, and with --export-torch a torch state dict of the final weights. Rerunning with the same
workdir resumes from the newest checkpoint (params, optimizer, step, rng and data position).
"""
import argparse
import dataclasses
import importlib
import json
import logging
import os
import time

import jax
import numpy as np


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='small', help='a file in experiments/configs/')
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--data', default=None,
                      help='"synthetic", a glob of img2dataset shards (.tar or .tfrecord), or a '
                           'weighted mixture "a/*.tar:0.7,b/*.tfrecord:0.3"')
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
                      'none; default: the config\'s with the synthetic data, none with tfrecords)')
  parser.add_argument('--export-torch', default=None, help='write the final weights here (.pt)')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--coordinator', default=None, help='host:port of process 0')
  return parser.parse_args(argv)


def load_config(args):
  """The config file's dict with the command-line overrides applied (validated, before compile)."""
  import losses  # pylint: disable=g-import-not-at-top
  from clip import training  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'experiments.configs.{args.config}').get_config()
  changes = {}
  if args.loss:
    changes['loss'] = args.loss
  if args.optimizer:
    changes['optimizer'] = args.optimizer
  if args.schedule:
    changes['schedule'] = args.schedule
  if args.steps:
    changes['total_steps'] = args.steps
    changes['warmup_steps'] = min(config['train'].warmup_steps, args.steps // 10)
  if args.batch_size:
    changes['batch_size'] = args.batch_size
  if args.mesh:
    changes['mesh'] = tuple(int(s) for s in args.mesh.split(','))
  config['train'] = dataclasses.replace(config['train'], **changes)
  assert isinstance(config['train'], training.TrainConfig)
  if args.loss:  # the model follows the loss: SigLIP's bias exactly where the loss takes one
    bias = losses.takes_bias(args.loss)
    if config['model'].logit_bias != bias:
      print(f'--loss {args.loss}: model logit_bias={bias} (the config had {not bias})')
      config['model'] = dataclasses.replace(config['model'], logit_bias=bias)
  training.check_logit_bias(config['model'], config['train'])
  if args.data:
    config['data'] = args.data
  if not config['data']:
    raise ValueError(f'config {args.config!r} has no default data: pass --data with a glob of '
                     'img2dataset shards (output_format "webdataset" or "tfrecord")')
  if args.keep_uids or args.min_image_size:
    if config['data'] == 'synthetic':
      raise ValueError('--keep-uids / --min-image-size filter img2dataset shards, not the '
                       'built-in synthetic data')
    from data import filters  # pylint: disable=g-import-not-at-top
    config['keep'] = filters.MetadataFilter(uids=args.keep_uids,
                                            min_image_size=args.min_image_size)
  if args.checkpoint_every:
    config['checkpoint_every'] = args.checkpoint_every
  if args.export_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise ValueError("--export-torch needs torch: pip install -e '.[torch]'") from None
  if args.eval_examples is not None:
    config['eval_examples'] = args.eval_examples
  elif config['data'] != 'synthetic':
    config['eval_examples'] = 0  # the built-in evaluation says nothing about real data
  return config


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
  ax_loss.plot(steps, [r['loss'] for r in records])
  ax_loss.set(xlabel='step', ylabel='training loss', title=title)
  ax_acc.plot(steps, [r['accuracy'] for r in records])
  ax_acc.set(xlabel='step', ylabel='in-batch matching accuracy', ylim=(0, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def make_data(config, cfg, tcfg, data_state):
  """(iterator of this process's share of each global batch, pipeline or None). `data_state` is
  where a resumed run's data continues: the step for the synthetic set (a function of it), the
  shard pipeline's (or mixture's) own state otherwise."""
  if config['data'] == 'synthetic':
    from data import synthetic  # pylint: disable=g-import-not-at-top
    ds = synthetic.SyntheticCaptions(seed=tcfg.seed, resolution=cfg.image_resolution)
    return ds.batches(tcfg.batch_size, start_step=data_state['step'],
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      context_length=cfg.context_length), None
  from data import mixture  # pylint: disable=g-import-not-at-top
  pipeline = mixture.make_pipeline(config['data'], global_batch_size=tcfg.batch_size,
                                   resolution=cfg.image_resolution, train=True, seed=tcfg.seed,
                                   context_length=cfg.context_length, keep=config.get('keep'),
                                   resume=data_state if data_state['step'] else None)
  return iter(pipeline), pipeline


def evaluate(params, cfg, n, seed):
  """Zero-shot accuracy (colour + shape, 48 classes, and each attribute) and image<->caption
  retrieval on `n` synthetic images: unseen images of trained combinations ('train' split) and
  the (shape, colour) pairs training never showed ('heldout')."""
  import clip  # pylint: disable=g-import-not-at-top
  from clip import zero_shot  # pylint: disable=g-import-not-at-top
  from data import synthetic  # pylint: disable=g-import-not-at-top
  results = {}
  for split, offset in (('train', 10**9), ('heldout', 0)):
    ds = synthetic.SyntheticCaptions(seed=seed, resolution=cfg.image_resolution, split=split)
    sample = ds.get(np.arange(offset, offset + n))
    images = clip.normalize_image(sample['image'].astype(np.float32) / 255)
    for task in ('colour_shape', 'shape', 'colour', 'count', 'size'):
      tokens = clip.tokenize(ds.prompts(task), cfg.context_length)[:, None]
      weights = zero_shot.classifier_weights_from_tokens(params, cfg, tokens)
      top, _ = zero_shot.classify(params, cfg, images, weights, k=1)
      accuracy = float(np.mean(np.asarray(top)[:, 0] == ds.labels(sample, task)))
      results[f'{split}/{task}_top1'] = accuracy
      results[f'{split}/{task}_chance'] = 1 / len(ds.classnames(task))
    recall = zero_shot.retrieval_metrics(
        clip.encode_image(params, images, cfg),
        clip.encode_text(params, clip.tokenize(sample['caption'], cfg.context_length), cfg))
    results.update({f'{split}/{k}': float(v) for k, v in recall.items()})
  results['num_examples'] = n
  return results


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('data').setLevel(logging.INFO)  # epoch lines: samples, skips per source
  init_distributed(args)
  config = load_config(args)
  import tqdm  # pylint: disable=g-import-not-at-top
  from tqdm.contrib.logging import logging_redirect_tqdm  # pylint: disable=g-import-not-at-top
  import clip  # pylint: disable=g-import-not-at-top
  from clip import checkpoint  # pylint: disable=g-import-not-at-top
  from clip import model  # pylint: disable=g-import-not-at-top
  from clip import sharding  # pylint: disable=g-import-not-at-top
  from clip import training  # pylint: disable=g-import-not-at-top
  cfg, tcfg = config['model'], config['train']
  workdir = args.workdir or os.path.join('results', 'train', args.config)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  os.makedirs(workdir, exist_ok=True)

  mesh = sharding.make_mesh(*tcfg.mesh)
  state, train_step, shardings, _, _ = training.setup(cfg, tcfg, mesh)
  start, data_state = 0, {'step': 0}
  if checkpoint.steps(ckpt_dir):
    state, meta = checkpoint.restore(ckpt_dir, jax.eval_shape(lambda: state), shardings)
    start, data_state = meta['step'], meta['data']
    print(f'resumed from {ckpt_dir} at step {start}')
  print(f'{args.config}: {training.param_count(state["params"]) / 1e6:.2f}M parameters, '
        f'loss {tcfg.loss}, global batch {tcfg.batch_size}, mesh {dict(mesh.shape)}, '
        f'{jax.process_count()} process(es)')

  log_path = os.path.join(workdir, 'metrics.jsonl')
  kept = read_metrics(log_path, start)
  if jax.process_index() == 0:
    with open(log_path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
  log = MetricsLog(log_path)
  data_iter, pipeline = make_data(config, cfg, tcfg, data_state)
  with logging_redirect_tqdm():  # the data pipeline's epoch lines, above the bar
    tick, images_seen = time.perf_counter(), 0
    for step in tqdm.trange(start, tcfg.total_steps, initial=start, total=tcfg.total_steps,
                            disable=jax.process_index() != 0, desc='train'):
      state, metrics = train_step(state, training.global_batch(mesh, next(data_iter)))
      images_seen += tcfg.batch_size
      done = step + 1
      if done % config['log_every'] == 0 or done == tcfg.total_steps:
        metrics = jax.device_get(metrics)
        metrics['images_per_s'] = images_seen / (time.perf_counter() - tick)
        tick, images_seen = time.perf_counter(), 0
        log.write(done, metrics)
      if done % config['checkpoint_every'] == 0 or done == tcfg.total_steps:
        data_state = pipeline.state() if pipeline else {'step': done}
        checkpoint.save(ckpt_dir, done, state, {'data': data_state},
                        keep=config['keep_checkpoints'])
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
    if config['eval_examples']:
      results = evaluate(params, cfg, config['eval_examples'], tcfg.seed + 1)
      print(json.dumps(results, indent=2))
      with open(os.path.join(workdir, 'eval.json'), 'w') as f:
        json.dump(results, f, indent=2)
  print(f'done: {workdir}')


if __name__ == '__main__':
  main()
