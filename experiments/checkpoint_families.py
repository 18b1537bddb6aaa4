"""What `clip.load` does with each checkpoint family and format, measured against the library that
defines the family (open-clip-torch, timm, transformers; big_vision's names), on small random
models saved as each library ships them.

  python -m experiments.checkpoint_families [--out results/checkpoint_families]

Every row is loaded and run, not typed: 'exact' (no CheckpointWarning and the largest relative
error of image features, text features and logits below 1e-4), 'warns' (a CheckpointWarning: its
text in the note, the error of what loaded in the error column), 'refused' (CheckpointError:
its first line in the note), 'WRONG' (loaded silently with a larger error: a bug to fix) or
'error: ...' (the measurement itself failed). Rows with a tokenizer (MetaCLIP 2) tokenize the
same texts with ours and the peer's; CoCa's 'logits' are its decoder's next-token scores, and
its greedy captions must equal open_clip's token for token; the NaFlex any-shape row measures
`clip.naflex_preprocess` + `clip.encode_image_naflex` (the load's warning is about
`clip.encode_image`'s square grid, the row before it). Export rows save with
`clip.save_open_clip` / `clip.save_hf` and load into the peer library. The measuring is in
`checkpoint_families_measure.py`, the 2026 families' models in `checkpoint_families_recent.py`.
Writes checkpoint_families.json and checkpoint_families.md into --out.
"""
import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time

import sentencepiece
import torch
import transformers
from safetensors.torch import save_file

import clip
from clip.formats import open_clip
from clip.formats import open_clip_folder
from clip.formats import openai
from clip.formats.hf import save_hf
from experiments import checkpoint_families_recent as recent
from experiments.checkpoint_families_measure import TOL
from experiments.checkpoint_families_measure import compare
from experiments.checkpoint_families_measure import hf_ref
from experiments.checkpoint_families_measure import measure_load
from experiments.checkpoint_families_measure import open_clip_ref
from experiments.checkpoint_families_measure import perturb
from experiments.checkpoint_families_measure import save_dir
from experiments.checkpoint_families_measure import save_image_processor
from experiments.references import open_clip as open_clip_reference
from experiments.siglip_to_big_vision import big_vision_npz


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='results/checkpoint_families')
  parser.add_argument('--only', default='',
                      help='comma-separated substrings: measure only the rows whose family '
                           'contains one (all rows by default)')
  return parser.parse_args(argv)


# ---------------------------------------------------------------- open_clip models

def _open_clip_vit(oc, quick_gelu, seed=0):
  """A small open_clip ViT CLIP (ViT-g-14's MLP ratio; 64-wide heads, which the shapes imply,
  so that a load without config= errs only in the activation)."""
  model_cfg = {'embed_dim': 48, 'quick_gelu': quick_gelu,
               'vision_cfg': {'image_size': 28, 'layers': 2, 'width': 128, 'head_width': 64,
                              'mlp_ratio': 4.3637, 'patch_size': 14},
               'text_cfg': {'context_length': 12, 'vocab_size': 300, 'width': 64, 'heads': 1,
                            'layers': 2}}
  torch.manual_seed(seed)
  return perturb(oc.model.CLIP(**model_cfg), seed), model_cfg


def open_clip_gelu(oc, tmp, with_config):
  m, model_cfg = _open_clip_vit(oc, quick_gelu=False)
  path = os.path.join(save_dir(tmp, f'gelu_{with_config}'), 'model.pt')
  torch.save(m.state_dict(), path)
  config = open_clip.config_from_open_clip(model_cfg) if with_config else None
  return measure_load(path, open_clip_ref(m), config)


def _write_open_clip_config(folder, model_cfg):
  with open(os.path.join(folder, 'open_clip_config.json'), 'w') as f:
    json.dump({'model_cfg': model_cfg}, f)


def open_clip_hub_folder(oc, tmp):
  m, model_cfg = _open_clip_vit(oc, quick_gelu=True, seed=1)
  folder = save_dir(tmp, 'hub')
  save_file({k: v.contiguous() for k, v in m.state_dict().items()},
            os.path.join(folder, 'open_clip_model.safetensors'))
  _write_open_clip_config(folder, model_cfg)
  return measure_load(folder, open_clip_ref(m))


