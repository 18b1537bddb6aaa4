"""ViT-B/32 on DataComp's download (OpenAI's architecture, trained from scratch).

DataComp's download_upstream.py writes img2dataset webdataset shards `<data_dir>/shards/*.tar`
with a parquet (holding the `uid`) beside each; its filtering baselines write a subset `.npy`.

  python -m experiments.train --config vit_b32_datacomp --data '/data/datacomp/shards/*.tar' \
      --keep-uids /data/datacomp/subset.npy --mesh=-1,1,1 --loss contrastive

Arguments (`--config vit_b32_datacomp:key=value,...`): loss, batch, steps.
"""
import dataclasses

import losses
from clip import configs
from clip.train import training
from experiments.configs import Experiment
from experiments.configs import RunConfig
from experiments.configs import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, loss='contrastive', batch=4096, steps=100_000)
  model = dataclasses.replace(configs.MODELS['ViT-B/32'], dtype='bfloat16', remat=True,
                              logit_bias=losses.takes_bias(arg.loss))
  train = training.TrainConfig(batch_size=arg.batch, total_steps=arg.steps,
                               warmup_steps=min(2000, arg.steps // 10), learning_rate=5e-4,
                               weight_decay=0.2, mesh=(-1, 1, 1), loss=arg.loss)
  run = RunConfig(data=None, log_every=50, checkpoint_every=2000, keep_checkpoints=3,
                  eval_examples=0)
  return Experiment(model, train, run)
