"""Changing a loaded model's input resolution: the image tower's position grid resized."""
import dataclasses

import jax
import numpy as np


def interpolate_pos_embed(params, cfg, image_resolution):
  """Bicubic resize of the image tower's position grid (class / pooled token kept) to a new
  input resolution -> `(params, cfg)`. Only done on request: a changed model is a new model.
  A fixed sin-cos table has nothing to resize: it is computed for the new grid."""
  vision = dataclasses.replace(cfg.vision, image_resolution=image_resolution)
  new_cfg = dataclasses.replace(cfg, vision=vision)
  if cfg.vision.arch == 'vit' and cfg.vision.pos_embedding == 'sincos2d':
    return params, new_cfg
  table = 'attnpool' if cfg.vision.arch == 'resnet' else None
  holder = params['visual'][table] if table else params['visual']
  pos = np.asarray(holder['positional_embedding'])
  old, new, d = cfg.vision.grid_size, vision.grid_size, pos.shape[-1]
  keep = pos.shape[0] - old * old  # the class / pooled token's row, if any
  grid = pos[keep:].reshape(old, old, d)
  resized = jax.image.resize(grid, (new, new, d), 'bicubic').reshape(new * new, d)
  holder = dict(holder, positional_embedding=np.concatenate([pos[:keep], np.asarray(resized)], 0))
  visual = dict(params['visual'], **({table: holder} if table else holder))
  return dict(params, visual=visual), new_cfg
