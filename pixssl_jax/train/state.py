"""The train state (student, EMA teacher, optimizer), the optimizer and the EMA schedule."""

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# The derived m0 aims this fraction below the configured share, so the float32 rounding of the
# per-step momenta cannot leave the product of a whole run above it.
_SHARE_MARGIN = 1e-3


@flax.struct.dataclass
class TrainState:
  """Everything the pre-training step updates; checkpointed as one pytree.

  Attributes:
    step: number of optimizer steps taken so far (int32 scalar).
    params: the student's parameters.
    ema_params: the teacher's parameters, an exponential moving average of `params`.
    opt_state: the optimizer state of `params`.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def ema_momentum(step: jax.Array, num_steps: int, base_momentum: float) -> jax.Array:
  """BYOL's teacher momentum: m0 at step 0, rising to 1 on a cosine at `num_steps`.

  m(k) = 1 - (1 - m0) * (cos(pi * k / K) + 1) / 2.
  """
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base_momentum) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def _ramp_weights(num_steps: int) -> np.ndarray:
  """`(cos(pi k / K) + 1) / 2` for the steps `k = 0 .. K - 1` of a run of K steps, float64."""
  k = np.arange(max(num_steps, 1), dtype=np.float64)
  return (np.cos(np.pi * k / max(num_steps, 1)) + 1.0) / 2.0


def derived_ema_momentum(num_steps: int, final_init_share: float) -> float:
  """The m0 whose cosine schedule leaves the teacher `final_init_share` of its initialisation.

  After K steps the teacher holds `prod_{k<K} m(k)` of its initial (random) parameters, with
  `m(k) = 1 - (1 - m0) c_k` and `c_k = (cos(pi k / K) + 1) / 2`. The log of the product,
  `sum_k log(1 - (1 - m0) c_k)`, falls monotonically in `1 - m0` (from 0 to -inf, `c_0 = 1`),
  so bisection finds the m0 that makes it `log(final_init_share)` (less a 0.1% margin).

  Args:
    num_steps: K, the run's length (>= 1).
    final_init_share: the share to leave, in (0, 1).

  Returns:
    m0 in (0, 1), as a Python float.
  """
  if not 0.0 < final_init_share < 1.0:
    raise ValueError(f'optim.ema_final_init_share must be in (0, 1), got {final_init_share}')
  c = _ramp_weights(num_steps)
  target = math.log(final_init_share) + math.log1p(-_SHARE_MARGIN)
  lo, hi = 0.0, 1.0  # Bracket of 1 - m0: log-share(lo) = 0 > target > log-share(hi) = -inf.
  for _ in range(100):
    mid = (lo + hi) / 2.0
    if np.sum(np.log1p(-mid * c)) > target:
      lo = mid
    else:
      hi = mid
  return 1.0 - hi  # The side whose share is at most the target.


def base_ema_momentum(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> float:
  """The run's teacher momentum m0: `optim.ema_momentum`, lowered for short runs.

  With `optim.ema_final_init_share` in (0, 1), m0 is the smaller of `optim.ema_momentum` and
  the m0 that leaves the teacher that share of its initialisation after `num_steps` steps
  (`derived_ema_momentum`); long runs keep BYOL's m0, short ones get a faster teacher. With it
  0 (or None, or absent from configs written before the field existed), m0 is
  `optim.ema_momentum`.
  """
  m0 = float(optim_cfg.ema_momentum)
  share = optim_cfg.get('ema_final_init_share', None)
  if not share:
    return m0
  return min(m0, derived_ema_momentum(num_steps, float(share)))


def teacher_init_share(step: jax.Array | int, num_steps: int, base_momentum: float
                       ) -> jax.Array:
  """The share of its initialisation the teacher holds after `step` EMA updates.

  `prod_{k < step} m(k)` for the cosine schedule of `ema_momentum` (1 at step 0): each update
  keeps `m` of the teacher, and the teacher starts as the student's initialisation. Computed
  from the step in closed form over the schedule (a masked sum of `log m(k)` over the run's
  K steps), so the train state needs no extra field.

  Args:
    step: number of updates done (may be traced).
    num_steps: K (static).
    base_momentum: m0.

  Returns:
    float32 scalar in (0, 1]; constant from step K on (m = 1 there).
  """
  log_m = np.log1p(-(1.0 - base_momentum) * _ramp_weights(num_steps)).astype(np.float32)
  taken = jnp.arange(log_m.size) < jnp.asarray(step, jnp.int32)
  return jnp.exp(jnp.sum(jnp.where(taken, jnp.asarray(log_m), 0.0)))


def ema_update(ema_params: Any, params: Any, momentum: jax.Array) -> Any:
  """teacher <- m * teacher + (1 - m) * student, leaf by leaf."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, ema_params, params)


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict,
                           num_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak rate, then cosine decay, as a function of the step index.

  Step k trains with the rate at point k + 1 of the curve, so the first step already learns
  (peak / warmup) instead of being spent at rate 0, and the rate reaches 0 after the last step.
  """
  warmup = min(optim_cfg.warmup_steps, max(num_steps - 1, 0))
  curve = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps + 1, warmup + 1), end_value=0.0)
  return lambda step: curve(step + 1)


def _decay_mask(params: Any) -> Any:
  # Weight decay on kernels only: biases and norm scales (rank <= 1) are not decayed.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
  """AdamW (default) or LARS on the warm-up + cosine schedule, after global-norm clipping."""
  schedule = learning_rate_schedule(optim_cfg, num_steps)
  if optim_cfg.name == 'adamw':
    base = optax.adamw(schedule, weight_decay=optim_cfg.weight_decay, mask=_decay_mask)
  elif optim_cfg.name == 'lars':
    base = optax.lars(schedule, weight_decay=optim_cfg.weight_decay,
                      weight_decay_mask=_decay_mask, trust_ratio_mask=_decay_mask)
  else:
    raise ValueError(f"config.optim.name: unknown optimizer {optim_cfg.name!r}; "
                     "choose 'adamw' or 'lars'.")
  if optim_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), base)
  return base


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """The state at step 0: the teacher starts as a copy of the student."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))

