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

import losses
from clip.train import captioning
from clip.train import distillation
from clip.train import ema
from clip.train import freezing
from clip.train import grad_cache
from clip import model
from clip.train import objectives
from clip.train import optim
from clip import sharding

ACCUMULATIONS = ('multisteps', 'grad_cache')


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
  # k > 1 accumulates k micro-batches per optimizer step. 'multisteps' (optax.MultiSteps): each
  # call of the step is one micro-batch of batch_size, seeing only its own negatives.
  # 'grad_cache' (clip/train/grad_cache.py): each call takes the global batch of batch_size and
  # runs it as k micro-batches of batch_size / k in two passes, every negative kept.
  accumulation_steps: int = 1
  accumulation: str = 'multisteps'
  mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the rest
  seed: int = 0
  freeze: tuple[str, ...] = ()  # regexes on per-layer torch keys kept bit-identical (`frozen`)
  layer_decay: float = 1.0      # < 1: layer-wise learning-rate decay in the image tower
  lock_image_tower: bool = False  # LiT: the image tower frozen and run without gradients
  # Captioning (a model with a decoder): total loss = contrastive + caption_weight * captioning
  # (CoCa's caption_loss_weight; loss='none' trains the captioning loss alone, CapPa). CapPa's
  # parallel prediction: the fraction of rows, and the fraction of their caption masked.
  caption_weight: float = 0.0
  caption_parallel: float = 0.75
  caption_mask_ratio: float = 1.0
  # An EMA of the parameters (`clip.train.ema`), state['ema'], when ema_decay is set (in (0, 1),
  # e.g. 0.9999); ema_warmup: the power of timm's decay warmup (2/3 or 3/4), None for none.
  ema_decay: float | None = None
  ema_warmup: float | None = None
  # NaFlex (SigLIP 2's native aspect ratio, `clip.vit_naflex`): a non-empty tuple of sequence
  # lengths (patches per image) turns it on, batches are then {'patches', 'spatial_shapes',
  # 'tokens'} and each step's length is drawn from these (`data.naflex_batching`); with
  # naflex_tokens_per_batch, each step's batch holds about that many patches (token-budget
  # batching) instead of batch_size images.
  naflex_seq_lengths: tuple[int, ...] = ()
  naflex_tokens_per_batch: int | None = None
  # Distillation (`clip.train.distillation`): loss + distill_weight * KD from a frozen teacher
  # (`setup(teacher=...)`), KD by `distill_loss` ('distillation' all-gathers the logits,
  # 'ring_distillation' rings them), the teacher's logits scaled by its own logit scale or by
  # 1 / distill_temperature (MobileCLIP). `teacher`: what clip.load takes for an online teacher
  # (the main job loads it, in teacher_dtype); None with distill_weight > 0: offline, the
  # batches carry its stored embeddings (`data.reinforced`).
  distill_weight: float = 0.0
  distill_loss: str = 'distillation'
  distill_temperature: float | None = None
  teacher: str | None = None
  teacher_dtype: str = 'float32'

  def __post_init__(self):
    none = objectives.NO_CONTRASTIVE
    if self.loss != none:
      losses.check_name(self.loss)
    if self.caption_weight < 0 or (self.loss == none and not self.caption_weight):
      raise ValueError(f'caption_weight must be >= 0, and > 0 with loss={none!r} (it is the only '
                       f'loss then); got {self.caption_weight} with loss {self.loss!r}')
    captioning.check_fractions(self.caption_parallel, self.caption_mask_ratio)
    if self.accumulation not in ACCUMULATIONS:
      raise ValueError(f'accumulation must be one of {ACCUMULATIONS}, got {self.accumulation!r}')
    if self.accumulation == 'multisteps' and self.total_steps % self.accumulation_steps:
      raise ValueError(f'MultiSteps updates once per accumulation_steps={self.accumulation_steps} '
                       f'calls: total_steps {self.total_steps} must be a multiple of it')
    if self.grad_cache and self.batch_size % self.accumulation_steps:
      raise ValueError(f'grad_cache splits batch_size {self.batch_size} into accumulation_steps='
                       f'{self.accumulation_steps} micro-batches: it must divide')
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
    freezing.compile_patterns(self.freeze)
    if not 0 < self.layer_decay <= 1:
      raise ValueError(f'layer_decay must be in (0, 1], got {self.layer_decay}')
    ema.check(self.ema_decay, self.ema_warmup)
    self._check_naflex()
    distillation.check_config(self)

  def _check_naflex(self):
    if isinstance(self.naflex_seq_lengths, list):  # a list from a config file: a tuple here
      object.__setattr__(self, 'naflex_seq_lengths', tuple(self.naflex_seq_lengths))
    lengths = self.naflex_seq_lengths
    if not isinstance(lengths, tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in lengths):
      raise ValueError('naflex_seq_lengths must be a tuple of ints >= 1 (patches per image, at '
                       f'least one), got {lengths!r}')
    budget = self.naflex_tokens_per_batch
    if budget is not None and not lengths:
      raise ValueError(f'naflex_tokens_per_batch={budget} batches NaFlex steps by patches, but '
                       'naflex_seq_lengths is empty (no NaFlex): give the lengths too')
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget < max(lengths)):
      raise ValueError(f'naflex_tokens_per_batch must be an int of at least the longest length '
                       f'{max(lengths)} (one image per step), got {budget!r}')
    if lengths and self.accumulation_steps > 1:
      raise ValueError('gradient accumulation (accumulation_steps > 1) is not supported with '
                       f'NaFlex batches (naflex_seq_lengths={lengths}): use accumulation_steps=1')

  @property
  def contrastive(self):
    """Whether the run has a contrastive loss (`loss` is not `objectives.NO_CONTRASTIVE`, the
    captioning-only run)."""
    return self.loss != objectives.NO_CONTRASTIVE

  @property
  def distills(self):
    """Whether the run adds a distillation term (`distill_weight > 0`)."""
    return self.distill_weight > 0

  @property
  def naflex(self):
    """Whether images come as NaFlex patches (`naflex_seq_lengths` given)."""
    return bool(self.naflex_seq_lengths)

  @property
  def frozen(self):
    """The regexes of what training leaves bit-identical (`clip.train.freezing`): parameters and
    BatchNorm buffers, named by their per-layer torch keys in every layout; LiT adds the image
    tower. Each must match something (`setup` raises before compiling)."""
    return tuple(self.freeze) + ((r'visual\..*',) if self.lock_image_tower else ())

  @property
  def trains_logit_bias(self):
    """Whether the loss trains SigLIP's `logit_bias` (`losses.takes_bias`; no contrastive loss,
    `loss='none'`, trains none): the model config carries one exactly then."""
    return self.contrastive and losses.takes_bias(self.loss)

  @property
  def grad_cache(self):
    """Whether the step runs two-pass accumulation (`accumulation='grad_cache'`, k > 1)."""
    return self.accumulation == 'grad_cache' and self.accumulation_steps > 1

  @property
  def micro_batch_size(self):
    """The examples one forward pass sees: batch_size, or batch_size / k under grad_cache."""
    return self.batch_size // self.accumulation_steps if self.grad_cache else self.batch_size

  def check_mesh(self, mesh):
    ways = mesh.shape['data'] * mesh.shape['fsdp']
    if self.naflex_tokens_per_batch is not None:
      return  # each step's batch size is a multiple of the shards (data.naflex_batching)
    if self.micro_batch_size % ways:
      what = (f'the grad_cache micro-batch {self.micro_batch_size} (batch_size {self.batch_size} '
              f'/ {self.accumulation_steps})' if self.grad_cache else
              f'batch_size {self.batch_size}')
      raise ValueError(f'{what} is not divisible by the {ways} batch shards of mesh '
                       f'{dict(mesh.shape)}')


