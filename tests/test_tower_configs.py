"""The towers' configs: bad values and bad combinations of the custom-architecture options raise
when built, naming them; the MLP width, MAP heads and end-of-text id each tower derives; how a
tower runs (`Execution`, its attention implementation included)."""
import dataclasses
import json
import warnings

import pytest

from clip import config_checks
from clip import configs
from clip import tower_configs
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION


@pytest.mark.parametrize('make, message', [
    (lambda: tower_configs.VisionConfig('vit', 64, 2, 3, 224, 32), 'not divisible by heads'),
    (lambda: tower_configs.VisionConfig('vit', 64, 2, 2, 16, 32), 'smaller than patch_size'),
    (lambda: tower_configs.VisionConfig('vit', 64, 2, 2, 224), 'patch_size'),
    (lambda: tower_configs.VisionConfig('resnet', 64, (3, 4, 6), 32, 224),
     '4 positive block counts'),
    (lambda: tower_configs.VisionConfig('resnet', 64, (3, 4, 6, 3), 32, 200), 'multiple of 32'),
    (lambda: tower_configs.VisionConfig('convnext', 64, 2, 2, 224, 32), 'arch'),
    (lambda: tower_configs.TextConfig(512, 12, 0), 'heads must be > 0'),
    (lambda: tower_configs.VisionConfig(**VISION, pool='map', pool_heads=0), 'pool_heads'),
    (lambda: tower_configs.VisionConfig(**VISION, pool='map', pool_heads=3), 'map-pooling heads'),
    (lambda: tower_configs.VisionConfig(**VISION, pool='avg'), "pool must be one of"),
    (lambda: tower_configs.VisionConfig(**{**VISION, 'width': 30, 'heads': 3},
                                        pos_embedding='sincos2d'),
     'divisible by 4'),
    (lambda: tower_configs.VisionConfig(**VISION, registers=2, pool_registers=True),
     'pool_registers'),
    (lambda: tower_configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, norm='rmsnorm'),
     'not to a ResNet'),
    (lambda: tower_configs.TextConfig(**{**TEXT, 'width': 24, 'heads': 8}, pos_embedding='rope'),
     'must be even'),
    (lambda: tower_configs.TextConfig(**TEXT, pool='first'), 'first token only'),
    (lambda: tower_configs.TextConfig(**TEXT, mlp='relu'), 'mlp must be one of'),
    (lambda: tower_configs.TextConfig(**TEXT, norm='batchnorm'), 'norm must be one of'),
    (lambda: tower_configs.TextConfig(**TEXT, causal=False, mask_padding=False),
     'mask_padding=False would let'),
    (lambda: tower_configs.TextConfig(**TEXT, projection=False, projection_bias=True),
     'projection_bias=True needs projection=True'),
    (lambda: tower_configs.TextConfig(**TEXT, norm_eps=0.0), 'norm_eps must be None'),
    (lambda: tower_configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, ln_pre=False),
     r"not to a ResNet: \['ln_pre=False'\]"),
    (lambda: tower_configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, patch_bias=True),
     r"not to a ResNet: \['patch_bias=True'\]"),
])
def test_bad_tower_configs_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_hidden_dim_and_map_heads_are_the_options_or_the_tower_s_defaults():
  vit = tower_configs.VisionConfig('vit', 64, 1, 4, 32, 8, pool='map')
  assert (vit.hidden_dim, vit.map_heads) == (256, 4)  # 4 x width, the tower's heads
  vit = tower_configs.VisionConfig('vit', 64, 1, 4, 32, 8, pool='map', mlp_dim=96, pool_heads=2)
  assert (vit.hidden_dim, vit.map_heads) == (96, 2)
  text = tower_configs.TextConfig(32, 1, 2, mlp_dim=40)
  decoder = tower_configs.DecoderConfig(48, 1, 3)
  assert (text.hidden_dim, text.map_heads, decoder.hidden_dim) == (40, 2, 192)
  assert tower_configs.mlp_dim_field(64, 256) is None and tower_configs.mlp_dim_field(64, 96) == 96


def test_end_of_text_id_is_stated_or_openai_s_with_a_warning_elsewhere():
  openai = tower_configs.TextConfig(32, 1, 2)
  assert openai.eot_id == 49407 == tower_configs.DecoderConfig(32, 1, 2).eot_id
  assert tower_configs.TextConfig(32, 1, 2, vocab_size=100, eot_token_id=3).eot_id == 3
  for make in (tower_configs.TextConfig, tower_configs.DecoderConfig):
    with pytest.warns(config_checks.ConfigWarning,
                      match=rf'{make.__name__}\(vocab_size=100\) states no eot_token_id: '
                            'assumed the last id, 99'):
      assert make(32, 1, 2, vocab_size=100).eot_id == 99
    with pytest.raises(ValueError, match=rf'{make.__name__}\.eot_token_id must be None '
                                         r'\(vocab_size - 1\) or in \[0, 100\), got 100'):
      make(32, 1, 2, vocab_size=100, eot_token_id=100)
  with warnings.catch_warnings():  # a tower that never reads the end-of-text id assumes nothing
    warnings.simplefilter('error')
    tower_configs.TextConfig(32, 1, 2, vocab_size=100, pool='last', causal=True)


def test_execution_is_how_a_tower_runs():
  assert tower_configs.Execution() == ('float32', 'none', False, 'xla')
  assert tower_configs.Execution._fields == ('dtype', 'remat', 'scan', 'attention')
  assert tower_configs.ATTENTIONS == ('xla', 'cudnn', 'einsum')


def test_the_attention_implementation_travels_with_the_config_not_its_architecture():
  """`CLIPConfig.attention` is validated, reaches `execution`, survives the JSON round trip (a
  config written before the field loads with the default), and is no architecture field."""
  base = configs.CLIPConfig(16, tower_configs.VisionConfig(**VISION),
                            tower_configs.TextConfig(**TEXT, eot_token_id=63))
  cfg = dataclasses.replace(base, attention='einsum')
  assert cfg.execution == ('float32', 'none', False, 'einsum') and base.attention == 'xla'
  values = json.loads(json.dumps(configs.to_dict(cfg)))
  assert values['attention'] == 'einsum' and configs.from_dict(values) == cfg
  del values['attention']
  assert configs.from_dict(values) == base
  assert 'attention' in configs.NON_ARCHITECTURE_FIELDS
  with pytest.raises(ValueError, match=r"CLIPConfig.attention must be one of \('xla', 'cudnn', "
                                       r"'einsum'\), got 'flash'"):
    dataclasses.replace(base, attention='flash')
