"""CLIP training: the train state, its shardings, and one pure jitted `train_step(state, batch)`.

The state is a plain dict `{'params', 'batch_stats', 'opt', 'step', 'rng'}`: `params` are what
gradients train (fp32), `batch_stats` the BatchNorm buffers of a ResNet (empty for a ViT). The
step runs the two towers under jit with the parameters placed by `clip.sharding` rules (GSPMD
inserts the FSDP gathers and tensor-parallel collectives) and the loss as an explicit `shard_map`
program over the batch axes (`losses.make_loss`).
"""
import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import losses
from clip import captioning
from clip import model
from clip import optim
from clip import sharding

MAX_LOGIT_SCALE = float(np.log(100.0))  # OpenAI clamps exp(logit_scale) to 100
NO_CONTRASTIVE = 'none'  # TrainConfig.loss of a captioning-only run (CapPa)
PATCH_DROPOUT_STREAM = 7  # fold_in of the step's key that draws FLIP's kept patches


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What a run needs besides the model config; validated before anything compiles."""
  batch_size: int = 64
  total_steps: int = 100
  loss: str = 'contrastive'
  optimizer: str = 'adamw'
  learning_rate: float = 5e-4
  weight_decay: float = 0.2
  warmup_steps: int = 10
  schedule: str = 'cosine'  # after the warmup: 'cosine' or 'linear' decay to 0, or 'constant'
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-6
  clip_norm: float | None = 1.0
  accumulation_steps: int = 1
  mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the rest
  seed: int = 0
  freeze: tuple[str, ...] = ()  # regexes on parameter paths kept bit-identical
  layer_decay: float = 1.0      # < 1: layer-wise learning-rate decay in the image tower
  lock_image_tower: bool = False  # LiT: the image tower frozen and run without gradients
  # Captioning (a model with a decoder): total loss = contrastive + caption_weight * captioning
  # (CoCa's caption_loss_weight; loss='none' trains the captioning loss alone, CapPa). CapPa's
  # parallel prediction: the fraction of rows, and the fraction of their caption masked.
  caption_weight: float = 0.0
  caption_parallel: float = 0.75
  caption_mask_ratio: float = 1.0

  def __post_init__(self):
    if self.loss != NO_CONTRASTIVE:
      losses.check_name(self.loss)
    if self.caption_weight < 0 or (self.loss == NO_CONTRASTIVE and not self.caption_weight):
      raise ValueError(f'caption_weight must be >= 0, and > 0 with loss={NO_CONTRASTIVE!r} (it '
                       f'is the only loss then); got {self.caption_weight} with loss {self.loss!r}')
    captioning.check_fractions(self.caption_parallel, self.caption_mask_ratio)
    if self.optimizer not in optim.OPTIMIZERS:
      raise ValueError(f'optimizer must be one of {optim.OPTIMIZERS}, got {self.optimizer!r}')
    if self.schedule not in optim.SCHEDULES:
      raise ValueError(f'schedule must be one of {optim.SCHEDULES}, got {self.schedule!r}')
    for name in ('batch_size', 'total_steps', 'accumulation_steps'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f'{name} must be an int >= 1, got {getattr(self, name)!r}')
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f'warmup_steps must be in [0, total_steps={self.total_steps}), '
                       f'got {self.warmup_steps}')
    if self.learning_rate <= 0 or self.weight_decay < 0:
      raise ValueError(f'need learning_rate > 0 and weight_decay >= 0, got '
                       f'{self.learning_rate}, {self.weight_decay}')
    if len(self.mesh) != 3:
      raise ValueError(f'mesh must be (data, fsdp, tensor), got {self.mesh!r}')
    if isinstance(self.freeze, str) or not all(isinstance(f, str) for f in self.freeze):
      raise ValueError(f'freeze must be a tuple of regexes, got {self.freeze!r}')
    if not 0 < self.layer_decay <= 1:
      raise ValueError(f'layer_decay must be in (0, 1], got {self.layer_decay}')

  @property
  def frozen(self):
    """Regexes of the parameters the optimizer leaves untouched."""
    return tuple(self.freeze) + ((r'visual\..*',) if self.lock_image_tower else ())

  def check_mesh(self, mesh):
    ways = mesh.shape['data'] * mesh.shape['fsdp']
    if self.batch_size % ways:
      raise ValueError(f'batch_size {self.batch_size} is not divisible by the {ways} batch '
                       f'shards of mesh {dict(mesh.shape)}')


def takes_bias(loss):
  """`losses.takes_bias`, and False for `'none'` (no contrastive loss)."""
  return loss != NO_CONTRASTIVE and losses.takes_bias(loss)


def check_objective(cfg, tcfg):
  """The model config and the losses agree: `check_logit_bias`, a contrastive loss needs a text
  tower, and a decoder is there exactly when the captioning loss has a weight. Raises
  ValueError naming both sides."""
  check_logit_bias(cfg, tcfg)
  if tcfg.loss != NO_CONTRASTIVE and cfg.text is None:
    raise ValueError(f'loss {tcfg.loss!r} compares images with a text tower, and the model has '
                     f'none (text=None): use loss={NO_CONTRASTIVE!r} with a caption_weight')
  if (cfg.decoder is None) != (tcfg.caption_weight == 0):
    raise ValueError(f'caption_weight {tcfg.caption_weight} with '
                     f'{"no decoder" if cfg.decoder is None else "a decoder"} in the model '
                     'config: a decoder is trained by a caption_weight > 0, and only a decoder is')


def check_logit_bias(cfg, tcfg):
  """The model config and the loss agree on SigLIP's bias (`losses.takes_bias`): the sigmoid
  losses train `logit_bias`, the others must not carry one. Raises ValueError naming both."""
  takes = takes_bias(tcfg.loss)
  if takes != cfg.logit_bias:
    raise ValueError(f'loss {tcfg.loss!r} {"takes" if takes else "takes no"} logit_bias, but the '
                     f'model config has logit_bias={cfg.logit_bias}: use '
                     f'dataclasses.replace(cfg, logit_bias={takes})')


class TrainSetup(typing.NamedTuple):
  """What `setup` builds for a training loop."""
  state: dict                # {'params', 'batch_stats', 'opt', 'step', 'rng'}, sharded
  train_step: typing.Callable  # (state, batch) -> (state, metrics), jitted, state donated
  shardings: dict            # the state's NamedShardings (checkpoint.restore takes them)
  schedule: typing.Callable  # optimizer step -> learning rate
  optimizer: optax.GradientTransformation


def setup(cfg, tcfg, mesh, *, init_params=None, objective=None, batch_keys=('image', 'tokens'),
          rules=sharding.DEFAULT_RULES):
  """The one way to set up a run: validates (mesh, loss vs model), builds the optimizer, the
  sharded state and the jitted step. Returns a `TrainSetup`.

  `init_params(key) -> params` replaces the random init (pretrained or fine-tuning weights);
  `objective(params, batch_stats, batch, key) -> (loss, (batch_stats, metrics))` replaces the
  CLIP objective (fine-tuning), with the `batch_keys` it reads."""
  tcfg.check_mesh(mesh)
  if objective is None:
    check_objective(cfg, tcfg)
  optimizer, schedule = make_optimizer(tcfg)
  state, shardings = create_state(cfg, tcfg, mesh, optimizer, rules, init_params)
  train_step = make_train_step(cfg, tcfg, mesh, optimizer, schedule, shardings, objective,
                               batch_keys)
  return TrainSetup(state, train_step, shardings, schedule, optimizer)


def make_optimizer(tcfg):
  return optim.make_optimizer(tcfg.optimizer, tcfg.learning_rate, tcfg.weight_decay,
                              tcfg.warmup_steps, tcfg.total_steps, tcfg.b1, tcfg.b2, tcfg.eps,
                              tcfg.clip_norm, tcfg.accumulation_steps, tcfg.frozen,
                              tcfg.layer_decay, tcfg.schedule)


def state_shardings(mesh, abstract_state, optimizer, rules=sharding.DEFAULT_RULES):
  """NamedShardings for every leaf of the state: params and BN buffers by the partition rules,
  optimizer moments like their parameters, counters and the rng replicated."""
  param_sh = sharding.param_shardings(mesh, abstract_state['params'], rules)
  stats_sh = sharding.param_shardings(mesh, abstract_state['batch_stats'], rules)
  repl = sharding.replicated(mesh)
  # Masked subtrees (optax.partition, e.g. Muon's two branches) keep their MaskedNodes.
  opt_sh = optax.tree_map_params(
      optimizer, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, abstract_state['opt'],
      param_sh, transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
  # Adafactor's factored moments have other shapes than their parameters: replicate those.
  opt_sh = jax.tree.map(
      lambda leaf, s: s if sharding.divides(s.mesh, np.shape(leaf), s.spec) else repl,
      abstract_state['opt'], opt_sh,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  return {'params': param_sh, 'batch_stats': stats_sh, 'opt': opt_sh, 'step': repl, 'rng': repl}


def _local_accuracy(mesh):
  """Image->text matching accuracy within each device's shard of the batch (memory O(b^2)),
  averaged over the shards."""
  def acc(img_bxD, txt_bxD):
    hits = jnp.argmax(img_bxD @ txt_bxD.T, axis=-1) == jnp.arange(img_bxD.shape[0])
    return jax.lax.pmean(hits.mean(), sharding.BATCH_AXES)
  return jax.shard_map(acc, mesh=mesh, in_specs=(P(sharding.BATCH_AXES),) * 2, out_specs=P())


def clip_objective(cfg, tcfg, mesh):
  """The image-text objective: `(params, batch_stats, batch, key) -> (loss, (batch_stats,
  metrics))` with `batch = {'image', 'tokens'}`: the contrastive loss `tcfg.loss` as a shard_map
  program, plus `tcfg.caption_weight` times the captioning loss of a model with a decoder
  (`clip.captioning`; `key` draws its parallel-prediction masks, and a fold of it the patches a
  ViT with `patch_dropout` keeps). The image tower runs once for both. With `tcfg.lock_image_tower` (LiT) it runs in inference mode without gradients."""
  check_objective(cfg, tcfg)
  contrastive = tcfg.loss != NO_CONTRASTIVE
  loss_fn = losses.make_loss(tcfg.loss, mesh, sharding.BATCH_AXES) if contrastive else None
  bias = takes_bias(tcfg.loss)
  accuracy = _local_accuracy(mesh)
  freeze = jax.lax.stop_gradient if tcfg.lock_image_tower else (lambda x: x)

  def objective(params, batch_stats, batch, key):
    dropout_key = jax.random.fold_in(key, PATCH_DROPOUT_STREAM)
    if cfg.decoder is None:
      img, batch_stats = model.training_image_features(
          params, batch_stats, batch['image'], cfg, update_bn=not tcfg.lock_image_tower,
          dropout_key=dropout_key)
    else:
      img, image_tokens = model.image_features_and_tokens(params, batch['image'], cfg,
                                                          dropout_key)
    total, metrics = 0.0, {}
    if contrastive:
      txt = model.l2_normalize(model.encode_text(params, batch['tokens'], cfg))
      img = model.l2_normalize(freeze(img))
      scalars = (params['logit_scale'],) + ((params['logit_bias'],) if bias else ())
      total = loss_fn(img, txt, *scalars)
      metrics['accuracy'] = accuracy(img, txt)
    if cfg.decoder is not None:
      caption_loss, caption_metrics = captioning.loss(
          params['text_decoder'], freeze(image_tokens), batch['tokens'], cfg.decoder, key,
          tcfg.caption_parallel, tcfg.caption_mask_ratio, cfg.execution)
      if contrastive:
        metrics['contrastive_loss'] = total
      total = total + tcfg.caption_weight * caption_loss
      metrics.update(caption_loss=caption_loss, **caption_metrics)
    return total, (batch_stats, metrics)
  return objective


def make_train_step(cfg, tcfg, mesh, optimizer, schedule, shardings, objective=None,
                    batch_keys=('image', 'tokens')):
  """`train_step(state, batch) -> (state, metrics)`, jitted with the state's shardings, the batch
  split over `('data', 'fsdp')`, and the state donated.

  `objective(params, batch_stats, batch, key) -> (loss, (batch_stats, metrics))` is what is
  minimised (`key`: a fresh PRNG key each step, from the state's `rng`):
  by default `clip_objective`; fine-tuning passes its own (`clip.finetune`) with its
  `batch_keys`. Metrics add the grad norm, the learning rate and, where the params have them, the
  logit scale (clamped to ln 100 after each update) and bias."""
  tcfg.check_mesh(mesh)
  objective = objective or clip_objective(cfg, tcfg, mesh)

  def train_step(state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see sharding.constrain_batch
      (loss, (new_stats, aux)), grads = jax.value_and_grad(objective, has_aux=True)(
          state['params'], state['batch_stats'], batch, state['rng'])
    updates, opt = optimizer.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, **aux, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(_optimizer_step(opt, state['step']))}
    if 'logit_scale' in params:
      params['logit_scale'] = jnp.clip(params['logit_scale'], 0.0, MAX_LOGIT_SCALE)
      metrics['logit_scale'] = jnp.exp(params['logit_scale'])
    if 'logit_bias' in params:
      metrics['logit_bias'] = params['logit_bias']
    new_state = {'params': params, 'batch_stats': new_stats, 'opt': opt,
                 'step': state['step'] + 1, 'rng': jax.random.fold_in(state['rng'], 1)}
    return new_state, metrics

  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(shardings, {k: batch_sh for k in batch_keys}),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def _optimizer_step(opt_state, step):
  """The schedule's step: micro-steps divided by the accumulation count under MultiSteps."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.gradient_step
  return step


def create_state(cfg, tcfg, mesh, optimizer, rules=sharding.DEFAULT_RULES, init_params=None):
  """(state, shardings): the initial state created directly in its sharded layout (its tree and
  shardings from `jax.eval_shape` first, then one jitted init straight into them).

  `init_params(key) -> params` (BatchNorm buffers included) replaces the random CLIP init, e.g.
  to start from pretrained weights (`lambda key: params`) or from a fine-tuning model."""
  def init(key):
    params = model.init_params(key, cfg) if init_params is None else init_params(key)
    params, batch_stats = model.split_batch_stats(params)
    return {'params': params, 'batch_stats': batch_stats, 'opt': optimizer.init(params),
            'step': jnp.zeros((), jnp.int32), 'rng': jax.random.fold_in(key, 2)}
  key = jax.random.PRNGKey(tcfg.seed)
  abstract = jax.eval_shape(init, key)
  shardings = state_shardings(mesh, abstract, optimizer, rules)
  state = jax.jit(init, out_shardings=shardings,
                  compiler_options={'xla_backend_optimization_level': 0})(key)
  return state, shardings


def global_batch(mesh, local_batch):
  """Global arrays from this process's share of the batch (every process calls it)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v))
          for k, v in local_batch.items()}


def param_count(params):
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))

