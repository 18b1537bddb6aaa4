"""A model's own text and image processing, read from its config: `get_tokenizer(cfg)`,
`preprocess_images(images, cfg)`, `normalize(images, cfg)`.

A model is its weights, its tokenizer and its image preprocessing (open_clip hands out the three
together with `create_model_and_transforms` / `get_tokenizer`, transformers with a processor saved
beside the weights). `CLIPConfig.tokenizer` and `CLIPConfig.preprocess` say which; every path
that tokenises or prepares images for a model goes through here, so a model is never fed another
family's tokens or pixels: a tokenizer that cannot produce the model's ids (OpenAI's BPE for a
32000-word vocabulary, a SentencePiece model whose end-of-sequence id is not the one the model
pools at) or that is not known (a SigLIP checkpoint without its `.model` file) is an error that
says how to give the right one, never a fall-back to OpenAI's.
"""
import functools

import numpy as np

from clip import configs
from clip import preprocess
from clip import siglip_tokenizer
from clip import tokenizer as openai_tokenizer
from clip import xlmr_tokenizer


class TokenizerError(ValueError):
  """A model whose tokenizer is unknown, or does not fit the model's vocabulary."""


class ModelTokenizer:
  """A model's tokenizer at its context length: `tokenizer(texts, truncate=False)` -> np.int32
  `(N, context_length)`. A text too long for the context raises ValueError unless `truncate`
  (which keeps the end-of-text token last, as each family's own tokenizer does).

  `eot_id` is the id that ends each row; `sot_id` the start-of-text id (OpenAI's 49406, XLM-R's
  `<s>`; None for SigLIP's SentencePiece, which starts rows with the text); `pad_id` what fills
  the rest."""

  def __init__(self, config, context_length, backend):
    self.config = config
    self.context_length = context_length
    self._backend = backend
    if config.kind == 'openai':
      self.sot_id, self.eot_id, self.pad_id = openai_tokenizer.SOT, openai_tokenizer.EOT, 0
    else:
      self.sot_id = getattr(backend, 'bos_id', None)
      self.eot_id, self.pad_id = backend.eos_id, backend.pad_id

  @property
  def vocab_size(self):
    return openai_tokenizer.VOCAB_SIZE if self.config.kind == 'openai' else self._backend.vocab_size

  def __call__(self, texts, truncate=False):
    return self._backend.tokenize(texts, self.context_length, truncate)

  def decode(self, tokens):
    """The text of a row of ids (a list of texts for a 2-D array)."""
    return self._backend.decode(tokens)

  def __repr__(self):
    return f'ModelTokenizer({self.config}, context_length={self.context_length})'


def _check_model_config(cfg):
  """TypeError unless `cfg` is a model's config: a CLIPConfig or a clip.coca.CoCaConfig."""
  from clip import coca  # pylint: disable=g-import-not-at-top  # a model module, loaded on use
  if not isinstance(cfg, (configs.CLIPConfig, coca.CoCaConfig)):
    raise TypeError(f'expected a clip.CLIPConfig, got {type(cfg).__name__}')


def _tower(cfg):
  """The tower that reads the tokens: the text tower (a CLIPConfig without one: its decoder)."""
  _check_model_config(cfg)
  return cfg.text or cfg.decoder


def _how_to_give(kind):
  return ('pass it when loading, clip.load(path, tokenizer=clip.TokenizerConfig('
          f'{kind!r}, model_file=...)) (or a path to the .model file), or set '
          'cfg = dataclasses.replace(cfg, tokenizer=clip.TokenizerConfig(...))')


def _reads_eot(cfg):
  return (cfg.text is not None and cfg.text.uses_eot) or cfg.decoder is not None


def _check_fits(tok, cfg):
  """The tokenizer's ids must be the model's: inside its vocabulary, ending rows with the id the
  model pools at (or generates up to)."""
  tower = _tower(cfg)
  if tok.vocab_size > tower.vocab_size:
    raise TokenizerError(
        f'cfg.tokenizer is {tok.config} with {tok.vocab_size} ids, but the model\'s vocabulary '
        f'holds {tower.vocab_size} (vocab_size): these are not this model\'s tokens. '
        + ('Its own tokenizer is unknown (OpenAI\'s BPE is only the default); '
           if tok.config.kind == 'openai' else '') + _how_to_give('siglip'))
  if _reads_eot(cfg) and tower.eot_id != tok.eot_id:
    raise TokenizerError(
        f'cfg.tokenizer is {tok.config}, which ends each row with id {tok.eot_id}, but the model '
        f'reads its end-of-text token at id {tower.eot_id} (eot_token_id): these are not this '
        'model\'s tokens. State the model\'s eot_token_id, or give its own tokenizer: '
        + _how_to_give('siglip'))