class TrainSetup(typing.NamedTuple):
  """What `setup` builds for a training loop."""
  state: dict                # {'params', 'batch_stats', 'opt', 'step', 'rng'} (+ 'ema'), sharded
  train_step: typing.Callable  # (state, batch) -> (state, metrics), jitted, state donated
  shardings: dict            # the state's NamedShardings (state_store.restore takes them)
  schedule: typing.Callable  # optimizer step -> learning rate
  optimizer: optax.GradientTransformation


def setup(cfg, tcfg, mesh, *, init_params=None, objective=None, batch_keys=None,
          rules=sharding.DEFAULT_RULES, teacher=None):
  """The one way to set up a run: validates (mesh, loss vs model), builds the optimizer, the
  sharded state and the jitted step. Returns a `TrainSetup`.

  `init_params(key) -> params` replaces the random init (pretrained or fine-tuning weights);
  `objective(params, batch_stats, batch, key) -> (loss, (batch_stats, metrics))` replaces the
  CLIP objective (fine-tuning), with the `batch_keys` it reads (default: the CLIP objective's,
  `objectives.batch_keys(tcfg)`). `teacher`: a `clip.train.distillation.Teacher`, given exactly
  when `tcfg.distill_weight > 0`; an online one's parameters are placed on the mesh by `rules`
  and passed to every step (`TrainSetup.train_step` binds them)."""
  tcfg.check_mesh(mesh)
  distillation.check_teacher(tcfg, teacher)
  if batch_keys is None:
    batch_keys = objectives.batch_keys(tcfg) + (
        distillation.batch_keys(cfg, teacher) if teacher else ())
  if objective is None:
    objectives.check_objective(cfg, tcfg)
  elif teacher is not None:
    raise ValueError('distillation adds its term to the CLIP objective; a custom objective '
                     'takes no teacher')
  if init_params is None:
    check_init_logit_scale(cfg)
  optimizer, schedule = optim.make_optimizer(tcfg)
  state, shardings = create_state(cfg, tcfg, mesh, optimizer, rules, init_params)
  train_step = make_train_step(cfg, tcfg, mesh, optimizer, schedule, shardings, objective,
                               batch_keys, teacher)
  if teacher is not None:
    train_step = _bound(train_step, distillation.place(teacher, mesh, rules))
  return TrainSetup(state, train_step, shardings, schedule, optimizer)


