"""CapPa on the built-in synthetic captions: `small`'s ViT trained by a captioning decoder alone
(Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too"): no text tower, no
contrastive loss. The decoder (3 blocks, width 128, as `small`'s text tower) cross-attends to
the ViT's patch tokens; 75% of the rows are trained by parallel prediction (every caption token
masked, bidirectional attention), the rest autoregressively, as CapPa. The decoder scores the 55
token ids the set's captions and prompts use (`output_ids`, tied to the embedding), not all
49408: the same softmax a tokenizer of this vocabulary would give, 16x cheaper on this CPU than
the full one. Same data, batch, steps and learning rate as `small`.

  python -m experiments.train --config cappa_small
  python -m experiments.evaluate --model results/train/cappa_small --config cappa_small \\
      --dataset synthetic/colour_shape --task generative_classification

Arguments (`--config cappa_small:key=value,...`): batch, steps, parallel (the fraction of rows
trained by parallel prediction).
"""
import dataclasses

from clip import configs
from clip import tokenizer
from data import synthetic
from experiments.configs import parse_arg
from experiments.configs import small


def decoder(context_length=32):
  """The captioning decoder of both captioning configs: `small`'s text-tower shape."""
  ids = synthetic.caption_token_ids(lambda texts: tokenizer.tokenize(texts, context_length),
                                    tokenizer.EOT)
  return configs.DecoderConfig(width=128, layers=3, heads=2, context_length=context_length,
                               image_projection=False, output_ids=ids)


def get_config(arg=None):
  arg = parse_arg(arg, batch=128, steps=1000, parallel=0.75)
  base = small.get_config(f'batch={arg.batch},steps={arg.steps}')
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=16, pool='gap', projection=False),
      text=None, decoder=decoder())
  train = dataclasses.replace(base.train, loss='none', caption_weight=1.0,
                              caption_parallel=arg.parallel)
  return dataclasses.replace(base, model=model, train=train)
