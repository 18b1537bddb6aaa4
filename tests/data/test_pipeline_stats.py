"""A pipeline's counts: added from several threads without loss, skips kept with their first
examples, and the summary line each epoch logs."""
import threading

from data import pipeline_stats


def test_counts_from_threads_add_up():
  stats = pipeline_stats.Stats()
  def work():
    for _ in range(1000):
      stats.add(samples=2, batches=1)
      stats.skip('empty_caption', 'k')
  threads = [threading.Thread(target=work) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert (stats.samples, stats.batches, stats.num_skipped) == (8000, 4000, 4000)
  assert stats.examples['empty_caption'] == ['k'] * pipeline_stats.MAX_EXAMPLES


def test_summary_names_every_count():
  stats = pipeline_stats.Stats()
  stats.add(samples=6, batches=2, files_read=3, filtered=4, remainder_dropped=1, full_captions=5)
  stats.skip('missing_image', 'a in x.tar')
  stats.skip('missing_image', 'b in x.tar')
  stats.truncated('y.tar', 'stopped at byte 10 of 20')
  stats.draw(['x.tar', 'y.tar', 'x.tar'])
  assert stats.num_skipped == 3 and stats.truncated_files == ['y.tar (stopped at byte 10 of 20)']
  assert stats.summary() == (
      '6 samples in 2 batches from 3 files; resampled: 3 draws of 2 distinct files, at most 2 of '
      'one; skipped 2 x missing_image, e.g. a in x.tar, b in x.tar; skipped 1 x truncated_file, '
      'e.g. y.tar (stopped at byte 10 of 20); 4 records left out by the filter; 1 samples of '
      'incomplete last batches dropped; 5 captions filled the context (truncated or exactly full)')
