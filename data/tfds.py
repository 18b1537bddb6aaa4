"""tensorflow-datasets classification sets for zero-shot evaluation and fine-tuning.

Any dataset `tfds.builder` knows with an image and a class label (cifar10, cifar100,
imagenet2012, food101, oxford_iiit_pet, ...) is read from a local `data_dir` that
tensorflow-datasets has prepared; nothing is downloaded here. Images go through the same
transforms as the tfrecord pipeline, the model's own (`preprocess`, its `cfg.preprocess`: its
eval resize for evaluation, the random resized crop for fine-tuning, its mean and std), so the
numbers match what the model was trained with.

  data = TFDSClassification('cifar10', 'test', data_dir='~/tensorflow_datasets')
  data.classnames        # ['airplane', 'automobile', ...], for zero-shot prompts
  for batch in data.batches(256, cfg.image_resolution, preprocess=cfg.preprocess):
    ...                  # {'image': (B, n, n, 3), 'label': (B,)}
"""
import logging
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds_lib

from data import model_inputs
from data import naflex_transforms
from data import processes
from data import transforms

log = logging.getLogger(__name__)
_SYNSET = re.compile(r'^n\d{8}$')


def _prepare_hint(name, data_dir):
  return (f'prepare it once on a machine with network access: `tfds build {name} --data_dir '
          f'{data_dir}` (or in Python: tfds.builder({name!r}, data_dir={data_dir!r})'
          '.download_and_prepare()), then copy that folder here. Manually downloaded datasets '
          f'(imagenet2012: ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar) go into '
          f'{os.path.join(data_dir, "downloads", "manual")} first.')


def _features(info):
  """(image key, label key) from the supervised keys, else the first Image and ClassLabel."""
  keys = info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  image = [k for k, f in info.features.items() if isinstance(f, tfds_lib.features.Image)]
  label = [k for k, f in info.features.items() if isinstance(f, tfds_lib.features.ClassLabel)]
  if not image or not label:
    raise ValueError(f'{info.name} has no image and class label features: {info.features}')
  return image[0], label[0]