def _bound(train_step, teacher_params):
  """`train_step(state, batch)` of a distilling step `(state, batch, teacher_params)`; the
  jitted step stays reachable as `.jitted` and the placed teacher as `.teacher_params`."""
  def step(state, batch):
    return train_step(state, batch, teacher_params)
  step.jitted, step.teacher_params = train_step, teacher_params
  return step


def check_init_logit_scale(cfg):
  """A random init's logit scale starts inside the range each step clamps it to,
  `cfg.logit_scale_range` ([0, ln 100] for CLIP, none for SigLIP): a start outside it would be
  moved there silently by the first step. Raises ValueError naming the start and the range."""
  start, bounds = cfg.init_logit_scale, cfg.logit_scale_range
  if start is not None and bounds is not None and not bounds[0] <= start <= bounds[1]:
    raise ValueError(f'init_logit_scale={start} is outside [{bounds[0]:g}, '
                     f'ln {np.exp(bounds[1]):.0f} = {bounds[1]:.4f}], the range training clamps '
                     'this model family\'s logit scale to (CLIPConfig.logit_scale_range)')


def state_shardings(mesh, abstract_state, optimizer, rules=sharding.DEFAULT_RULES):
  """NamedShardings for every leaf of the state: params and BN buffers by the partition rules,
  optimizer moments and the parameters' EMA (where the state has one) like their parameters,
  counters and the rng replicated."""
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
  ema_sh = {'ema': param_sh} if 'ema' in abstract_state else {}
  return {'params': param_sh, 'batch_stats': stats_sh, 'opt': opt_sh, 'step': repl, 'rng': repl,
          **ema_sh}


