"""Model FLOPs of a CLIP config, counted from its shapes, and the peak FLOP/s that MFU divides by.

Model FLOPs utilisation (MFU) is the FLOPs the model needs per second over the device's peak
(Chowdhery et al. 2022, "PaLM", appendix B): the count is the architecture's, whatever the
implementation runs, so rematerialisation's recomputed forward is not in it (that would be the
"hardware FLOPs"). The counts here are the matrix multiplications only, 2 FLOPs per
multiply-accumulate, as PaLM and Kaplan et al. 2020 ("Scaling Laws for Neural Language Models",
section 2.1) count them; norms, biases, activations, softmax, residual adds, embedding gathers,
pooling means and the optimizer update are left out (each is O(tokens x width) against the
matmuls' O(tokens x width^2)). Biases and norms are ignored for that reason.

Checked against XLA (tests/test_flops.py): the forward counts equal the FLOPs of the `dot` and
`convolution` instructions of the lowered program exactly (ViT with and without MAP / SwiGLU /
registers, ModifiedResNet, text towers, decoder); XLA's `cost_analysis` total, which adds the
elementwise work, is 3-5% above them on 64-wide towers (less on wide ones). A lowered training
gradient holds exactly 3x the forward's matmuls but for what the convention leaves out: no
gradient for the images (one patch-embedding matmul fewer), and the step's extra B x B x E
matmuls (the in-batch accuracy metric; the all-gather contrastive loss, like open_clip's
`ClipLoss`, computes the logits once per direction). In a train step XLA's total also holds
AdamW (about a dozen FLOPs per parameter).

Per example, with T tokens of width D, MLP hidden width F (g = 2 input matrices for GeGLU and
SwiGLU, else 1), K keys per query and E = embed_dim:

  block:      qkv 6TD^2, QK^T 2TKD, AV 2TKD, out 2TD^2, MLP 2TDF(g + 1)   (self-attention: K=T)
  patch embed 2 P (3 p^2) D over all P = grid^2 patches (patch dropout drops after it)
  ViT tokens  T = class token + registers + patches (training: `kept_patches` with dropout)
  NaFlex ViT  at sequence length S (`num_patches`, `clip.vit_naflex`): the patch embedding over
              all S slots and T = prefix + S (padding is computed; training with dropout:
              `vit_naflex.kept_patches(v, S)` slots), plus a learned table's resize to each
              grid, 2 S G^2 D (G = grid_size); its backward has one matmul, not two (no gradient
              for the interpolation weights)
  MAP pool    one query over the pooled tokens T': 2D^2 (q) + 4T'D^2 (k, v) + 4T'D + 2D^2 (out)
              + 2DF(g + 1)
  projection  2DE (each tower)
  text        L = context_length; OpenAI's causal end-of-text pooling runs the last block at the
              pooled position only (`clip.text.apply`): its keys and values over L rows (4LD^2),
              one query row (2D^2 + 4LD + 2D^2 + 2DF(g + 1)); other pools run every block fully
  ResNet      every convolution 2 HoWo k^2 Cin Cout (stem, bottlenecks, downsamples) and the
              attention pool: one query, keys and values over (R/32)^2 + 1 tokens
  decoder     L - 1 teacher-forced positions: self-attention blocks plus a cross-attention to
              the T image tokens (queries 2LD^2, keys/values 4TD^2, QK^T and AV 4LTD), the image
              projection 2TWD and the scores 2LDS (S = `num_outputs`)
  loss        the image-text logits of the global batch B: 2BE per example (their cross-batch
              matmul, B x B x E, shared out over the B examples)

Causal attention is counted in full (T x T), as PaLM's 12LHQT term and as XLA computes it.
A training step (`train_step_flops`) is 3x the forward: the backward pass costs two matmuls per
forward matmul (the gradients of its two operands), Kaplan et al. 2020 section 2.1 and PaLM
appendix B ("6N" per token).
"""
import time
import warnings

import numpy as np

from clip import configs
from clip import vit_naflex

# Dense (no sparsity) peak TFLOP/s of the matrix units in bf16 (= fp16 on these chips), by
# `jax.devices()[0].device_kind`: TPU kinds exactly (JAX's names, in its `tpu_info.py`: v5e is
# 'TPU v5 lite', v5p 'TPU v5', v6e 'TPU v6 lite'; 'TPU v4 lite' is another chip), NVIDIA
# kinds by their start (they go on with the memory and form factor, e.g. 'NVIDIA A100-SXM4-40GB',
# 'NVIDIA H100 80GB HBM3'), the longest match first. Sources: NVIDIA's A100 datasheet (312
# "BFLOAT16 Tensor Core"), H100 datasheet (SXM 989, PCIe 756, NVL 835: its sparse figures
# halved), H200 datasheet (989, NVL 835); Google Cloud's TPU system-architecture pages per
# chip: v4 275, v5e 197, v5p 459, v6e 918.
PEAK_BF16_TFLOPS = {
    'TPU v4': 275.0,
    'TPU v5 lite': 197.0,
    'TPU v5e': 197.0,
    'TPU v5': 459.0,
    'TPU v5p': 459.0,
    'TPU v6 lite': 918.0,
    'TPU v6e': 918.0,
    'NVIDIA A100': 312.0,
    'NVIDIA H100': 989.0,  # SXM; PCIe and NVL match first, by their longer names
    'NVIDIA H100 PCIe': 756.0,
    'NVIDIA H100 NVL': 835.0,
    'NVIDIA H200': 989.0,
    'NVIDIA H200 NVL': 835.0,
}
HALF_DTYPES = ('bfloat16', 'float16')


