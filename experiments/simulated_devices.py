"""Simulated CPU devices for scripts and tests: XLA reads the count once, when jax is imported."""
import os
import re
import sys

_FLAG = '--xla_force_host_platform_device_count'


def simulate_cpu_devices(count, who='this script', jax_imported='raise'):
  """Sets XLA_FLAGS so that jax starts with `count` CPU devices.

  Replaces a count already in XLA_FLAGS (the last one given wins) and keeps the other flags.
  If jax is already imported the flag would be ignored: that raises, or with
  `jax_imported='keep'` leaves the devices as they are (for a module that tests import and that
  checks `jax.device_count()` itself).
  """
  if not isinstance(count, int) or count < 1:
    raise ValueError(f'the simulated device count must be an int >= 1, got {count!r}')
  if jax_imported not in ('raise', 'keep'):
    raise ValueError(f"jax_imported must be 'raise' or 'keep', got {jax_imported!r}")
  if 'jax' in sys.modules:
    if jax_imported == 'keep':
      return
    raise RuntimeError(f'{who} sets the simulated device count, so it must run before jax is '
                       'imported: run it as a script (python -m ...)')
  others = re.sub(rf'{_FLAG}=\S*', '', os.environ.get('XLA_FLAGS', '')).split()
  os.environ['XLA_FLAGS'] = ' '.join(others + [f'{_FLAG}={count}'])