def make_train_step(cfg, tcfg, mesh, optimizer, schedule, shardings, objective=None,
                    batch_keys=None, teacher=None):
  """`train_step(state, batch) -> (state, metrics)`, jitted with the state's shardings, the batch
  split over `('data', 'fsdp')`, and the state donated.

  `objective(params, batch_stats, batch, key) -> (loss, (batch_stats, metrics))` is what is
  minimised (`key`: a fresh PRNG key each step, from the state's `rng`):
  by default `objectives.clip_objective`; fine-tuning passes its own (`clip.train.finetune`)
  with its `batch_keys`. Metrics add the grad norm, the learning rate and, where the params have
  them, the logit scale (clamped after each update to the model family's
  `cfg.logit_scale_range`) and bias.

  What `tcfg.frozen` names (`clip.train.freezing`) leaves the step bit-identical: its gradients and
  updates are zeroed by the optimizer, and its old values are kept after the update, the clamp and
  the BatchNorm statistics (a frozen ResNet layer's running buffers stay as they were).

  With `tcfg.ema_decay`, the state's `'ema'` moves towards the updated parameters after each
  optimizer update (`clip.train.ema.after_step`; not on MultiSteps' accumulating calls).

  With a distillation `teacher` the step is `train_step(state, batch, teacher_params)` (None
  offline): the objective adds `tcfg.distill_weight` times KD, and is differentiated with respect
  to the teacher's parameters too, so that the metrics' `teacher_grad_norm` shows, from the
  compiled step, that the teacher gets no gradient (its path is stopped: XLA folds it to 0)."""
  tcfg.check_mesh(mesh)
  batch_keys = objectives.batch_keys(tcfg) if batch_keys is None else batch_keys
  distilling, online = teacher is not None, teacher is not None and teacher.online
  if tcfg.grad_cache:
    if objective is not None:
      raise ValueError('grad_cache accumulation runs the CLIP objective; a custom objective '
                       'accumulates with accumulation="multisteps"')
    value_and_grad = grad_cache.value_and_grad(cfg, tcfg, mesh)
  else:
    objective = objective or objectives.clip_objective(cfg, tcfg, mesh, teacher)
    value_and_grad = jax.value_and_grad(objective, argnums=(0, 4) if online else 0,
                                        has_aux=True)

  def train_step(state, batch, teacher_params=None):
    frozen_params, frozen_stats = freezing.masks(tcfg.frozen, state['params'],
                                                 state['batch_stats'])
    extra = (teacher_params,) if distilling else ()
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see sharding.constrain_batch
      (loss, (new_stats, aux)), grads = value_and_grad(
          state['params'], state['batch_stats'], batch, state['rng'], *extra)
    if online:
      grads, teacher_grads = grads
      aux['teacher_grad_norm'] = optax.tree.norm(teacher_grads)
    updates, opt = optimizer.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if 'logit_scale' in params and cfg.logit_scale_range is not None:
      params['logit_scale'] = jnp.clip(params['logit_scale'], *cfg.logit_scale_range)
    params = freezing.keep(frozen_params, state['params'], params)
    new_stats = freezing.keep(frozen_stats, state['batch_stats'], new_stats)
    metrics = {'loss': loss, **aux, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(_optimizer_step(opt, state['step']))}
    if 'logit_scale' in params:
      metrics['logit_scale'] = jnp.exp(params['logit_scale'])
    if 'logit_bias' in params:
      metrics['logit_bias'] = params['logit_bias']
    new_state = {'params': params, 'batch_stats': new_stats, 'opt': opt,
                 'step': state['step'] + 1, 'rng': jax.random.fold_in(state['rng'], 1)}
    if tcfg.ema_decay is not None:
      new_state['ema'] = ema.after_step(state['ema'], params, opt, state['step'], tcfg.ema_decay,
                                        tcfg.ema_warmup)
    return new_state, metrics

  batch_sh = sharding.batch_sharding(mesh)
  in_shardings = (shardings, {k: batch_sh for k in batch_keys})
  if distilling:  # the teacher's parameters stay where `distillation.place` put them
    in_shardings += (None,)
  return jax.jit(train_step, in_shardings=in_shardings,
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
  to start from pretrained weights (`lambda key: params`) or from a fine-tuning model. With
  `tcfg.ema_decay` the state has `'ema'`, the initial params in float32 (`clip.train.ema.init`)."""
  def init(key):
    params = model.init_params(key, cfg) if init_params is None else init_params(key)
    params, batch_stats = model.split_batch_stats(params)
    state = {'params': params, 'batch_stats': batch_stats, 'opt': optimizer.init(params),
             'step': jnp.zeros((), jnp.int32), 'rng': jax.random.fold_in(key, 2)}
    return state if tcfg.ema_decay is None else {**state, 'ema': ema.init(params)}
  key = jax.random.PRNGKey(tcfg.seed)
  abstract = jax.eval_shape(init, key)
  freezing.check(tcfg.frozen, abstract['params'], abstract['batch_stats'])
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

