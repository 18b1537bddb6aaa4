"""Fine-tune a CLIP model downstream with the pre-training train step (`clip.train.finetune`).

Modes:
  classifier       image tower + linear head initialised from zero-shot weights; full fine-tuning
                   or LP-FT (--lp-steps of head-only training first), layer-wise lr decay;
                   reports zero-shot, fine-tuned and WiSE-FT accuracy for several alphas, on
                   unseen images of trained (shape, colour) pairs and on held-out pairs.
  lit              locked-image tuning: the text tower learns on image-text pairs (--loss),
                   the image tower stays bit-identical; reports zero-shot before and after.
  text-classifier  the text tower + a linear head on labelled captions.

  python -m experiments.finetune --model results/train/small --config small \
      --mode classifier --dataset synthetic/shape --steps 300 --layer-decay 0.75 --lp-steps 50
  python -m experiments.finetune --model ViT-B/32 --mode classifier --dataset tfds/cifar10 \
      --data-dir ~/tfds --steps 2000 --batch-size 256
  python -m experiments.finetune --model results/train/small --config small --mode lit

Prompts and captions go through the model's own tokenizer (`clip.get_tokenizer(cfg)`), images
through its own preprocessing (`cfg.preprocess`), in every mode; a model whose tokenizer is
unknown is refused with `clip.TokenizerError`.

Writes --out (default results/finetune/<mode>): results.json, a checkpoint of the final
parameters, and for the classifier wise_ft.png (accuracy against the WiSE-FT alpha).
"""
import argparse
import dataclasses
import json
import os

from experiments import malloc_tuning

if __name__ == '__main__':  # before jax is imported: the setting needs a fresh process
  malloc_tuning.reexec_if_untuned()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tqdm

import clip
from clip import model
from clip import processing
from clip import sharding
from clip.eval import zero_shot
from clip.formats import workdirs
from clip.train import finetune
from clip.train import loop
from clip.train import state_store
from clip.train import training
from data import synthetic
from data import synthetic_eval
from experiments import configs

MODES = ('classifier', 'lit', 'text-classifier')
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True, help='official name, checkpoint or workdir')
  parser.add_argument('--config', default=None, help='a file in experiments/configs/')
  parser.add_argument('--mode', default='classifier', choices=MODES)
  parser.add_argument('--dataset', default='synthetic/colour_shape',
                      help='synthetic[/<task>] or tfds/<name> (classifier, text-classifier)')
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--lp-steps', type=int, default=0,
                      help='LP-FT: head-only steps first (the image tower frozen, a ResNet\'s '
                           'BatchNorm statistics included)')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--learning-rate', type=float, default=1e-4)
  parser.add_argument('--layer-decay', type=float, default=1.0)
  parser.add_argument('--weight-decay', type=float, default=0.1)
  parser.add_argument('--loss', default='contrastive', help='lit: the image-text loss')
  parser.add_argument('--mesh', default='-1,1,1')
  parser.add_argument('--eval-examples', type=int, default=1024)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None)
  return parser.parse_args(argv)


def _synthetic(cfg, split, seed=0):
  return synthetic.SyntheticCaptions(seed=seed, resolution=cfg.image_resolution, split=split)


def _normalised(images_u8, cfg):
  """The built-in set's uint8 images, drawn at the model's resolution -> normalised with the
  model's mean and std (the only step of its preprocessing they need)."""
  return processing.normalize(images_u8.astype(np.float32) / 255, cfg)


def labelled_batches(args, cfg):
  """Endless training batches {'image' (the model's preprocessing), 'label', 'caption'} and one
  prompt per class."""
  kind, _, name = args.dataset.partition('/')
  if kind == 'synthetic':
    ds, task = _synthetic(cfg, 'train', args.seed), name or 'colour_shape'

    def stream():
      step = 0
      while True:
        start = synthetic.UNSEEN_START + step * args.batch_size
        sample = ds.get(np.arange(start, start + args.batch_size))
        yield {'image': _normalised(sample['image'], cfg), 'label': ds.labels(sample, task),
               'caption': sample['caption']}
        step += 1
    return stream(), ds.prompts(task)
  if kind == 'tfds':
    from data import tfds  # pylint: disable=g-import-not-at-top
    data = tfds.TFDSClassification(name, 'train', data_dir=args.data_dir)
    batches = data.batches(args.batch_size, cfg.image_resolution, preprocess=cfg.preprocess,
                           train=True, seed=args.seed)
    prompts = [zero_shot.DEFAULT_TEMPLATES[0].format(c) for c in data.classnames]
    return batches, prompts
  raise ValueError(f'--dataset must be synthetic[/<task>] or tfds/<name>, got {args.dataset!r}')


