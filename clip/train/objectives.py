"""The CLIP training objective: contrastive / sigmoid image-text loss and, for a model with a
captioning decoder, the captioning loss, as one function of `(params, batch_stats, batch, key)`
for `training.setup`; and the checks that a model config and a `TrainConfig` agree on it."""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import losses
from clip.train import captioning
from clip.train import distillation
from clip import model
from clip import sharding

NO_CONTRASTIVE = 'none'  # TrainConfig.loss of a captioning-only run (CapPa)
PATCH_DROPOUT_STREAM = 7  # fold_in of the step's key that draws FLIP's kept patches


def check_objective(cfg, tcfg):
  """The model config and the losses agree: `check_logit_bias`, a contrastive loss needs a text
  tower, a decoder is there exactly when the captioning loss has a weight, and NaFlex training
  has a ViT image tower and no decoder. Raises ValueError naming both sides."""
  check_logit_bias(cfg, tcfg)
  if tcfg.contrastive and cfg.text is None:
    raise ValueError(f'loss {tcfg.loss!r} compares images with a text tower, and the model has '
                     f'none (text=None): use loss={NO_CONTRASTIVE!r} with a caption_weight')
  if (cfg.decoder is None) != (tcfg.caption_weight == 0):
    raise ValueError(f'caption_weight {tcfg.caption_weight} with '
                     f'{"no decoder" if cfg.decoder is None else "a decoder"} in the model '
                     'config: a decoder is trained by a caption_weight > 0, and only a decoder is')
  if tcfg.naflex:
    model.check_naflex_model(cfg)
    if cfg.decoder is not None:
      raise ValueError('NaFlex batches train a two-tower model; a captioning decoder reading '
                       'padded NaFlex image tokens is not supported (train it at fixed '
                       'resolution)')


def check_logit_bias(cfg, tcfg):
  """The model config and the loss agree on SigLIP's bias (`TrainConfig.trains_logit_bias`): the
  sigmoid losses train `logit_bias`, the others must not carry one. Raises ValueError naming
  both."""
  takes = tcfg.trains_logit_bias
  if takes != cfg.logit_bias:
    raise ValueError(f'loss {tcfg.loss!r} {"takes" if takes else "takes no"} logit_bias, but the '
                     f'model config has logit_bias={cfg.logit_bias}: use '
                     f'dataclasses.replace(cfg, logit_bias={takes})')


def batch_keys(tcfg):
  """What a CLIP training batch holds: `('image', 'tokens')`, or with NaFlex (`tcfg.naflex`)
  `('patches', 'spatial_shapes', 'tokens')` (`clip.model.NaFlexImages`)."""
  return ('patches', 'spatial_shapes', 'tokens') if tcfg.naflex else ('image', 'tokens')


def batch_images(batch):
  """A batch's images as the image tower takes them: its 'image' array, or NaFlex's
  `model.NaFlexImages(patches, spatial_shapes)`."""
  if 'patches' in batch:
    return model.NaFlexImages(batch['patches'], batch['spatial_shapes'])
  return batch['image']


def local_accuracy(mesh):
  """Image->text matching accuracy within each device's shard of the batch (memory O(b^2)),
  averaged over the shards."""
  def acc(img_bxD, txt_bxD):
    hits = jnp.argmax(img_bxD @ txt_bxD.T, axis=-1) == jnp.arange(img_bxD.shape[0])
    return jax.lax.pmean(hits.mean(), sharding.BATCH_AXES)
  return jax.shard_map(acc, mesh=mesh, in_specs=(P(sharding.BATCH_AXES),) * 2, out_specs=P())


