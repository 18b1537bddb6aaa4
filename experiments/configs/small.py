"""The main job's default: a small ViT CLIP on the built-in synthetic captions, about 10 minutes on
a 2-core CPU, ending with zero-shot accuracy and retrieval recall on held-out combinations.

  python -m experiments.train                       # this config
  python -m experiments.train --config small --loss ring_sigmoid
"""
from clip import configs
from clip import training


def get_config(arg=None):
  del arg
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=16),
      text=configs.TextConfig(width=128, layers=3, heads=2, context_length=32))
  train = training.TrainConfig(batch_size=128, total_steps=1000, warmup_steps=50,
                               learning_rate=1e-3, weight_decay=0.1)
  return {'model': model, 'train': train, 'data': 'synthetic', 'log_every': 25,
          'checkpoint_every': 500, 'keep_checkpoints': 2, 'eval_examples': 1024}