def open_clip_training_checkpoint(oc, tmp):
  m, model_cfg = _open_clip_vit(oc, quick_gelu=True, seed=2)
  folder = save_dir(tmp, 'ddp_compiled')
  state = {'module._orig_mod.' + k: v for k, v in m.state_dict().items()}
  path = os.path.join(folder, 'epoch_3.pt')
  torch.save({'epoch': 3, 'state_dict': state}, path)
  _write_open_clip_config(folder, model_cfg)
  return measure_load(path, open_clip_ref(m))


def timm_siglip(oc, image_size=32):
  """open_clip's ViT-B-16-SigLIP classes (a timm MAP-pooled ViT trunk, the custom text tower),
  small: 8 px patches over `image_size` px images."""
  # Local: timm is optional (open-clip-torch brings it), and only this row needs it.
  import timm  # pylint: disable=g-import-not-at-top
  model_cfg = oc.get_model_config('ViT-B-16-SigLIP')
  model_cfg['embed_dim'] = 64
  del model_cfg['custom_text']
  model_cfg['text_cfg'].update(width=64, heads=4, layers=2, context_length=16, vocab_size=100,
                               mlp_ratio=1.5)
  torch.manual_seed(3)
  m = oc.model.CustomTextCLIP(**model_cfg)
  m.visual.trunk = timm.models.vision_transformer.VisionTransformer(
      img_size=image_size, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=1.75,
      class_token=False, global_pool='map', num_classes=0)
  return perturb(m, 3)


def _siglip_cfg(act, image_size=32):
  """The small SigLIP's config, stated by hand (as a user reading the model card would)."""
  vision = clip.VisionConfig('vit', 64, 2, 2, image_size, 8, pool='map', ln_pre=False,
                             patch_bias=True, projection=False, mlp=act, norm_eps=1e-6,
                             mlp_dim=112)
  text = clip.TextConfig(64, 2, 4, 16, 100, pool='last', causal=False, mask_padding=False,
                         projection_bias=True, mlp=act, norm_eps=1e-6, mlp_dim=96)
  return clip.CLIPConfig(64, vision, text, logit_bias=True)


def open_clip_timm_siglip(oc, tmp, with_config, image_size=32):
  m = timm_siglip(oc, image_size)
  path = os.path.join(save_dir(tmp, f'timm_siglip_{with_config}_{image_size}'), 'siglip.pt')
  torch.save(m.state_dict(), path)
  config = _siglip_cfg('gelu', image_size) if with_config else None
  return measure_load(path, open_clip_ref(m), config, siglip=True)


def timm_eva(oc, name, seed=0):
  """open_clip's `name` (an EVA or PE-Core config), its timm trunk built by its own model function
  cut to 2 blocks of 128 (64-wide heads) over 32 px images, a small text tower; every parameter
  perturbed. Returns (model, our config of it)."""
  import timm  # pylint: disable=g-import-not-at-top
  model_cfg = {**copy.deepcopy(oc.get_model_config(name)), 'embed_dim': 48}
  model_cfg['text_cfg'].update(width=64, heads=1, layers=2, context_length=16, vocab_size=100)
  cfg, vision_cfg = open_clip.config_from_open_clip(model_cfg), model_cfg['vision_cfg']
  hidden = clip.configs.mlp_dim_field(128, int(128 * cfg.vision.hidden_dim / cfg.vision.width))
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(
      cfg.vision, width=128, layers=2, heads=2, image_resolution=32, patch_size=8, mlp_dim=hidden))
  torch.manual_seed(seed)
  m = oc.model.CustomTextCLIP(48, {**vision_cfg, 'timm_model_name': 'eva02_tiny_patch14_224'},
                              model_cfg['text_cfg'])  # a small trunk, replaced:
  # As TimmModel builds it (timm_proj null): num_classes=embed_dim, global_pool=timm_pool.
  m.visual.trunk = timm.create_model(vision_cfg['timm_model_name'], num_classes=48,
                                     global_pool=vision_cfg['timm_pool'], img_size=32,
                                     patch_size=8, embed_dim=128, depth=2, num_heads=2)
  return perturb(m, seed), cfg


def open_clip_eva(oc, tmp, name):
  (m, cfg), path = timm_eva(oc, name), os.path.join(save_dir(tmp, name), 'eva.pt')
  torch.save(m.state_dict(), path)
  return measure_load(path, open_clip_ref(m), cfg)


