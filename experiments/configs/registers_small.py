"""A small model with the newer block recipe on the built-in synthetic captions: 4 register tokens
in the ViT, RMSNorm and GeGLU MLPs (hidden width 2 x width) in both towers, query-key
normalisation, and rotary positions in the text tower; contrastive loss. Same size, data and
schedule as `small`, so the two compare.

  python -m experiments.train --config registers_small
  python -m experiments.train --config registers_small --optimizer muon

Arguments (`--config registers_small:key=value,...`): loss, batch, steps.
"""
import losses
from clip import configs
from clip import training
from experiments.configs import Experiment
from experiments.configs import RunConfig
from experiments.configs import parse_arg

BLOCK = dict(norm='rmsnorm', mlp='geglu', mlp_dim=256, qk_norm=True)


def get_config(arg=None):
  arg = parse_arg(arg, loss='contrastive', batch=128, steps=1000)
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=16, registers=4, **BLOCK),
      text=configs.TextConfig(width=128, layers=3, heads=2, context_length=32,
                              pos_embedding='rope', **BLOCK),
      logit_bias=losses.takes_bias(arg.loss))
  train = training.TrainConfig(batch_size=arg.batch, total_steps=arg.steps,
                               warmup_steps=min(50, arg.steps // 10), learning_rate=1e-3,
                               weight_decay=0.1, loss=arg.loss)
  run = RunConfig(data='synthetic', log_every=25, checkpoint_every=500, keep_checkpoints=2,
                  eval_examples=1024)
  return Experiment(model, train, run)
