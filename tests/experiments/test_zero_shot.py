"""experiments/zero_shot.py end to end: a tiny checkpoint built so that the right classes are
known classifies a folder of images (table, CSV and JSON); bad folders, models and classes are
refused with a message."""
import csv
import json

import chex
import jax
import numpy as np
import pytest
from PIL import Image

import clip
from clip import preprocess
from clip import tokenizer
from clip.eval import zero_shot
from experiments import zero_shot as cli
from tests.eval.test_zero_shot import BPE_CFG
from tests.eval.test_zero_shot import np_normalize
from tests.eval.test_zero_shot import np_softmax
from tests.eval.test_zero_shot import text_projection_for


@pytest.fixture(scope='module')
def cli_case(tmp_path_factory):
  """A tiny checkpoint whose default-template prompts of class c land on the feature of image
  perm[c], saved as a torch state dict beside a folder of PNGs."""
  import torch  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp('zero_shot')
  (folder / 'images').mkdir()
  rng = np.random.default_rng(5)
  classes, perm = ['red', 'green', 'blue'], np.array([1, 2, 0])
  paths = []
  for i, size in enumerate([(40, 50), (64, 33), (32, 32)]):
    paths.append(folder / 'images' / f'img{i}.png')
    Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(paths[-1])
  (folder / 'images' / 'notes.txt').write_text('not an image')
  params = clip.init(jax.random.PRNGKey(2), BPE_CFG)
  img = np.asarray(clip.encode_image(params, preprocess.preprocess(paths, 32), BPE_CFG))
  templates = zero_shot.DEFAULT_TEMPLATES
  tokens = tokenizer.tokenize(zero_shot.prompts(classes, templates), context_length=16)
  known = text_projection_for(params, BPE_CFG, tokens, img[np.repeat(perm, len(templates))])
  torch.save(clip.to_torch_state_dict(known), folder / 'model.pt')
  (folder / 'classes.txt').write_text('\n'.join(classes) + '\n\n')
  return folder, classes, perm, img


def test_cli_end_to_end(cli_case, capsys):
  folder, classes, perm, img = cli_case
  out = folder / 'results'
  predictions = cli.main(['--model', str(folder / 'model.pt'), '--images', str(folder / 'images'),
                          '--classes', str(folder / 'classes.txt'), '--top-k', '5',
                          '--csv', str(folder / 'out.csv'), '--out', str(out)])
  printed = capsys.readouterr().out
  assert 'skipped 1 entries' in printed and 'notes.txt' in printed
  assert '--top-k 5 > 3 classes: showing 3' in printed
  expected_class = [classes[c] for c in np.argsort(perm)]
  cos = np_normalize(img) @ np_normalize(img[perm]).T
  scale = float(np.exp(clip.init(jax.random.PRNGKey(2), BPE_CFG)['logit_scale']))
  expected_p = np.sort(np_softmax(scale * cos), axis=1)[:, ::-1]
  assert [p['image'] for p in predictions] == ['img0.png', 'img1.png', 'img2.png']
  assert [p['top'][0]['class'] for p in predictions] == expected_class
  got_p = np.array([[t['probability'] for t in p['top']] for p in predictions])
  chex.assert_trees_all_close(got_p, expected_p, atol=1e-4)
  for name, cls in zip(['img0.png', 'img1.png', 'img2.png'], expected_class):
    assert any(line.startswith(name) and f'{cls} ' in line for line in printed.splitlines())
  with open(folder / 'out.csv', encoding='utf-8') as f:
    table = list(csv.reader(f))
  assert table[0] == ['image', 'class_1', 'prob_1', 'class_2', 'prob_2', 'class_3', 'prob_3']
  assert [row[1] for row in table[1:]] == expected_class
  np.testing.assert_allclose(np.array([row[2::2] for row in table[1:]], float), got_p, atol=1e-6)
  with open(out / 'predictions.json', encoding='utf-8') as f:
    assert json.load(f)['predictions'] == predictions


def test_cli_classes_as_list(cli_case, capsys):
  folder, _, _, _ = cli_case
  predictions = cli.main(['--model', str(folder / 'model.pt'), '--images', str(folder / 'images'),
                          '--classes', 'red, green', '--top-k', '1', '--out',
                          str(folder / 'results2')])
  assert [len(p['top']) for p in predictions] == [1, 1, 1]
  assert {p['top'][0]['class'] for p in predictions} <= {'red', 'green'}
  assert 'top-1' in capsys.readouterr().out


def test_cli_errors(cli_case, tmp_path):
  folder, _, _, _ = cli_case
  model = str(folder / 'model.pt')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'text_only').mkdir()
  (tmp_path / 'text_only' / 'a.txt').write_text('x')
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'bad.png').write_bytes(b'not a png')
  cases = [
      (['--model', model, '--images', str(tmp_path / 'empty')], 'no images in'),
      (['--model', model, '--images', str(tmp_path / 'text_only')], 'no images in'),
      (['--model', model, '--images', str(tmp_path / 'nowhere')], 'is not a folder'),
      (['--model', 'ViT-Z-99', '--images', str(folder / 'images')],  # ORG/NAME: a Hub name
       "--model must be an official model .* got 'ViT-Z-99'"),
      (['--model', model, '--images', str(tmp_path / 'broken')], "bad.png' as an image"),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit, match=message):
      cli.main(args + ['--classes', 'a,b', '--out', str(tmp_path / 'out')])
  with pytest.raises(SystemExit, match='names some classes twice'):
    cli.main(['--model', model, '--images', str(folder / 'images'), '--classes', 'a,b,a'])
