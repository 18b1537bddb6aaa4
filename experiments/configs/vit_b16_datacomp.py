"""ViT-B/16 on DataComp's download (img2dataset webdataset shards), FSDP over all devices
(ZeRO-3 style).

  python -m experiments.train --config vit_b16_datacomp --data '/data/datacomp/shards/*.tar' \
      --keep-uids /data/datacomp/subset.npy --mesh=1,-1,1 --loss contrastive
"""
import dataclasses

from clip import configs
from clip import training


def get_config(arg=None):
  del arg
  model = dataclasses.replace(configs.MODELS['ViT-B/16'], dtype='bfloat16', remat=True)
  train = training.TrainConfig(batch_size=4096, total_steps=100_000, warmup_steps=2000,
                               learning_rate=5e-4, weight_decay=0.2, mesh=(1, -1, 1))
  return {'model': model, 'train': train, 'data': None, 'log_every': 50,
          'checkpoint_every': 2000, 'keep_checkpoints': 3, 'eval_examples': 0}
