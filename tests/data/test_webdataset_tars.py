"""The webdataset tar reader (img2dataset's `output_format="webdataset"`): round trip, agreement
with the tfrecord format, sharding, determinism, resume, corrupt and truncated tars, file kinds,
and a SigLIP model's own tokens and pixels.

Tars are written in img2dataset's layout (`{key}.png|jpg|webp`, `{key}.txt`, `{key}.json`);
corrupt ones member by member with the standard library's `tarfile`, so the reader is checked
against the format. Pixels are compared with PIL's decode of the same bytes.
"""
import hashlib
import io
import os
import tarfile
import threading

import chex
import numpy as np
from PIL import Image
import pytest

import clip
from data import shards
from data import tfrecords
from data import webdataset_tars
from tests.data.test_tfrecords import EXACT
from tests.data.test_tfrecords import OPENAI
from tests.data.test_tfrecords import fake_tokenize
from tests.data.test_tfrecords import model_tokenize
from tests.data.test_tfrecords import one_level
from tests.data.test_tfrecords import read_all
from tests.data.test_tfrecords import siglip_cfg  # pylint: disable=unused-import
from tests.data.test_tfrecords import smooth_image

RES = 24
FIELDS = ('key', 'caption', 'url', 'status', 'error_message', 'uid', 'width', 'original_height')
TIMEOUT_S = 60  # an all-bad source must fail well within this, not loop through empty epochs


def img2dataset_metadata(key, caption, image_bytes, width, height):
  """The `.json` img2dataset writes beside each image (DataComp's kept `uid` among it)."""
  return {'url': f'https://example.com/{key}.jpg', 'caption': caption, 'key': key,
          'status': 'success', 'error_message': None, 'width': width, 'height': height,
          'original_width': 2 * width, 'original_height': 2 * height, 'exif': '{}',
          'sha256': hashlib.sha256(image_bytes).hexdigest(),
          'uid': hashlib.md5(key.encode()).hexdigest()}


def img2dataset_sample(key, image, caption, fmt='png'):
  data = tfrecords.encode_image(image, fmt)
  height, width = image.shape[:2]
  return {'__key__': key, fmt: data, 'txt': caption,
          'json': img2dataset_metadata(key, caption, data, width, height)}


def write_shards(out_dir, num_shards, per_shard, fmt='png', size=RES, seed=0, prefix=''):
  """img2dataset-style tars; returns {key: (image uint8, webdataset sample)} in written order."""
  rng = np.random.default_rng(seed)
  written = {}
  os.makedirs(out_dir, exist_ok=True)
  for shard in range(num_shards):
    samples = []
    for i in range(per_shard):
      key = f'{prefix}{shard:05d}{i:04d}'
      image = smooth_image(rng, size, size)
      samples.append(img2dataset_sample(key, image, f'a picture {shard} {i} caf\u00e9', fmt))
      written[key] = (image, samples[-1])
    webdataset_tars.write_tar(webdataset_tars.shard_path(out_dir, shard), samples)
  return written


def write_members(path, members):
  """A tar of (name, bytes) members, written with the standard library only."""
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def sample_members(key, caption=b'fine', images=('png',), meta=None, rng=None):
  """The members of one sample as img2dataset names them (json, image(s), txt)."""
  rng = rng or np.random.default_rng(0)
  image = smooth_image(rng, RES, RES)
  meta = webdataset_tars.encode_json(meta or img2dataset_metadata(key, 'x', b'', RES, RES))
  members = [(f'{key}.json', meta)]
  members += [(f'{key}.{fmt}', tfrecords.encode_image(image, fmt)) for fmt in images]
  return members + ([(f'{key}.txt', caption)] if caption is not None else [])


def pipeline(files, **kwargs):
  kwargs = {'global_batch_size': 4, 'resolution': RES, 'train': False, 'tokenize': fake_tokenize,
            'preprocess': OPENAI, 'process_index': 0, 'process_count': 1, **kwargs}
  return shards.Pipeline(files, **kwargs)


