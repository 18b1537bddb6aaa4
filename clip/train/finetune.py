"""Downstream models on CLIP towers, trained by the same sharded train step as pre-training.

- Image classifier (the counterpart of Hugging Face's `CLIPVisionModelForImageClassification`):
  the image tower and a linear `head` on its L2-normalised features, the head initialised from
  zero-shot classifier weights (times the logit scale), so that step 0 *is* the zero-shot
  classifier. Full fine-tuning, or LP-FT (`TrainConfig(freeze=(r'visual\\..*',))` first: the
  tower's weights and a ResNet's BatchNorm statistics stay bit-identical, `clip.train.freezing`;
  then everything), with layer-wise learning-rate decay (`TrainConfig(layer_decay=0.75)`).
- WiSE-FT (`wise_ft`): the weight-space interpolation of zero-shot and fine-tuned parameters.
- LiT: `TrainConfig(lock_image_tower=True)` with the CLIP objective: the text tower learns, the
  image tower stays bit-identical and runs without gradients.
- Text classifier: the text tower and a linear `head` on its pooled features.

Inputs are the model's own: images by its preprocessing (`clip.preprocess_images(images, cfg)`),
texts by its tokenizer (`clip.get_tokenizer(cfg)`), zero-shot weights from prompts tokenised by it
(`zero_shot.classifier_weights`).

The parameter dicts keep torch's keys: `{'visual': ..., 'head': {'weight': (C, D), 'bias': (C,)}}`
for images, the text tower's top-level keys plus `head` for text.

  zero_shot_weights = zero_shot.classifier_weights(clip_params, classnames, cfg)
  params = finetune.image_classifier_params(clip_params, zero_shot_weights)
  run = training.setup(cfg, tcfg, mesh, init_params=lambda key: params,
                       objective=finetune.image_classification_objective(cfg),
                       batch_keys=('image', 'label'))
  state, metrics = run.train_step(run.state, batch)
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip import model

NOT_TEXT_KEYS = ('visual', 'logit_scale', 'logit_bias')


def text_tower(clip_params):
  """The text tower's top-level entries (OpenAI's `token_embedding`, `positional_embedding`,
  `transformer`, `ln_final`, `text_projection`, or a custom tower's)."""
  return {k: v for k, v in clip_params.items() if k not in NOT_TEXT_KEYS}


def image_feature_dim(visual):
  """Width of the image tower's output: its projection's, the ResNet attention pool's, or (a ViT
  without projection) its width."""
  if isinstance(visual.get('proj'), dict):  # a biased projection, nn.Linear (out, in)
    return visual['proj']['weight'].shape[0]
  if 'proj' in visual:
    return visual['proj'].shape[1]
  if 'attnpool' in visual:
    return visual['attnpool']['c_proj']['weight'].shape[0]
  return visual['ln_post']['weight'].shape[0]


def text_feature_dim(params):
  if isinstance(params.get('text_projection'), dict):  # nn.Linear layout (out, in)
    return params['text_projection']['weight'].shape[0]
  if 'text_projection' in params:
    return params['text_projection'].shape[1]
  return params['ln_final']['weight'].shape[0]


def image_classifier_params(clip_params, weights_DxC, scale=None):
  """The image tower of `clip_params` and a head equal to the zero-shot classifier: logits =
  exp(logit_scale) * normalised features @ weights (`zero_shot.classifier_weights`)."""
  weights_DxC = np.asarray(weights_DxC, np.float32)
  dim = image_feature_dim(clip_params['visual'])
  if weights_DxC.ndim != 2 or weights_DxC.shape[0] != dim:
    raise ValueError(f'classifier weights must be (embed_dim={dim}, classes) for this image '
                     f'tower, got {weights_DxC.shape}')
  scale = float(np.exp(clip_params['logit_scale'])) if scale is None else scale
  return {'visual': clip_params['visual'],
          'head': {'weight': scale * weights_DxC.T,
                   'bias': np.zeros((weights_DxC.shape[1],), np.float32)}}


def text_classifier_params(clip_params, num_classes, key, std=0.01):
  """The text tower of `clip_params` and a new linear head on its pooled, normalised features."""
  embed_dim = text_feature_dim(clip_params)
  head = {'weight': std * jax.random.normal(key, (num_classes, embed_dim), jnp.float32),
          'bias': jnp.zeros((num_classes,), jnp.float32)}
  return {**text_tower(clip_params), 'head': head}


def _head(p, features_NxD):
  return model.l2_normalize(features_NxD) @ p['weight'].T + p['bias']


def classify_images(params, images, cfg):
  """Logits (N, C) of the image classifier (inference mode) on images (N, R, R, 3) prepared by
  the model's own preprocessing (`clip.preprocess_images(images, cfg)`)."""
  return _head(params['head'], model.encode_image(params, images, cfg))


def classify_texts(params, tokens, cfg):
  """Logits (N, C) of the text classifier on int tokens (N, L) of the model's own tokenizer
  (`clip.get_tokenizer(cfg)(texts)`)."""
  return _head(params['head'], model.encode_text(params, tokens, cfg))


def _classification(logits_NxC, labels_N):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_NxC, labels_N).mean()
  return loss, {'accuracy': jnp.mean(jnp.argmax(logits_NxC, -1) == labels_N)}


def image_classification_objective(cfg):
  """Cross-entropy of the image classifier on `{'image', 'label'}` batches (ResNets train their
  BatchNorm statistics), for `training.setup(objective=...)`."""
  def objective(params, batch_stats, batch, key):  # pylint: disable=unused-argument
    feats, batch_stats = model.training_image_features(params, batch_stats, batch['image'], cfg)
    loss, metrics = _classification(_head(params['head'], feats), batch['label'])
    return loss, (batch_stats, metrics)
  return objective


def text_classification_objective(cfg):
  """Cross-entropy of the text classifier on `{'tokens', 'label'}` batches."""
  def objective(params, batch_stats, batch, key):  # pylint: disable=unused-argument
    loss, metrics = _classification(classify_texts(params, batch['tokens'], cfg), batch['label'])
    return loss, (batch_stats, metrics)
  return objective


def wise_ft(zero_shot_params, finetuned_params, alpha):
  """WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned, leaf by leaf (same trees)."""
  if not 0 <= alpha <= 1:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}')
  zs, ft = jax.tree.structure(zero_shot_params), jax.tree.structure(finetuned_params)
  if zs != ft:
    raise ValueError(f'the parameter trees differ: {zs} vs {ft}')
  return jax.tree.map(lambda a, b: (1 - alpha) * np.asarray(a) + alpha * np.asarray(b),
                      zero_shot_params, finetuned_params)
