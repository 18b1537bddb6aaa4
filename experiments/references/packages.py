"""Reference libraries for tests and benchmarks, pip-installed with `--no-deps` into side folders.

The references either collide with our import names (OpenAI's package is also called `clip`) or
pull a CUDA torch over the CPU wheel through their dependencies (open-clip-torch and timm need
torchvision), so they never go into the environment itself: each set lives in its own folder
under `tests/.reference*` (or $CLIP_REFERENCE_DIR), installed on first use.
"""
import os
import shutil
import subprocess
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.environ.get('CLIP_REFERENCE_DIR', os.path.join(_REPO, 'tests', '.reference'))


def install(packages, folder, marker):
  """`pip install --no-deps --target folder packages` unless `folder/marker` exists. pip writes
  into a temporary folder that is then renamed, so concurrent test workers never see half."""
  if os.path.exists(os.path.join(folder, marker)):
    return folder
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix='.install-')
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', tmp,
                  *packages], check=True)
  try:
    os.rename(tmp, folder)
  except OSError:  # another worker won the race
    shutil.rmtree(tmp, ignore_errors=True)
  return folder
