"""The checkpoint families researchers load in 2026 (issue 34) for the checkpoint-families table
(`experiments/checkpoint_families.py`) and their tests: SigLIP 2 NaFlex at its grid and at any
shape (transformers' `Siglip2Model`), open_clip's CoCa with its captioning decoder and MetaCLIP 2
worldwide (open_clip's hub folders and transformers' `MetaClip2Model`, with their XLM-V-style
tokenizer). Each is a small model built by the peer library with the family's options, every
parameter perturbed, saved as that library ships it, loaded by `clip.load` and compared with the
peer on the same inputs (rows as `checkpoint_families_measure` classifies them)."""
import importlib
import json
import os
import shutil
from unittest import mock

import numpy as np
import sentencepiece
import torch
import transformers
from PIL import Image

import clip
from clip import coca
from experiments.checkpoint_families_measure import classify
from experiments.checkpoint_families_measure import hf_outputs
from experiments.checkpoint_families_measure import hf_ref
from experiments.checkpoint_families_measure import load
from experiments.checkpoint_families_measure import max_err
from experiments.checkpoint_families_measure import measure_load
from experiments.checkpoint_families_measure import open_clip_ref
from experiments.checkpoint_families_measure import ours
from experiments.checkpoint_families_measure import perturb
from experiments.checkpoint_families_measure import rel_err
from experiments.checkpoint_families_measure import save_dir
from experiments.checkpoint_families_measure import save_image_processor

# ---------------------------------------------------------------- SigLIP 2 NaFlex

NAFLEX_PATCH = 8  # hf_siglip2_model's: a 4 x 4 position table of 8 px patches
# (height, width) of a NaFlex batch: tall, wide, square, and one larger than any patch budget.
NAFLEX_SIZES = ((40, 20), (20, 40), (33, 33), (200, 120))


def hf_siglip2_model(seed=0):
  """A small transformers Siglip2Model (NaFlex, a 4 x 4 grid of 8 px patches), every parameter
  perturbed (also used by the tests)."""
  config = transformers.Siglip2Config(
      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=100, max_position_embeddings=16),
      vision_config=dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=2, num_patches=16, patch_size=NAFLEX_PATCH))
  torch.manual_seed(seed)
  return perturb(transformers.Siglip2Model(config), seed)


def _siglip2_forward(hf, tokens, pixels, mask, shapes):
  with torch.no_grad():
    return hf_outputs(hf(input_ids=torch.from_numpy(tokens).long(),
                         pixel_values=torch.from_numpy(pixels),
                         pixel_attention_mask=torch.from_numpy(np.asarray(mask)).long(),
                         spatial_shapes=torch.from_numpy(np.asarray(shapes))))


