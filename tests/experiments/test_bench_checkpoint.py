"""experiments/bench_checkpoint.py, its parts that run in-process (a whole run takes minutes): the
memory probe against an allocation of known size, the reference pre-orbax save against the state
it saved, and the shard comparison that checks what each method wrote."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_checkpoint

MIB = 2 ** 20


def test_peak_rss_sees_an_allocation_freed_before_the_block_ends():
  size = 64 * MIB
  with bench_checkpoint.PeakRss() as peak:
    start = bench_checkpoint._status_bytes('VmRSS')  # pylint: disable=protected-access
    block = np.ones(size, np.uint8)  # written, so resident
    time.sleep(0.05)  # several polls
    del block
  assert peak.hwm is not None, 'this kernel refused to reset VmHWM'
  for seen in (peak.hwm, peak.polled):
    assert size - MIB < seen - start < size + 16 * MIB, (seen - start) / MIB  # page rounding


def test_pre_orbax_save_writes_every_leaf_and_the_comparison_catches_a_change(tmp_path):
  state = {'params': {'w': jnp.arange(24.0).reshape(6, 4)},
           'opt': {'mu': jnp.ones((6, 4)), 'nu': jnp.full((6, 4), 2.0)},
           'step': jnp.zeros((), jnp.int32)}
  path = bench_checkpoint.pre_orbax_save(str(tmp_path), 7, state)
  assert path == str(tmp_path / 'step_00000007' / 'state.npz')
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  with np.load(path) as stored:
    assert sorted(stored.files) == sorted(jax.tree_util.keystr(p) for p, _ in flat)
    for p, leaf in flat:
      np.testing.assert_array_equal(stored[jax.tree_util.keystr(p)], np.asarray(leaf))
      assert bench_checkpoint.shards_equal(stored[jax.tree_util.keystr(p)], leaf)
  changed = np.asarray(state['params']['w']).copy()
  changed[5, 3] += 1
  assert not bench_checkpoint.shards_equal(changed, state['params']['w'])
  assert not bench_checkpoint.shards_equal(jnp.asarray(changed), state['params']['w'])


def test_a_leaf_the_devices_do_not_split_is_refused(capsys):
  with pytest.raises(SystemExit):
    bench_checkpoint.parse_args(['--leaf-mib', '1', '--local-devices', '3'])
  assert 'a leaf of 1 MiB has 256 rows, not divisible by the 6 devices' in capsys.readouterr().err
