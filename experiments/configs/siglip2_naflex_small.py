"""SigLIP 2's NaFlex variant, small, on the built-in layout captions (`data.synthetic_layout`:
scenes of several aspect ratios whose captions say where things are): each image keeps its aspect
ratio as a variable grid of 8 px patches, padded to a sequence length drawn per step from
`seq_lengths` (`data.naflex_batching`; one compile per length), learned positions resized to each
image's grid, the MAP head and the sigmoid loss, as SigLIP 2 (Tschannen et al. 2025).

  python -m experiments.train --config siglip2_naflex_small
  python -m experiments.train --config siglip2_naflex_small:budget=4096     # token budget
  python -m experiments.train --config siglip2_naflex_small:naflex=False    # the same model at
                                                                            # fixed resolution

Arguments (`--config siglip2_naflex_small:key=value,...`): batch (images per step, fixed
batching), budget (patches per step: token-budget batching instead), steps, lengths (e.g.
'32/64/96'), naflex (False: squash every image to 64 x 64, the baseline), loss.
"""
from clip import configs
from clip.train import training
from experiments.configs import Experiment
from experiments.configs import RunConfig
from experiments.configs import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, loss='sigmoid', batch=64, budget=0, steps=600, lengths='32/64/96',
                  naflex=True)
  lengths = tuple(int(s) for s in arg.lengths.split('/')) if arg.naflex else ()
  model = configs.CLIPConfig(
      embed_dim=128,
      vision=configs.VisionConfig('vit', width=128, layers=4, heads=2, image_resolution=64,
                                  patch_size=8, pool='map', mlp='gelu'),
      text=configs.TextConfig(width=128, layers=3, heads=2, context_length=32, causal=False,
                              mlp='gelu'),
      logit_bias=True, scan=True,
      # SigLIP 2's: pixels in [-1, 1], bilinear; squash for the fixed-resolution baseline.
      preprocess=configs.PreprocessConfig(mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode='squash',
                                          interpolation='bilinear', max_num_patches=64))
  train = training.TrainConfig(
      batch_size=arg.batch, total_steps=arg.steps, warmup_steps=min(50, arg.steps // 10),
      learning_rate=1e-3, weight_decay=0.1, loss=arg.loss, naflex_seq_lengths=lengths,
      naflex_tokens_per_batch=arg.budget or None)
  run = RunConfig(data='synthetic_layout', log_every=25, checkpoint_every=500,
                  keep_checkpoints=2, eval_examples=1024)
  return Experiment(model, train, run)
