"""The main job's default: a small ViT CLIP on the built-in synthetic captions, about 10 minutes on
a 2-core CPU, ending with zero-shot accuracy and retrieval recall on held-out combinations.

  python -m experiments.train                       # this config
  python -m experiments.train --config small --loss ring_sigmoid

Arguments (`--config small:key=value,...`): loss, batch, steps (optimizer updates), accum and
accumulation: `accum=8` with `accumulation=grad_cache` (the default) runs each update's `batch`
as 8 micro-batches in two passes, every negative kept (`small:batch=1024,accum=8` trains at a
global batch of 1024 in the memory of 128); with `accumulation=multisteps` each of 8 calls sees
its own `batch` (`optax.MultiSteps`), so the run makes `steps x 8` calls.
"""
import losses
from clip import configs
from clip.train import training
from experiments.configs import Experiment
from experiments.configs import RunConfig
from experiments.configs import parse_arg


def get_config(arg=None, default_loss='contrastive'):
  """`default_loss` lets the variants (siglip_small, registers_small) share this schedule."""
  arg = parse_arg(arg, loss=default_loss, batch=128, steps=1000, accum=1,
                  accumulation='grad_cache')
  calls = arg.accum if arg.accumulation == 'multisteps' else 1  # step calls per update
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=16),
      text=configs.TextConfig(width=128, layers=3, heads=2, context_length=32),
      logit_bias=losses.takes_bias(arg.loss))
  train = training.TrainConfig(batch_size=arg.batch, total_steps=arg.steps * calls,
                               warmup_steps=min(50, arg.steps // 10) * calls, learning_rate=1e-3,
                               weight_decay=0.1, loss=arg.loss, accumulation_steps=arg.accum,
                               accumulation=arg.accumulation)
  run = RunConfig(data='synthetic', log_every=25, checkpoint_every=500, keep_checkpoints=2,
                  eval_examples=1024)
  return Experiment(model, train, run)
