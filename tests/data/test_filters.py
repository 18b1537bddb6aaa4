"""DataComp-style filtering from the parquet img2dataset writes beside each shard: uid subsets in
every file form DataComp uses, the minimum image size, failed rows, and the errors."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import filters
from data import shards
from tests.data.test_webdataset_tars import pipeline
from tests.data.test_webdataset_tars import write_shards

# Per shard: the (original_width, original_height) of its six samples, as the parquet says.
SIZES = ([(300, 250), (200, 500), (199, 400), (640, 480), (150, 150), (800, 600)],
         [(250, 300), (500, 199), (200, 200), (100, 900), (1000, 220), (300, 300)])
FAILED_IN_SHARD = 5  # this sample's row says 'failed_to_resize' (the sample is in the tar anyway)
OTHER_UID = 'f' * 8 + '0' * 24  # in no shard


def write_parquet(path, rows, drop=()):
  """img2dataset's metadata table: one row per URL tried."""
  columns = {'key': pa.string(), 'url': pa.string(), 'caption': pa.string(),
             'status': pa.string(), 'error_message': pa.string(), 'original_width': pa.int64(),
             'original_height': pa.int64(), 'uid': pa.string()}
  pq.write_table(pa.table({name: pa.array([r.get(name) for r in rows], kind)
                           for name, kind in columns.items() if name not in drop}), path)


def parquet_rows(shard, written):
  """The shard's rows: its samples (one marked failed), then a URL that failed to download."""
  rows = []
  for i, (width, height) in enumerate(SIZES[shard]):
    key = f'{shard:05d}{i:04d}'
    failed = i == FAILED_IN_SHARD
    rows.append({'key': key, 'url': f'https://example.com/{key}.jpg', 'caption': 'x',
                 'status': 'failed_to_resize' if failed else 'success',
                 'error_message': 'image too large' if failed else None,
                 'original_width': width, 'original_height': height,
                 'uid': written[key][1]['json']['uid']})
  rows.append({'key': f'{shard:05d}0006', 'status': 'failed_to_download',
               'error_message': 'timeout', 'uid': f'{shard + 1:032x}'})
  return rows


@pytest.fixture(scope='module')
def shard_dir(tmp_path_factory):
  """Two tars of six samples with their parquets: (folder, {key: uid}, [parquet rows])."""
  out = str(tmp_path_factory.mktemp('filtered'))
  written = write_shards(out, num_shards=2, per_shard=6)
  rows = []
  for shard in range(2):
    rows += parquet_rows(shard, written)
    write_parquet(os.path.join(out, f'{shard:05d}.parquet'), parquet_rows(shard, written))
  return out, {k: s['json']['uid'] for k, (_, s) in written.items()}, rows


def read_kept(folder, keep):
  """The keys a pipeline with `keep` yields (on_error='raise': filtering is no error)."""
  p = pipeline(folder, keep=keep, fields=('key',), on_error='raise')
  return sorted(k.decode() for batch in p for k in batch['key']), p


def chosen_uids(uids):
  """Uids of four good samples, of the sample whose row failed, of a failed URL, and one absent."""
  keys = ['000000000', '000000002', '000010001', '000010003', '000000005']
  return [uids[k] for k in keys] + [f'{2:032x}', OTHER_UID]


def save_uids(form, uids, folder):
  if form == 'list':
    return [u.upper() for u in uids]  # uids are matched case-insensitively
  path = os.path.join(folder, f'subset-{form}' + ('.txt' if form == 'text' else '.npy'))
  if form == 'datacomp npy':
    np.save(path, np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids],
                           np.dtype('u8,u8')))
  elif form == 'string npy':
    np.save(path, np.array(uids))
  else:
    with open(path, 'w') as f:
      f.write('\n'.join(uids) + '\n\n')
  return path


