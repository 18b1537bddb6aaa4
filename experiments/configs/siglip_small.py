"""A SigLIP-style small model on the built-in synthetic captions: MAP-head pooling, fixed 2-D
sin-cos positions, exact-GELU MLPs, a bidirectional text tower, the sigmoid loss with its learnable
bias (init -10, scale ln 10), blocks held stacked and run by `lax.scan`. Same size, data and
schedule as `small`, so the two compare.

  python -m experiments.train --config siglip_small
  python -m experiments.train --config siglip_small --loss ring_sigmoid --mesh=2,2,2

Arguments (`--config siglip_small:key=value,...`): loss, batch, steps.
"""
import dataclasses

from clip import configs
from experiments.configs import small


def get_config(arg=None):
  base = small.get_config(arg, default_loss='sigmoid')  # the same schedule, data and evaluation
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=16, pool='map', pos_embedding='sincos2d', mlp='gelu'),
      text=configs.TextConfig(width=128, layers=3, heads=2, context_length=32, causal=False,
                              mlp='gelu'),
      logit_bias=base.model.logit_bias, scan=True)
  return dataclasses.replace(base, model=model)
