"""SigLIP 2 / CoCa style on the built-in synthetic captions: `siglip_small` (sigmoid loss, MAP
head, bidirectional text tower) plus `cappa_small`'s captioning decoder on the same ViT tokens,
the two losses added (total = sigmoid + caption_weight x captioning; CoCa weighs captioning 2,
SigLIP 2's decoder loss 1). Same data, batch, steps and learning rate as `small`.

  python -m experiments.train --config siglip_cappa_small

Arguments (`--config siglip_cappa_small:key=value,...`): loss, batch, steps, caption_weight,
parallel.
"""
import dataclasses

from experiments.configs import cappa_small
from experiments.configs import parse_arg
from experiments.configs import siglip_small


def get_config(arg=None):
  arg = parse_arg(arg, loss='sigmoid', batch=128, steps=1000, caption_weight=1.0, parallel=0.75)
  base = siglip_small.get_config(f'loss={arg.loss},batch={arg.batch},steps={arg.steps}')
  model = dataclasses.replace(base.model, decoder=cappa_small.decoder(base.model.context_length))
  train = dataclasses.replace(base.train, caption_weight=arg.caption_weight,
                              caption_parallel=arg.parallel)
  return dataclasses.replace(base, model=model, train=train)
