"""A SigLIP-style small model on the built-in synthetic captions: MAP-head pooling, fixed 2-D
sin-cos positions, exact-GELU MLPs, a bidirectional text tower, the sigmoid loss with its learnable
bias (init -10, scale ln 10), blocks held stacked and run by `lax.scan`. Same size, data and
schedule as `small`, so the two compare.

  python -m experiments.train --config siglip_small
  python -m experiments.train --config siglip_small --loss ring_sigmoid --mesh=2,2,2

Arguments (`--config siglip_small:key=value,...`): loss, batch, steps.
"""
import losses
from clip import configs
from clip import training
from experiments.configs import Experiment
from experiments.configs import RunConfig
from experiments.configs import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, loss='sigmoid', batch=128, steps=1000)
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=16, pool='map', pos_embedding='sincos2d', mlp='gelu'),
      text=configs.TextConfig(width=128, layers=3, heads=2, context_length=32, causal=False,
                              mlp='gelu'),
      logit_bias=losses.takes_bias(arg.loss), scan=True)
  train = training.TrainConfig(batch_size=arg.batch, total_steps=arg.steps,
                               warmup_steps=min(50, arg.steps // 10), learning_rate=1e-3,
                               weight_decay=0.1, loss=arg.loss)
  run = RunConfig(data='synthetic', log_every=25, checkpoint_every=500, keep_checkpoints=2,
                  eval_examples=1024)
  return Experiment(model, train, run)
