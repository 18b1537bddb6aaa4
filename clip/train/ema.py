"""An exponential moving average (EMA) of the parameters, kept in the train state as `'ema'`.

After each optimizer update, `ema <- decay * ema + (1 - decay) * params`: big_vision's
`params_ema` (its JetFormer trainer, `config.ema_decay`) and timm's `ModelEmaV2`/`V3`, starting
from the initial parameters. It is computed as timm's V3 does, `ema + (1 - decay) * (params -
ema)` (`torch.lerp`): the same average, and exact where the parameters do not move, so the EMA of
a frozen parameter stays bit-identical to it. The EMA is float32 whatever the parameters' dtype
(timm's note: a bfloat16 EMA rounds `(1 - decay) * (params - ema)` away at usual decays), has the
parameters' tree and shapes, and takes their shardings (FSDP and tensor parallelism included).

Optional decay warmup (timm's `ModelEmaV3(use_warmup=True)`, after @crowsonkb, with its gamma 1):
the decay of the n-th update is `min(decay, 1 - n ** -power)`, so the first update copies the
parameters and power 1 gives the plain mean of the parameters after each update; timm suggests
power 2/3 for runs of a million steps or more, 3/4 for shorter ones.

Under `optax.MultiSteps` (accumulation) the EMA moves only on the calls that apply an update: the
others leave the parameters unchanged and would otherwise decay the EMA k times per update.
"""
import math

import jax
import jax.numpy as jnp
import optax


def check(decay, warmup_power=None):
  """Raises ValueError unless `decay` is None (no EMA) or a number in (0, 1) and `warmup_power`
  is None (no warmup) or a number > 0 given with a decay. Messages name the value given."""
  def real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  if decay is not None and not (real(decay) and 0 < decay < 1):
    raise ValueError(f'ema_decay must be a number in (0, 1) (e.g. 0.9999), or None for no EMA; '
                     f'got {decay!r}')
  if warmup_power is not None:
    if decay is None:
      raise ValueError(f'ema_warmup={warmup_power!r} warms up the EMA decay: it needs ema_decay')
    if not (real(warmup_power) and warmup_power > 0):
      raise ValueError(f'ema_warmup (the power of the decay warmup, timm suggests 2/3 or 3/4) '
                       f'must be a number > 0, or None for no warmup; got {warmup_power!r}')


def init(params):
  """The EMA before any update: a float32 copy of `params` (same tree and shapes)."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def decay_at(decay, updates, warmup_power=None):
  """The decay of update number `updates` (1 for the first; an int or a traced int array):
  `decay`, or with a warmup `min(decay, 1 - updates ** -warmup_power)`. A float32 scalar."""
  decay = jnp.float32(decay)
  if warmup_power is None:
    return decay
  n = jnp.maximum(jnp.asarray(updates, jnp.float32), 1.0)
  return jnp.minimum(decay, 1 - n ** -jnp.float32(warmup_power))


def update(ema, params, decay, applied=True):
  """`ema + (1 - decay) * (params - ema)` where `applied` (a bool, or a traced scalar bool),
  `ema` unchanged (exactly) where not. `decay` is a scalar in [0, 1)."""
  weight = jnp.where(applied, 1 - jnp.asarray(decay, jnp.float32), 0.0)
  return jax.tree.map(lambda e, p: e + weight * (jnp.asarray(p, jnp.float32) - e), ema, params)


def applied_updates(opt_state, step):
  """(applied, count) after a call of the train step: whether the call applied an optimizer
  update and how many updates were applied so far, this one included. `opt_state` is the new
  optimizer state; `step` counts the calls before this one. Under `optax.MultiSteps` a call
  applies an update when its mini-step counter wraps to 0; otherwise every call does."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.mini_step == 0, opt_state.gradient_step
  return jnp.bool_(True), step + 1


def after_step(ema, params, opt_state, step, decay, warmup_power=None):
  """The train step's EMA update, after the optimizer's: `update` at `decay_at(decay, count,
  warmup_power)` if the call applied an update (`applied_updates(opt_state, step)`)."""
  applied, count = applied_updates(opt_state, step)
  return update(ema, params, decay_at(decay, count, warmup_power), applied)
