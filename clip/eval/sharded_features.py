"""Features of an evaluation set embedded on every device of the training mesh, every process
feeding only its own share, every process getting all of them back in one order.

  encoder = ShardedEncoder(cfg, mesh, batch_size=256)
  share = encoder.share(images_u8_NxRxRx3, tags_NxK)      # this process's rows (collective)
  features_MxD, tags_MxK = encoder.images(params, share)   # all processes' rows, sorted by tag

Each process holds its rows (uint8 images as the model's eval transform left them, or int32
tokens) and, per row, int32 tags whose first two columns name its place in the whole set (e.g.
(shard file, record) or (0, example index)) and whose other columns ride along (labels). Every
step each process puts its next `batch_size / process_count` rows into a global batch split over
the mesh's batch axes (`training.global_batch`); one jitted program normalises the images (the
model's mean and std, `clip.processing.normalize`) and runs the tower on all devices, and its
outputs, features and tags, come back replicated (`out_shardings` replicated), so that every
process computes the same metrics from the same arrays. The processes run the same number of
steps (the largest share's, agreed once by `share`); a process with fewer rows, and the last
batch of each, is padded with rows tagged -1, dropped before the metrics, and the rows that come
back are counted against the rows put in (RuntimeError otherwise). The features are sorted by
their tags, so metrics that depend on the order (retrieval's tie rule: the lower index first)
are the same for any process count, device count or batch size.
"""
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from clip import model
from clip import processing
from clip import sharding
from clip.train import training

PAD = -1  # the first tag of a padding row


class Share(typing.NamedTuple):
  """This process's rows of an evaluation set and how the processes run through them."""
  inputs: np.ndarray   # uint8 (n, R, R, 3) images or int32 (n, L) tokens: this process's rows
  tags: np.ndarray     # int32 (n, K), K >= 2: columns 0 and 1 place a row in the whole set
  steps: int           # global batches every process runs (its largest share's)
  total: int           # rows over all processes


class ShardedEncoder:
  """The two towers of `cfg` on `mesh`, fed `batch_size` rows a step over all processes.

  Raises ValueError unless `batch_size` is a positive multiple of the process count and of the
  mesh's batch shards (`data * fsdp`), or when `cfg` has no text tower."""

  def __init__(self, cfg, mesh, batch_size):
    ways = mesh.shape['data'] * mesh.shape['fsdp']
    count = jax.process_count()
    if (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        or batch_size % ways or batch_size % count):
      raise ValueError(f'the evaluation batch size must be a positive multiple of the mesh\'s '
                       f'{ways} batch shards (data x fsdp of {dict(mesh.shape)}) and of the '
                       f'{count} process(es), got {batch_size!r}')
    if cfg.text is None:
      raise ValueError('evaluators compare images with texts: this model has no text tower')
    self.cfg, self.mesh = cfg, mesh
    self.local_batch = batch_size // count
    self._image_fn = _embed_fn(cfg, mesh, 'image')
    self._text_fn = _embed_fn(cfg, mesh, 'text')

  def share(self, inputs, tags):
    """This process's `inputs` (uint8 images (n, R, R, 3) at the model's resolution, or int32
    tokens (n, L)) with their int32 tags (n, K), as a `Share`. Every process must call it, in the
    same order (it agrees on the step count with the others); n may be 0 on some processes, not
    on all. ValueError for mismatched shapes, negative place tags or an empty set."""
    inputs, tags = np.asarray(inputs), np.asarray(tags, np.int32)
    if tags.ndim != 2 or tags.shape[1] < 2 or tags.shape[0] != inputs.shape[0]:
      raise ValueError(f'tags must be int (n, K >= 2) for n = {inputs.shape[0]} rows, got '
                       f'{tags.shape}')
    if tags.size and tags[:, :2].min() < 0:
      raise ValueError(f'place tags (columns 0, 1) must be >= 0, got {tags[:, :2].min()}')
    counts = multihost_utils.process_allgather(np.int32(len(inputs))).reshape(-1)
    if not counts.sum():
      raise ValueError('the evaluation set holds no row in any process')
    return Share(inputs, tags, int(-(-counts.max() // self.local_batch)), int(counts.sum()))

  def images(self, params, share):
    """(float32 image features (total, embed_dim), tags (total, K)) of every process's rows, in
    the order of their tags."""
    return self._run(self._image_fn, params, share, 'image')

  def texts(self, params, share):
    """(float32 text features (total, embed_dim), tags (total, K)), as `images`."""
    return self._run(self._text_fn, params, share, 'tokens')

  def _run(self, fn, params, share, key):
    outs = [fn(params, training.global_batch(self.mesh, batch))
            for batch in _local_batches(share, self.local_batch, key)]
    features = np.concatenate([np.asarray(o['features']) for o in outs])
    tags = np.concatenate([np.asarray(o['tags']) for o in outs])
    real = tags[:, 0] != PAD
    if int(real.sum()) != share.total:
      raise RuntimeError(f'{share.total} rows went in and {int(real.sum())} came back')
    features, tags = features[real], tags[real]
    order = np.lexsort(tags.T[::-1])
    return features[order], tags[order]


def _local_batches(share, size, key):
  """`share.steps` batches of `size` rows {key: inputs, 'tags': tags}, padded with tag -1."""
  for step in range(share.steps):
    inputs = share.inputs[step * size:(step + 1) * size]
    tags = share.tags[step * size:(step + 1) * size]
    pad = size - len(inputs)
    if pad:
      inputs = np.concatenate([inputs, np.zeros((pad, *share.inputs.shape[1:]),
                                                share.inputs.dtype)])
      tags = np.concatenate([tags, np.full((pad, share.tags.shape[1]), PAD, np.int32)])
    yield {key: inputs, 'tags': tags}


@functools.lru_cache(maxsize=None)
def _embed_fn(cfg, mesh, tower):
  """The jitted `(params, {'image' | 'tokens', 'tags'}) -> {'features', 'tags'}`, replicated."""
  def embed(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see sharding.constrain_batch
      if tower == 'image':
        images = processing.normalize(batch['image'].astype(jnp.float32) / 255, cfg)
        features = model.encode_image(params, images, cfg)
      else:
        features = model.encode_text(params, batch['tokens'], cfg)
    return {'features': features.astype(jnp.float32), 'tags': batch['tags']}
  return jax.jit(embed, out_shardings=sharding.replicated(mesh))
