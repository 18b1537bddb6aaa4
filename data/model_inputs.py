"""The model's own input processing as every pipeline takes it: its tokenizer (`tokenize=`) and
its `clip.PreprocessConfig` (`preprocess=`), checked where they are given, so that a wrong one
fails there and not inside tf.data (numpy only)."""
import functools
import typing

import numpy as np

from clip import processing_configs

IMAGE_DTYPES = ('float32', 'uint8')


def check_tokenize(tokenize):
  """`tokenize` if it is callable, else TypeError saying what to pass."""
  if not callable(tokenize):
    raise TypeError('tokenize must be the model\'s tokenizer, a callable texts -> int (N, L), e.g. '
                    f'functools.partial(clip.get_tokenizer(cfg), truncate=True); got {tokenize!r}')
  return tokenize


def check_preprocess(preprocess):
  """`preprocess` if it is a `clip.PreprocessConfig`, else TypeError saying what to pass."""
  if not isinstance(preprocess, processing_configs.PreprocessConfig):
    raise TypeError('preprocess must be the model\'s clip.PreprocessConfig (cfg.preprocess), got '
                    f'{type(preprocess).__name__}')
  return preprocess


def tokenizer_layout(tokenize):
  """Calls `tokenize` (checked) on three texts. Returns its context length (the width of what it
  returns) and its padding `(pad, pad_ends)`: the id after an empty text's tokens, and whether it
  also ends rows (SigLIP's `</s>` does both, OpenAI's 0 only pads). ValueError if it does not
  return int (3, L)."""
  tokens = np.asarray(check_tokenize(tokenize)(['a photo of a cat', 'a dog', '']))
  if tokens.ndim != 2 or tokens.shape[0] != 3 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError('tokenize(list of 3 str) must return int (3, context_length), got '
                     f'{tokens.dtype} {tokens.shape}')
  empty = tokens[2]
  return tokens.shape[1], (int(empty[-1]), bool(np.all(empty == empty[-1])))


def filled_rows(tokens_NxL, pad, pad_ends):
  """Rows whose text reached the end of the context (truncated, or exactly full), given the
  tokenizer's padding `(pad, pad_ends)` from `tokenizer_layout`."""
  full = tokens_NxL[:, -1] != pad
  if not pad_ends or tokens_NxL.shape[1] < 2:
    return full
  return full | (tokens_NxL[:, -2] != pad)


def check_image_dtype(image_dtype):
  """`image_dtype` if a pipeline can yield it: 'float32' (normalised) or 'uint8' (raw pixels,
  normalised on the device); else ValueError naming both."""
  if image_dtype not in IMAGE_DTYPES:
    raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {image_dtype!r}")
  return image_dtype


class TeacherInputs(typing.NamedTuple):
  """What a distillation teacher reads beside the student (`clip.train.distillation`): its own
  tokenizer (texts -> int (N, L_teacher), e.g. `functools.partial(clip.get_tokenizer(tcfg),
  truncate=True)`), its `clip.PreprocessConfig` and its image resolution. A pipeline given one
  adds `'teacher_image'` (the teacher's view of the student's sample: the same crop, at this
  resolution, normalised with this preprocessing's mean and std) and `'teacher_tokens'`."""
  tokenize: typing.Callable
  preprocess: processing_configs.PreprocessConfig
  resolution: int

  @classmethod
  def of(cls, cfg):
    """The teacher inputs of a loaded model config: `clip.get_tokenizer(cfg)` (truncating, as the
    student's in training), `cfg.preprocess`, `cfg.image_resolution`. Raises what
    `clip.get_tokenizer` raises for a tokenizer it cannot build."""
    from clip import processing  # pylint: disable=g-import-not-at-top
    return cls(functools.partial(processing.get_tokenizer(cfg), truncate=True), cfg.preprocess,
               cfg.image_resolution)

  def checked(self):
    """Self, its tokenizer, preprocessing and resolution checked (TypeError / ValueError)."""
    check_tokenize(self.tokenize)
    check_preprocess(self.preprocess)
    if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or (
        self.resolution < 1):
      raise ValueError(f'the teacher resolution must be a positive int, got {self.resolution!r}')
    return self
