"""The real img2dataset's shards, read back: tfrecord (jpg, png, webp) and webdataset tars.

Images of varied sizes (RGB, one with alpha, greyscale, one under the stored size) and three
URLs that fail (a 404, a text file, a truncated JPEG) are served on 127.0.0.1 by a server inside
the tests; img2dataset 1.47 downloads them into every format once per session (shared by the
xdist workers). `shards.Pipeline` must return each successful sample exactly once, with the
pixels PIL decodes from the stored bytes (read with tarfile / tf.train.Example, not through the
pipeline) and the parquet's metadata; `MetadataFilter` keeps exactly the expected keys; training
ends on every format and stops with `EmptyEpochError` where no record is usable; evaluation
reads the shards for retrieval.
"""
import contextlib
import csv
import fcntl
import functools
import glob
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading

import jax
import numpy as np
from PIL import Image
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

import clip
from clip.formats import files
from clip.eval import retrieval
from clip.train import state_store
from data import filters
from data import shards
from experiments import evaluate
from experiments.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORMATS = ('tfrecord-jpg', 'tfrecord-png', 'tfrecord-webp', 'webdataset-jpg', 'webdataset-png',
           'webdataset-webp')
# Training reads each image kind (JPEG's windowed decode, the others whole) from each file kind
# once; the webdataset reader hands png and webp to the same decoder as the tfrecord reader.
TRAIN_FORMATS = ('tfrecord-jpg', 'tfrecord-png', 'tfrecord-webp', 'webdataset-jpg')
CLI_FORMAT = 'webdataset-jpg'  # through img2dataset's own command and process pool
SUFFIX = {'tfrecord': 'tfrecord', 'webdataset': 'tar'}
SIGNATURE = {'jpg': b'\xff\xd8\xff', 'png': b'\x89PNG\r\n\x1a\n', 'webp': b'RIFF'}
SIZE = 32  # img2dataset's --image_size, and the pipeline's resolution: no resize on reading
PER_SHARD = 5
BAD = {'missing.jpg': 'failed_to_download', 'notes.txt': 'failed_to_resize',
       'cut.jpg': 'failed_to_resize'}
FIELDS = ('key', 'caption', 'status', 'error_message', 'uid', 'url', 'width', 'height',
          'original_width', 'original_height', 'sha256')
BUILD_TIMEOUT_S = 240
RUN_TIMEOUT_S = 180

# Runs in a subprocess: img2dataset's download() for several formats. Its process pool and its
# progress logger are processes spawned per download, each importing img2dataset (and the pool's
# TensorFlow) again, ~8 s a format: here shards are downloaded in this process and progress is
# not printed. The reader, downloader, resizer and writers are img2dataset's own; CLI_FORMAT
# goes through its command, pool and logger unchanged.
BUILD = """
import json, sys
import img2dataset

def in_process(processes_count, downloader, reader, subjob_size, max_shard_retry):
  for status, row in map(downloader, reader):
    if status is False:
      sys.exit(f'img2dataset failed on shard {row}')

class Silent:
  def __init__(self, *args, **kwargs):
    self.done_shards = set()
  start = join = terminate = lambda self: None

img2dataset.download.__globals__.update(multiprocessing_distributor=in_process,
                                        LoggerProcess=Silent)
for job in json.loads(sys.argv[1]):
  img2dataset.download(**job)
"""


# ------------------------------------------------------------------------------ sources


