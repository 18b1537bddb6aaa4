"""Simulated CPU devices for scripts and tests: XLA reads the count once, when jax is imported."""
import os
import re
import sys

_FLAG = '--xla_force_host_platform_device_count'


def simulate_cpu_devices(count, who='this script'):
  """Sets XLA_FLAGS so that jax starts with `count` CPU devices.

  Replaces a count already in XLA_FLAGS (the last one given wins) and keeps the other flags.
  Raises if jax is already imported, where the flag would be silently ignored.
  """
  if not isinstance(count, int) or count < 1:
    raise ValueError(f'the simulated device count must be an int >= 1, got {count!r}')
  if 'jax' in sys.modules:
    raise RuntimeError(f'{who} sets the simulated device count, so it must run before jax is '
                       'imported: run it as a script (python -m ...)')
  others = re.sub(rf'{_FLAG}=\S*', '', os.environ.get('XLA_FLAGS', '')).split()
  os.environ['XLA_FLAGS'] = ' '.join(others + [f'{_FLAG}={count}'])