def _xlmr(config):
  if config.model_file is None:
    raise TokenizerError(
        'this model reads XLM-RoBERTa-style tokens (open_clip\'s HFTokenizer, e.g. MetaCLIP 2\'s '
        'XLM-V), but its tokenizer.json is not known (it did not come with the checkpoint: Hugging '
        'Face folders and open_clip hub repositories ship it, or the repository its '
        'hf_tokenizer_name names). Pass it when loading, clip.load(path, tokenizer='
        'clip.TokenizerConfig(\'xlmr\', model_file=\'.../tokenizer.json\')), or set cfg = '
        'dataclasses.replace(cfg, tokenizer=clip.TokenizerConfig(...))')
  return xlmr_tokenizer.cached_tokenizer(config.model_file, config.clean)


def _sentencepiece(config):
  if config.model_file is None:
    raise TokenizerError(
        f'this model reads {config.kind} SentencePiece tokens, but its SentencePiece model file '
        'is not known (it did not come with the checkpoint: Hugging Face folders ship it as '
        'spiece.model or tokenizer.model; big_vision checkpoints and lone weight files ship '
        'none). ' + _how_to_give(config.kind))
  sp = siglip_tokenizer.cached_tokenizer(config.model_file, config.kind, config.clean)
  eos_piece = sp._sp.id_to_piece(sp.eos_id)  # pylint: disable=protected-access
  expected = {'siglip': '</s>', 'siglip2': '<eos>'}[config.kind]
  if eos_piece != expected:
    other = 'siglip2' if config.kind == 'siglip' else 'siglip'
    raise TokenizerError(
        f'{config.model_file} ends sequences with {eos_piece!r}, not {expected!r}: it is not a '
        f'{config.kind} vocabulary (T5\'s for SigLIP, Gemma\'s for SigLIP 2); is the model\'s '
        f'tokenizer kind {other!r}?')
  return sp


@functools.lru_cache(maxsize=32)
def _backend(config):
  if config.kind == 'unknown':
    raise TokenizerError(
        f'this model\'s tokenizer is {config.name}, which this package does not run (it runs '
        'OpenAI\'s BPE, SigLIP / SigLIP 2 SentencePiece models and XLM-RoBERTa-style '
        'tokenizer.json files): tokenise with that library '
        'and pass the ids, or, if it is one of those, ' + _how_to_give('siglip'))
  if config.kind == 'openai':
    return openai_tokenizer.default_tokenizer()
  return _xlmr(config) if config.kind == 'xlmr' else _sentencepiece(config)


def get_tokenizer(cfg):
  """The model's own tokenizer (`cfg.tokenizer`) at its context length: a `ModelTokenizer`,
  `texts -> np.int32 (N, cfg.context_length)`, token for token the family's own (OpenAI's
  `clip.tokenize`; transformers' `SiglipTokenizer` / `Siglip2Tokenizer` called with
  `padding='max_length', truncation=True`; open_clip's SigLIP pipelines with
  `clean='canonicalize'`; open_clip's `HFTokenizer` over XLM-V for MetaCLIP 2).

  Raises TokenizerError when the tokenizer is not known (a SentencePiece model without its file)
  or its ids are not the model's (OpenAI's BPE, the default, for a model whose vocabulary is
  smaller than OpenAI's or ends rows elsewhere), saying how to give the right one.
  """
  tower = _tower(cfg)
  tok = ModelTokenizer(cfg.tokenizer, tower.context_length, _backend(cfg.tokenizer))
  _check_fits(tok, cfg)
  return tok


def tokenize(texts, cfg, truncate=False):
  """`get_tokenizer(cfg)(texts, truncate)`."""
  return get_tokenizer(cfg)(texts, truncate)


def preprocess_images(images, cfg):
  """Images (a sequence of PIL images, file paths or uint8 (H, W, 3) RGB arrays, or a uint8
  (N, H, W, 3) array) -> NHWC float32 `(N, R, R, 3)` at the model's `image_resolution` R, by the
  model's own transform (`cfg.preprocess`: resize mode, interpolation, mean, std): OpenAI's
  `preprocess` and open_clip's eval transform bit for bit, on every image mode. transformers'
  PIL image processors (`CLIPImageProcessor`, `SiglipImageProcessor`) agree within one uint8
  level on RGB, grey and CMYK images; by design they differ elsewhere: they convert to RGB
  (compositing transparency on white) before resizing, where OpenAI and open_clip resize in the
  image's own mode and drop alpha after, and `CLIPImageProcessor` rounds its centre-crop offset
  down (one pixel off torchvision's for some sizes). `tests/test_processing.py` pins both down."""
  _check_model_config(cfg)
  return preprocess.preprocess(images, cfg.image_resolution, cfg.preprocess)


def normalize(images, cfg):
  """NHWC float images with values in [0, 1] -> normalised with the model's mean and std
  (`cfg.preprocess`); `clip.normalize_image` is OpenAI's constants alone."""
  _check_model_config(cfg)
  return configs.normalize_with(images, cfg.preprocess.mean, cfg.preprocess.std)
