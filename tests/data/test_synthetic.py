"""The built-in captioned shapes: determinism, what the pixels show, held-out pairs, and model
batches in the model's own processing (its export: `test_synthetic_shards.py`)."""
# pylint: disable=redefined-outer-name
import chex
import numpy as np
import pytest
from scipy import ndimage

import clip
from data import synthetic
from data.synthetic import SyntheticCaptions
from tests.data.test_tfrecords import OPENAI
from tests.data.test_tfrecords import model_tokenize
from tests.data.test_tfrecords import siglip_cfg  # pylint: disable=unused-import

# Object colours are drawn within +-12 of their palette entry per channel.
COLOUR_TOLERANCE = 13


def components(image, rgb):
  """Connected regions of `image` within COLOUR_TOLERANCE of `rgb`: (count, centroids (y, x))."""
  near = np.all(np.abs(image.astype(int) - rgb) <= COLOUR_TOLERANCE, -1)
  labels, n = ndimage.label(near)
  return n, ndimage.center_of_mass(near, labels, range(1, n + 1)), ndimage.sum(near, labels,
                                                                              range(1, n + 1))


def test_deterministic_and_random_access():
  ds = SyntheticCaptions(seed=7, resolution=32)
  batch = ds.batch(16, step=2)
  again = SyntheticCaptions(seed=7, resolution=32).get(np.arange(32, 48))
  chex.assert_trees_all_equal(batch, again)
  one = ds.get([37])
  np.testing.assert_array_equal(one['image'][0], batch['image'][5])
  assert one['caption'][0] == batch['caption'][5]
  other = SyntheticCaptions(seed=8, resolution=32).batch(16, step=2)
  assert not np.array_equal(other['image'], batch['image'])


