"""Weighted mixtures of shard sources for training: `--data 'a/*.tar:0.7,b/*.tfrecord:0.3'`.

Every global batch holds a fixed number of samples from each source: the weights times the batch,
rounded by largest remainder (0.7 / 0.3 of 256 -> 179 / 77), each source a `data.shards.Pipeline`
of its own (its own files, epochs, shuffle and skip counts, logged under its name), the parts
concatenated and shuffled together by a permutation seeded by (seed, step). A stratified mixture,
like CLIP-JAX's per-dataset batch split, rather than tf.data's `sample_from_datasets`: each
batch holds the weights exactly up to rounding, and resuming needs only each source's own
`state()`. Deterministic given the seed; `state()` / `resume=` continue exactly.
"""
import logging

import numpy as np

from data import naflex_transforms
from data import processes
from data import shards

log = logging.getLogger(__name__)


def parse_sources(spec):
  """'a/*.tar:0.7,b/*.tfrecord:0.3' -> [('a/*.tar', 0.7), ('b/*.tfrecord', 0.3)]; a single
  pattern without a weight -> [(pattern, 1.0)]. A ':' followed by a number is the weight, so
  gs:// paths and patterns without weights pass through. Raises ValueError on a mixture entry
  without a weight, or a weight that is not positive."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f'data must be a file pattern or "pattern:weight,...", got {spec!r}')
  sources = []
  for entry in spec.split(','):
    pattern, _, weight = entry.strip().rpartition(':')
    try:
      sources.append((pattern, float(weight)))
    except ValueError:
      sources.append((entry.strip(), None))
  if len(sources) == 1 and sources[0][1] is None:
    return [(sources[0][0], 1.0)]
  unweighted = [p for p, w in sources if w is None]
  if unweighted:
    raise ValueError(f'each source of a mixture needs a weight ("pattern:0.5"), got none for '
                     f'{unweighted} in {spec!r}')
  bad = [(p, w) for p, w in sources if not 0 < w < float('inf')]
  if bad:
    raise ValueError(f'mixture weights must be positive and finite, got {bad}')
  return sources


def batch_counts(weights, batch_size):
  """Samples per batch of each source: `weights` (normalised) times `batch_size`, rounded by
  largest remainder so they add up to `batch_size` exactly (ties: the earlier source)."""
  weights = np.asarray(weights, np.float64) / np.sum(weights)
  exact = weights * batch_size
  counts = np.floor(exact).astype(int)
  order = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
  for k in order[:batch_size - counts.sum()]:
    counts[k] += 1
  return counts.tolist()


class MixtureStats:
  """The sources' `pipeline_stats.Stats` under one face: `num_skipped`, `summary()` (per source)."""

  def __init__(self, mixture):
    self._mixture = mixture

  @property
  def num_skipped(self):
    return sum(p.stats.num_skipped for p in self._mixture.pipelines)

  @property
  def samples(self):
    return sum(p.stats.samples for p in self._mixture.pipelines)

  def summary(self):
    return ' | '.join(f'{p.name}: {p.stats.summary()}' for p in self._mixture.pipelines)


