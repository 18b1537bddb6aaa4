"""clip/pooling.py: the MAP head (a learned probe attending to the tokens, then a residual MLP)
against float64 numpy, with and without the padding mask, for both towers' configs."""
import chex
import jax
import numpy as np
import pytest

from clip import configs
from clip import pooling
from tests.numpy_reference import BLOCK_OPTIONS
from tests.numpy_reference import MUST_DIFFER
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION
from tests.numpy_reference import np_map
from tests.numpy_reference import perturbed
from tests.numpy_reference import rel_err
from tests.numpy_reference import to_np

MAP_CASES = {
    'text': lambda: configs.TextConfig(**TEXT, pool='map'),
    'vision-two-heads': lambda: configs.VisionConfig(**VISION, pool='map', pool_heads=2),
    'everything-norm-eps': lambda: configs.TextConfig(**TEXT, **BLOCK_OPTIONS['everything'],
                                                      pool='map', causal=False, norm_eps=0.5),
}


@pytest.mark.parametrize('name', sorted(MAP_CASES))
def test_map_head_matches_numpy(name):
  """The mask (True = a real token) hides the padding from the probe: what sits there changes
  nothing, while without the mask it changes every padded row."""
  cfg = MAP_CASES[name]()
  p = perturbed(pooling.init(jax.random.PRNGKey(0), cfg))
  x = np.random.default_rng(1).standard_normal((3, 7, 32)).astype(np.float32)
  mask = np.arange(7)[None] < np.array([[7], [4], [1]])
  x64 = x.astype(np.float64)
  for m in (None, mask):
    assert rel_err(pooling.apply(p, x, cfg, m), np_map(to_np(p), x64, cfg, m)) < RTOL
  noisy = np.where(mask[..., None], x, 3.0).astype(np.float32)
  chex.assert_trees_all_close(pooling.apply(p, noisy, cfg, mask), pooling.apply(p, x, cfg, mask),
                              rtol=1e-5, atol=1e-6)
  unmasked = pooling.apply(p, noisy, cfg)
  for row in (1, 2):
    assert rel_err(unmasked[row], np_map(to_np(p), x64, cfg)[row]) > MUST_DIFFER