class TFDSClassification:
  """One split of a prepared tfds classification dataset, this process's even share of it.

  `classnames` default to the dataset's label names with '_' as spaces; pass your own (e.g.
  OpenAI's curated ImageNet names) where the dataset's are ids (imagenet2012's are WordNet ids).
  """

  def __init__(self, name, split='test', *, data_dir=None, classnames=None, process_index=None,
               process_count=None):
    process_index, process_count = processes.process_share(process_index, process_count)
    data_dir = os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR',
                                                             '~/tensorflow_datasets'))
    try:
      self.builder = tfds_lib.builder(name, data_dir=data_dir)
    except tfds_lib.core.registered.DatasetNotFoundError:
      raise ValueError(f'tensorflow-datasets has no dataset {name!r}; tfds.list_builders() '
                       'lists the known names') from None
    if not self.builder.is_prepared():
      raise FileNotFoundError(f'dataset {name!r} is not prepared in {data_dir}; '
                              + _prepare_hint(name, data_dir))
    info = self.builder.info
    if split not in info.splits:
      raise ValueError(f'{name} has splits {sorted(info.splits)}, got {split!r}')
    self.name, self.split = name, split
    self.image_key, self.label_key = _features(info)
    names = list(info.features[self.label_key].names)
    if classnames is None:
      classnames = [n.replace('_', ' ') for n in names]
      if any(_SYNSET.match(n) for n in names):
        log.warning('%s labels are WordNet ids (%s, ...): pass classnames= with readable names '
                    'for zero-shot classification', name, names[0])
    elif len(classnames) != len(names):
      raise ValueError(f'{name} has {len(names)} classes, got {len(classnames)} classnames')
    self.classnames = list(classnames)
    self.num_classes = len(names)
    self.process_split = tfds_lib.even_splits(split, n=process_count)[process_index]
    self.process_count = process_count
    self.num_examples = info.splits[self.process_split].num_examples

  def dataset(self, batch_size, resolution, *, preprocess, train=False, seed=0, num_epochs=None,
              image_dtype='float32', shuffle_buffer=10_000, naflex=None):
    """The tf.data pipeline: {'image': (B, n, n, 3), 'label': int32 (B,)}; eval keeps a smaller
    last batch, training drops it (and repeats `num_epochs` times, None = endless). `preprocess`
    is the model's `clip.PreprocessConfig`: its eval resize and interpolation (training uses the
    random resized crop), and the mean and std of a float32 image.

    `naflex`, a `data.naflex_batching.NaFlexBatching` (batch_size and resolution None): NaFlex
    batches {'patches': float32 (B, S, P*P*3), 'spatial_shapes': int32 (B, 2), 'label'} as
    `data.shards.Pipeline` makes them, from step 0 (`data.naflex_transforms`); an image with a
    side below one patch raises InvalidArgumentError (nothing here counts skips)."""
    model_inputs.check_preprocess(preprocess)
    plan = naflex_transforms.plan_for(naflex, self.process_count, batch_size, resolution,
                                      image_dtype)
    if not self.num_examples:
      raise ValueError(f'{self.name} {self.split}: this process\'s share holds no example '
                       '(more processes than examples)')
    model_inputs.check_image_dtype(image_dtype)
    ds = self.builder.as_dataset(
        split=self.process_split, shuffle_files=train,
        decoders={self.image_key: tfds_lib.decode.SkipDecoding()},
        read_config=tfds_lib.ReadConfig(shuffle_seed=seed, interleave_cycle_length=4))
    ds = ds.map(lambda ex: (ex[self.image_key], ex[self.label_key]))
    if train:
      ds = ds.repeat(num_epochs).shuffle(shuffle_buffer, seed=seed)

    def crop_seed(index):
      return tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), index)

    def example(index, image_bytes, label):
      if plan:
        return naflex_example(index, image_bytes, label)
      if train:
        image = transforms.random_resized_crop(image_bytes, resolution, crop_seed(index),
                                               on_white=preprocess.convert_first)
      else:
        image = transforms.eval_transform(
            transforms.decode(image_bytes, preprocess.convert_first), resolution, preprocess)
      if image_dtype == 'float32':
        image = transforms.normalize_image(image, preprocess.mean, preprocess.std)
      return {'image': image, 'label': tf.cast(label, tf.int32)}

    def naflex_example(index, image_bytes, label):
      image, small = naflex_transforms.decode_and_crop(
          image_bytes, plan.patch_size, crop_seed(index) if train else None,
          on_white=preprocess.convert_first)
      check = tf.debugging.assert_equal(small, False, message=(
          f'{self.name}: an image has a side below one patch ({plan.patch_size} px)'))
      with tf.control_dependencies([check]):
        return {'image': tf.identity(image), 'label': tf.cast(label, tf.int32)}

    ds = ds.enumerate().map(lambda i, x: example(i, *x), num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
    if plan:
      ds = naflex_transforms.batches(ds, plan, 0, preprocess)
      if train:  # a last step with fewer images than its batch is dropped
        ds = ds.filter(lambda b: tf.size(b['label'], tf.int64) == b['_size'][0])
      ds = ds.map(lambda b: {k: b[k] for k in ('patches', 'spatial_shapes', 'label')})
    else:
      ds = ds.batch(batch_size, drop_remainder=train)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(2)

  def batches(self, batch_size, resolution, *, preprocess, train=False, seed=0, num_epochs=None,
              image_dtype='float32', shuffle_buffer=10_000, naflex=None):
    """Numpy batches of `dataset(...)`."""
    return self.dataset(batch_size, resolution, preprocess=preprocess, train=train, seed=seed,
                        num_epochs=num_epochs, image_dtype=image_dtype,
                        shuffle_buffer=shuffle_buffer, naflex=naflex).as_numpy_iterator()

  def arrays(self, batch_size, resolution, *, preprocess):
    """This process's share in evaluation order as whole arrays: (images float32 (N, R, R, 3),
    labels int32 (N,)), prepared by the model's `clip.PreprocessConfig` `preprocess`."""
    images, labels = [], []
    for batch in self.batches(batch_size, resolution, preprocess=preprocess):
      images.append(batch['image'])
      labels.append(batch['label'])
    return np.concatenate(images), np.concatenate(labels)