def open_clip_refused_trunk(oc, tmp, trunk):
  vision_cfg = {'timm_model_name': trunk, 'timm_model_pretrained': False,
                'timm_pool': '', 'timm_proj': 'linear', 'image_size': 32}
  text_cfg = {'context_length': 12, 'vocab_size': 300, 'width': 64, 'heads': 1, 'layers': 1}
  m = oc.model.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
  path = os.path.join(save_dir(tmp, trunk), 'trunk.pt')
  torch.save(m.state_dict(), path)
  return measure_load(path, open_clip_ref(m))


# ---------------------------------------------------------------- Hugging Face models

def _hf_clip(seed=0):
  """A small CLIPModel with exact GELU and 64-wide heads (what OpenAI's shape rules assume)."""
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=2, vocab_size=100, max_position_embeddings=16,
                       hidden_act='gelu', eos_token_id=2),
      vision_config=dict(hidden_size=64, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=1, image_size=32, patch_size=8, hidden_act='gelu'),
      projection_dim=24)
  torch.manual_seed(seed)
  return perturb(transformers.CLIPModel(config), seed)


def hf_siglip(seed=0, image_size=32):
  """A small transformers SiglipModel (8 px patches over `image_size` px images), every
  parameter perturbed (also used by the tests)."""
  config = transformers.SiglipConfig(
      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=100, max_position_embeddings=16),
      vision_config=dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=2, image_size=image_size, patch_size=8))
  torch.manual_seed(seed)
  m = transformers.SiglipModel(config).eval()
  with torch.no_grad():
    m.logit_scale.fill_(2.3)
    m.logit_bias.fill_(-4.0)
  return perturb(m, seed)


def hf_folder(tmp, siglip, lone, image_size=32):
  """save_pretrained's folder, or its model.safetensors alone (no config.json beside it)."""
  hf = hf_siglip(seed=4, image_size=image_size) if siglip else _hf_clip(seed=4)
  folder = save_dir(tmp, f'hf_{siglip}_{image_size}')
  hf.save_pretrained(folder)
  save_image_processor(folder, siglip, hf.config.vision_config.image_size)
  path = folder
  if lone:
    path = os.path.join(save_dir(tmp, f'hf_{siglip}_lone'), 'model.safetensors')
    with open(os.path.join(folder, 'model.safetensors'), 'rb') as src, open(path, 'wb') as dst:
      dst.write(src.read())
  return measure_load(path, hf_ref(hf), siglip=siglip, normalized=True)


def big_vision(tmp):
  hf = hf_siglip(seed=5)
  path = os.path.join(save_dir(tmp, 'big_vision'), 'siglip.npz')
  big_vision_npz(hf, path)
  return measure_load(path, hf_ref(hf), siglip=True, normalized=True)


# ---------------------------------------------------------------- exports

def _peer_row(missing, unexpected, err):
  if missing or unexpected:
    return {'result': 'WRONG', 'error': err,
            'note': f'missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]}'}
  return {'result': 'exact' if err < TOL else 'WRONG', 'error': err, 'note': ''}


def export_open_clip(oc, tmp):
  m, model_cfg = _open_clip_vit(oc, quick_gelu=False, seed=6)
  cfg = open_clip.config_from_open_clip(model_cfg)
  params = openai.from_state_dict({k: v.numpy() for k, v in m.state_dict().items()}, cfg)[0]
  folder = save_dir(tmp, 'export_open_clip')
  open_clip_folder.save_open_clip(params, cfg, folder)
  theirs = oc.create_model(f'local-dir:{folder}').eval()  # open_clip loads strictly
  return _peer_row((), (), compare(params, cfg, open_clip_ref(theirs)))


