"""open_clip's own training step, timed beside ours by `experiments/bench_train.py`.

The model is open-clip-torch's (`open_clip.create_model` for a model it names, e.g. ViT-B/32 as
'ViT-B-32' with `force_quick_gelu=True`, OpenAI's activation and ours; otherwise
`open_clip.CLIP` built from `clip.formats.open_clip.open_clip_model_cfg` of our config), random
init, float32, on the CPU; the loss is `open_clip.loss.ClipLoss` (`SigLipLoss` for the sigmoid
losses, the model then starting with open_clip's `init_logit_bias=-10`); the optimizer torch's
AdamW with open_clip_train's parameter groups (no weight decay on gains, biases and the logit
scale and bias) and our TrainConfig's learning rate, betas, epsilon and weight decay. One step is
open_clip_train's `train_one_epoch` body without AMP: zero the gradients, forward, loss,
backward, clip the gradient norm (`--grad-clip-norm`, when our config clips), optimizer step,
clamp the logit scale to [0, ln 100]. The architecture is checked to be ours by its parameter
count.
"""
import dataclasses
import math
import os
import time

import numpy as np

from experiments.references.open_clip import import_open_clip

# Our model names that open_clip registers under another name (OpenAI's architectures).
OPEN_CLIP_NAMES = {'ViT-B/32': 'ViT-B-32', 'ViT-B/16': 'ViT-B-16', 'ViT-L/14': 'ViT-L-14',
                   'ViT-L/14@336px': 'ViT-L-14-336', 'RN50': 'RN50', 'RN101': 'RN101',
                   'RN50x4': 'RN50x4', 'RN50x16': 'RN50x16', 'RN50x64': 'RN50x64'}
SIGMOID_LOSSES = ('sigmoid', 'ring_sigmoid')  # open_clip's SigLipLoss
CONTRASTIVE_LOSSES = ('contrastive', 'ring_contrastive')  # open_clip's ClipLoss


def set_threads():
  """torch runs on every core of the machine (`os.cpu_count()`), as XLA's CPU client does."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  return torch.get_num_threads()


def matmul_probe_tflops(size=2048, repeats=5):
  """torch's best fp32 `size` x `size` matmul rate in TFLOP/s, after a warm-up."""
  import torch  # pylint: disable=g-import-not-at-top
  set_threads()
  a = torch.randn(size, size)
  a @ a  # pylint: disable=pointless-statement
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a  # pylint: disable=pointless-statement
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12


def build_model(name, cfg, sigmoid):
  """open_clip's model for our model `name` with config `cfg` (see the module docstring)."""
  from clip.formats import open_clip as open_clip_format  # pylint: disable=g-import-not-at-top
  open_clip = import_open_clip()
  extra = {'init_logit_bias': -10.0, 'init_logit_scale': math.log(10.0)} if sigmoid else {}
  if name in OPEN_CLIP_NAMES:
    return open_clip.create_model(OPEN_CLIP_NAMES[name], force_quick_gelu=True, output_dict=True,
                                  **extra)
  plain = dataclasses.replace(cfg, logit_bias=False, dtype='float32', remat='none', scan=False)
  model_cfg = open_clip_format.open_clip_model_cfg(plain)
  model_cfg.pop('custom_text', None)
  return open_clip.CLIP(**model_cfg, output_dict=True, **extra)


def _optimizer(model, tcfg):
  import torch  # pylint: disable=g-import-not-at-top
  exclude = lambda n, p: p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n
  named = list(model.named_parameters())
  groups = [{'params': [p for n, p in named if exclude(n, p)], 'weight_decay': 0.0},
            {'params': [p for n, p in named if not exclude(n, p)],
             'weight_decay': tcfg.weight_decay}]
  return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=(tcfg.b1, tcfg.b2), eps=tcfg.eps)


def make_step(model, tcfg):
  """open_clip_train's step for `model`: `step(images, texts) -> loss` (a float). Raises
  ValueError for a `tcfg.loss` open_clip has no counterpart of."""
  import torch  # pylint: disable=g-import-not-at-top
  if tcfg.loss not in CONTRASTIVE_LOSSES + SIGMOID_LOSSES:
    raise ValueError(f'open_clip has no counterpart of loss {tcfg.loss!r}; it has '
                     f'{CONTRASTIVE_LOSSES + SIGMOID_LOSSES}')
  open_clip = import_open_clip()
  sigmoid = tcfg.loss in SIGMOID_LOSSES
  loss_fn = (open_clip.loss.SigLipLoss(rank=0, world_size=1) if sigmoid
             else open_clip.loss.ClipLoss(rank=0, world_size=1))
  optimizer = _optimizer(model, tcfg)
  model.train()

  def step(images, texts):
    optimizer.zero_grad(set_to_none=True)
    out = model(images, texts)
    scalars = (out['logit_scale'],) + ((out['logit_bias'],) if sigmoid else ())
    loss = loss_fn(out['image_features'], out['text_features'], *scalars)
    loss.backward()
    if tcfg.clip_norm is not None:
      torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_norm, norm_type=2.0)
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    return loss.item()
  return step


def bench(name, cfg, tcfg, tokens, repeats, expected_params):
  """Times open_clip's step for our model `name` (`cfg`, `tcfg`) at `tcfg.batch_size`, on random
  images and `tokens` (B, L) int: `{'step_s' (median of `repeats` after a first step),
  'first_step_s', 'images_per_s', 'params_m', 'threads'}`. Raises ValueError when open_clip's
  model has another parameter count than `expected_params` (then it is another architecture)."""
  import torch  # pylint: disable=g-import-not-at-top
  threads = set_threads()
  torch.manual_seed(0)
  model = build_model(name, cfg, tcfg.loss in SIGMOID_LOSSES)
  count = sum(p.numel() for p in model.parameters())
  if count != expected_params:
    raise ValueError(f'open_clip\'s model for {name!r} has {count} parameters, ours '
                     f'{expected_params}: not the same architecture')
  step = make_step(model, tcfg)
  r = cfg.image_resolution
  images = torch.randn(tcfg.batch_size, 3, r, r)
  texts = torch.from_numpy(np.asarray(tokens, np.int64))
  start = time.perf_counter()
  step(images, texts)
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step(images, texts)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  return {'step_s': step_s, 'first_step_s': first, 'images_per_s': tcfg.batch_size / step_s,
          'params_m': count / 1e6, 'threads': threads}
