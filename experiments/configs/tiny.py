"""A tiny ViT CLIP for tests and smoke runs: trains in seconds on the built-in synthetic captions.

  python -m experiments.train --config tiny --steps 50
"""
from clip import configs
from clip import training


def get_config(arg=None):
  del arg
  model = configs.CLIPConfig(
      embed_dim=32,
      vision=configs.VisionConfig('vit', width=64, layers=2, heads=2, image_resolution=32,
                                  patch_size=8),
      text=configs.TextConfig(width=64, layers=2, heads=2, context_length=32))
  train = training.TrainConfig(batch_size=32, total_steps=50, warmup_steps=5, learning_rate=1e-3,
                               weight_decay=0.1)
  return {'model': model, 'train': train, 'data': 'synthetic', 'log_every': 5,
          'checkpoint_every': 25, 'keep_checkpoints': 2, 'eval_examples': 256}