def tiny_sentencepiece(folder, vocab_size=43):
  """A SigLIP-style (T5 conventions: `<pad>` 0, `</s>` 1, `<unk>` 2) SentencePiece model of
  `vocab_size` pieces trained on a few prompts, for the small SigLIP models' vocabularies."""
  corpus = os.path.join(folder, 'corpus.txt')
  with open(corpus, 'w') as f:
    f.write('\n'.join(f'a photo of a {c} number {i}' for i in range(50)
                      for c in ('red circle', 'blue square', 'green triangle', 'yellow star')))
  sentencepiece.SentencePieceTrainer.train(
      input=corpus, model_prefix=os.path.join(folder, 'spm'), model_type='unigram',
      vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  return os.path.join(folder, 'spm.model')


def export_hf(tmp, siglip):
  hf = hf_siglip(seed=7) if siglip else _hf_clip(seed=7)
  source, out = save_dir(tmp, f'export_hf_src_{siglip}'), save_dir(tmp, f'export_hf_{siglip}')
  hf.save_pretrained(source)
  save_image_processor(source, siglip, hf.config.vision_config.image_size)
  # A SigLIP export writes its tokenizer's files: the source folder needs one.
  tokenizer = tiny_sentencepiece(save_dir(tmp, 'export_hf_spm')) if siglip else None
  params, cfg = clip.load(source, tokenizer=tokenizer)
  save_hf(params, cfg, out)
  cls = transformers.SiglipModel if siglip else transformers.CLIPModel
  theirs, info = cls.from_pretrained(out, output_loading_info=True)
  err = compare(params, cfg, hf_ref(theirs.eval()), siglip, normalized=True)
  return _peer_row(info['missing_keys'], info['unexpected_keys'], err)


# ---------------------------------------------------------------- the table

def rows():
  """(family, format, config given, expected result, measure(oc, tmp))."""
  return [
      ('open_clip ViT, GELU (LAION/DataComp)', 'bare state dict .pt', 'no', 'warns',
       lambda oc, tmp: open_clip_gelu(oc, tmp, with_config=False)),
      ('open_clip ViT, GELU (LAION/DataComp)', 'bare state dict .pt', 'yes', 'exact',
       lambda oc, tmp: open_clip_gelu(oc, tmp, with_config=True)),
      ('open_clip ViT, QuickGELU', 'hub folder (open_clip_config.json + .safetensors)', 'no',
       'exact', open_clip_hub_folder),
      ('open_clip ViT, QuickGELU', "training checkpoint {'state_dict'}, module._orig_mod. "
       'keys, open_clip_config.json beside', 'no', 'exact', open_clip_training_checkpoint),
      ('HF CLIPModel, GELU', 'save_pretrained folder', 'no', 'exact',
       lambda oc, tmp: hf_folder(tmp, siglip=False, lone=False)),
      ('HF CLIPModel, GELU', 'lone model.safetensors', 'no', 'warns',
       lambda oc, tmp: hf_folder(tmp, siglip=False, lone=True)),
      ('HF SiglipModel', 'save_pretrained folder', 'no', 'exact',
       lambda oc, tmp: hf_folder(tmp, siglip=True, lone=False)),
      ('HF SiglipModel', 'lone model.safetensors', 'no', 'warns',
       lambda oc, tmp: hf_folder(tmp, siglip=True, lone=True)),
      ('HF Siglip2Model (NaFlex), at its grid', 'save_pretrained folder', 'no', 'warns',
       lambda oc, tmp: recent.hf_siglip2(tmp)),
      ('HF Siglip2Model (NaFlex), any shape: clip.naflex_preprocess + encode_image_naflex',
       'save_pretrained folder + Siglip2ImageProcessor', 'no', 'exact',
       lambda oc, tmp: recent.hf_siglip2_any_shape(tmp)),
      # A bare .pt states no preprocessing: config= gives the architecture, not the transform.
      ('open_clip timm-trunk SigLIP', 'state dict .pt', 'yes', 'warns',
       lambda oc, tmp: open_clip_timm_siglip(oc, tmp, with_config=True)),
      ('open_clip timm-trunk SigLIP', 'state dict .pt', 'no', 'warns',
       lambda oc, tmp: open_clip_timm_siglip(oc, tmp, with_config=False)),
      # So400m/14 at 384 px covers 27 x 27 patches, 6 px short: 38 px over 8 px patches, the same.
      ('SigLIP So400m/14 at 384 px (grid floors as the conv; 38 px / 8 px here), HF '
       '(SiglipModel)', 'save_pretrained folder', 'no', 'exact',
       lambda oc, tmp: hf_folder(tmp, siglip=True, lone=False, image_size=38)),
      ('SigLIP So400m/14 at 384 px (grid floors as the conv; 38 px / 8 px here), open_clip '
       'timm trunk', 'state dict .pt', 'yes', 'warns',
       lambda oc, tmp: open_clip_timm_siglip(oc, tmp, with_config=True, image_size=38)),
      ('big_vision SigLIP', '.npz', 'no', 'warns', lambda oc, tmp: big_vision(tmp)),
      ('open_clip EVA02 (timm Eva trunk: 2-D RoPE, SwiGLU, sub-LN)', 'state dict .pt', 'yes',
       'exact', lambda oc, tmp: open_clip_eva(oc, tmp, 'EVA02-B-16')),
      ('open_clip EVA02-E / EVA01-g (timm Eva trunk: q/v biases, post-norm)', 'state dict .pt',
       'yes', 'exact', lambda oc, tmp: open_clip_eva(oc, tmp, 'EVA02-E-14')),
      ('open_clip PE-Core T/S/B/L (timm Eva trunk: 2-D RoPE, class token + MAP head)',
       'state dict .pt', 'yes', 'warns', lambda oc, tmp: open_clip_eva(oc, tmp, 'PE-Core-B-16')),
      ('open_clip CoCa (coca_ViT-B-32: attentional pooler, captioning decoder)',
       'hub folder (open_clip_config.json + .bin)', 'no', 'exact', recent.open_clip_coca),
      ('MetaCLIP 2 worldwide, open_clip (XLM-V tokenizer, pooled at the first </s>)',
       'hub folder (save_for_hf: config, weights, tokenizer.json)', 'no', 'exact',
       recent.open_clip_metaclip2),
      ('MetaCLIP 2 worldwide, HF (MetaClip2Model)', 'save_pretrained folder + tokenizer', 'no',
       'exact', lambda oc, tmp: recent.hf_metaclip2(tmp)),
      ('open_clip ConvNeXt trunk', 'state dict .pt', 'no', 'refused',
       lambda oc, tmp: open_clip_refused_trunk(oc, tmp, 'convnext_atto')),
      ('open_clip MobileCLIP2 (MCi / FastViT trunk)', 'state dict .pt', 'no', 'refused',
       lambda oc, tmp: open_clip_refused_trunk(oc, tmp, 'fastvit_mci0')),
      ('export: clip.save_open_clip', "open_clip create_model('local-dir:...')", '-',
       'exact', export_open_clip),
      ('export: clip.save_hf (CLIP)', 'CLIPModel.from_pretrained, strict', '-', 'exact',
       lambda oc, tmp: export_hf(tmp, siglip=False)),
      ('export: clip.save_hf (SigLIP)', 'SiglipModel.from_pretrained, strict', '-',
       'exact', lambda oc, tmp: export_hf(tmp, siglip=True)),
  ]


def run_row(family, fmt, config_given, expected, measure, oc, tmp):
  start = time.perf_counter()
  try:
    out = measure(oc, tmp)
  except Exception as e:  # pylint: disable=broad-except
    out = {'result': f'error: {type(e).__name__}', 'error': None, 'note': str(e)[:200]}
  return {'family': family, 'format': fmt, 'config_given': config_given, 'expected': expected,
          **out, 'seconds': round(time.perf_counter() - start, 2)}


def table(results):
  lines = ['| family | format | config given | result | max rel. error | note |',
           '| --- | --- | --- | --- | ---: | --- |']
  for r in results:
    err = '' if r['error'] is None else f'{r["error"]:.1e}'
    note = r['note'].replace('|', '\\|').replace('\n', ' ')
    if r['result'] != r['expected']:
      note = f'**expected {r["expected"]}** ' + note
    cells = [r['family'], r['format'], r['config_given'], r['result'], err, note]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  oc = open_clip_reference.import_open_clip()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    wanted = [w for w in args.only.split(',') if w]
    chosen = [r for r in rows() if not wanted or any(w in r[0] for w in wanted)]
    if not chosen:
      raise SystemExit(f'--only {args.only!r} matches no row; families: '
                       f'{sorted({r[0] for r in rows()})}')
    results = [run_row(*row, oc, tmp) for row in chosen]
  md = table(results)
  print(md)
  print(f'{len(results)} rows in {time.perf_counter() - start:.1f} s')
  out = os.fspath(args.out)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'checkpoint_families.json'), 'w') as f:
    json.dump({'tolerance': TOL, 'rows': results}, f, indent=1)
  with open(os.path.join(out, 'checkpoint_families.md'), 'w') as f:
    f.write(md + '\n')
  return results


if __name__ == '__main__':
  main()
