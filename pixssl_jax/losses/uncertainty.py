"""Monte Carlo dropout statistics and the uncertainty-weighted pixel loss (METHOD.md)."""

import jax
import jax.numpy as jnp

from pixssl_jax.losses.global_consistency import NORM_EPS

WEIGHTING_FORMS = ('exp', 'kendall', 'threshold', 'none')


def mean_over_samples(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over the leading (sample) axis as a chain of K - 1 elementwise adds.

  XLA's CPU reduction over a leading axis is slow: for `[8, 16, 32, 32, 64]` float32 it took
  42 ms against 1 ms for the unrolled adds (K is small and static, so this stays one fused
  elementwise kernel on every backend).
  """
  total = x[0]
  for k in range(1, x.shape[0]):
    total = total + x[k]
  return total / x.shape[0]


def mc_dropout_statistics(samples: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Mean prediction and per-pixel uncertainty of K stabilizer samples.

  The variance is taken after L2-normalising each sample over channels, because the loss is a
  cosine: only the direction of a prediction matters, not its length. Since each normalised
  sample has unit norm, the channel-mean variance lies in `[0, 1/C]`. It is computed as
  `(mean_k |n_k|^2 - |mean_k n_k|^2) / C`, which equals the channel mean of the per-channel
  variances and needs one pass over the samples.

  Args:
    samples: `[K, B, *G, C]` stabilizer outputs for K dropout keys.

  Returns:
    `(mean [B, *G, C], variance [B, *G])`, float32; the variance is 0 for `K = 1`.
  """
  samples = samples.astype(jnp.float32)
  # l2_normalize by hand, keeping each sample's squared norm: |n_k|^2 = sq * inv^2 (1 unless
  # the sample is shorter than the norm floor) needs no second pass over [K, B, *G, C]
  # (measured 54 -> 21 ms for [8, 16, 32, 32, 64] on XLA:CPU; docs/performance.md).
  sq = jnp.sum(jnp.square(samples), axis=-1)
  inv = jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS ** 2))
  mean_direction = mean_over_samples(samples * inv[..., None])
  second_moment = mean_over_samples(sq * jnp.square(inv))
  variance = jnp.maximum(second_moment - jnp.sum(jnp.square(mean_direction), axis=-1), 0.0)
  return mean_over_samples(samples), variance / samples.shape[-1]


def ramp_threshold(step: jax.Array | int, num_steps: int, start: float, end: float) -> jax.Array:
  """UA-MT's sigmoid-shaped ramp of the uncertainty threshold over training.

  `t = start + (end - start) * exp(-5 (1 - x)^2)`, `x = clip(step / num_steps, 0, 1)`
  (Laine & Aila's ramp-up, used by UA-MT). `t(0) = start + 0.0067 (end - start)`, `t = end`
  from `num_steps` on.

  Args:
    step: current step (may be traced).
    num_steps: total training steps (static, > 0).
    start: threshold at the beginning.
    end: threshold at the end.

  Returns:
    Scalar float32 threshold.
  """
  x = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
  return start + (end - start) * jnp.exp(-5.0 * jnp.square(1.0 - x))


def _safe_ratio(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """`num / den`, 0 where `den == 0` (no valid pixel), with finite gradients."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def weighted_pixel_loss(discrepancy: jnp.ndarray, valid: jnp.ndarray, uncertainty: jnp.ndarray,
                        *, form: str, tau: float = 1.0, eps: float = 1e-3,
                        threshold: jax.Array | float = 0.0) -> jnp.ndarray:
  """Uncertainty-weighted mean of the per-pixel discrepancy over valid pixels.

  Forms (METHOD.md "Adaptive weighting"), with `m` the valid mask:
    - 'exp': `w = stop_gradient(exp(-u / tau))`, `sum(m w d) / sum(m w)`;
    - 'kendall': mean over valid of `d exp(-s) + s`, `s = log(u + eps)` (gradient flows into
      `u`, which is how the stabilizer learns to report its uncertainty);
    - 'threshold': plain mean over pixels with `m` and `u < threshold`;
    - 'none': plain mean over valid pixels.
  Returns 0 (and zero gradients, never NaN) when no pixel is selected.

  Args:
    discrepancy: `[B, *G]` per-pixel discrepancy `d`.
    valid: `[B, *G]` bool or {0,1} float mask.
    uncertainty: `[B, *G]` per-pixel uncertainty `u >= 0`.
    form: one of `WEIGHTING_FORMS`.
    tau: temperature of the 'exp' form.
    eps: offset inside the log of the 'kendall' form.
    threshold: uncertainty threshold of the 'threshold' form (may be traced).

  Returns:
    Scalar float32 loss.
  """
  if form not in WEIGHTING_FORMS:
    raise ValueError(f'method.weighting must be one of {WEIGHTING_FORMS}, got {form!r}')
  if discrepancy.shape != valid.shape or discrepancy.shape != uncertainty.shape:
    raise ValueError(f'discrepancy {discrepancy.shape}, valid {valid.shape} and uncertainty '
                     f'{uncertainty.shape} must have the same shape')
  d = discrepancy.astype(jnp.float32)
  u = uncertainty.astype(jnp.float32)
  mask = valid.astype(jnp.float32)
  if form == 'exp':
    if tau <= 0:
      raise ValueError(f'method.tau must be > 0, got {tau}')
    w = jax.lax.stop_gradient(jnp.exp(-u / tau)) * mask
    return _safe_ratio(jnp.sum(w * d), jnp.sum(w))
  if form == 'kendall':
    if eps <= 0:
      raise ValueError(f'method.kendall_eps must be > 0, got {eps}')
    s = jnp.log(u + eps)
    return _safe_ratio(jnp.sum(mask * (d * jnp.exp(-s) + s)), jnp.sum(mask))
  if form == 'threshold':
    mask = mask * (u < threshold).astype(jnp.float32)
  return _safe_ratio(jnp.sum(mask * d), jnp.sum(mask))
