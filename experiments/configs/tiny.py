"""A tiny ViT CLIP for tests and smoke runs: trains in seconds on the built-in synthetic captions.

  python -m experiments.train --config tiny --steps 50
  python -m experiments.train --config tiny:loss=sigmoid,batch=64

Arguments (`--config tiny:key=value,...`): loss, batch, steps.
"""
import losses
from clip import configs
from clip.train import training
from experiments.configs import Experiment
from experiments.configs import RunConfig
from experiments.configs import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, loss='contrastive', batch=32, steps=50)
  model = configs.CLIPConfig(
      embed_dim=32,
      vision=configs.VisionConfig('vit', width=64, layers=2, heads=2, image_resolution=32,
                                  patch_size=8),
      text=configs.TextConfig(width=64, layers=2, heads=2, context_length=32),
      logit_bias=losses.takes_bias(arg.loss))
  train = training.TrainConfig(batch_size=arg.batch, total_steps=arg.steps,
                               warmup_steps=max(arg.steps // 10, 1), learning_rate=1e-3,
                               weight_decay=0.1, loss=arg.loss)
  run = RunConfig(data='synthetic', log_every=5, checkpoint_every=25, keep_checkpoints=2,
                  eval_examples=256)
  return Experiment(model, train, run)