def test_sets(args, cfg):
  """{name: (images by the model's preprocessing, labels, captions or None)} to evaluate on. The
  built-in set gives two: 'train' (unseen images of the (shape, colour) pairs fine-tuning sees)
  and 'heldout' (the pairs it never sees); tfds its test split."""
  kind, _, name = args.dataset.partition('/')
  if kind == 'synthetic':
    out = {}
    for split, offset in (('train', synthetic.FINETUNE_UNSEEN_START), ('heldout', 0)):
      ds = _synthetic(cfg, split, args.seed + 1)
      sample = ds.get(np.arange(offset, offset + args.eval_examples))
      out[split] = (_normalised(sample['image'], cfg), ds.labels(sample, name or 'colour_shape'),
                    sample['caption'])
    return out
  if kind != 'tfds':
    raise ValueError(f'--dataset must be synthetic[/<task>] or tfds/<name>, got {args.dataset!r}')
  from data import tfds  # pylint: disable=g-import-not-at-top
  data = tfds.TFDSClassification(name, 'test', data_dir=args.data_dir)
  return {'test': (*data.arrays(args.batch_size, cfg.image_resolution,
                                preprocess=cfg.preprocess), None)}


def _accuracy(logits, labels):
  return float(np.mean(np.asarray(logits).argmax(-1) == labels))


def _run(cfg, tcfg, init_params, objective, batch_keys, batches, to_batch):
  """Trains with the pre-training step (`clip.train.loop`); returns the final params and the
  metrics logged every 10 steps and at the last."""
  mesh = sharding.make_mesh(*tcfg.mesh)
  setup = training.setup(cfg, tcfg, mesh, init_params=init_params, objective=objective,
                         batch_keys=batch_keys)
  log = []
  bar = tqdm.tqdm(total=tcfg.total_steps, desc='fine-tune', unit='step')
  state = loop.train(setup.state, setup.train_step,
                     (training.global_batch(mesh, to_batch(b)) for b in batches),
                     steps=tcfg.total_steps,
                     hooks=[loop.progress(bar),
                            loop.log_metrics(lambda step, m: log.append({'step': step, **m}), 10)])
  return model.update_batch_stats(jax.device_get(state['params']),
                                  jax.device_get(state['batch_stats'])), log


def classifier(args, params, cfg, tcfg):
  batches, prompts = labelled_batches(args, cfg)
  weights = zero_shot.classifier_weights_from_tokens(params,
                                                     clip.get_tokenizer(cfg)(prompts)[:, None], cfg)
  zs = finetune.image_classifier_params(params, weights)
  tests = test_sets(args, cfg)
  objective = finetune.image_classification_objective(cfg)
  to_batch = lambda b: {'image': b['image'], 'label': b['label']}
  current, log = zs, []
  if args.lp_steps:
    lp = dataclasses.replace(tcfg, total_steps=args.lp_steps,
                             warmup_steps=min(tcfg.warmup_steps, args.lp_steps - 1),
                             freeze=(r'visual\..*',))
    current, log = _run(cfg, lp, lambda key: current, objective, ('image', 'label'), batches,
                        to_batch)
  ft, ft_log = _run(cfg, tcfg, lambda key: current, objective, ('image', 'label'), batches,
                    to_batch)
  accuracy = {split: {str(a): _accuracy(finetune.classify_images(finetune.wise_ft(zs, ft, a), x,
                                                                  cfg), y) for a in ALPHAS}
              for split, (x, y, _) in tests.items()}
  results = {'zero_shot_accuracy': {k: v['0.0'] for k, v in accuracy.items()},
             'finetuned_accuracy': {k: v['1.0'] for k, v in accuracy.items()},
             'wise_ft_accuracy': accuracy, 'log': log + ft_log}
  return ft, results