def train_batches(files, n, **kwargs):
  p = pipeline(files, train=True, shuffle_buffer=8, fields=('key',), **kwargs)
  it = iter(p)
  return [next(it) for _ in range(n)], p


def keys_of(batch):
  return [k.decode() for k in batch['key']]


@pytest.fixture(scope='module')
def png_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('png_tars'))
  return out, write_shards(out, num_shards=3, per_shard=5)


# ------------------------------------------------------------------------------ round trip


def test_png_round_trip_is_exact(png_dir):
  """Lossless images at the model's size come back as exactly `clip.normalize_image(x / 255)`,
  with captions, tokens and the `.json` metadata (a null error_message as empty bytes)."""
  out, written = png_dir
  got = read_all(pipeline(out, fields=FIELDS))
  keys = keys_of(got)
  assert sorted(keys) == sorted(written)
  chex.assert_shape(got['image'], (15, RES, RES, 3))
  assert got['image'].dtype == np.float32 and got['tokens'].dtype == np.int32
  expected = np.stack([written[k][0] for k in keys]).astype(np.float32) / 255
  chex.assert_trees_all_close(got['image'], np.asarray(clip.normalize_image(expected)), atol=EXACT)
  meta = [written[k][1]['json'] for k in keys]
  captions = [written[k][1]['txt'] for k in keys]
  assert [c.decode() for c in got['caption']] == captions
  np.testing.assert_array_equal(got['tokens'], fake_tokenize(captions))
  for name in ('url', 'status', 'uid'):
    assert [v.decode() for v in got[name]] == [m[name] for m in meta], name
  assert list(got['error_message']) == [b''] * 15
  np.testing.assert_array_equal(got['width'], [m['width'] for m in meta])
  np.testing.assert_array_equal(got['original_height'], [m['original_height'] for m in meta])


@pytest.mark.parametrize('fmt', ['jpg', 'webp'])
def test_lossy_formats_decode_like_pil(tmp_path, fmt):
  """jpg and webp members, read as uint8 at their native size, are PIL's decode of the bytes."""
  written = write_shards(str(tmp_path), num_shards=1, per_shard=3, fmt=fmt)
  got = read_all(pipeline(str(tmp_path), image_dtype='uint8', fields=('key',)))
  assert got['image'].dtype == np.uint8 and sorted(keys_of(got)) == sorted(written)
  for key, image in zip(keys_of(got), got['image']):
    data = written[key][1][fmt]
    np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))
    assert not np.array_equal(image, written[key][0])  # lossy: PIL is the reference, not the input


def test_a_siglip_model_gets_its_own_tokens_and_pixels(tmp_path, siglip_cfg):
  """Tars of JPEGs of assorted shapes read for a SigLIP model: its SentencePiece tokens
  (`clip.get_tokenizer(cfg)`) and its squashed pixels normalised with mean and std 0.5
  (`clip.preprocess_images` of the decoded bytes, within one uint8 level)."""
  rng = np.random.default_rng(3)
  samples = [img2dataset_sample(f'00000000{i}', smooth_image(rng, *rng.integers(20, 90, 2)),
                                f'a {i} picture of snow', 'jpg') for i in range(5)]
  webdataset_tars.write_tar(webdataset_tars.shard_path(str(tmp_path), 0), samples)
  with pytest.raises(TypeError, match='preprocess'):
    shards.Pipeline(str(tmp_path), global_batch_size=4, resolution=RES, train=False,
                    tokenize=fake_tokenize, process_index=0, process_count=1)
  got = read_all(pipeline(str(tmp_path), resolution=siglip_cfg.image_resolution,
                          tokenize=model_tokenize(siglip_cfg), preprocess=siglip_cfg.preprocess,
                          fields=('key',)))
  by_key = {s['__key__']: s for s in samples}
  ordered = [by_key[k] for k in keys_of(got)]
  assert len(ordered) == 5
  np.testing.assert_array_equal(got['tokens'], clip.get_tokenizer(siglip_cfg)(
      [s['txt'] for s in ordered], truncate=True))
  own = clip.preprocess_images([Image.open(io.BytesIO(s['jpg'])) for s in ordered], siglip_cfg)
  chex.assert_trees_all_close(got['image'], own, atol=one_level(siglip_cfg.preprocess))


