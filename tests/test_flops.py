"""clip/flops.py against XLA: the analytic matmul FLOPs equal those of the dot instructions in
the lowered program exactly (forward passes of the towers, and train steps up to the two terms
the 3x convention does not model), and XLA's `cost_analysis` total, which also counts the
elementwise work, is within a few percent above them."""
import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip
from clip import flops
from clip import sharding
from clip.train import objectives
from clip.train import training
from experiments.configs import tiny
from experiments.references import openai as openai_reference

_DEF = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]')
_OP = re.compile(r'\s*(?:ROOT )?%?[\w.\-]+ = \w+\[([\d,]*)\]\S* (dot|convolution)'
                 r'\(%?([\w.\-]+), %?([\w.\-]+)\)')
_CONTRACTING = re.compile(r'lhs_contracting_dims=\{([\d,]*)\}')
_KERNEL_LABELS = re.compile(r'dim_labels=\w+_(\w+)->')


def _ints(text):
  return [int(s) for s in text.split(',') if s]


def dot_flops(hlo):
  """2 x output elements x contracted size, summed over every `dot` and `convolution` (ungrouped:
  the kernel's size over its output features) of an HLO module's text."""
  shapes = {m.group(1): _ints(m.group(2)) for m in map(_DEF.match, hlo.splitlines()) if m}
  total = 0
  for line in hlo.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    assert 'feature_group_count' not in line and 'batch_group_count' not in line, line
    if m.group(2) == 'dot':
      contracting = _CONTRACTING.search(line)
      lhs = shapes[m.group(3)]
      k = np.prod([lhs[i] for i in _ints(contracting.group(1))]) if contracting else 1
    else:
      kernel = shapes[m.group(4)]
      k = np.prod(kernel) // kernel[_KERNEL_LABELS.search(line).group(1).index('o')]
    total += 2 * int(np.prod(_ints(m.group(1)))) * int(k)
  return total


def _inputs(cfg, n):
  r = cfg.image_resolution
  images = np.random.default_rng(0).standard_normal((n, r, r, 3)).astype(np.float32)
  return images, openai_reference.random_tokens(np.random.default_rng(1), n, cfg)


TINY = tiny.get_config().model
_V, _T = TINY.vision, TINY.text
OPTIONS = dataclasses.replace(  # MAP pooling, SwiGLU, registers; bidirectional MAP-pooled text
    TINY, vision=dataclasses.replace(_V, pool='map', mlp='swiglu', registers=2, pool_heads=4,
                                     mlp_dim=96),
    text=dataclasses.replace(_T, pool='map', causal=False, mlp='geglu', eot_token_id=49407))
RESNET = dataclasses.replace(TINY, vision=clip.VisionConfig('resnet', 8, (1, 2, 1, 1), 4, 64))
# A CoCa-like model: the two towers and a captioning decoder with its own head; FLIP's patch
# dropout (the blocks and the decoder see half the patches in training).
CAPTIONER = dataclasses.replace(TINY, vision=dataclasses.replace(_V, patch_dropout=0.5),
                                decoder=clip.DecoderConfig(
    width=48, layers=2, heads=2, context_length=32, tie_embedding=False, eot_token_id=49407))


@pytest.mark.parametrize('cfg', [TINY, OPTIONS, RESNET], ids=['tiny', 'options', 'resnet'])
def test_tower_forward_matmuls_are_counted_exactly(cfg):
  params = jax.eval_shape(lambda: clip.init_params(jax.random.PRNGKey(0), cfg))
  images, tokens = _inputs(cfg, 4)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', clip.ConfigWarning)
    image = jax.jit(lambda p, x: clip.encode_image(p, x, cfg)).lower(params, images)
    text = jax.jit(lambda p, t: clip.encode_text(p, t, cfg)).lower(params, tokens)
  assert dot_flops(image.as_text(dialect='hlo')) == 4 * flops.image_flops(cfg)
  assert dot_flops(text.as_text(dialect='hlo')) == 4 * flops.text_flops(cfg.text, cfg.embed_dim)


