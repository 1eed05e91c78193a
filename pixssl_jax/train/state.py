"""The train state (student, EMA teacher, optimizer), the optimizer and the EMA schedule."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


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