def write_tfrecords_like(tar_dir, out_dir, written):
  """The same samples, shard for shard, as img2dataset's tfrecords."""
  os.makedirs(out_dir, exist_ok=True)
  for name in sorted(os.listdir(tar_dir)):
    tar_keys = [s['__key__'] for s in webdataset_tars.read_tar(os.path.join(tar_dir, name))]
    examples = []
    for key in tar_keys:
      sample = written[key][1]
      meta = {k: v for k, v in sample['json'].items() if k != 'key'}
      examples.append(tfrecords.serialize_example(key, sample['png'], sample['txt'], 'png', **meta))
    tfrecords.write_tfrecord(os.path.join(out_dir, name.replace('.tar', '.tfrecord')), examples)


def test_tar_and_tfrecord_give_identical_batches(png_dir, tmp_path):
  out, written = png_dir
  write_tfrecords_like(out, str(tmp_path), written)
  from_tar = list(pipeline(out, fields=FIELDS))
  from_tfrecord = list(pipeline(str(tmp_path), fields=FIELDS))
  assert len(from_tar) == 4
  chex.assert_trees_all_equal(from_tar, from_tfrecord)
  tar_train, _ = train_batches(out, 2, seed=2)
  tfrecord_train, _ = train_batches(str(tmp_path), 2, seed=2)
  chex.assert_trees_all_equal(tar_train, tfrecord_train)


# ------------------------------------------------------------- sharding, determinism, resume


@pytest.mark.parametrize('process_count', [2, 3])
def test_process_shares_are_disjoint_and_complete(png_dir, process_count):
  out, written = png_dir
  shares = []
  for index in range(process_count):
    p = pipeline(out, global_batch_size=2 * process_count, process_index=index,
                 process_count=process_count, fields=('key',))
    assert p.batch_size == 2
    shares.append(set(keys_of(read_all(p))))
  assert set.union(*shares) == set(written)
  assert sum(len(s) for s in shares) == len(written)


def test_training_is_deterministic_given_the_seed(png_dir):
  out, _ = png_dir
  first, _ = train_batches(out, 4, seed=3)
  again, _ = train_batches(out, 4, seed=3)
  other, _ = train_batches(out, 1, seed=4)
  chex.assert_trees_all_equal(first, again)
  assert keys_of(first[0]) != keys_of(other[0])
  assert not np.array_equal(first[0]['image'], other[0]['image'])
  # 15 samples, batches of 4: 3 per epoch; the next epoch is reshuffled and recropped.
  assert keys_of(first[0]) != keys_of(first[3])


def test_resume_from_state_and_from_step(png_dir):
  """The state is a record position: from it, batches of 4 are the ones that followed, and
  batches of 2 hold the same samples with the same crops."""
  out, _ = png_dir
  reference, p = train_batches(out, 4, seed=1)
  state = p.state()
  assert state == {'epoch': 1, 'record': 4, 'step': 4}
  reference += [next(iter(p))]
  assert p.stats.remainder_dropped == 3  # 15 = 3 * 4 + 3
  resumed, _ = train_batches(out, 1, seed=1, resume=state)
  chex.assert_trees_all_equal(resumed, reference[4:])
  from_step, _ = train_batches(out, 1, seed=1, start_step=4)
  chex.assert_trees_all_equal(from_step, reference[4:])
  halves, _ = train_batches(out, 2, seed=1, global_batch_size=2, resume=state)
  chex.assert_trees_all_equal({k: np.concatenate([h[k] for h in halves]) for k in halves[0]},
                              reference[4])


# -------------------------------------------------------------------------- corrupt input


