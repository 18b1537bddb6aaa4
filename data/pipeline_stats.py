"""What a shard pipeline yielded and skipped: samples, batches and files read, every record not
used counted by its reason with its first keys, truncated files, resampled draws. tf.data's
threads update it (under its lock); `summary()` is the line each epoch logs."""
import dataclasses
import threading

MAX_EXAMPLES = 10  # keys kept per skip reason, for the summary


@dataclasses.dataclass
class Stats:
  """What the pipeline yielded and skipped. tf.data's threads update it (under the lock)."""
  samples: int = 0
  batches: int = 0
  files_read: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)   # reason -> count
  examples: dict = dataclasses.field(default_factory=dict)  # reason -> first keys / paths
  truncated_files: list = dataclasses.field(default_factory=list)
  drawn: dict = dataclasses.field(default_factory=dict)     # resampled: file -> times drawn
  filtered: int = 0            # records the `keep` filter left out (not errors)
  remainder_dropped: int = 0   # samples of an incomplete last batch in training
  full_captions: int = 0       # captions that filled the context (truncated, or exactly full)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False,
                                            compare=False)

  def add(self, **counts):
    with self._lock:
      for name, n in counts.items():
        setattr(self, name, getattr(self, name) + n)

  def skip(self, reason, example):
    with self._lock:
      self.skipped[reason] = self.skipped.get(reason, 0) + 1
      keys = self.examples.setdefault(reason, [])
      if len(keys) < MAX_EXAMPLES:
        keys.append(example)

  def draw(self, paths):
    with self._lock:
      for path in paths:
        self.drawn[path] = self.drawn.get(path, 0) + 1

  def truncated(self, path, detail):
    with self._lock:
      self.truncated_files.append(f'{path} ({detail})')
    self.skip('truncated_file', f'{path} ({detail})')

  @property
  def num_skipped(self):
    """Records skipped (truncated files count once each: what followed the break is unknown)."""
    return sum(self.skipped.values())

  def summary(self):
    lines = [f'{self.samples} samples in {self.batches} batches from {self.files_read} files']
    if self.drawn:
      lines.append(f'resampled: {sum(self.drawn.values())} draws of {len(self.drawn)} distinct '
                   f'files, at most {max(self.drawn.values())} of one')
    for reason, count in sorted(self.skipped.items()):
      lines.append(f'skipped {count} x {reason}, e.g. {", ".join(self.examples[reason][:3])}')
    if self.filtered:
      lines.append(f'{self.filtered} records left out by the filter')
    if self.remainder_dropped:
      lines.append(f'{self.remainder_dropped} samples of incomplete last batches dropped')
    if self.full_captions:
      lines.append(f'{self.full_captions} captions filled the context (truncated or exactly full)')
    return '; '.join(lines)