def peak_tflops(device_kind, dtype):
  """The dense peak TFLOP/s of one `device_kind` chip for matmuls in `dtype` (`PEAK_BF16_TFLOPS`:
  a TPU's kind exactly, an NVIDIA kind by its longest known start), or None with a warning naming
  why: an unknown device, or float32, whose accelerator peak depends on how JAX
  runs fp32 matmuls (TF32 / bf16 passes under `jax_default_matmul_precision`), so it is not
  guessed (pass the peak explicitly). A CPU has no table entry: measure it
  (`matmul_probe_tflops`)."""
  if dtype not in HALF_DTYPES:
    warnings.warn(f'no {dtype} peak is looked up for {device_kind!r}: its fp32 matmuls run as '
                  'TF32, bf16 passes or fp32 by JAX\'s matmul precision; give the peak '
                  'explicitly', stacklevel=2)
    return None
  if device_kind in PEAK_BF16_TFLOPS:
    return PEAK_BF16_TFLOPS[device_kind]
  for prefix in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
    if prefix.startswith('NVIDIA') and device_kind.startswith(prefix):
      return PEAK_BF16_TFLOPS[prefix]
  warnings.warn(f'unknown device kind {device_kind!r}: no peak TFLOP/s known (known: '
                f'{sorted(PEAK_BF16_TFLOPS)}); give the peak explicitly', stacklevel=2)
  return None


def matmul_probe_tflops(size=2048, repeats=5, dtype='float32', device=None):
  """The best TFLOP/s of `repeats` jitted `size` x `size` matmuls in `dtype` on `device` (the
  first by default), after a warm-up: the peak a CPU reaches in practice (XLA's CPU dot runs on
  every core of the process's thread pool)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype),
                     device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12


def _mlp(tokens, d, f, kind):
  return 2 * tokens * d * f * (3 if kind in ('geglu', 'swiglu') else 2)


def _attention(queries, keys, d):
  """Projections (q over `queries` rows, k and v over `keys` rows, out) and QK^T, AV."""
  return 2 * queries * d * d * 2 + 4 * keys * d * d + 4 * queries * keys * d


def block_flops(t, tokens, queries=None):
  """One transformer block of tower config `t` (a ViT / text / decoder config) over `tokens`
  tokens, of which `queries` (all by default) are computed (`causal_block_at`)."""
  queries = tokens if queries is None else queries
  return _attention(queries, tokens, t.width) + _mlp(queries, t.width, t.hidden_dim, t.mlp)


def _map_pool(t, tokens):
  return _attention(1, tokens, t.width) + _mlp(1, t.width, t.hidden_dim, t.mlp)


def vit_tokens(v, training=False, num_patches=None):
  """Tokens through a ViT's blocks: class token + registers + patches (kept ones in training);
  `num_patches` S: NaFlex's patch slots per image, padding included (`clip.vit_naflex`, which
  keeps `kept_patches(v, S)` slots under patch dropout)."""
  if num_patches is None:
    patches = v.kept_patches if training else v.grid_size ** 2
  else:
    patches = vit_naflex.kept_patches(v, num_patches) if training else num_patches
  return int(v.has_class_token) + v.registers + patches


def vit_flops(v, embed_dim, training=False, head=True, num_patches=None):
  """Forward FLOPs per image of ViT config `v` (with patch dropout when `training`); without
  the `head` (pooling, projection) for a captioner's tokens. `num_patches` S counts the NaFlex
  tower (`clip.vit_naflex`) at sequence length S: every slot computed, padding included, and a
  learned position table's resize to each grid (one matmul, 2 S G^2 D)."""
  tokens = vit_tokens(v, training, num_patches)
  patches = v.grid_size ** 2 if num_patches is None else num_patches
  flops = 2 * patches * 3 * v.patch_size ** 2 * v.width  # patch embedding
  if num_patches is not None and v.pos_embedding == 'learned':
    flops += 2 * num_patches * v.grid_size ** 2 * v.width  # positions resized per grid
  flops += v.layers * block_flops(v, tokens)
  if not head:
    return flops
  if v.pool == 'map':
    flops += _map_pool(v, tokens if v.pool_registers else tokens - v.registers)
  return flops + (2 * v.width * embed_dim if v.projection else 0)