def write_corrupt_tar(path):
  """One tar with a good sample first and last, and bad samples of every kind between."""
  rng = np.random.default_rng(1)
  members = sample_members('000000000', rng=rng)
  members += [('000000001.json', b'{}'), ('000000001.png', b'not an image at all'),
              ('000000001.txt', b'undecodable')]
  members += sample_members('000000002', images=('png', 'jpg'), rng=rng)
  members += sample_members('000000003', images=(), rng=rng)
  members += sample_members('000000004', caption=b'   ', rng=rng)
  members += sample_members('000000005', caption=b'bad utf8 \xff\xfe', rng=rng)
  members += [('000000006.json', b'{"status": "success", not json')]
  members += sample_members('000000006', rng=rng)[1:]
  members += [('README', b'a member with no extension')]
  members += sample_members('000000007', meta={'status': 'success', 'width': 2**70}, rng=rng)
  members += sample_members('000000009', rng=rng)
  write_members(path, members)


def test_corrupt_samples_are_counted_and_skipped(tmp_path):
  path = str(tmp_path / '00000.tar')
  write_corrupt_tar(path)
  p = pipeline(str(tmp_path), fields=('key', 'caption'))
  got = read_all(p)
  assert keys_of(got) == ['000000000', '000000009']
  assert list(got['caption']) == [b'fine', b'fine']
  assert p.stats.skipped == {'undecodable_image': 1, 'several_images': 1, 'missing_image': 1,
                             'empty_caption': 1, 'invalid_utf8_caption': 1,
                             'invalid_metadata': 2, 'unrecognised_member': 1}
  assert p.stats.examples['undecodable_image'] == [f'000000001 in {path}']
  assert p.stats.examples['several_images'] == [f'000000002 (jpg, png) in {path}']
  # Not JSON; a number no feature holds (it must not end the file: the last sample is read).
  invalid = p.stats.examples['invalid_metadata']
  assert invalid[0] == f'000000006 in {path}' and invalid[1].startswith('000000007 (')
  assert p.stats.examples['unrecognised_member'] == [f'README in {path}']
  assert p.stats.truncated_files == [] and p.stats.files_read == 1 and p.stats.samples == 2
  assert p.last_epoch_stats.skipped == p.stats.skipped


def cut_shard(path, key, where):
  """Cuts the tar inside sample `key`: in its image's data, in its first header, or at that
  header's start (a member boundary: what follows, the end-of-archive block too, is gone)."""
  with tarfile.open(path) as tar:
    members = tar.getmembers()
  first = [m for m in members if m.name.startswith(key + '.')][0]
  image = [m for m in members if m.name == key + '.png'][0]
  cut = {'inside member data': image.offset_data + image.size // 2,
         'inside a header': first.offset + 100, 'at a member boundary': first.offset}[where]
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:cut])


@pytest.mark.parametrize('where, detail', [
    ('inside member data', 'member 000010002.png: unexpected end of data'),
    ('inside a header', 'no end-of-archive block'),
    ('at a member boundary', 'no end-of-archive block'),
])
def test_truncated_tar_is_reported_once(tmp_path, where, detail):
  """The samples before the cut are read, the other shard whole, the cut one reported once."""
  written = write_shards(str(tmp_path), num_shards=2, per_shard=4)
  path = webdataset_tars.shard_path(str(tmp_path), 1)
  cut_shard(path, '000010002', where)
  p = pipeline(str(tmp_path), fields=('key',))
  got = read_all(p)
  whole = sorted(k for k in written if k.startswith('00000'))
  assert sorted(keys_of(got)) == whole + ['000010000', '000010001']
  assert p.stats.skipped == {'truncated_file': 1}
  assert len(p.stats.truncated_files) == 1
  assert p.stats.truncated_files[0].startswith(f'{path} ({detail}')
  assert p.stats.files_read == 2


@pytest.mark.parametrize('corrupt', ['samples', 'truncated'])
def test_corrupt_input_raises_when_asked(tmp_path, corrupt):
  """A bad sample raises at its batch, a cut file once it has been read to the cut."""
  if corrupt == 'samples':
    write_corrupt_tar(str(tmp_path / '00000.tar'))
  else:
    write_shards(str(tmp_path), num_shards=1, per_shard=2)
    cut_shard(webdataset_tars.shard_path(str(tmp_path), 0), '000000001', 'at a member boundary')
  reason = {'samples': 'undecodable_image', 'truncated': 'truncated_file'}[corrupt]
  with pytest.raises(shards.CorruptDataError, match=f'skipped 1 x {reason}'):
    list(pipeline(str(tmp_path), on_error='raise'))