def image_outputs(params, batch_stats, images, cfg, tcfg, key):
  """The image tower as the CLIP objective runs it: `(features (N, embed_dim) or None without a
  text tower, the tokens a decoder reads or None without one, batch_stats)`. FLIP's patch
  dropout draws from `key` folded with `PATCH_DROPOUT_STREAM`; a ResNet trains its BatchNorm
  statistics (the train step keeps those a freeze pattern names, `clip.train.freezing`); under LiT
  (`tcfg.lock_image_tower`) the tower runs in inference mode and its outputs carry no gradient."""
  dropout_key = jax.random.fold_in(key, PATCH_DROPOUT_STREAM)
  image_tokens = None
  if cfg.decoder is None:
    img, batch_stats = model.training_image_features(
        params, batch_stats, images, cfg, update_bn=not tcfg.lock_image_tower,
        dropout_key=dropout_key)
  else:
    img, image_tokens = model.image_features_and_tokens(params, images, cfg, dropout_key)
  if tcfg.lock_image_tower:
    img, image_tokens = jax.lax.stop_gradient((img, image_tokens))
  return img, image_tokens, batch_stats


def normalised_pair(params, img, tokens, cfg):
  """`(image, text)` embeddings, L2-normalised, of image features and caption tokens."""
  txt = model.encode_text(params, tokens, cfg)
  return model.l2_normalize(img), model.l2_normalize(txt)


def loss_scalars(params, loss):
  """What contrastive loss `loss` takes after the embeddings: the logit scale, and the bias if it
  takes one (`losses.takes_bias`)."""
  return (params['logit_scale'],) + ((params['logit_bias'],) if losses.takes_bias(loss) else ())


def clip_objective(cfg, tcfg, mesh, teacher=None):
  """The image-text objective: `(params, batch_stats, batch, key) -> (loss, (batch_stats,
  metrics))` with `batch = {'image', 'tokens'}` (or NaFlex's, `batch_keys`): the contrastive
  loss `tcfg.loss` as a shard_map program, plus `tcfg.caption_weight` times the captioning loss
  of a model with a decoder (`clip.train.captioning`; `key` draws its parallel-prediction
  masks, and a fold of it the patches a ViT with `patch_dropout` keeps). The image tower runs
  once for both (`image_outputs`). With a distillation `teacher` (`clip.train.distillation`)
  the objective takes the teacher's parameters last (None offline) and adds
  `tcfg.distill_weight` times KD."""
  check_objective(cfg, tcfg)
  contrastive = tcfg.contrastive
  loss_fn = losses.make_loss(tcfg.loss, mesh, sharding.BATCH_AXES) if contrastive else None
  accuracy = local_accuracy(mesh)
  kd = None if teacher is None else distillation.kd_term(cfg, tcfg, mesh, teacher)

  def objective(params, batch_stats, batch, key, teacher_params=None):
    img, image_tokens, batch_stats = image_outputs(params, batch_stats, batch_images(batch), cfg,
                                                   tcfg, key)
    total, metrics = 0.0, {}
    if 'patches' in batch:  # which of the plan's shapes this step had
      metrics['naflex_seq_len'] = jnp.asarray(batch['patches'].shape[1], jnp.float32)
      metrics['naflex_images'] = jnp.asarray(batch['patches'].shape[0], jnp.float32)
    if contrastive:
      img, txt = normalised_pair(params, img, batch['tokens'], cfg)
      total = loss_fn(img, txt, *loss_scalars(params, tcfg.loss))
      metrics['accuracy'] = accuracy(img, txt)
      if kd is not None or cfg.decoder is not None:
        metrics['contrastive_loss'] = total
      if kd is not None:
        metrics['distill_loss'] = kd(img, txt, params['logit_scale'], batch, teacher_params)
        total = total + tcfg.distill_weight * metrics['distill_loss']
    if cfg.decoder is not None:
      caption_loss, caption_metrics = captioning.loss(
          params['text_decoder'], image_tokens, batch['tokens'], cfg.decoder, key,
          tcfg.caption_parallel, tcfg.caption_mask_ratio, cfg.execution)
      total = total + tcfg.caption_weight * caption_loss
      metrics.update(caption_loss=caption_loss, **caption_metrics)
    return total, (batch_stats, metrics)
  return objective