def lit(args, params, cfg, tcfg):
  tokenize = clip.get_tokenizer(cfg)  # before anything runs: the model's own, or TokenizerError
  before = synthetic_eval.evaluate(params, cfg, args.eval_examples, args.seed + 1)
  ds = _synthetic(cfg, 'train', args.seed)
  batches = ds.batches(tcfg.batch_size, start_step=synthetic.LIT_START_STEP, tokenize=tokenize,
                       preprocess=cfg.preprocess)
  tcfg = dataclasses.replace(tcfg, lock_image_tower=True, loss=args.loss)
  init = dict(params)
  if tcfg.trains_logit_bias != cfg.logit_bias:  # the model follows the loss
    print(f'--loss {args.loss}: LiT trains with logit_bias={not cfg.logit_bias}')
    cfg = dataclasses.replace(cfg, logit_bias=not cfg.logit_bias)
    init = model.add_logit_bias(init) if cfg.logit_bias else {
        k: v for k, v in init.items() if k != 'logit_bias'}
  tuned, log = _run(cfg, tcfg, lambda key: init, None, ('image', 'tokens'), batches, lambda b: b)
  after = synthetic_eval.evaluate(tuned, cfg, args.eval_examples, args.seed + 1)
  keys = ('heldout/colour_shape_top1', 'heldout/image_to_text_R@1', 'heldout/text_to_image_R@1')
  return tuned, {'before': {k: before[k] for k in keys}, 'after': {k: after[k] for k in keys},
                 'log': log}


def text_classifier(args, params, cfg, tcfg):
  if not args.dataset.startswith('synthetic'):
    raise ValueError('text-classifier needs labelled captions: --dataset synthetic/<task>')
  tokenize = clip.get_tokenizer(cfg)
  batches, prompts = labelled_batches(args, cfg)
  head = finetune.text_classifier_params(params, len(prompts), jax.random.PRNGKey(args.seed))
  to_batch = lambda b: {'tokens': tokenize(b['caption']), 'label': b['label']}
  tuned, log = _run(cfg, tcfg, lambda key: head, finetune.text_classification_objective(cfg),
                    ('tokens', 'label'), batches, to_batch)
  accuracy = {}
  for split, (_, y, captions) in test_sets(args, cfg).items():
    logits = finetune.classify_texts(tuned, tokenize(captions), cfg)
    accuracy[split] = _accuracy(logits, y)
  return tuned, {'accuracy': accuracy, 'chance': 1 / len(prompts), 'log': log}


def plot_wise_ft(accuracy, path):
  """Accuracy against the WiSE-FT alpha, one line per evaluation split."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for split, by_alpha in accuracy.items():
    ax.plot([float(a) for a in by_alpha], [100 * v for v in by_alpha.values()], '-o', label=split)
  ax.set(xlabel='WiSE-FT alpha (0: zero-shot, 1: fine-tuned)', ylabel='accuracy %')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  if args.lp_steps and args.mode != 'classifier':
    raise ValueError('--lp-steps applies to --mode classifier only')
  tcfg = training.TrainConfig(batch_size=args.batch_size, total_steps=args.steps,
                              warmup_steps=args.steps // 10, learning_rate=args.learning_rate,
                              weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                              mesh=tuple(int(s) for s in args.mesh.split(',')), seed=args.seed)
  params, cfg = workdirs.load_model(args.model, configs.model_config(args.config),
                                    config_name=args.config)
  run = {'classifier': classifier, 'lit': lit, 'text-classifier': text_classifier}[args.mode]
  tuned, results = run(args, params, cfg, tcfg)
  out = args.out or os.path.join('results', 'finetune', args.mode)
  os.makedirs(out, exist_ok=True)
  state_store.save(os.path.join(out, workdirs.CHECKPOINTS), args.steps, {'params': tuned}, keep=1)
  results = {'mode': args.mode, 'model': args.model, 'dataset': args.dataset, **results}
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  if args.mode == 'classifier':
    plot_wise_ft(results['wise_ft_accuracy'], os.path.join(out, 'wise_ft.png'))
  print(json.dumps({k: v for k, v in results.items() if k != 'log'}, indent=2))
  return results


if __name__ == '__main__':
  main()