def in_thread(fn):
  """fn() in a daemon thread: (its exception or None, whether it finished within TIMEOUT_S)."""
  result = {}
  def target():
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      result['error'] = e
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(TIMEOUT_S)
  return result.get('error'), not thread.is_alive()


@pytest.mark.parametrize('train', [True, False])
def test_a_source_of_only_bad_samples_raises_within_one_epoch(tmp_path, train):
  path = str(tmp_path / '00000.tar')
  write_members(path, [(f'00000000{i}.{ext}', data) for i in range(5)
                       for ext, data in (('png', b'not an image'), ('txt', b'caption'))])
  p = pipeline(path, train=train)
  error, finished = in_thread(lambda: next(iter(p)))
  assert finished, f'no EmptyEpochError within {TIMEOUT_S} s'
  assert isinstance(error, shards.EmptyEpochError), error
  assert path in str(error) and '5 x undecodable_image' in str(error)
  assert p.state()['epoch'] == 1 and p.stats.files_read == 1


def test_an_epoch_smaller_than_one_batch_raises_in_training(tmp_path):
  write_shards(str(tmp_path), num_shards=1, per_shard=3)
  p = pipeline(str(tmp_path), train=True)
  error, finished = in_thread(lambda: next(iter(p)))
  assert finished and isinstance(error, shards.EmptyEpochError), error
  assert 'training needs 4 good samples per batch' in str(error)
  assert p.stats.remainder_dropped == 3 and not p.stats.skipped
  assert len(read_all(pipeline(str(tmp_path)))['image']) == 3  # evaluation keeps the short batch


# ---------------------------------------------------------------------- files and metadata


def test_wrong_file_kinds_are_named(tmp_path):
  tars, others, mixed = (tmp_path / name for name in ('tars', 'others', 'mixed'))
  write_shards(str(tars), num_shards=1, per_shard=1)
  for folder in (tars, others):
    os.makedirs(folder, exist_ok=True)
    (folder / '00000.parquet').write_bytes(b'PAR1')
    (folder / '00000_stats.json').write_text('{}')
  with pytest.raises(ValueError, match='point it at the shards') as error:
    pipeline(str(tars / '*'))
  assert "'.parquet': 1" in str(error.value) and "'.json': 1" in str(error.value)
  assert len(pipeline(tars).files) == 1  # a folder (here a Path) means its shards
  with pytest.raises(FileNotFoundError, match=r"no \.tfrecord or \.tar shard; found .*'\.parquet'"):
    pipeline(str(others))
  write_shards(str(mixed), num_shards=1, per_shard=1)
  tfrecords.write_tfrecord(str(mixed / '00001.tfrecord'), [])
  with pytest.raises(ValueError, match=r"one format.*'\.tar': 1.*mixture"):
    pipeline(str(mixed))


def test_metadata_named_like_an_output_is_prefixed(tmp_path):
  """A `.json` field named 'image' (or '_status') comes back under 'metadata_<name>', beside the
  pixels and the pipeline's own bookkeeping."""
  image = smooth_image(np.random.default_rng(2), RES, RES)
  sample = img2dataset_sample('000000000', image, 'a cat')
  sample['json'].update({'image': 'cat.jpg', '_status': 7})
  webdataset_tars.write_tar(str(tmp_path / '00000.tar'), [sample])
  got = read_all(pipeline(str(tmp_path), image_dtype='uint8',
                          fields={'image': 'bytes', '_status': 'int', 'status': 'bytes'}))
  assert list(got['metadata_image']) == [b'cat.jpg'] and list(got['metadata__status']) == [7]
  assert list(got['status']) == [b'success']
  np.testing.assert_array_equal(got['image'][0], image)