def test_xla_cost_analysis_is_the_matmuls_plus_a_few_percent():
  """XLA's total adds norms, activations, softmax and adds: 4% on this 64-wide ViT (3-5% on
  such tiny towers; less on wide ones, where the matmuls grow with the width squared)."""
  params = jax.eval_shape(lambda: clip.init_params(jax.random.PRNGKey(0), TINY))
  images, _ = _inputs(TINY, 4)
  compiled = jax.jit(lambda p, x: clip.encode_image(p, x, TINY)).lower(params, images).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert 1.0 < cost['flops'] / (4 * flops.image_flops(TINY)) < 1.08, cost['flops']


def lowered_gradient(cfg, batch, **train):
  """The train step's value and gradient (`clip.train.objectives.clip_objective`), lowered
  from shapes alone (the optimizer update, the rest of the step, has no matmuls)."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tcfg = training.TrainConfig(batch_size=batch, total_steps=10, warmup_steps=1, mesh=(1, 1, 1),
                              **train)
  objective = objectives.clip_objective(cfg, tcfg, mesh)
  params = jax.eval_shape(lambda: clip.init_params(jax.random.PRNGKey(0), cfg))
  params, batch_stats = clip.split_batch_stats(params)
  images, tokens = _inputs(cfg, batch)
  grad = jax.jit(jax.value_and_grad(objective, has_aux=True))
  return grad.lower(params, batch_stats, {'image': images, 'tokens': tokens},
                    jax.random.PRNGKey(0))


@pytest.mark.parametrize('cfg,train', [(TINY, {}), (CAPTIONER, {'caption_weight': 1.0}),
                                       (OPTIONS, {'loss': 'sigmoid'})],
                         ids=['tiny', 'captioner', 'sigmoid'])
def test_train_step_matmuls_are_three_forwards(cfg, train):
  """The gradient's dots are 3x the forward's but for what the convention does not model: the
  patch embedding has no gradient for its input (the images); the step also scores the in-batch
  accuracy (one more B x B x E matmul), and the all-gather contrastive loss computes the logits
  once per direction (`losses/allgather.py`), twice the one matmul counted."""
  batch = 8
  if train.get('loss') == 'sigmoid':
    cfg = dataclasses.replace(cfg, logit_bias=True)
  hlo = lowered_gradient(cfg, batch, **train).as_text(dialect='hlo')
  v = cfg.vision
  patch_embedding = 2 * v.grid_size ** 2 * 3 * v.patch_size ** 2 * v.width * batch
  logits = 2 * batch * batch * cfg.embed_dim
  twice = 3 * logits if train.get('loss', 'contrastive') == 'contrastive' else 0
  expected = flops.train_step_flops(cfg, batch) - patch_embedding + logits + twice
  assert dot_flops(hlo) == expected


def test_peaks_are_looked_up_by_device_kind_and_never_guessed():
  assert flops.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert flops.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.0
  assert flops.peak_tflops('NVIDIA H100 NVL', 'float16') == 835.0
  assert flops.peak_tflops('TPU v5 lite', 'bfloat16') == 197.0
  assert flops.peak_tflops('TPU v5', 'bfloat16') == 459.0
  with pytest.warns(UserWarning, match='unknown device kind'):
    assert flops.peak_tflops('TPU v4 lite', 'bfloat16') is None  # not a v4
  with pytest.warns(UserWarning, match='unknown device kind'):
    assert flops.peak_tflops('cpu', 'bfloat16') is None
  with pytest.warns(UserWarning, match='float32 peak'):
    assert flops.peak_tflops('NVIDIA A100-SXM4-40GB', 'float32') is None


def test_counting_refuses_what_it_does_not_count():
  with pytest.raises(TypeError, match='CLIPConfig'):
    flops.model_flops_per_example(TINY.vision)
  with pytest.raises(ValueError, match='positive int, got 0'):
    flops.train_step_flops(TINY, 0)
  with pytest.raises(ValueError, match='positive int, got True'):
    flops.train_step_flops(TINY, True)


def test_matmul_probe_measures_a_positive_rate():
  assert 0 < flops.matmul_probe_tflops(size=256, repeats=2) < 100
