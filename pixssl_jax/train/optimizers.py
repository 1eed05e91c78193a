"""The optimizer (AdamW or LARS) and its learning-rate schedule, for pre-training and
fine-tuning."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


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


class DelayedState(NamedTuple):
  count: jax.Array
  inner: Any


def delayed(tx: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """`tx` held for the first `steps` updates: zero updates, and `tx`'s state (its step count,
  moments) untouched, so afterwards `tx` runs as if it started then, schedule included."""
  def init(params):
    return DelayedState(jnp.zeros((), jnp.int32), tx.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = tx.update(updates, state.inner, params)
    active = state.count >= steps
    pick = lambda new, old: jnp.where(active, new, old)
    return (jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates),
            DelayedState(state.count + 1, jax.tree.map(pick, new_inner, state.inner)))

  return optax.GradientTransformation(init, update)


class TwoStageState(NamedTuple):
  count: jax.Array
  first: Any
  second: Any


def two_stage(first: optax.GradientTransformation, second: optax.GradientTransformation,
              steps: int) -> optax.GradientTransformation:
  """`first` for the first `steps` updates, then `second`, each state advancing only in its
  own stage: `second` starts as if created then (schedule and moments from their start)."""
  def init(params):
    return TwoStageState(jnp.zeros((), jnp.int32), first.init(params), second.init(params))

  def update(updates, state, params=None):
    in_first = state.count < steps
    first_updates, first_state = first.update(updates, state.first, params)
    second_updates, second_state = second.update(updates, state.second, params)
    keep = lambda active: (lambda new, old: jnp.where(active, new, old))
    return (jax.tree.map(lambda a, b: jnp.where(in_first, a, b), first_updates, second_updates),
            TwoStageState(state.count + 1,
                          jax.tree.map(keep(in_first), first_state, state.first),
                          jax.tree.map(keep(~in_first), second_state, state.second)))

  return optax.GradientTransformation(init, update)
