"""Knowledge distillation in the train step: a frozen teacher's image-text logits teach the student.

The objective is `contrastive + distill_weight * KD` (`TrainConfig.distill_weight`), KD the
cross-entropy from the teacher's to the student's image-text logit distributions over the global
batch in both directions (`losses.distillation`: open_clip's `DistillClipLoss`, or MobileCLIP's
teacher temperature with `TrainConfig.distill_temperature`), computed on the all-gathered or
ring-sharded logits (`TrainConfig.distill_loss`: 'distillation' or 'ring_distillation').

The teacher's embeddings come from one of two places:

- online (`Teacher.online`): the teacher model runs inside the jitted step, without gradients,
  its parameters a separate argument of the step (placed by the partition rules, never donated,
  optionally bfloat16). A teacher of any family reads its own inputs: its tokenizer and image
  preprocessing (`data.model_inputs.TeacherInputs`), so a batch holds `'teacher_image'` and
  `'teacher_tokens'` unless the teacher reads exactly what the student reads
  (`shares_inputs`), when it takes the student's `'image'` and `'tokens'`;
- offline (`Teacher.offline`): reinforced shards (`data.reinforced`, MobileCLIP's reinforced
  data, arXiv:2311.17049) stored the teacher's L2-normalised embeddings, and a batch holds
  `'teacher_image_embedding'` and `'teacher_text_embedding'` (B, E), used as stored.
"""
import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np

import losses
from clip import configs
from clip import model
from clip import processing
from clip import sharding
from clip.tower_configs import DTYPES

ONLINE_KEYS = ('teacher_image', 'teacher_tokens')
# TrainConfig's distillation settings and their defaults: set without a weight, an error.
UNUSED_WITHOUT_WEIGHT = {'teacher': None, 'distill_loss': 'distillation',
                         'distill_temperature': None, 'teacher_dtype': 'float32'}
OFFLINE_KEYS = ('teacher_image_embedding', 'teacher_text_embedding')


class Teacher(typing.NamedTuple):
  """A distillation teacher. Online: `params` and `cfg` (its own tokenizer and preprocessing).
  Offline: neither, and `logit_scale` is the stored teacher's (log space, `reinforced.json`), or
  None where the run scales the teacher by `TrainConfig.distill_temperature`."""
  params: dict | None
  cfg: configs.CLIPConfig | None
  logit_scale: float | None = None

  @property
  def online(self):
    return self.cfg is not None

  @classmethod
  def load(cls, spec, dtype='float32'):
    """The teacher `clip.load(spec)` gives (a file, a training workdir, a name, 'hf-hub:...'),
    its parameters cast to `dtype` ('float32' or 'bfloat16', which is also its compute dtype).

    Raises:
      ValueError: the model has no text tower or no logit scale (a captioner), `dtype` is not
        one of the model dtypes, or its tokenizer is unknown (what `clip.get_tokenizer` raises,
        with the teacher named), all before anything compiles.
    """
    from clip.formats import load  # pylint: disable=g-import-not-at-top  # the loaders: lazily
    params, cfg = load.load(spec)
    return cls.of(params, cfg, dtype, name=spec)

  @classmethod
  def of(cls, params, cfg, dtype='float32', name='the teacher'):
    """A teacher from loaded `params` and `cfg` (see `load`)."""
    check_dtype(dtype)
    if getattr(cfg, 'text', None) is None or 'logit_scale' not in params:
      raise ValueError(f'{name}: a distillation teacher compares images with texts, and this '
                       'model has no text tower or no logit_scale')
    try:
      processing.get_tokenizer(cfg)
    except (ValueError, TypeError, OSError) as e:
      raise ValueError(f'{name}: its tokenizer is unknown, so it cannot read the captions: '
                       f'{e}') from None
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return cls(params, dataclasses.replace(cfg, dtype=dtype))

  @classmethod
  def offline(cls, logit_scale=None):
    """A teacher whose embeddings the batches carry (reinforced shards)."""
    if logit_scale is not None and not np.isfinite(logit_scale):
      raise ValueError(f'the stored teacher logit_scale must be finite, got {logit_scale}')
    return cls(None, None, None if logit_scale is None else float(logit_scale))


def shares_inputs(cfg, teacher_cfg):
  """Whether the teacher reads exactly the student's inputs: the same tokenizer and context
  length, the same image preprocessing and resolution (then batches need no teacher keys)."""
  return (teacher_cfg.tokenizer == cfg.tokenizer
          and teacher_cfg.context_length == cfg.context_length
          and teacher_cfg.preprocess == cfg.preprocess
          and teacher_cfg.image_resolution == cfg.image_resolution)


def batch_keys(cfg, teacher):
  """The keys a distillation batch adds to the student's (`ONLINE_KEYS`, `OFFLINE_KEYS`, or none
  when an online teacher `shares_inputs` with the student)."""
  if not teacher.online:
    return OFFLINE_KEYS
  return () if shares_inputs(cfg, teacher.cfg) else ONLINE_KEYS


