"""Writing files safely: every file the library writes (exports, a workdir's model config) goes
through `atomic_write`."""
import os
import tempfile


def atomic_write(path, write):
  """`write(tmp)` into a temporary file beside `path`, then renamed onto it: never half a file
  (its folder is made if missing). Every file the library writes goes through it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.part')
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