def _hf_naflex_ref(hf, patch):
  """transformers' Siglip2Model outputs at its table's grid: pixels patchified in the
  processor's (row, col, channel) order, every patch real."""
  def ref(images, tokens):
    n, r = images.shape[:2]
    grid = r // patch
    patches = images.reshape(n, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    return _siglip2_forward(hf, tokens, patches.reshape(n, grid * grid, -1),
                            np.ones((n, grid * grid)), np.array([[grid, grid]] * n))
  return ref


def hf_siglip2(tmp):
  hf = hf_siglip2_model(seed=8)
  folder = save_dir(tmp, 'hf_siglip2')
  hf.save_pretrained(folder)
  return measure_load(folder, _hf_naflex_ref(hf, NAFLEX_PATCH), siglip=True, normalized=True)


def naflex_images(seed, sizes=NAFLEX_SIZES):
  """uint8 (h, w, 3) images of `sizes`."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]


def _naflex_err(hf, processor, params, cfg, images, tokens, max_num_patches):
  """The largest relative error of our NaFlex pixels (vs the folder's Siglip2ImageProcessor),
  features and logits (vs Siglip2Model on the processor's patches); inf if the masks or the
  patch grids differ."""
  pixels, mask, shapes = clip.naflex_preprocess(images, cfg.vision.patch_size, max_num_patches,
                                                cfg)
  theirs = processor([Image.fromarray(a) for a in images], max_num_patches=max_num_patches,
                     return_tensors='np')
  if not (np.array_equal(mask, theirs['pixel_attention_mask'])
          and np.array_equal(shapes, theirs['spatial_shapes'])):
    return float('inf')
  image_features = clip.encode_image_naflex(params, pixels, mask, shapes, cfg)
  got = ours(params, cfg, image_features, tokens, normalized=True)
  want = _siglip2_forward(hf, tokens, theirs['pixel_values'], mask, shapes)
  return max(rel_err(pixels, theirs['pixel_values']), max_err(got, want))


def hf_siglip2_any_shape(tmp, budgets=(25,)):
  """A Siglip2Model folder with its Siglip2ImageProcessor: `clip.naflex_preprocess` +
  `clip.encode_image_naflex` on a batch mixing aspect ratios, at each patch budget (one here:
  tests/test_naflex.py runs two). The load's one warning, that `clip.encode_image` squashes (the
  at-its-grid row), is not about this path."""
  hf, folder = hf_siglip2_model(seed=10), save_dir(tmp, 'hf_siglip2_naflex')
  hf.save_pretrained(folder)
  transformers.Siglip2ImageProcessorPil(patch_size=NAFLEX_PATCH,
                                        max_num_patches=max(budgets)).save_pretrained(folder)
  loaded = load(folder)
  if isinstance(loaded, dict):
    return loaded
  params, cfg, warned = loaded
  processor = transformers.AutoImageProcessor.from_pretrained(folder, backend='pil')
  images = naflex_images(seed=11)
  tokens = np.random.default_rng(12).integers(0, cfg.text.vocab_size,
                                              (len(images), cfg.text.context_length), np.int32)
  err = max(_naflex_err(hf, processor, params, cfg, images, tokens, s) for s in budgets)
  return classify(err, [w for w in warned if 'naflex_preprocess keeps' not in w],
                  f'{len(images)} images (tall, wide, square, large) in one batch, '
                  f'max_num_patches {" and ".join(map(str, budgets))}; pixels as the folder\'s '
                  'processor; the load warns that clip.encode_image squashes (row above)')


# ---------------------------------------------------------------- CoCa

COCA_VOCAB, COCA_SOT, COCA_EOS = 100, 98, 99
# coca_ViT-B-32 shrunk: its keys and options, small widths (the pooler's embed_dim 32 differs
# from the ViT width 48, as B-32's 512 / 768, so its q/k/v weights are separate).
COCA_TINY = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 48, 'head_width': 16, 'patch_size': 8,
                   'attentional_pool': True, 'attn_pooler_heads': 4, 'attn_pooler_queries': 6,
                   'output_tokens': True},
    'text_cfg': {'context_length': 12, 'vocab_size': COCA_VOCAB, 'width': 32, 'heads': 4,
                 'layers': 1, 'embed_cls': True, 'output_tokens': True},
    'multimodal_cfg': {'context_length': 12, 'vocab_size': COCA_VOCAB, 'width': 32, 'heads': 4,
                       'layers': 2, 'attn_pooler_heads': 4},
    'custom_text': True,
}


def open_clip_coca_model(oc, model_cfg, seed=0):
  """open_clip's `coca_model.CoCa(**model_cfg)`, every parameter perturbed."""
  kwargs = {k: v for k, v in model_cfg.items() if k != 'custom_text'}
  torch.manual_seed(seed)
  m = oc.coca_model.CoCa(**kwargs).eval()
  # open_clip leaves the decoder's vocabulary head as torch.empty (its init_parameters is not
  # called): give it its intended init before the perturbation.
  with torch.no_grad():
    head = m.text_decoder.text_projection
    head.normal_(std=head.shape[0] ** -0.5)
  return perturb(m, seed + 1)


def save_open_clip_folder(m, model_cfg, folder):
  """As open_clip ships a model: its state dict `.bin` beside `open_clip_config.json`."""
  torch.save(m.state_dict(), os.path.join(folder, 'open_clip_pytorch_model.bin'))
  with open(os.path.join(folder, 'open_clip_config.json'), 'w') as f:
    json.dump({'model_cfg': model_cfg}, f)


def coca_inputs(n=3, seed=0, size=32, context=12):
  """Random images and captions: SOT, words, EOS, then padding (0) as the tokenizer pads."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n, size, size, 3)).astype(np.float32)
  tokens = rng.integers(1, COCA_SOT, (n, context))
  tokens[:, 0] = COCA_SOT
  for row, end in enumerate((5, 9, 11)[:n]):
    tokens[row, end], tokens[row, end + 1:] = COCA_EOS, 0
  return images, tokens


def open_clip_greedy_captions(oc, m, images, seq_len, min_seq_len):
  """open_clip's `generate(generation_type='top_k', top_k=1, fixed_output_length=True)`. Under
  transformers 5 open_clip turns `generate` off altogether (its BeamSearchScorer import fails);
  the greedy path uses only what transformers 5 still has: it is turned back on meanwhile."""
  with mock.patch.object(oc.coca_model, '_has_transformers', True), mock.patch.dict(
      oc.coca_model.GENERATION_TYPES, top_k=oc.coca_model.TopKLogitsWarper), torch.no_grad():
    return m.generate(torch.from_numpy(images).permute(0, 3, 1, 2), generation_type='top_k',
                      top_k=1, seq_len=seq_len, min_seq_len=min_seq_len,
                      sot_token_id=COCA_SOT, eos_token_id=COCA_EOS,
                      fixed_output_length=True).numpy()


def open_clip_coca(oc, tmp, seq_len=10, min_seq_len=3):
  """Features and the decoder's next-token scores vs open_clip's; greedy captions of 4 images
  token for token (a differing caption makes the row WRONG)."""
  m, folder = open_clip_coca_model(oc, COCA_TINY, seed=2), save_dir(tmp, 'coca')
  save_open_clip_folder(m, COCA_TINY, folder)
  loaded = load(folder)
  if isinstance(loaded, dict):
    return loaded
  params, cfg, warned = loaded
  images, tokens = coca_inputs()
  image, text, scores = coca.apply(params, images, tokens, cfg)
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    err = max(rel_err(image, m.encode_image(x, normalize=False)),
              rel_err(text, m.encode_text(torch.from_numpy(tokens), normalize=False)),
              rel_err(scores, m(x, torch.from_numpy(tokens), output_labels=False)['logits']))
  images = coca_inputs(n=4, seed=1)[0]
  theirs = open_clip_greedy_captions(oc, m, images, seq_len, min_seq_len)
  got = np.asarray(coca.caption(params, images, cfg, COCA_SOT, COCA_EOS, seq_len, min_seq_len))
  if not np.array_equal(got, theirs):
    return {'result': 'WRONG', 'error': err, 'note': 'greedy captions differ from open_clip\'s'}
  return classify(err, warned, f'features and decoder scores; greedy captions (4 images, '
                  f'{seq_len} tokens) equal token for token; beam search not compared '
                  '(open_clip\'s needs BeamSearchScorer, gone in transformers 5)')


# ---------------------------------------------------------------- MetaCLIP 2

METACLIP2_CONTEXT = 16  # short, so that long texts are cut
_WORDS = ('a', 'photo', 'of', 'the', 'cat', 'dog', 'Haus', 'café', 'naïve', 'über', '東京',
          '猫の写真', 'Σίσυφος', 'ΟΔΥΣΣΕΥΣ', 'кошка', 'صورة', '🙂', '«quoted»', 'don’t', 'ﬁne',
          'Ｆｕｌｌ', 'x²', 'A.B,C!', 'snake_case', '12:30')
_SEPARATORS = (' ', ' ', ' ', '  ', '\t', '\n', ' \u3000 ', '&amp;', ' &lt;b&gt; ', '\u00a0')
# Texts that hit edges: empty, blank, special tokens' strings in the text (an inner '</s>' gives
# a row two end ids: the model pools at the first), characters never trained (<unk>).
EDGE_TEXTS = ('', '   ', '\n\t', '<mask>', 'a cat </s> a dog', '<s>', 'ＡＢＣ ｱｲｳ', 'Ω≈ç√∫', 'ß ẞ',
              'émoji 🐈‍⬛ zwj', 'mojibake cafÃ©', 'x' * 200)


def multilingual_texts(n=200, seed=0):
  """The edge texts, then random multilingual texts (every fifth one long) up to `n`."""
  rng = np.random.default_rng(seed)
  out = list(EDGE_TEXTS)
  while len(out) < n:
    k = int(rng.integers(1, 40 if len(out) % 5 == 0 else 8))
    parts = [_WORDS[i] for i in rng.integers(0, len(_WORDS), k)]
    seps = [_SEPARATORS[i] for i in rng.integers(0, len(_SEPARATORS), k)]
    out.append(''.join(p + s for p, s in zip(parts, seps)))
  return out


def _train_sentencepiece(folder):
  """A tiny unigram model with XLM-R's conventions (`<unk>` 0, `<s>` 1, `</s>` 2, no pad; the
  fairseq offset transformers applies makes them `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3)."""
  corpus = [t for t in multilingual_texts(400, seed=1)[len(EDGE_TEXTS):] if t.strip()] * 3
  prefix = os.path.join(folder, 'spm')
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=prefix, model_type='unigram', vocab_size=300,
      hard_vocab_limit=False, character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      minloglevel=2)
  return prefix + '.model'


def old_converter_layout(path):
  """`tokenizer.json` as transformers' older converter wrote XLM-R's (and Hub repositories hold):
  the charsmap then runs of spaces to one; a Metaspace pre-tokenizer alone."""
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  norm = data['normalizer']
  precompiled = [n for n in norm.get('normalizers', [norm]) if n['type'] == 'Precompiled']
  if len(precompiled) != 1:
    raise ValueError(f'{path}: expected one Precompiled normalizer, got {norm}')
  data['normalizer'] = {'type': 'Sequence', 'normalizers': [
      precompiled[0], {'type': 'Replace', 'pattern': {'Regex': ' {2,}'}, 'content': ' '}]}
  data['pre_tokenizer'] = {'type': 'Metaspace', 'replacement': '▁', 'prepend_scheme': 'always',
                           'split': True}
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(data, f)


def xlmr_tokenizer_folders(root):
  """{'transformers5': folder, 'old_converter': folder} of a tiny XLM-R-style tokenizer saved by
  transformers' `XLMRobertaTokenizer.save_pretrained` (tokenizer.json, tokenizer_config.json), as
  `facebook/xlm-v-base` ships XLM-V's; the second with the older converter's `tokenizer.json`."""
  source = os.path.join(root, 'source')
  os.makedirs(source)
  shutil.move(_train_sentencepiece(root), os.path.join(source, 'sentencepiece.bpe.model'))
  tok = transformers.XLMRobertaTokenizer.from_pretrained(source)
  folders = {name: os.path.join(root, name) for name in ('transformers5', 'old_converter')}
  for folder in folders.values():
    tok.save_pretrained(folder)
  old_converter_layout(os.path.join(folders['old_converter'], 'tokenizer.json'))
  return folders


def metaclip2_model(oc, tokenizer_name, vocab_size, seed=0):
  """open_clip's ViT-H-14-worldwide, small: its head width (80 image, 64 text), QuickGELU (its
  metaclip2_worldwide tag), a causal text tower pooled at the first `</s>` (eos_id 2)."""
  model_cfg = {
      'embed_dim': 32, 'quick_gelu': True,
      'vision_cfg': {'image_size': 28, 'layers': 1, 'width': 160, 'head_width': 80,
                     'patch_size': 14},
      'text_cfg': {'hf_tokenizer_name': tokenizer_name, 'pool_type': 'eos', 'eos_id': 2,
                   'context_length': METACLIP2_CONTEXT, 'vocab_size': vocab_size, 'width': 64,
                   'heads': 1, 'layers': 2}}
  torch.manual_seed(seed)
  m = oc.model.CLIP(**{k: v for k, v in model_cfg.items() if k != 'quick_gelu'},
                    quick_gelu=True)
  m = perturb(m, seed)
  m.visual.image_mean, m.visual.image_std = clip.IMAGE_MEAN, clip.IMAGE_STD
  return m, model_cfg


def metaclip2_hub_folder(oc, xlmr_folder, folder, seed=0):
  """A small MetaCLIP 2 model saved by open_clip's own `save_for_hf` with its tokenizer."""
  tok = oc.tokenizer.HFTokenizer(str(xlmr_folder), context_length=METACLIP2_CONTEXT)
  m, model_cfg = metaclip2_model(oc, str(xlmr_folder), len(tok.tokenizer), seed)
  save_for_hf = importlib.import_module('open_clip.push_to_hf_hub').save_for_hf
  save_for_hf(m, tok, model_cfg, str(folder), safe_serialization=True)
  return m, model_cfg


def hf_metaclip2_model(vocab_size, seed=0):
  """transformers' `MetaClip2Model` (model_type 'metaclip_2': CLIP's towers pooled at the first
  `eos_token_id`), small with ViT-H-14-worldwide's head widths, every parameter perturbed."""
  config = transformers.MetaClip2Config(
      text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=1, vocab_size=vocab_size,
                       max_position_embeddings=METACLIP2_CONTEXT, hidden_act='quick_gelu',
                       eos_token_id=2, bos_token_id=0, pad_token_id=1),
      vision_config=dict(hidden_size=160, intermediate_size=640, num_hidden_layers=1,
                         num_attention_heads=2, image_size=28, patch_size=14,
                         hidden_act='quick_gelu'),
      projection_dim=32)
  torch.manual_seed(seed)
  return perturb(transformers.MetaClip2Model(config), seed)


def _tokenize_texts(their_tokenizer):
  """tokenize(cfg) for measure_load: (ours, theirs) of the same multilingual texts."""
  # an inner '</s>' (pooled at the first), a long text (cut) and a short one
  texts = ['a cat </s> a dog', *multilingual_texts(len(EDGE_TEXTS) + 5, seed=2)[-2:]]
  return lambda cfg: (clip.get_tokenizer(cfg)(texts, truncate=True), their_tokenizer(texts))


def open_clip_metaclip2(oc, tmp):
  """A hub folder as open_clip's `save_for_hf` writes it (config, weights, tokenizer.json)."""
  folders = xlmr_tokenizer_folders(save_dir(tmp, 'xlmr_open_clip'))
  folder = save_dir(tmp, 'metaclip2_open_clip')
  m, _ = metaclip2_hub_folder(oc, folders['transformers5'], folder, seed=3)
  theirs = oc.get_tokenizer(f'local-dir:{folder}')
  return measure_load(folder, open_clip_ref(m),
                      tokenize=_tokenize_texts(lambda texts: theirs(texts).numpy()))


def hf_metaclip2(tmp):
  """A `MetaClip2Model.save_pretrained` folder with its XLMRobertaTokenizer's files."""
  folders = xlmr_tokenizer_folders(save_dir(tmp, 'xlmr_hf'))
  folder = save_dir(tmp, 'metaclip2_hf')
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(folders['old_converter'], name), os.path.join(folder, name))
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  hf = hf_metaclip2_model(len(hf_tok), seed=4)
  hf.save_pretrained(folder)
  save_image_processor(folder, False, 28)

  def theirs(texts):
    return hf_tok(texts, padding='max_length', max_length=METACLIP2_CONTEXT, truncation=True,
                  return_tensors='np').input_ids

  return measure_load(folder, hf_ref(hf), normalized=True, tokenize=_tokenize_texts(theirs))