def test_pixels_show_what_the_labels_and_caption_say():
  """Count, colour, position and relative size read back from the image with connected
  components; the caption names the colour, the shape and the count."""
  ds = SyntheticCaptions(seed=0, resolution=96, split='all')
  s = ds.get(np.arange(60))
  for i in range(60):
    rgb = synthetic.RGB[s['colour'][i]]
    n, centres, areas = components(s['image'][i], rgb)
    count = s['count'][i] + 1
    assert n == count, (i, s['caption'][i])
    columns = {int(x // 32) for _, x in centres}
    assert columns == {s['position'][i]}
    expected_area = np.pi * (synthetic.RADII[s['size'][i]] * 96) ** 2
    assert 0.3 * expected_area < np.mean(areas) < 1.6 * expected_area
    caption = s['caption'][i]
    assert synthetic.COLOURS[s['colour'][i]] in caption
    noun = synthetic.SHAPES[s['shape'][i]] if count == 1 else synthetic.SHAPES_PLURAL[s['shape'][i]]
    assert f' {noun}' in caption
    words = caption.replace(',', ' ').replace(':', ' ').replace('.', ' ').split()
    assert {'two', 'three'} & set(words) == ({synthetic.COUNTS[count - 1]} if count > 1 else set())


def test_heldout_pairs_only_in_their_split():
  pairs = lambda split: set(zip(*[SyntheticCaptions(1, 16, split).attributes(
      np.arange(3000))[k] for k in ('shape', 'colour')]))
  heldout = set(synthetic.HELDOUT)
  assert len(heldout) == len(synthetic.SHAPES)
  assert len({c for _, c in heldout}) == len(synthetic.SHAPES)
  assert not pairs('train') & heldout
  assert pairs('train') | heldout == pairs('all')
  assert pairs('heldout') == heldout


def test_classification_views():
  names = SyntheticCaptions.classnames()
  assert len(names) == len(synthetic.COLOURS) * len(synthetic.SHAPES)
  s = SyntheticCaptions(2, 32, 'heldout').batch(20)
  for i, label in enumerate(SyntheticCaptions.labels(s)):
    assert names[label] == f'{synthetic.COLOURS[s["colour"][i]]} {synthetic.SHAPES[s["shape"][i]]}'
  assert SyntheticCaptions.prompts()[0] == 'a photo of a red circle.'
  assert SyntheticCaptions.prompts('count')[2] == 'a photo of three shapes.'
  for task in synthetic.ATTRIBUTES:
    assert len(SyntheticCaptions.prompts(task)) == len(synthetic.ATTRIBUTES[task])
    assert SyntheticCaptions.labels(s, task).max() < len(SyntheticCaptions.classnames(task))
  with pytest.raises(ValueError, match='task must be one of'):
    SyntheticCaptions.classnames('weight')


def fake_tokenize(texts):
  out = np.zeros((len(texts), 8), np.int32)
  for i, t in enumerate(texts):
    out[i, :min(8, len(t))] = [ord(c) for c in t[:8]]
  return out


def test_model_batches_are_the_same_global_batch_on_any_process_count():
  ds = SyntheticCaptions(3, 32)
  whole = next(ds.batches(8, start_step=5, tokenize=fake_tokenize, preprocess=OPENAI))
  halves = [next(ds.batches(8, start_step=5, process_index=p, process_count=2,
                            tokenize=fake_tokenize, preprocess=OPENAI)) for p in range(2)]
  chex.assert_trees_all_equal(whole, {k: np.concatenate([h[k] for h in halves])
                                      for k in whole})
  raw = ds.batch(8, step=5)
  chex.assert_trees_all_close(
      whole['image'], np.asarray(clip.normalize_image(raw['image'].astype(np.float32) / 255)),
      atol=1e-6)
  np.testing.assert_array_equal(whole['tokens'], fake_tokenize(raw['caption']))
  with pytest.raises(ValueError, match='multiple of the process count'):
    next(ds.batches(9, process_count=2, tokenize=fake_tokenize, preprocess=OPENAI))


def sample_indices(ds, batches, upto=64):
  """The sample index of every image of `batches` (uint8), found among samples [0, upto)."""
  raw = ds.get(np.arange(upto))
  index = {image.tobytes(): i for i, image in enumerate(raw['image'])}
  return [index[image.tobytes()] for batch in batches for image in batch['image']]


@pytest.mark.parametrize('process_count', [1, 2])
def test_model_batches_start_at_any_example(process_count):
  """`start_example`: the k-th global batch holds samples [first + k * batch, ...), whatever
  batch size read the samples before it, on any process count; `start_step=s` is
  `start_example=s * batch`."""
  ds = SyntheticCaptions(3, 32)
  kwargs = dict(tokenize=fake_tokenize, preprocess=OPENAI, image_dtype='uint8',
                process_count=process_count)
  def global_batches(batch_size, num_steps, **start):
    shares = [ds.batches(batch_size, num_steps=num_steps, process_index=p, **start, **kwargs)
              for p in range(process_count)]
    return [{'image': np.concatenate([b['image'] for b in parts])} for parts in zip(*shares)]
  assert sample_indices(ds, global_batches(4, 3, start_example=14)) == list(range(14, 26))
  assert sample_indices(ds, global_batches(6, 2, start_example=7)) == list(range(7, 19))
  chex.assert_trees_all_equal(global_batches(4, 2, start_step=3),
                              global_batches(4, 2, start_example=12))
  with pytest.raises(ValueError, match='not both'):
    next(ds.batches(4, start_step=1, start_example=4, **kwargs))


def test_model_batches_are_the_models_own_tokens_and_pixels(siglip_cfg):
  """A SigLIP model's batches: its SentencePiece tokens (`clip.get_tokenizer(cfg)`), its pixels
  (`clip.preprocess_images`: at the model's size only the mean and std 0.5 apply). Without the
  model's tokenizer or preprocessing, a TypeError names the missing one."""
  ds = SyntheticCaptions(3, siglip_cfg.image_resolution)
  batch = next(ds.batches(4, start_step=2, tokenize=model_tokenize(siglip_cfg),
                          preprocess=siglip_cfg.preprocess))
  raw = ds.batch(4, step=2)
  np.testing.assert_array_equal(batch['tokens'],
                                clip.get_tokenizer(siglip_cfg)(raw['caption'], truncate=True))
  chex.assert_trees_all_close(batch['image'], clip.preprocess_images(raw['image'], siglip_cfg),
                              atol=1e-6)
  for missing in ('tokenize', 'preprocess'):
    given = {'tokenize': fake_tokenize, 'preprocess': OPENAI}
    del given[missing]
    with pytest.raises(TypeError, match=missing):
      next(ds.batches(4, **given))
  with pytest.raises(TypeError, match=r'cfg\.preprocess\), got CLIPConfig'):
    next(ds.batches(4, tokenize=fake_tokenize, preprocess=siglip_cfg))


def test_bad_arguments():
  with pytest.raises(ValueError, match='split must be one of'):
    SyntheticCaptions(split='test')
  with pytest.raises(ValueError, match='resolution'):
    SyntheticCaptions(resolution=8)
  with pytest.raises(ValueError, match='>= 0'):
    SyntheticCaptions().get([-1])


def test_parse_caption_recovers_the_labels_of_every_template():
  """Every caption the set writes parses back to its shape, colour and count, and to its size
  where the template names one; a caption naming none or two of an attribute gives -1."""
  ds = SyntheticCaptions(seed=0, resolution=32, split='all')
  attrs = ds.attributes(np.arange(3000))
  for i, caption in enumerate(ds.captions(attrs)):
    parsed = SyntheticCaptions.parse_caption(caption)
    for name in ('shape', 'colour', 'count'):
      assert parsed[name] == attrs[name][i], (caption, name)
    assert parsed['size'] in (-1, attrs['size'][i]), caption
  assert SyntheticCaptions.parse_caption('a red and blue circle .')['colour'] == -1
  assert SyntheticCaptions.parse_caption('two circle .')['count'] == -1  # singular noun
  assert SyntheticCaptions.parse_caption('a photo .') == {
      'shape': -1, 'colour': -1, 'size': -1, 'count': -1}


def test_caption_token_ids_cover_every_caption_and_need_the_end_token():
  tokenize = lambda texts: clip.tokenize(texts, 32)
  ids = set(synthetic.caption_token_ids(tokenize, clip.tokenizer.EOT))
  ds = SyntheticCaptions(seed=1, resolution=32, split='all')
  rows = tokenize(ds.captions(ds.attributes(np.arange(20000))))
  assert set(np.unique(rows)) - {0} <= ids and clip.tokenizer.EOT in ids and 0 not in ids
  with pytest.raises(ValueError, match='has no end-of-text id 7'):
    synthetic.caption_token_ids(tokenize, 7)
