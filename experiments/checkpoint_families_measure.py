"""How `experiments/checkpoint_families.py` measures a row: `clip.load` of a saved checkpoint,
classified (exact / warns / refused / WRONG, as that module's docstring defines them) by the
largest relative error of image features, text features and logits against the peer library's
outputs on the same inputs; and the folders the rows save into."""
import os
import warnings

import numpy as np
import torch
import transformers

import clip
from clip import model
from experiments.references import openai as openai_reference

TOL = 1e-4  # fp32: relative error of features and logits


def rel_err(a, b):
  """max |a - b| / max |b| (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(cfg, siglip, n=3, seed=0):
  rng = np.random.default_rng(seed)
  r = cfg.image_resolution
  images = rng.normal(size=(n, r, r, 3)).astype(np.float32)
  if siglip:  # SigLIP pools the last position: every position is a real token
    return images, rng.integers(0, cfg.text.vocab_size, (n, cfg.text.context_length), np.int32)
  return images, openai_reference.random_tokens(rng, n, cfg)


def ours(params, cfg, image_features, tokens, normalized):
  """Our {'image', 'text', 'logits'} from the image features and the tokens (normalised features
  when the reference gives them so)."""
  txt = clip.encode_text(params, tokens, cfg)
  logits = model.logits(params, image_features, txt)[0]  # not clip.apply: no second compile
  if normalized:
    image_features, txt = normalize(image_features), normalize(txt)
  return {'image': image_features, 'text': txt, 'logits': logits}


def max_err(ours_out, theirs_out):
  return max(rel_err(ours_out[k], theirs_out[k]) for k in ('image', 'text', 'logits'))


def open_clip_ref(m):
  """open_clip's outputs: unnormalised features, logits with its scale (and bias)."""
  def ref(images, tokens):
    with torch.no_grad():
      x, t = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(tokens).long()
      logits = m.get_logits(x, t)[0]
      return {'image': m.encode_image(x).numpy(), 'text': m.encode_text(t).numpy(),
              'logits': logits.numpy()}
  return ref


def hf_outputs(out):
  """transformers' model outputs -> {'image', 'text', 'logits'} (normalised embeddings)."""
  return {'image': out.image_embeds.numpy(), 'text': out.text_embeds.numpy(),
          'logits': out.logits_per_image.numpy()}


def hf_ref(hf):
  """transformers' outputs: normalised embeddings and logits_per_image."""
  def ref(images, tokens):
    with torch.no_grad():
      return hf_outputs(hf(input_ids=torch.from_numpy(tokens).long(),
                           pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)))
  return ref


def compare(params, cfg, ref, siglip=False, normalized=False, tokens=None):
  """The largest relative error of our image features, text features and logits vs `ref` on
  random images, and random tokens or `tokens` = (ours, the peer's) from each one's tokenizer
  (a tokenizer that differs shows as an error of the text features)."""
  images, random_tokens = _inputs(cfg, siglip)
  our_tokens, their_tokens = (random_tokens, random_tokens) if tokens is None else tokens
  got = ours(params, cfg, clip.encode_image(params, images, cfg), our_tokens, normalized)
  return max_err(got, ref(images, their_tokens))


def without_path(message, path):
  """The message without the leading '<weights file>: ' (a temporary path)."""
  return message.split(': ', 1)[-1] if message.startswith(os.fspath(path)) else message


def load(path, config=None):
  """clip.load(path, config) -> (params, cfg, the CheckpointWarnings' texts), or a 'refused'
  row (a dict) for a CheckpointError."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    try:
      params, cfg = clip.load(path, config=config)
    except clip.CheckpointError as e:
      return {'result': 'refused', 'error': None,
              'note': without_path(str(e), path).split('\n')[0]}
  return params, cfg, [without_path(str(w.message), path) for w in caught
                       if issubclass(w.category, clip.CheckpointWarning)]


def classify(err, warned=(), note=''):
  """A row: 'warns' (the first warning as its note) if any, else 'exact' or 'WRONG' by TOL."""
  if warned:
    return {'result': 'warns', 'error': err, 'note': warned[0][:120]}
  return {'result': 'exact' if err < TOL else 'WRONG', 'error': err, 'note': note}


def measure_load(path, ref, config=None, siglip=False, normalized=False, tokenize=None):
  """clip.load(path, config) classified by the rules of checkpoint_families' docstring;
  `tokenize(cfg) -> (our tokens, the peer's tokens)` of the same texts, or random tokens."""
  loaded = load(path, config)
  if isinstance(loaded, dict):
    return loaded
  params, cfg, warned = loaded
  tokens = None if tokenize is None else tokenize(cfg)
  return classify(compare(params, cfg, ref, siglip, normalized, tokens), warned)


def perturb(m, seed):
  """The torch model in eval mode, every parameter perturbed."""
  return openai_reference.perturb(m.eval(), seed)


def save_dir(tmp, name):
  folder = os.path.join(tmp, name)
  os.makedirs(folder, exist_ok=True)
  return folder


def save_image_processor(folder, siglip, size):
  """The `preprocessor_config.json` a hub folder holds beside the weights (transformers'
  `CLIPImageProcessor` / `SiglipImageProcessor` at the model's size)."""
  if siglip:
    processor = transformers.SiglipImageProcessor(size={'height': size, 'width': size})
  else:
    processor = transformers.CLIPImageProcessor(size={'shortest_edge': size},
                                                crop_size={'height': size, 'width': size})
  processor.save_pretrained(folder)
