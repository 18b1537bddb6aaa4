"""data/transforms.py: the tf.data image transforms against their PIL / torchvision twins."""
import itertools

import numpy as np

from clip import preprocess
from data import transforms


def test_resized_size_is_the_preprocess_rule_on_tensors():
  """One rule, one argument order: torchvision's Resize(n) as `clip.preprocess` computes it."""
  sizes = list(itertools.product(range(1, 90, 7), range(1, 90, 11)))
  for (width, height), n_px in itertools.product(sizes, (16, 24, 224)):
    got = tuple(int(x) for x in transforms.resized_size(width, height, n_px))
    assert got == preprocess.resized_size(width, height, n_px), (width, height, n_px)
  assert tuple(np.asarray(transforms.resized_size(640, 427, 224))) == (335, 224)