@pytest.mark.parametrize('form', ['list', 'datacomp npy', 'string npy', 'text'])
def test_uid_subset_keeps_exactly_those_samples(shard_dir, tmp_path, form):
  folder, uids, _ = shard_dir
  chosen = chosen_uids(uids)
  assert any(int(u[0], 16) >= 8 for u in chosen[:5])  # a first half above 2**63 is read too
  keep = filters.MetadataFilter(uids=save_uids(form, chosen, str(tmp_path)))
  assert keep.uids == frozenset(chosen)
  kept, p = read_kept(folder, keep)
  assert kept == ['000000000', '000000002', '000010001', '000010003']  # not the failed row's
  assert p.stats.filtered == 12 - 4 and p.stats.skipped == {} and p.stats.samples == 4


def test_min_image_size_keeps_the_large_enough(shard_dir):
  folder, uids, rows = shard_dir
  expected = sorted(r['key'] for r in rows if r['status'] == 'success' and
                    min(r['original_width'], r['original_height']) >= 200)
  kept, p = read_kept(folder, filters.MetadataFilter(min_image_size=200))
  assert kept == expected == ['000000000', '000000001', '000000003', '000010000', '000010002',
                              '000010004']
  assert p.stats.filtered == 12 - 6 and p.stats.num_skipped == 0
  both = filters.MetadataFilter(uids=chosen_uids(uids), min_image_size=200)
  assert read_kept(folder, both)[0] == ['000000000']


def test_status_other_than_success_is_never_kept(shard_dir):
  folder, uids, _ = shard_dir
  failed = [f'{shard:05d}{FAILED_IN_SHARD:04d}' for shard in range(2)]
  keep = filters.MetadataFilter(uids=list(uids.values()), min_image_size=1)
  kept, p = read_kept(folder, keep)
  assert not set(kept) & set(failed) and len(kept) == 10 and p.stats.filtered == 2


def test_missing_parquet_is_named(tmp_path):
  write_shards(str(tmp_path), num_shards=1, per_shard=2)
  with pytest.raises(FileNotFoundError, match='no .*00000.parquet for .*00000.tar'):
    pipeline(str(tmp_path), keep=filters.MetadataFilter(min_image_size=10))


@pytest.mark.parametrize('drop, keep, missing', [
    (('uid',), {'uids': [OTHER_UID]}, "['uid']"),
    (('original_height',), {'min_image_size': 10}, "['original_height']"),
])
def test_missing_column_is_named(tmp_path, drop, keep, missing):
  written = write_shards(str(tmp_path), num_shards=1, per_shard=6)
  write_parquet(str(tmp_path / '00000.parquet'), parquet_rows(0, written), drop=drop)
  with pytest.raises(ValueError, match='has no column') as error:
    pipeline(str(tmp_path), keep=filters.MetadataFilter(**keep))
  assert missing in str(error.value) and '00000.parquet' in str(error.value)


@pytest.mark.parametrize('uids', [['0' * 31], ['g' * 32], [OTHER_UID, OTHER_UID + '0']])
def test_bad_uids_raise(uids):
  with pytest.raises(ValueError, match='32 hex digits'):
    filters.MetadataFilter(uids=uids)


def test_bad_uid_file_raises(tmp_path):
  path = str(tmp_path / 'subset.npy')
  np.save(path, np.array([OTHER_UID, 'not-a-uid']))
  with pytest.raises(ValueError, match='not-a-uid'):
    filters.load_uids(path)


@pytest.mark.parametrize('kwargs, message', [
    ({}, 'needs uids= or min_image_size='),
    ({'min_image_size': 0}, 'positive int, got 0'),
    ({'min_image_size': True}, 'positive int, got True'),
])
def test_filter_needs_a_criterion(kwargs, message):
  with pytest.raises(ValueError, match=message):
    filters.MetadataFilter(**kwargs)


def test_filtered_records_are_not_errors(shard_dir):
  """Filtering everything out is an empty epoch, not corrupt data."""
  folder, _, _ = shard_dir
  p = pipeline(folder, keep=filters.MetadataFilter(uids=[OTHER_UID]), on_error='raise')
  with pytest.raises(shards.EmptyEpochError, match='12 records left out by the filter'):
    list(p)
  assert p.stats.filtered == 12 and p.stats.num_skipped == 0
