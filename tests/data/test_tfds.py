"""The tensorflow-datasets adapter, on a small dataset prepared offline in a temporary data_dir:
each model's own preprocessing (OpenAI's, SigLIP's), process shares, training batches, errors."""
import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds

from clip import preprocess
from data import tfds as data_tfds
from data.synthetic import SyntheticCaptions
from tests.data.test_tfrecords import EXACT
from tests.data.test_tfrecords import OPENAI
from tests.data.test_tfrecords import SIGLIP
from tests.data.test_tfrecords import one_level

NAMES = ['red_circle', 'blue_square', 'green_triangle']


def images(start, n):
  """Non-square images (the eval transform resizes and crops them), from the synthetic set."""
  return SyntheticCaptions(0, 48).get(np.arange(start, start + n))['image'][:, :, 8:]


class TinyShapes(tfds.core.GeneratorBasedBuilder):
  """A classification builder, prepared offline: image + ClassLabel, like cifar10."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, supervised_keys=('image', 'label'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=NAMES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 12), 'test': self._generate_examples(100, 7)}

  def _generate_examples(self, start, n):
    for i, image in enumerate(images(start, n)):
      yield i, {'image': image, 'label': (start + i) % 3}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  TinyShapes(data_dir=path).download_and_prepare()
  return path


@pytest.mark.parametrize('config', [OPENAI, SIGLIP], ids=['openai', 'siglip'])
def test_eval_batches_match_the_models_pil_preprocess(data_dir, config):
  """OpenAI's resize and centre crop, SigLIP's squash with mean and std 0.5: each equals
  `clip.preprocess` (PIL) of the stored image within one uint8 level."""
  data = data_tfds.TFDSClassification('tiny_shapes', 'test', data_dir=data_dir, process_index=0,
                                      process_count=1)
  assert data.classnames == ['red circle', 'blue square', 'green triangle']
  assert data.num_examples == 7 and data.num_classes == 3
  batches = list(data.batches(4, resolution=32, preprocess=config))
  assert [len(b['label']) for b in batches] == [4, 3]
  got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  # tfds stores examples in its own order: match them to the originals by content.
  originals = images(100, 7)
  references = np.stack([preprocess.preprocess_image(image, 32, config) for image in originals])
  for image, label in zip(got['image'], got['label']):
    match = int(np.argmin(np.abs(references - image).reshape(7, -1).max(-1)))
    chex.assert_trees_all_close(image, references[match], atol=one_level(config))
    assert label == (100 + match) % 3
  assert len({int(np.argmin(np.abs(references - image).reshape(7, -1).max(-1)))
              for image in got['image']}) == 7


def test_process_shares_and_training_batches(data_dir):
  shares = [data_tfds.TFDSClassification('tiny_shapes', 'train', data_dir=data_dir,
                                         process_index=p, process_count=2) for p in range(2)]
  assert [s.num_examples for s in shares] == [6, 6]
  first = list(shares[0].batches(4, 24, preprocess=SIGLIP, train=True, seed=1, num_epochs=2))
  again = list(shares[0].batches(4, 24, preprocess=SIGLIP, train=True, seed=1, num_epochs=2))
  assert len(first) == 3 and all(b['image'].shape == (4, 24, 24, 3) for b in first)
  chex.assert_trees_all_equal(first, again)
  raw = list(shares[0].batches(4, 24, preprocess=SIGLIP, train=True, seed=1, num_epochs=2,
                               image_dtype='uint8'))
  chex.assert_trees_all_close(first[0]['image'],
                              (raw[0]['image'] / np.float32(255) - 0.5) / 0.5, atol=EXACT)


def test_missing_data_and_unknown_names_explain_themselves(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r'not prepared in .*tfds build cifar10 --data_dir'):
    data_tfds.TFDSClassification('cifar10', data_dir=str(tmp_path), process_index=0,
                                 process_count=1)
  with pytest.raises(ValueError, match='no dataset'):
    data_tfds.TFDSClassification('no_such_dataset_xyz', data_dir=str(tmp_path), process_index=0,
                                 process_count=1)
  with pytest.raises(ValueError, match='splits'):
    data_tfds.TFDSClassification('tiny_shapes', 'validation', data_dir=data_dir,
                                 process_index=0, process_count=1)
  with pytest.raises(ValueError, match='3 classes, got 2'):
    data_tfds.TFDSClassification('tiny_shapes', data_dir=data_dir, classnames=['a', 'b'],
                                 process_index=0, process_count=1)


def test_arrays_are_the_batches_in_order_and_an_empty_share_raises(data_dir):
  data = data_tfds.TFDSClassification('tiny_shapes', 'test', data_dir=data_dir, process_index=0,
                                      process_count=1)
  images, labels = data.arrays(3, 32, preprocess=SIGLIP)
  batches = list(data.batches(3, 32, preprocess=SIGLIP))
  np.testing.assert_array_equal(images, np.concatenate([b['image'] for b in batches]))
  np.testing.assert_array_equal(labels, np.concatenate([b['label'] for b in batches]))
  assert len(labels) == 7
  shares = [data_tfds.TFDSClassification('tiny_shapes', 'test', data_dir=data_dir,
                                         process_index=p, process_count=8) for p in range(8)]
  empty = [s for s in shares if s.num_examples == 0]
  assert empty, 'expected an empty share: 7 examples over 8 processes'
  with pytest.raises(ValueError, match="tiny_shapes test: this process's share holds no example"):
    empty[0].arrays(3, 32, preprocess=OPENAI)


def test_preprocess_is_required(data_dir):
  """No OpenAI default: the model's preprocessing is named, or the call is a TypeError."""
  data = data_tfds.TFDSClassification('tiny_shapes', 'test', data_dir=data_dir, process_index=0,
                                      process_count=1)
  with pytest.raises(TypeError, match='preprocess'):
    data.batches(3, 32)
  with pytest.raises(TypeError, match='preprocess'):
    data.arrays(3, 32)
  with pytest.raises(TypeError, match=r'cfg\.preprocess\), got str'):
    data.batches(3, 32, preprocess='openai')
