"""losses/allgather.py and ring.py as shard_map bodies: each one, called with a str axis name and
differentiated per device inside shard_map, against its single-device reference."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

import losses
from tests.losses.test_reference import FP32_RTOL
from tests.losses.test_reference import assert_rel_close
from tests.losses.test_reference import loss_args
from tests.losses.test_reference import mesh_of
from tests.losses.test_reference import pairs
from tests.losses.test_reference import reference_value_and_grad
from tests.losses.test_reference import rel_err


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_gradient_taken_inside_shard_map(name):
  """Called as a shard_map body with a str axis name, differentiated per device: each device's
  gradient is its slice of the reference's (the loss is replicated, the gathers transpose)."""
  mesh, _ = mesh_of('8')
  body = {'contrastive': losses.allgather_contrastive_loss,
          'sigmoid': losses.allgather_sigmoid_loss,
          'ring_contrastive': losses.ring_contrastive_loss,
          'ring_sigmoid': losses.ring_sigmoid_loss}[name]
  args = loss_args(name, *pairs('random'))

  def per_device(*a):
    value, grads = jax.value_and_grad(lambda *x: body(*x, axis_name='data'), argnums=(0, 1))(*a)
    return value, grads

  scalars = (P(),) * (len(args) - 2)
  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P('data'), *scalars),
                             out_specs=(P(), (P('data'), P('data')))))
  value, grads = fn(*args)
  ref_value, ref_grads = reference_value_and_grad(name, args)
  assert rel_err(value, ref_value) < FP32_RTOL
  assert_rel_close(grads, ref_grads[:2], FP32_RTOL)
