"""A small model with the newer block recipe on the built-in synthetic captions: 4 register tokens
in the ViT, RMSNorm and GeGLU MLPs (hidden width 2 x width) in both towers, query-key
normalisation, and rotary positions in the text tower; contrastive loss. Same size, data and
schedule as `small`, so the two compare.

  python -m experiments.train --config registers_small
  python -m experiments.train --config registers_small --optimizer muon
"""
from clip import configs
from clip import training

BLOCK = dict(norm='rmsnorm', mlp='geglu', mlp_dim=256, qk_norm=True)


def get_config(arg=None):
  del arg
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=16, registers=4, **BLOCK),
      text=configs.TextConfig(width=128, layers=3, heads=2, context_length=32,
                              pos_embedding='rope', **BLOCK))
  train = training.TrainConfig(batch_size=128, total_steps=1000, warmup_steps=50,
                               learning_rate=1e-3, weight_decay=0.1)
  return {'model': model, 'train': train, 'data': 'synthetic', 'log_every': 25,
          'checkpoint_every': 500, 'keep_checkpoints': 2, 'eval_examples': 1024}