class Mixture:
  """Training batches drawn from several sources with weights; iterate it like a `Pipeline`.

  Args:
    sources: [(files, weight), ...] (`files` as `shards.Pipeline` takes them), or the
      `--data` string `parse_sources` reads.
    global_batch_size: over all processes; each process yields its share, each source
      contributing `batch_counts(weights, per-process batch)` samples of it.
    tokenize, preprocess: the model's tokenizer and `clip.PreprocessConfig`, as
      `shards.Pipeline` takes them (required: every source is read as the model reads).
    seed: each source's pipeline gets its own seed from it; the in-batch shuffle uses it too.
    resume: a `state()` dict to continue from exactly.
    naflex: a `data.naflex_batching.NaFlexBatching` (then no global_batch_size): NaFlex batches,
      each step's images (this process's share of `naflex.batch_size_for(S)`) split by
      `batch_counts` among the sources, every source at the step's length S.
    **pipeline_kwargs: passed to every source's `shards.Pipeline` (resolution, fields,
      `resampled` for sources whose file count the process count does not divide, ...);
      `train` must be True (a mixture has no single epoch to evaluate on); with `num_epochs`,
      the mixture ends when its first source does.

  Raises:
    ValueError: a weight too small to give its source one sample per batch, or train=False.
  """

  def __init__(self, sources, *, global_batch_size=None, tokenize, preprocess, seed=0,
               process_index=None, process_count=None, resume=None, naflex=None,
               **pipeline_kwargs):
    if isinstance(sources, str):
      sources = parse_sources(sources)
    if not pipeline_kwargs.get('train', True):
      raise ValueError('a mixture is for training (train=True); evaluate each source on its own')
    pipeline_kwargs['train'] = True
    process_index, process_count = processes.process_share(process_index, process_count)
    plan = naflex_transforms.plan_for(naflex, process_count, global_batch_size,
                                      pipeline_kwargs.get('resolution'), 'float32')
    self.seed = seed
    weights = [w for _, w in sources]
    sizes = plan.sizes_K.tolist() if plan else [processes.local_batch_size(global_batch_size,
                                                                           process_count)]
    self.batch_size = None if plan else sizes[0]
    counts_KxN = [batch_counts(weights, size) for size in sizes]  # per length, per source
    self.counts = None if plan else counts_KxN[0]
    empty = [files for (files, _), *n in zip(sources, *counts_KxN) if min(n) == 0]
    if empty:
      raise ValueError(f'sources {empty} get no sample in a per-process batch of '
                       f'{min(sizes)} with weights {weights}: raise their weight or the batch')
    parts = [dict(naflex=naflex_transforms.StepPlan(naflex, dict(zip(plan.seq_lengths, n))))
             if plan else dict(global_batch_size=n[0] * process_count) for n in zip(*counts_KxN)]
    if resume is not None and len(resume.get('sources', ())) != len(sources):
      raise ValueError(f'resume state holds {len(resume.get("sources", ()))} sources, the '
                       f'mixture has {len(sources)}')
    self.pipelines = [
        shards.Pipeline(files, seed=seed + 10_007 * k, process_index=process_index,
                        process_count=process_count, **part,
                        resume=resume['sources'][k] if resume else None, name=str(files),
                        tokenize=tokenize, preprocess=preprocess, **pipeline_kwargs)
        for k, ((files, _), part) in enumerate(zip(sources, parts))]
    self._step = resume['step'] if resume else 0
    self.stats = MixtureStats(self)
    log.info('mixture, per batch of %s: %s', '/'.join(map(str, sizes)), ', '.join(
        f'{p.name} {"/".join(map(str, n))} (weight {w / sum(weights):.3f})'
        for p, *n, w in zip(self.pipelines, *counts_KxN, weights)))

  def state(self):
    """{'step', 'sources': [each source's `state()`]}; JSON-serialisable."""
    return {'step': self._step, 'sources': [p.state() for p in self.pipelines]}

  def __iter__(self):
    iterators = [iter(p) for p in self.pipelines]
    while True:
      try:
        parts = [next(it) for it in iterators]
      except StopIteration:  # a source with `num_epochs` ended
        return
      size = sum(len(part['tokens']) for part in parts)
      order = np.random.default_rng([self.seed, self._step]).permutation(size)
      self._step += 1
      yield {key: np.concatenate([part[key] for part in parts])[order] for key in parts[0]}


def make_pipeline(data, *, tokenize, preprocess, **kwargs):
  """A `shards.Pipeline` for one source, a `Mixture` for a weighted list ('a:0.7,b:0.3'), read
  with the model's tokenizer and `clip.PreprocessConfig` (as `shards.Pipeline` takes them)."""
  sources = parse_sources(data) if isinstance(data, str) else None
  if sources is not None and len(sources) > 1:
    return Mixture(sources, tokenize=tokenize, preprocess=preprocess, **kwargs)
  return shards.Pipeline(sources[0][0] if sources else data, tokenize=tokenize,
                         preprocess=preprocess, **kwargs)