def smooth_image(h, w, channels, seed):
  """A photo-like image: a few low-frequency waves per channel, uint8 (h, w, channels)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  waves = [np.sin(2 * np.pi * (rng.uniform(0.3, 1.5) * x + rng.uniform(0.3, 1.5) * y) +
                  rng.uniform(0, 6)) for _ in range(channels)]
  return np.clip(np.rint(127.5 + 110 * np.stack(waves, -1)), 0, 255).astype(np.uint8)


def encoded(image_HxWxC, fmt):
  mode = {1: 'L', 3: 'RGB', 4: 'RGBA'}[image_HxWxC.shape[-1]]
  buffer = io.BytesIO()
  Image.fromarray(np.squeeze(image_HxWxC, -1) if mode == 'L' else image_HxWxC, mode).save(
      buffer, {'jpg': 'JPEG', 'png': 'PNG'}[fmt], quality=90)
  return buffer.getvalue()


def good_sources():
  """[(file name, bytes, (h, w), caption)]: RGB JPEG/PNG of 40-90 px, one with alpha, two
  greyscale, one smaller than the stored size (img2dataset enlarges it)."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(18):
    h, w = (24, 29) if i == 9 else tuple(int(s) for s in rng.integers(40, 91, 2))
    channels = 4 if i == 3 else 1 if i in (4, 11) else 3
    fmt = 'png' if i % 2 or channels == 4 else 'jpg'
    caption = 'un café ☕ à 3 €' if i == 6 else f'a smooth picture, number {i}'
    out.append((f'img{i}.{fmt}', encoded(smooth_image(h, w, channels, i), fmt), (h, w), caption))
  return out


def source_rows(good):
  """[(name, caption, uid)]: the good ones with the failing ones in between (the last shard
  holds only a failure, so its tar / tfrecord is empty)."""
  rows = [(name, caption) for name, _, _, caption in good]
  rows.insert(5, ('missing.jpg', 'a file that is not there'))
  rows.insert(12, ('notes.txt', 'a text file'))
  rows.append(('cut.jpg', 'a truncated jpeg'))
  return [(name, caption, f'{i:02x}' * 16) for i, (name, caption) in enumerate(rows)]


