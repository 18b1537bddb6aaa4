"""open-clip-torch (and timm) as references for tests and the checkpoint-families table.

They are installed with `--no-deps` into a side folder (`tests/.reference-open_clip`; see
`reference_packages`): through torchvision their dependencies would pull a CUDA torch over the
CPU wheel. Both import torchvision. PyPI's torchvision 0.28.0 (the release matching torch 2.13.0)
ships C++ ops linked against the CUDA build of torch; beside the CPU wheel they fail to load, which
torchvision tolerates, except that its import then registers fake kernels for the ops
`torchvision::nms` and `torchvision::qnms` without checking that they exist, and raises. We
declare those two schemas (no kernel: calling them would raise) before the import, so the
pure-Python parts open_clip and timm use (transforms, FrozenBatchNorm2d) import. Nothing here
calls a torchvision op. With a torchvision whose ops load, this does nothing.
"""
import sys

from experiments.references import packages as reference_packages

PACKAGES = ('open-clip-torch==3.3.0', 'timm==1.0.31', 'torchvision==0.28.0')
FOLDER = reference_packages.ROOT + '-open_clip'

_OPS = ('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
        'qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
_library = []  # keeps the declared schemas alive


def _import_torchvision():
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
    return
  except RuntimeError as e:
    if 'torchvision::' not in str(e):
      raise
  import torch  # pylint: disable=g-import-not-at-top
  for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
    del sys.modules[name]  # the half-imported package
  lib = torch.library.Library('torchvision', 'FRAGMENT')
  for schema in _OPS:
    lib.define(schema)
  _library.append(lib)
  import torchvision  # pylint: disable=g-import-not-at-top,unused-import,redefined-outer-name


def import_open_clip():
  """`open_clip`, importable beside the CPU torch wheel (see the module docstring)."""
  reference_packages.install(PACKAGES, FOLDER, 'open_clip')
  if FOLDER not in sys.path:
    sys.path.insert(0, FOLDER)
  _import_torchvision()
  import open_clip  # pylint: disable=g-import-not-at-top
  return open_clip
