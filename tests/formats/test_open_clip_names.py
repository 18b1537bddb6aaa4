"""open_clip's names (clip/formats/open_clip_names.py): our bundled table equals the configs
open-clip-torch ships, and our tags carry its quick_gelu flags."""
import pytest

import clip
from clip.formats import open_clip as occ
from clip.formats import open_clip_names as names
from clip.formats import open_clip_pretrained as pretrained
from tests.formats.test_open_clip import OPENAI_NAMES
from tests.formats.test_open_clip import STANDARD
from tests.formats.test_open_clip import oc  # pylint: disable=unused-import


@pytest.mark.parametrize('name', sorted(names.MODEL_CFGS))
def test_bundled_model_cfg_equals_open_clips(oc, name):
  assert names.MODEL_CFGS[name] == oc.get_model_config(name)


def test_table_holds_open_clips_standard_and_siglip_names(oc):
  for base in STANDARD:
    for name in (base, f'{base}-quickgelu'):
      assert (name in names.MODEL_CFGS) == (name in oc.list_models()), name
  assert 'ViT-g-14-quickgelu' not in names.MODEL_CFGS  # open_clip has no such config or name rule
  siglip = {n for n in oc.list_models() if 'SigLIP' in n}
  assert siglip <= set(names.MODEL_CFGS), siglip - set(names.MODEL_CFGS)
  # 384 px over 14 px patches: the grid floors to 27 x 27, as timm's conv does.
  so400m_384 = occ.config_from_open_clip(oc.get_model_config('ViT-SO400M-14-SigLIP-384'))
  assert (so400m_384.vision.image_resolution, so400m_384.vision.grid_size) == (384, 27)


@pytest.mark.parametrize('name', sorted(names.PRETRAINED_TAGS))
def test_tags_and_their_quick_gelu_are_open_clips(oc, name):
  tags = names.PRETRAINED_TAGS[name]
  assert set(tags) == set(oc.pretrained.list_pretrained_tags_by_model(name))
  assert tags == {t: oc.get_pretrained_cfg(name, t).get('quick_gelu', False) for t in tags}


def test_every_name_has_tags():
  assert set(names.PRETRAINED_TAGS) == set(names.MODEL_CFGS)


def test_a_quick_gelu_tag_switches_quick_gelu_on():
  for base, tags in names.PRETRAINED_TAGS.items():
    for tag, quick in tags.items():
      want = names.open_clip_config(f'{base.removesuffix("-quickgelu")}-quickgelu' if quick
                                  else base)
      assert names.open_clip_config(base, tag) == want, (base, tag)
      assert names.open_clip_config(f'{base}/{tag.upper().replace("_", "-")}') == want, (base, tag)


@pytest.mark.parametrize('openai_name', sorted(OPENAI_NAMES))
def test_openai_tags_give_our_openai_configs(openai_name):
  name = OPENAI_NAMES[openai_name]
  assert names.open_clip_config(name, 'openai') == clip.MODELS[openai_name]
  assert names.open_clip_config(f'{name}-quickgelu') == clip.MODELS[openai_name]


@pytest.mark.parametrize('name', sorted(names.PRETRAINED_TAGS))
def test_pretrained_repos_and_preprocessing_are_open_clips(oc, name):
  """Where clip.load(name, pretrained=tag) downloads from, and the preprocessing it pairs with the
  weights: open_clip's `get_pretrained_cfg` (its URL kept only for weights with no Hub repo)."""
  assert set(pretrained.HF_HUB[name]) == set(names.PRETRAINED_TAGS[name])
  for tag in names.PRETRAINED_TAGS[name]:
    theirs = dict(oc.get_pretrained_cfg(name, tag))
    if theirs['hf_hub']:
      theirs['url'] = ''
    assert pretrained.pretrained_cfg(name, tag) == theirs, (name, tag)
