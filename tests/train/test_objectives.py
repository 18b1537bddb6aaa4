"""The CLIP objective's parts (`clip/train/objectives.py`): the model and the loss agree on
SigLIP's bias (the loss decides, a captioning-only run trains none), what each loss takes after
the embeddings, and the in-batch matching accuracy against numpy."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import losses
from clip.train import objectives
from clip.train import training
from tests.train.test_training import TINY
from tests.train.test_training import single_device_mesh


@pytest.mark.parametrize('loss,logit_bias', [('sigmoid', False), ('contrastive', True)])
def test_a_loss_and_model_that_disagree_on_the_bias_raise_before_compiling(loss, logit_bias):
  """`losses` owns whether a loss takes SigLIP's bias; the model config must agree (no patching
  of the state behind the config's back)."""
  tcfg = training.TrainConfig(batch_size=8, total_steps=2, warmup_steps=0, loss=loss)
  cfg = dataclasses.replace(TINY, logit_bias=logit_bias)
  with pytest.raises(ValueError, match=f'logit_bias={logit_bias}'):
    training.setup(cfg, tcfg, single_device_mesh())


def test_the_bias_follows_the_loss_and_a_captioning_run_trains_none():
  expected = {'contrastive': False, 'ring_contrastive': False, 'sigmoid': True,
              'ring_sigmoid': True}
  for loss, takes in expected.items():
    assert losses.takes_bias(loss) is takes
    assert training.TrainConfig(loss=loss).trains_logit_bias is takes
    objectives.check_logit_bias(dataclasses.replace(TINY, logit_bias=takes),
                                training.TrainConfig(loss=loss))
  captioning = training.TrainConfig(loss=objectives.NO_CONTRASTIVE, caption_weight=1.0)
  assert captioning.trains_logit_bias is False
  params = {'logit_scale': np.float32(2.0), 'logit_bias': np.float32(-10.0)}
  assert objectives.loss_scalars(params, 'ring_sigmoid') == (2.0, -10.0)
  assert objectives.loss_scalars(params, 'contrastive') == (2.0,)


def test_local_accuracy_is_the_rate_of_images_nearest_their_own_caption():
  rng = np.random.default_rng(0)
  img_8x4 = rng.standard_normal((8, 4)).astype(np.float32)
  txt_8x4 = img_8x4 + 0.1 * rng.standard_normal((8, 4)).astype(np.float32)
  txt_8x4[:3] = rng.standard_normal((3, 4))  # three captions that need not match
  expected = np.mean(np.argmax(img_8x4 @ txt_8x4.T, axis=1) == np.arange(8))
  got = objectives.local_accuracy(single_device_mesh())(jnp.asarray(img_8x4),
                                                        jnp.asarray(txt_8x4))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
