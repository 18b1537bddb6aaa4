"""Ring losses: per-device memory of the jitted gradient stays flat in the number of devices
(while the all-gather losses grow with it), and the streaming log-sum-exp survives large logits."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import bench_losses
import losses

LOCAL_BATCH, DIM = 256, 64
DEVICE_COUNTS = (2, 4, 8)
FLAT = 1.1  # ring: temp bytes at n devices <= FLAT * temp bytes at 2 devices
GROWTH = 3.0  # all-gather: temp bytes at 8 devices >= GROWTH * temp bytes at 2 devices (ideal 4)
BLOCKS = 8  # ring temp bytes <= BLOCKS fp32 arrays of (b^2 + b*d) elements


def grad_temp_bytes(name, n):
  """`memory_analysis()` temp bytes per device of the jitted gradient w.r.t. every argument, for
  LOCAL_BATCH pairs per device on n devices; compiled from shapes only."""
  mesh = Mesh(np.asarray(jax.devices()[:n]), ('data',))
  emb = jax.ShapeDtypeStruct((n * LOCAL_BATCH, DIM), jnp.float32,
                             sharding=NamedSharding(mesh, P('data')))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  args = (emb, emb, scalar, scalar) if losses.takes_bias(name) else (emb, emb, scalar)
  grad = jax.jit(jax.grad(losses.make_loss(name, mesh), argnums=tuple(range(len(args)))))
  return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('name', ['ring_contrastive', 'ring_sigmoid'])
def test_ring_memory_is_flat_in_devices(name):
  temp = {n: grad_temp_bytes(name, n) for n in DEVICE_COUNTS}
  assert all(temp[n] <= FLAT * temp[2] for n in DEVICE_COUNTS), temp
  assert max(temp.values()) <= BLOCKS * 4 * (LOCAL_BATCH**2 + LOCAL_BATCH * DIM), temp


@pytest.mark.parametrize('name', ['contrastive', 'sigmoid'])
def test_allgather_memory_grows_with_devices(name):
  temp = {n: grad_temp_bytes(name, n) for n in DEVICE_COUNTS}
  assert temp[2] < temp[4] < temp[8] and temp[8] >= GROWTH * temp[2], temp
  assert temp[8] > BLOCKS * 4 * (LOCAL_BATCH**2 + LOCAL_BATCH * DIM), temp


@pytest.mark.parametrize('name', ['ring_contrastive', 'ring_sigmoid'])
def test_ring_is_stable_at_large_logits(name):
  """logits up to 1000: every step's block max differs, so the running log-sum-exp rescales."""
  rng = np.random.default_rng(1)
  x_NxD = rng.standard_normal((16, 8))
  img = (x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True)).astype(np.float32)
  txt = img[::-1].copy()  # the best match of each row is a negative, on another device
  sigmoid = losses.takes_bias(name)
  args = (img, txt, np.log(1000.0), 3.0) if sigmoid else (img, txt, np.log(1000.0))
  ref = losses.sigmoid_loss if sigmoid else losses.contrastive_loss
  argnums = tuple(range(len(args)))
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  value, grads = jax.value_and_grad(losses.make_loss(name, mesh), argnums=argnums)(*args)
  ref_value, ref_grads = jax.value_and_grad(ref, argnums=argnums)(*args)
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max()


def test_bench_losses_writes_table_json_and_plot(tmp_path):
  bench_losses.main(['--devices', '1,2', '--batch-sizes', '8', '--dim', '16', '--repeats', '1',
                     '--out', str(tmp_path)])
  with open(tmp_path / 'bench_losses.json') as f:
    rows = json.load(f)['rows']
  assert {(r['loss'], r['devices']) for r in rows} == {
      (name, n) for name in bench_losses.NAMES for n in (1, 2)}
  assert all(r['step_s'] > 0 and r['temp_bytes'] > 0 for r in rows)
  assert all('time_vs_allgather' in r for r in rows if r['loss'].startswith('ring'))
  assert (tmp_path / 'bench_losses.png').stat().st_size > 0