def resnet_flops(v, embed_dim):
  """Forward FLOPs per image of a ModifiedResNet config (`clip/resnet.py`)."""
  w, side = v.width, v.image_resolution // 2
  conv = lambda s, k, c_in, c_out: 2 * s * s * k * k * c_in * c_out
  flops = conv(side, 3, 3, w // 2) + conv(side, 3, w // 2, w // 2) + conv(side, 3, w // 2, w)
  side //= 2  # the stem's average pool
  inplanes = w
  for i, blocks in enumerate(v.layers):
    planes = w * 2 ** i
    for b in range(blocks):
      stride = 2 if i and not b else 1
      out = side // stride
      flops += conv(side, 1, inplanes, planes) + conv(side, 3, planes, planes)
      flops += conv(out, 1, planes, planes * 4)
      if stride > 1 or inplanes != planes * 4:
        flops += conv(out, 1, inplanes, planes * 4)
      inplanes, side = planes * 4, out
  d, tokens = v.feature_width, side * side + 1
  return flops + 2 * d * d + 4 * tokens * d * d + 4 * tokens * d + 2 * d * embed_dim


def text_flops(t, embed_dim):
  """Forward FLOPs per caption of text config `t` over its full context."""
  length = t.context_length
  if t.pool == 'eot' and t.causal:  # the last block at the pooled position only
    flops = (t.layers - 1) * block_flops(t, length) + block_flops(t, length, queries=1)
  else:
    flops = t.layers * block_flops(t, length)
    if t.pool == 'map':
      flops += _map_pool(t, length)
  return flops + (2 * t.width * embed_dim if t.projection else 0)


def decoder_flops(d, image_tokens, image_width):
  """Forward FLOPs per caption of captioning decoder config `d` over `image_tokens` tokens of
  width `image_width`, teacher-forced on `context_length - 1` positions (`clip/train`)."""
  length = d.context_length - 1
  flops = 2 * image_tokens * image_width * d.width if d.image_projection else 0
  cross = _attention(length, image_tokens, d.width)
  flops += d.layers * (block_flops(d, length) + cross)
  return flops + 2 * length * d.width * d.num_outputs


def image_flops(cfg, training=False, num_patches=None):
  """Forward FLOPs per image of `cfg`'s image tower (NaFlex's at `num_patches` S: `vit_flops`)."""
  v = cfg.vision
  if v.arch == 'resnet':
    if num_patches is not None:
      raise ValueError(f'num_patches={num_patches} counts a NaFlex ViT; this tower is a ResNet')
    return resnet_flops(v, cfg.embed_dim)
  # A captioner (no text tower) reads the tokens only: no pooling, no projection.
  return vit_flops(v, cfg.embed_dim, training, head=cfg.text is not None,
                   num_patches=num_patches)


def model_flops_per_example(cfg, batch_size=None, training=True, num_patches=None):
  """Forward FLOPs per image-caption pair of CLIPConfig `cfg`: image tower, text tower, the
  captioning decoder when there is one, and, given the global `batch_size`, the image-text
  logits of the contrastive or sigmoid loss (2 x batch_size x embed_dim). `training` counts the
  patches a ViT keeps under `patch_dropout`; `num_patches` S the NaFlex image tower at sequence
  length S (`vit_flops`). Raises TypeError for anything but a CLIPConfig (e.g.
  `clip.coca.CoCaConfig`, not counted here); ValueError for `num_patches` with a ResNet."""
  if not isinstance(cfg, configs.CLIPConfig):
    raise TypeError(f'model_flops_per_example takes a clip.CLIPConfig, got {type(cfg).__name__}')
  flops = image_flops(cfg, training, num_patches)
  if cfg.text is not None:
    flops += text_flops(cfg.text, cfg.embed_dim)
    if batch_size:
      flops += 2 * batch_size * cfg.embed_dim
  if cfg.decoder is not None:
    v = cfg.vision
    flops += decoder_flops(cfg.decoder, vit_tokens(v, training, num_patches) - v.registers,
                           v.width)
  return flops


def train_step_flops(cfg, batch_size, num_patches=None):
  """Model FLOPs of one training step at global batch `batch_size` (an int, in FLOPs): 3 x the
  forward (PaLM appendix B; no rematerialisation recompute, no optimizer update); a NaFlex step
  at sequence length `num_patches` S (`vit_flops`). Raises ValueError for a batch size or S that
  is not a positive int (a bool is not one)."""
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size < 1):
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
  if num_patches is not None and (isinstance(num_patches, bool) or not isinstance(
      num_patches, (int, np.integer)) or num_patches < 1):
    raise ValueError(f'num_patches must be a positive int or None, got {num_patches!r}')
  return 3 * batch_size * model_flops_per_example(cfg, batch_size, training=True,
                                                  num_patches=num_patches)
