"""losses/make.py: every registered loss, made for a mesh and its batch axes, equals its reference
in value and in the gradients w.r.t. both embeddings, the scale and the bias, on 8 simulated
devices and several meshes (random, duplicated and identical pairs; fp32 and bf16); bad names,
axes, batches and arities raise."""
import functools

import chex
import jax
import jax.numpy as jnp
import pytest

import losses
from tests.losses.test_reference import FP32_RTOL
from tests.losses.test_reference import LOG_SCALE
from tests.losses.test_reference import MESHES
from tests.losses.test_reference import SIGMOID
from tests.losses.test_reference import assert_rel_close
from tests.losses.test_reference import loss_args
from tests.losses.test_reference import mesh_of
from tests.losses.test_reference import pairs
from tests.losses.test_reference import reference_value_and_grad
from tests.losses.test_reference import rel_err

BF16_VALUE_RTOL = 1e-5  # bf16 products are exact in the fp32 accumulation: only sum order differs
BF16_GRAD_RTOL = 1e-2  # embedding gradients are returned in bf16 (8 mantissa bits)
TIED_ATOL = 1e-5  # absolute, for gradients that are exactly zero with all logits tied


@functools.lru_cache(maxsize=None)
def sharded_value_and_grad(name, mesh_name):
  mesh, batch_axes = mesh_of(mesh_name)
  argnums = (0, 1, 2, 3) if name in SIGMOID else (0, 1, 2)
  return jax.jit(jax.value_and_grad(losses.make_loss(name, mesh, batch_axes), argnums=argnums))


@pytest.mark.parametrize('kind', ['random', 'duplicate'])
@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_sharded_loss_equals_reference(name, mesh_name, kind):
  args = loss_args(name, *pairs(kind))
  value, grads = sharded_value_and_grad(name, mesh_name)(*args)
  ref_value, ref_grads = reference_value_and_grad(name, args)
  assert rel_err(value, ref_value) < FP32_RTOL
  assert_rel_close(grads, ref_grads, FP32_RTOL)


@pytest.mark.parametrize('mesh_name', ['8', '4x2'])
@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_sharded_loss_with_identical_embeddings(name, mesh_name):
  """All logits tie. The contrastive gradients are zero, cancellations of terms summing to ~20 in
  magnitude, so they are compared absolutely (TIED_ATOL). 16 pairs: at 32 the fp32 reference's
  own sigmoid bias gradient, a sum of 1024 equal terms, is off by 1.5e-5."""
  args = loss_args(name, *pairs('identical', n=16))
  value, grads = sharded_value_and_grad(name, mesh_name)(*args)
  ref_value, ref_grads = reference_value_and_grad(name, args)
  assert rel_err(value, ref_value) < FP32_RTOL
  chex.assert_trees_all_close(grads, ref_grads, atol=TIED_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_sharded_loss_in_bf16(name):
  img, txt = (x.astype(jnp.bfloat16) for x in pairs('random'))
  args = loss_args(name, img, txt)
  value, grads = sharded_value_and_grad(name, '4x2')(*args)
  ref_value, ref_grads = reference_value_and_grad(name, args)
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  assert rel_err(value, ref_value) < BF16_VALUE_RTOL
  assert_rel_close(grads[:2], ref_grads[:2], BF16_GRAD_RTOL)
  assert_rel_close(grads[2:], ref_grads[2:], FP32_RTOL)


def test_make_loss_rejects_bad_input():
  mesh, batch_axes = mesh_of('4x2')
  with pytest.raises(ValueError, match="one of .*'ring_sigmoid'.*got 'softmax'"):
    losses.make_loss('softmax', mesh, batch_axes)
  with pytest.raises(ValueError, match=r"\['tensor'\] are not axes"):
    losses.make_loss('contrastive', mesh, ('data', 'tensor'))
  img, txt = pairs('random', n=12)
  with pytest.raises(ValueError, match='global batch 12 must be divisible by the 8 devices'):
    losses.make_loss('contrastive', mesh, batch_axes)(img, txt, LOG_SCALE)
  img, txt = pairs('random')
  with pytest.raises(TypeError, match=r'takes \(img, txt, logit_scale, logit_bias\), got 3'):
    losses.make_loss('sigmoid', mesh, batch_axes)(img, txt, LOG_SCALE)
