"""The image outputs of a fixed-resolution shard pipeline (`data.shards.Pipeline`), per record
inside tf.data: the student's image, and for distillation what the teacher sees or saw.

  student only:   {'image'}
  online teacher: {'image', 'teacher_image'} and, per batch, 'teacher_tokens'. In training one
                  random crop window is drawn per image and resized twice, to the student's and
                  to the teacher's resolution, each normalised with its model's mean and std; in
                  evaluation each model's own eval transform.
  reinforced:     {'image', 'teacher_image_embedding', 'teacher_text_embedding'} (and
                  'augmentation_index'): in training stored augmentation j, drawn statelessly
                  from (seed, epoch, record position), is replayed (its window cropped, resized
                  to the student's resolution, normalised) and row j of the stored image
                  embeddings comes with it; in evaluation augmentation 0.

Crops are stateless functions of (seed, epoch, record position), as the pipeline's resume needs.
"""
import numpy as np
import tensorflow as tf

from data import model_inputs
from data import reinforced as reinforced_shards
from data import transforms

# The batch keys this module adds (besides 'image').
OUTPUTS = ('teacher_image', 'teacher_tokens', reinforced_shards.IMAGE_EMBEDDING,
           reinforced_shards.TEXT_EMBEDDING, 'augmentation_index')


def crop_seed(seed, epoch, index):
  """The stateless seed of the record at position `index` (cast to int64, as the pipeline
  counts) of epoch `epoch`."""
  return tf.random.experimental.stateless_fold_in(tf.constant([seed, epoch], tf.int64),
                                                  tf.cast(index, tf.int64))


def check_options(naflex, teacher, reinforced):
  """ValueError for a distillation option the pipeline cannot combine."""
  if naflex is not None and (teacher is not None or reinforced is not None):
    raise ValueError('teacher= and reinforced= take fixed-resolution batches; a NaFlex pipeline '
                     '(naflex=) has no square image to share with a teacher')
  if teacher is not None and reinforced is not None:
    raise ValueError('give teacher= (online distillation) or reinforced= (stored teacher '
                     'outputs), not both')


def _check_teacher(teacher):
  if not isinstance(teacher, model_inputs.TeacherInputs):
    raise TypeError('teacher must be data.model_inputs.TeacherInputs(tokenize, preprocess, '
                    f'resolution) (TeacherInputs.of(cfg)), got {type(teacher).__name__}')
  return teacher.checked()


class Views:
  """A record's image outputs (see the module docstring). `files` are the expanded shards
  (reinforced ones are checked here, before any training: `data.reinforced.check_source`)."""

  def __init__(self, files, resolution, preprocess, image_dtype, train, seed, scale, ratio,
               teacher=None, reinforced=None):
    self.resolution, self.preprocess, self.image_dtype = resolution, preprocess, image_dtype
    self.train, self.seed, self.scale, self.ratio = train, seed, scale, ratio
    self.teacher = teacher and _check_teacher(teacher)
    self.reinforced = reinforced
    self.reader = None
    if reinforced is not None:
      reinforced_shards.check_source(files, reinforced)
      self.reader = reinforced_shards.reader_for(files[0])
    if self.teacher:
      self.teacher_context, _ = model_inputs.tokenizer_layout(self.teacher.tokenize)

  @property
  def outputs(self):
    """The per-record keys a batch carries."""
    if self.reinforced:
      return ('image', reinforced_shards.IMAGE_EMBEDDING, reinforced_shards.TEXT_EMBEDDING,
              *(('augmentation_index',) if self.reinforced.return_index else ()))
    return ('image', 'teacher_image') if self.teacher else ('image',)

  def features(self):
    """What records must hold besides img2dataset's schema (a parse spec)."""
    return reinforced_shards.features(self.reinforced) if self.reinforced else {}

  def blank(self):
    """The outputs of a record that is not used (the shapes and dtypes of `__call__`'s)."""
    out = {'image': tf.zeros([self.resolution, self.resolution, 3], self.image_dtype)}
    if self.teacher:
      n = self.teacher.resolution
      out['teacher_image'] = tf.zeros([n, n, 3], self.image_dtype)
    if self.reinforced:
      e = self.reinforced.embed_dim
      out.update({reinforced_shards.IMAGE_EMBEDDING: tf.zeros([e], tf.float32),
                  reinforced_shards.TEXT_EMBEDDING: tf.zeros([e], tf.float32),
                  'augmentation_index': tf.constant(0, tf.int32)})
    return out

  def _finish(self, image_u8, preprocess):
    # Normalised per image, in the parallel map: a whole batch at once runs out of cache (2x slower)
    if self.image_dtype == tf.float32:
      return transforms.normalize_image(image_u8, preprocess.mean, preprocess.std)
    return image_u8

  def __call__(self, ex, image_bytes, index, epoch):
    """A parsed record `ex` (with `features()`) and its image bytes -> the outputs."""
    if self.reinforced:
      return self._replayed(ex, image_bytes, index, epoch)
    if not self.train:
      return self._evaluated(image_bytes)
    on_white = self.preprocess.convert_first
    crop, window = transforms.random_crop(image_bytes, crop_seed(self.seed, epoch, index),
                                          self.scale, self.ratio, on_white)
    out = {'image': self._finish(transforms.resize_crop(crop, self.resolution), self.preprocess)}
    if self.teacher:
      t = self.teacher
      if t.preprocess.convert_first != on_white:  # the same window, decoded the teacher's way
        crop = transforms.crop_at(image_bytes, window, t.preprocess.convert_first)
      out['teacher_image'] = self._finish(transforms.resize_crop(crop, t.resolution),
                                          t.preprocess)
    return out

  def _evaluated(self, image_bytes):
    models = [('image', self.resolution, self.preprocess)]
    if self.teacher:
      models.append(('teacher_image', self.teacher.resolution, self.teacher.preprocess))
    decoded = {}
    out = {}
    for name, n_px, preprocess in models:
      on_white = preprocess.convert_first
      if on_white not in decoded:
        decoded[on_white] = transforms.decode(image_bytes, on_white)
      image = transforms.eval_transform(decoded[on_white], n_px, preprocess)
      out[name] = self._finish(image, preprocess)
    return out

  def _replayed(self, ex, image_bytes, index, epoch):
    k, e = self.reinforced.augmentations, self.reinforced.embed_dim
    j = (tf.random.stateless_uniform(
        [], crop_seed(self.seed, epoch, index), minval=0, maxval=k, dtype=tf.int32)
         if self.train else tf.constant(0, tf.int32))
    window = tf.reshape(ex[reinforced_shards.WINDOWS], [k, 4])[j]
    crop = transforms.crop_at(image_bytes, window, self.preprocess.convert_first)
    return {'image': self._finish(transforms.resize_crop(crop, self.resolution), self.preprocess),
            reinforced_shards.IMAGE_EMBEDDING: tf.reshape(
                ex[reinforced_shards.IMAGE_EMBEDDING], [k, e])[j],
            reinforced_shards.TEXT_EMBEDDING: ex[reinforced_shards.TEXT_EMBEDDING],
            'augmentation_index': j}

  def batch_outputs(self, captions_B):
    """Per-batch outputs: the teacher's tokens of the captions, int32 (B, L_teacher)."""
    if not self.teacher:
      return {}
    tokens = tf.numpy_function(self._teacher_tokens, [captions_B], tf.int32, stateful=False)
    tokens.set_shape([None, self.teacher_context])
    return {'teacher_tokens': tokens}

  def _teacher_tokens(self, captions_B):
    return np.asarray(self.teacher.tokenize([c.decode('utf-8') for c in captions_B]), np.int32)
