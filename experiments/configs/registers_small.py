"""A small model with the newer block recipe on the built-in synthetic captions: 4 register tokens
in the ViT, RMSNorm and GeGLU MLPs (hidden width 2 x width) in both towers, query-key
normalisation, and rotary positions in the text tower; contrastive loss. Same size, data and
schedule as `small`, so the two compare.

  python -m experiments.train --config registers_small
  python -m experiments.train --config registers_small --optimizer muon

Arguments (`--config registers_small:key=value,...`): loss, batch, steps.
"""
import dataclasses

from clip import configs
from experiments.configs import small

BLOCK = dict(norm='rmsnorm', mlp='geglu', mlp_dim=256, qk_norm=True)


def get_config(arg=None):
  base = small.get_config(arg, default_loss='contrastive')  # the same schedule, data and evaluation
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=16, registers=4, **BLOCK),
      text=configs.TextConfig(width=128, layers=3, heads=2, context_length=32,
                              pos_embedding='rope', **BLOCK),
      logit_bias=base.model.logit_bias)
  return dataclasses.replace(base, model=model)