def check_dtype(dtype):
  """A teacher's dtype (`TrainConfig.teacher_dtype`): 'float32' or 'bfloat16', else ValueError."""
  if dtype not in DTYPES[:2]:
    raise ValueError(f'teacher_dtype must be float32 or bfloat16, got {dtype!r}')


def check_config(tcfg):
  """TrainConfig's distillation fields: a weight >= 0, a known loss, a temperature > 0 or None,
  a teacher dtype, and what distillation does not run with. Raises ValueError naming them."""
  if not np.isfinite(tcfg.distill_weight) or tcfg.distill_weight < 0:
    raise ValueError(f'distill_weight must be a finite number >= 0, got {tcfg.distill_weight}')
  if tcfg.distill_loss not in losses.DISTILLATION_LOSSES:
    raise ValueError(f'distill_loss must be one of {sorted(losses.DISTILLATION_LOSSES)}, got '
                     f'{tcfg.distill_loss!r}')
  tau = tcfg.distill_temperature
  if tau is not None and not (np.isfinite(tau) and tau > 0):
    raise ValueError(f'distill_temperature must be None (the teacher\'s own logit scale) or a '
                     f'finite number > 0, got {tau}')
  check_dtype(tcfg.teacher_dtype)
  if not tcfg.distill_weight:
    unused = {name: getattr(tcfg, name) for name, default in UNUSED_WITHOUT_WEIGHT.items()
              if getattr(tcfg, name) != default}
    if unused:
      raise ValueError(f'{unused} set but distill_weight is 0, so nothing distils: set a '
                       'distill_weight > 0, or leave them unset')
    return
  for what, bad in (('a contrastive loss (loss="none")', not tcfg.contrastive),
                    ('grad_cache accumulation', tcfg.grad_cache),
                    ('NaFlex batches', tcfg.naflex)):
    if bad:
      raise ValueError(f'distillation (distill_weight={tcfg.distill_weight}) runs on the '
                       f'contrastive logits of fixed-resolution batches; it does not run with '
                       f'{what}')


def check_teacher(tcfg, teacher):
  """A teacher exactly when the run distils (`tcfg.distill_weight > 0`); an offline one needs a
  scale (its stored logit scale or `tcfg.distill_temperature`). Raises ValueError."""
  if bool(tcfg.distill_weight) != (teacher is not None):
    raise ValueError(f'distill_weight={tcfg.distill_weight} needs a teacher exactly when it is '
                     f'> 0; got {"a" if teacher is not None else "no"} teacher')
  if teacher is None:
    return
  if not isinstance(teacher, Teacher):
    raise TypeError(f'teacher must be a clip.train.distillation.Teacher, got '
                    f'{type(teacher).__name__}')
  if not teacher.online and teacher.logit_scale is None and tcfg.distill_temperature is None:
    raise ValueError('an offline teacher (embeddings from reinforced shards) needs its stored '
                     'logit_scale or TrainConfig.distill_temperature to scale its logits')


def place(teacher, mesh, rules=sharding.DEFAULT_RULES):
  """The teacher's parameters on `mesh` by the partition rules (None offline)."""
  if not teacher.online:
    return None
  shardings = sharding.param_shardings(mesh, teacher.params, rules)
  return jax.device_put(teacher.params, shardings)


def kd_term(cfg, tcfg, mesh, teacher):
  """`kd(img, txt, logit_scale, batch, teacher_params) -> KD` for the objective: the student's
  L2-normalised embeddings and log-space scale, the teacher's embeddings (`embeddings`) and its
  scale: `tcfg.distill_temperature` if set, else the teacher's own logit scale."""
  loss_fn = losses.make_distillation_loss(tcfg.distill_loss, mesh, sharding.BATCH_AXES)
  tau = tcfg.distill_temperature

  def kd(img, txt, logit_scale, batch, teacher_params):
    t_img, t_txt = embeddings(cfg, teacher, teacher_params, batch)
    if tau is not None:
      return loss_fn(img, txt, logit_scale, t_img, t_txt, teacher_temperature=tau)
    t_scale = (teacher_params['logit_scale'] if teacher.online else
               jnp.asarray(teacher.logit_scale, jnp.float32))
    return loss_fn(img, txt, logit_scale, t_img, t_txt,
                   teacher_logit_scale=t_scale.astype(jnp.float32))
  return kd


def embeddings(cfg, teacher, teacher_params, batch):
  """The teacher's L2-normalised `(image, text)` embeddings of `batch` (fp32, gradient
  stopped): computed by the online teacher from its inputs, or the offline ones as stored."""
  if not teacher.online:
    img, txt = batch[OFFLINE_KEYS[0]], batch[OFFLINE_KEYS[1]]
  else:
    shared = shares_inputs(cfg, teacher.cfg)
    images = batch['image'] if shared else batch['teacher_image']
    tokens = batch['tokens'] if shared else batch['teacher_tokens']
    img = model.l2_normalize(model.encode_image(teacher_params, images, teacher.cfg))
    txt = model.l2_normalize(model.encode_text_jit(teacher_params, tokens, teacher.cfg))
  return jax.lax.stop_gradient((img.astype(jnp.float32), txt.astype(jnp.float32)))
