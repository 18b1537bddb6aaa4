"""LAION's clip_benchmark as the reference for our evaluation metrics (tests only).

It is pip-installed with `--no-deps` into a side folder (`tests/.reference-clip_benchmark`; see
`reference_packages`): its dependencies include open_clip and torchvision, which would pull a
CUDA torch over the CPU wheel. Only its metric modules are imported; they need torch, tqdm and
scikit-learn (the test extras), nothing from its model or dataset code.

Its `accuracy` calls `float()` on a one-element 1-d array, which numpy >= 2.4 refuses; the
modules get a `float` that takes the element first (nothing else in them changes).
"""
import builtins
import importlib
import sys

import numpy as np

from experiments.references import packages as reference_packages

PACKAGES = ('clip-benchmark==1.6.2',)
FOLDER = reference_packages.ROOT + '-clip_benchmark'


def import_metrics():
  """`(zeroshot_classification, zeroshot_retrieval, linear_probe)`: clip_benchmark's modules."""
  reference_packages.install(PACKAGES, FOLDER, 'clip_benchmark')
  if FOLDER not in sys.path:
    sys.path.insert(0, FOLDER)
  modules = tuple(importlib.import_module(f'clip_benchmark.metrics.{name}') for name in
                  ('zeroshot_classification', 'zeroshot_retrieval', 'linear_probe'))
  for module in modules:
    module.float = _float
  return modules


def _float(x=0.0):
  return builtins.float(np.asarray(x).reshape(()) if np.ndim(x) else x)
