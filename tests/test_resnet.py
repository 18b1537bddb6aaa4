"""clip/resnet.py, ModifiedResNet in training mode: batch statistics and running-buffer updates as
torch's BN, and gradients through every BatchNorm. Its inference parity with OpenAI's torch
ResNets is tests/test_model.py's (parametrized together with the ViTs)."""
import chex
import jax
import numpy as np
import torch

import clip
from clip.formats import files
from experiments.references import openai as reference

CFG = clip.CLIPConfig(24, clip.VisionConfig('resnet', 8, (1, 2, 1, 1), 4, 64),
                      clip.TextConfig(32, 1, 4, 8, 50))


def test_train_mode_matches_torch(openai_model):
  torch.manual_seed(0)
  m = reference.perturb(reference.build(openai_model, CFG))
  params = files.nest({k: v.numpy().copy() for k, v in m.state_dict().items()})
  images = np.random.default_rng(0).standard_normal((4, 64, 64, 3)).astype(np.float32)
  m.visual.train()
  with torch.no_grad():
    expected = m.visual(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  trainable, stats = clip.split_batch_stats(params)
  features, batch_stats = clip.training_image_features(trainable, stats, images, CFG)
  # error relative to the largest feature, as in the inference parity tests
  assert np.abs(features - expected).max() / np.abs(expected).max() < 1e-4
  updated = clip.update_batch_stats(params, batch_stats)
  torch_after = {k: v.numpy() for k, v in m.state_dict().items()}
  ours_after = files.flatten(updated)
  assert ours_after.keys() == torch_after.keys()
  for key in torch_after:
    np.testing.assert_allclose(ours_after[key], torch_after[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # the update touched every BN buffer and nothing else
  changed = {k for k in torch_after if not np.array_equal(ours_after[k], files.flatten(params)[k])}
  assert changed == {k for k in torch_after if k.endswith(clip.model.BATCH_STAT_KEYS)}


def test_gradients_flow_in_train_mode():
  params = clip.init(jax.random.PRNGKey(0), CFG)
  trainable, stats = clip.split_batch_stats(params)
  assert all(k.endswith(clip.model.BATCH_STAT_KEYS) for k in files.flatten(stats))
  assert not any(k.endswith(clip.model.BATCH_STAT_KEYS) for k in files.flatten(trainable))
  chex.assert_trees_all_equal(clip.update_batch_stats(trainable, stats), params)
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)

  def loss(trainable):
    features, _ = clip.training_image_features(trainable, stats, images, CFG)
    return (features ** 2).mean()

  grads = jax.jit(jax.grad(loss))(trainable)  # one compiled program, not the ResNet op by op
  chex.assert_tree_all_finite(grads)
  # bn3 scales start at zero (OpenAI's init), so the residual branch learns through them first
  assert np.abs(grads['visual']['layer1']['0']['bn3']['weight']).sum() > 0
  assert np.abs(grads['visual']['conv1']['weight']).sum() > 0