ROWS = source_rows(good_sources())
NUM_SHARDS = -(-len(ROWS) // PER_SHARD)
EMPTY_SHARD = f'{NUM_SHARDS - 1:05d}'  # holds the truncated JPEG only


def serve_dir(www, good):
  for name, data, _, _ in good:
    (www / name).write_bytes(data)
  (www / 'notes.txt').write_text('not an image, just text\n' * 20)
  whole = good[0][1]
  (www / 'cut.jpg').write_bytes(whole[:len(whole) // 3])


class QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    del args


@contextlib.contextmanager
def http_server(directory):
  server = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(directory)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}'
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


# ---------------------------------------------------------------------------- img2dataset


def write_url_list(path, base, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['url', 'caption', 'uid'])
    writer.writerows([f'{base}/{name}', caption, uid] for name, caption, uid in rows)


def download_args(url_list, out, fmt):
  output_format, encode_format = fmt.split('-')
  return {'url_list': url_list, 'input_format': 'csv', 'url_col': 'url', 'caption_col': 'caption',
          'save_additional_columns': ['uid'], 'output_format': output_format,
          'output_folder': os.path.join(out, fmt), 'encode_format': encode_format,
          'encode_quality': 9 if encode_format == 'png' else 95, 'image_size': SIZE,
          'resize_mode': 'center_crop', 'processes_count': 1, 'thread_count': 2,
          'number_sample_per_shard': PER_SHARD, 'timeout': 60, 'enable_wandb': False,
          'distributor': 'multiprocessing'}


def cli_command(args):
  """img2dataset's console script (its entry point run by this interpreter where the script is
  not beside it) with `args` as flags."""
  script = os.path.join(os.path.dirname(sys.executable), 'img2dataset')
  cmd = [script] if os.path.exists(script) else [
      sys.executable, '-c', 'from img2dataset.main import main; main()']
  for name, value in args.items():
    cmd += [f'--{name}', json.dumps(value) if isinstance(value, list) else str(value)]
  return cmd


def subprocess_env():
  env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE='1', TF_CPP_MIN_LOG_LEVEL='2')
  env['no_proxy'] = env['NO_PROXY'] = '127.0.0.1,localhost'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def finish(proc):
  """Waits for an img2dataset process (killed after BUILD_TIMEOUT_S); its output if it failed."""
  try:
    out, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
  return None if proc.returncode == 0 else f'exit code {proc.returncode}:\n{out[-4000:]}'


def run_img2dataset(url_list, out):
  """Every format: `CLI_FORMAT` by the console script (its process pool), the others by
  download() in one other process; both at once."""
  jobs = [download_args(url_list, out, fmt) for fmt in FORMATS if fmt != CLI_FORMAT]
  popen = functools.partial(subprocess.Popen, env=subprocess_env(), cwd=out, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  procs = {'the img2dataset command': popen(cli_command(download_args(url_list, out,
                                                                        CLI_FORMAT))),
           'img2dataset.download()': popen([sys.executable, '-c', BUILD, json.dumps(jobs)])}
  errors = {what: finish(proc) for what, proc in procs.items()}
  errors = [f'{what}: {error}' for what, error in errors.items() if error]
  if errors:
    raise RuntimeError('\n'.join(errors))
  for fmt in FORMATS:
    written = sorted(glob.glob(os.path.join(out, fmt, '*_stats.json')))
    if len(written) != NUM_SHARDS:  # a failed shard is only printed by its pool
      raise RuntimeError(f'img2dataset wrote {written} for {fmt}, not {NUM_SHARDS} shards')


def build(out):
  """Serves the sources and runs img2dataset; returns what the tests compare with."""
  good = good_sources()
  www = out / 'www'
  www.mkdir(parents=True)
  serve_dir(www, good)
  with http_server(www) as base:
    write_url_list(str(out / 'urls.csv'), base, ROWS)
    for attempt in range(2):  # img2dataset's multiprocessing has been seen to flake once
      try:
        run_img2dataset(str(out / 'urls.csv'), str(out))
        break
      except RuntimeError:
        if attempt:
          raise
        for fmt in FORMATS:
          shutil.rmtree(out / fmt, ignore_errors=True)
  sources = {f'{base}/{name}': {'size': size, 'sha256': hashlib.sha256(data).hexdigest()}
             for name, data, size, _ in good}
  return {'dir': str(out), 'base': base, 'sources': sources}


def build_once(shared):
  """`build` by the first worker to take the lock; the others read its manifest."""
  shared.mkdir(exist_ok=True)
  manifest, failed = shared / 'manifest.json', shared / 'failed'
  with open(shared / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if failed.exists():
      raise RuntimeError(f'another worker failed to build the shards: {failed.read_text()}')
    if not manifest.exists():
      try:
        manifest.write_text(json.dumps(build(shared / 'out')))
      except Exception as e:
        failed.write_text(str(e)[-4000:])
        raise
  return json.loads(manifest.read_text())


@pytest.fixture(scope='session')
def made(tmp_path_factory):
  """img2dataset's output, built once per session: xdist's workers share it through the
  session's temporary folder."""
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    return build(tmp_path_factory.mktemp('img2dataset'))
  return build_once(tmp_path_factory.getbasetemp().parent / 'img2dataset')


def folder(made, fmt):
  return os.path.join(made['dir'], fmt)


def shard_glob(made, fmt):
  return os.path.join(folder(made, fmt), '*.' + SUFFIX[fmt.split('-')[0]])


def empty_shard(made, fmt):
  return shard_glob(made, fmt).replace('*', EMPTY_SHARD)


def parquet_rows(directory):
  """Every row img2dataset wrote beside its shards, by url."""
  rows = {}
  for path in sorted(glob.glob(os.path.join(directory, '*.parquet'))):
    for row in pq.read_table(path).to_pylist():
      rows[row['url']] = row
  return rows


def successes(made, fmt):
  rows = parquet_rows(folder(made, fmt)).values()
  return {r['key']: r for r in rows if r['status'] == 'success'}


# --------------------------------------------------------------------- independent reading


def tar_images(directory, image_format):
  """key -> image bytes, from every tar with Python's tarfile."""
  out = {}
  for path in glob.glob(os.path.join(directory, '*.tar')):
    with tarfile.open(path) as tar:
      for info in tar.getmembers():
        key, _, ext = info.name.partition('.')
        if ext == image_format:
          out[key] = tar.extractfile(info).read()
  return out


def tfrecord_images(directory, image_format):
  """key -> image bytes, from every tfrecord with tf.train.Example."""
  out = {}
  for record in tf.data.TFRecordDataset(glob.glob(os.path.join(directory, '*.tfrecord'))):
    feature = tf.train.Example.FromString(record.numpy()).features.feature
    out[feature['key'].bytes_list.value[0].decode()] = feature[image_format].bytes_list.value[0]
  return out


def stored_images(made, fmt):
  output_format, image_format = fmt.split('-')
  read = tar_images if output_format == 'webdataset' else tfrecord_images
  return read(folder(made, fmt), image_format)


def pil_rgb(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def processing():
  """The tiny model's tokenizer and preprocessing (OpenAI's), as the main jobs hand them."""
  cfg = tiny.get_config().model
  return {'tokenize': functools.partial(clip.get_tokenizer(cfg), truncate=True),
          'preprocess': cfg.preprocess}


def read_all(files, **kwargs):
  pipeline = shards.Pipeline(files, global_batch_size=4, resolution=SIZE, train=False,
                             image_dtype='uint8', process_index=0, process_count=1,
                             **processing(), **kwargs)
  batches = list(pipeline)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, pipeline


# ----------------------------------------------------------------------------------- tests


def test_img2dataset_kept_the_served_images_and_failed_the_bad_urls(made):
  """The ground truth the other tests use: the parquet says success exactly for the images
  served (with their sha256 and size), and names why the bad URLs failed."""
  for fmt in FORMATS:
    rows = parquet_rows(folder(made, fmt))
    assert len(rows) == len(ROWS), fmt
    for name, status in BAD.items():
      assert rows[f'{made["base"]}/{name}']['status'] == status, (fmt, name)
    for url, source in made['sources'].items():
      row = rows[url]
      assert row['status'] == 'success', (fmt, url, row['error_message'])
      assert row['sha256'] == source['sha256']
      assert (row['original_height'], row['original_width']) == tuple(source['size'])
      assert (row['height'], row['width']) == (SIZE, SIZE)
    images = stored_images(made, fmt)
    assert images.keys() == successes(made, fmt).keys(), fmt
    assert all(b.startswith(SIGNATURE[fmt.split('-')[1]]) for b in images.values()), fmt
    assert os.path.exists(empty_shard(made, fmt))
    assert not [k for k in images if k.startswith(EMPTY_SHARD)], fmt


@pytest.mark.parametrize('fmt', FORMATS)
def test_pipeline_yields_every_success_once_with_its_pixels_and_metadata(made, fmt):
  out, pipeline = read_all(shard_glob(made, fmt), fields=FIELDS)
  expected = successes(made, fmt)
  keys = [k.decode() for k in out['key']]
  assert len(keys) == len(set(keys)) and set(keys) == expected.keys()
  assert pipeline.stats.num_skipped == 0 and not pipeline.stats.truncated_files
  images = stored_images(made, fmt)
  for i, key in enumerate(keys):
    row = expected[key]
    np.testing.assert_array_equal(out['image'][i], pil_rgb(images[key]), err_msg=key)
    assert out['caption'][i].decode() == row['caption']
    assert out['error_message'][i] == b'' and row['error_message'] is None
    for name in ('status', 'uid', 'url', 'sha256'):
      assert out[name][i].decode() == row[name], (key, name)
    for name in ('width', 'height', 'original_width', 'original_height'):
      assert out[name][i] == row[name], (key, name)
  sizes = {tuple(made['sources'][expected[k]['url']]['size']) for k in keys}
  assert (24, 29) in sizes and len(sizes) > 10


def datacomp_subset(uids, path):
  """uids as DataComp's subset files hold them: u8,u8 halves of the 128-bit uid."""
  np.save(path, np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], 'u8,u8'))
  return path


@pytest.mark.parametrize('fmt', ['tfrecord-png', 'webdataset-jpg'])
def test_metadata_filter_keeps_exactly_the_expected_keys(made, fmt, tmp_path):
  rows = parquet_rows(folder(made, fmt))
  key_of = {uid: rows[f'{made["base"]}/{name}'] for name, _, uid in ROWS}
  chosen = [uid for i, (_, _, uid) in enumerate(ROWS) if i % 3 == 0] + ['ab' * 16]
  by_uid = {key_of[u]['key'] for u in chosen if u in key_of and key_of[u]['status'] == 'success'}
  big = {rows[url]['key'] for url, s in made['sources'].items() if min(s['size']) >= 60}
  assert 3 < len(by_uid) < 10 and 3 < len(big) < 15 and by_uid - big and big - by_uid
  for keep, kept in [(filters.MetadataFilter(uids=chosen), by_uid),
                     (filters.MetadataFilter(min_image_size=60), big),
                     (filters.MetadataFilter(uids=datacomp_subset(chosen, tmp_path / 's.npy'),
                                             min_image_size=60), by_uid & big)]:
    out, pipeline = read_all(shard_glob(made, fmt), fields=('key',), keep=keep)
    assert sorted(k.decode() for k in out['key']) == sorted(kept)
    assert pipeline.stats.filtered == len(successes(made, fmt)) - len(kept)


# ---------------------------------------------------------------- shards of unusable records


def garbage_tfrecords(made, out):
  """img2dataset's tfrecords with every image feature replaced by bytes no decoder reads."""
  for path in glob.glob(os.path.join(folder(made, 'tfrecord-jpg'), '*.tfrecord')):
    with tf.io.TFRecordWriter(os.path.join(out, os.path.basename(path))) as writer:
      for record in tf.data.TFRecordDataset(path):
        example = tf.train.Example.FromString(record.numpy())
        image = example.features.feature['jpg'].bytes_list.value
        image[0] = b'\xff\xd8\xff' + image[0][3:40]  # a JPEG header cut short
        writer.write(example.SerializeToString())


def garbage_tars(made, out):
  """img2dataset's tars with every .jpg member replaced by text."""
  for path in glob.glob(os.path.join(folder(made, 'webdataset-jpg'), '*.tar')):
    with tarfile.open(path) as src, tarfile.open(os.path.join(out, os.path.basename(path)),
                                                 'w') as dst:
      for info in src.getmembers():
        data = src.extractfile(info).read()
        if info.name.endswith('.jpg'):
          data = b'this is not an image'
          info.size = len(data)
        dst.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def unusable(made, tmp_path_factory):
  """Shards without a usable record: img2dataset's with every image replaced by garbage
  ('garbage-*'), and the shard img2dataset wrote for a failed download only ('empty-*')."""
  out = {}
  for kind, write in (('tfrecord', garbage_tfrecords), ('tar', garbage_tars)):
    directory = tmp_path_factory.mktemp(f'garbage-{kind}')
    write(made, str(directory))
    out[f'garbage-{kind}'] = os.path.join(str(directory), '*.' + kind)
  out['empty-tfrecord'] = empty_shard(made, 'tfrecord-png')
  out['empty-tar'] = empty_shard(made, 'webdataset-jpg')
  return out


@pytest.mark.parametrize('kind', ['garbage-tfrecord', 'garbage-tar', 'empty-tfrecord',
                                  'empty-tar'])
def test_pipeline_raises_on_an_epoch_without_a_usable_record(made, unusable, kind):
  n = len(successes(made, 'tfrecord-jpg')) if kind.startswith('garbage') else 0
  for train in (False, True):
    pipeline = shards.Pipeline(unusable[kind], global_batch_size=2, resolution=SIZE,
                               train=train, process_index=0, process_count=1, **processing())
    with pytest.raises(shards.EmptyEpochError, match='yielded no batch'):
      next(iter(pipeline))
    assert pipeline.stats.skipped == ({'undecodable_image': n} if n else {})
    assert not pipeline.stats.truncated_files


# ------------------------------------------------------------------------- the main jobs


def train(data, workdir):
  """experiments.train on `data` for one step of 8 on one CPU device (8 simulated ones compile
  slower); the finished process."""
  cmd = [sys.executable, '-m', 'experiments.train', '--config', 'tiny', '--data', data,
         '--steps', '1', '--batch-size', '8', '--eval-examples', '0', '--workdir', str(workdir)]
  env = dict(subprocess_env(), XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run(cmd, env=env, cwd=ROOT, timeout=RUN_TIMEOUT_S, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize('fmt', TRAIN_FORMATS)
def test_training_on_img2dataset_shards_ends(made, fmt, tmp_path):
  run = train(shard_glob(made, fmt), tmp_path)
  assert run.returncode == 0, run.stdout[-3000:]
  assert 'data: 8 samples in 1 batches' in run.stdout, run.stdout[-3000:]
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [1] and np.isfinite(records[0]['loss'])


def test_training_on_unusable_shards_stops_with_empty_epoch_error(unusable, tmp_path):
  run = train(unusable['garbage-tar'], tmp_path)  # a loop of empty epochs: TimeoutExpired
  assert run.returncode != 0
  assert 'EmptyEpochError' in run.stdout and 'yielded no batch' in run.stdout, run.stdout[-3000:]
  assert state_store.steps(tmp_path / 'checkpoints') == []


@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
  """A random tiny model as a flat .npz checkpoint (biases perturbed: OpenAI's init zeroes them)."""
  cfg = tiny.get_config().model
  flat = files.flatten(clip.init(jax.random.PRNGKey(0), cfg))
  rng = np.random.default_rng(0)
  flat = {k: np.asarray(v) + (0.1 * rng.standard_normal(v.shape).astype(np.float32)
                              if v.ndim == 1 else 0) for k, v in flat.items()}
  path = tmp_path_factory.mktemp('model') / 'tiny.npz'
  np.savez(path, **flat)
  return str(path), files.nest(flat), cfg


def test_retrieval_evaluation_on_png_tfrecords(made, model_file, tmp_path):
  """Recall of the model on the shards equals recall on PIL's decode of the stored images with
  the parquet's captions (the eval crop of a stored-size image is the image itself)."""
  path, params, cfg = model_file
  fmt = 'tfrecord-png'
  result = evaluate.main(['--model', path, '--config', 'tiny', '--task', 'zeroshot_retrieval',
                          '--captions', shard_glob(made, fmt), '--batch-size', '8',
                          '--output', str(tmp_path / 'r.json')])
  rows, images = successes(made, fmt), stored_images(made, fmt)
  keys = sorted(rows)
  pixels = np.stack([pil_rgb(images[k]) for k in keys]).astype(np.float32) / 255
  recall = retrieval.retrieval_metrics(
      clip.encode_image(params, clip.normalize_image(pixels), cfg),
      clip.encode_text(params, clip.tokenize([rows[k]['caption'] for k in keys],
                                             cfg.context_length), cfg))
  assert result['dataset'] == shard_glob(made, fmt)
  for k in (1, 5, 10):
    np.testing.assert_allclose(result['metrics'][f'image_retrieval_recall@{k}'],
                               recall[f'text_to_image_R@{k}'])
    np.testing.assert_allclose(result['metrics'][f'text_retrieval_recall@{k}'],
                               recall[f'image_to_text_R@{k}'])
  hits = len(keys) * np.array(list(result['metrics'].values()))  # of the 18 pairs read
  np.testing.assert_allclose(hits, np.round(hits), atol=1e-6)


@pytest.mark.parametrize('kind', ['garbage-tfrecord', 'empty-tar'])
def test_retrieval_evaluation_on_unusable_shards_says_why(unusable, model_file, tmp_path, kind):
  with pytest.raises(shards.EmptyEpochError, match='yielded no batch'):
    evaluate.main(['--model', model_file[0], '--config', 'tiny', '--task',
                   'zeroshot_retrieval', '--captions', unusable[kind],
                   '--output', str(tmp_path / 'r.json')])
