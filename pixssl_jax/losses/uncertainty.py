"""Monte Carlo dropout statistics, the uncertainty-weighted pixel loss and its diagnostics.

The forms and their scales are described in docs/method.md ("Uncertainty weighting").
"""

import jax
import jax.numpy as jnp

from pixssl_jax.losses.global_consistency import NORM_EPS

WEIGHTING_FORMS = ('exp', 'kendall', 'threshold', 'none')
# 'relative': u is measured against the batch (exp: standardised over the valid pixels;
# threshold: a quantile of the valid pixels) or against its bound 1/C (kendall), so the
# strength of the weighting does not depend on the absolute size of u, which shrinks several
# fold during training. 'absolute': the paper-style forms on the raw u (docs/method.md).
WEIGHTING_SCALES = ('relative', 'absolute')
# 'exp' relative: standardised uncertainties are clipped to +-Z_CLIP, so a handful of pixels
# far below the batch mean (e.g. a hidden layer that ReLU zeroes, u = 0) cannot take over the
# loss: the largest weight ratio is exp(2 Z_CLIP / tau).
Z_CLIP = 3.0
# Spearman's rank correlation is a diagnostic: a fixed strided subsample of at most this many
# cells keeps its two sorts cheap at any batch and grid size.
SPEARMAN_CELLS = 4096


def mean_over_samples(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over the leading (sample) axis as a chain of K - 1 elementwise adds.

  XLA's CPU reduction over a leading axis is many times slower than the unrolled adds
  (docs/performance.md); K is small and static, so this stays one fused elementwise kernel on
  every backend.
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
  # the sample is shorter than the norm floor) needs no second pass over [K, B, *G, C].
  sq = jnp.sum(jnp.square(samples), axis=-1)
  inv = jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS ** 2))
  mean_direction = mean_over_samples(samples * inv[..., None])
  second_moment = mean_over_samples(sq * jnp.square(inv))
  variance = jnp.maximum(second_moment - jnp.sum(jnp.square(mean_direction), axis=-1), 0.0)
  return mean_over_samples(samples), variance / samples.shape[-1]


def ramp_threshold(step: jax.Array | int, num_steps: int, start: float, end: float) -> jax.Array:
  """UA-MT's sigmoid-shaped ramp from `start` to `end` over training.

  `t = start + (end - start) * exp(-5 (1 - x)^2)`, `x = clip(step / num_steps, 0, 1)`
  (Laine & Aila's ramp-up, used by UA-MT). `t(0) = start + 0.0067 (end - start)`, `t = end`
  from `num_steps` on. Ramps the absolute threshold and the relative keep fraction alike.

  Args:
    step: current step (may be traced).
    num_steps: total training steps (static, > 0).
    start: value at the beginning.
    end: value at the end.

  Returns:
    Scalar float32.
  """
  x = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
  return start + (end - start) * jnp.exp(-5.0 * jnp.square(1.0 - x))


def _safe_ratio(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """`num / den`, 0 where `den == 0` (no valid pixel), with finite gradients."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def valid_ranks(x: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Ascending ordinal ranks of the valid entries of `x` among themselves.

  The valid entries get the ranks `0 .. n_valid - 1` (ties broken by position, so the ranks
  never depend on how an array is sharded); invalid entries get ranks `>= n_valid`.

  Args:
    x: `[...]` values.
    valid: `[...]` bool or {0,1} mask.

  Returns:
    `[...]` int32 ranks.
  """
  flat = jnp.where(valid.astype(bool), x.astype(jnp.float32), jnp.inf).reshape(-1)
  order = jnp.argsort(flat, stable=True)
  ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  return ranks.reshape(x.shape)


def _masked_mean_std(x: jnp.ndarray, mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Mean and (population) standard deviation of `x` over `mask`; 0, 0 for an empty mask."""
  n = jnp.sum(mask)
  mean = _safe_ratio(jnp.sum(mask * x), n)
  var = _safe_ratio(jnp.sum(mask * jnp.square(x - mean)), n)
  return mean, jnp.sqrt(var)


def uncertainty_weighting(discrepancy: jnp.ndarray, valid: jnp.ndarray,
                          uncertainty: jnp.ndarray, *, form: str, scale: str = 'relative',
                          tau: float = 1.0, eps: float = 1e-3,
                          threshold: jax.Array | float = 0.0,
                          keep_fraction: jax.Array | float = 1.0,
                          num_channels: int = 1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Uncertainty-weighted mean of the per-pixel discrepancy, and the weights it used.

  With `m` the valid mask, `d` the discrepancy and `u` the uncertainty (docs/method.md):
    - 'exp', relative: `z = clip((u - mean_m u) / std_m u, -Z_CLIP, Z_CLIP)`,
      `w = stop_gradient(exp(-z / tau))`, `L = sum(m w d) / sum(m w)`; absolute:
      `w = stop_gradient(exp(-u / tau))`;
    - 'kendall': mean over valid of `d exp(-s) + s` with `s = log(C u + eps)` (relative: `C u`
      is `1 - |mean direction|^2`, in [0, 1] like `d / 2`) or `s = log(u + eps)` (absolute);
      the gradient flows into `u`, which is how the stabilizer learns to report uncertainty;
    - 'threshold', relative: plain mean over the `keep_fraction` most certain valid pixels
      (at least one); absolute: over valid pixels with `u < threshold`;
    - 'none': plain mean over valid pixels.
  Returns a loss of 0 (and zero gradients, never NaN) when no pixel is selected.

  Args:
    discrepancy: `[B, *G]` per-pixel discrepancy `d`.
    valid: `[B, *G]` bool or {0,1} float mask.
    uncertainty: `[B, *G]` per-pixel uncertainty `u >= 0`.
    form: one of `WEIGHTING_FORMS`.
    scale: one of `WEIGHTING_SCALES`.
    tau: temperature of the 'exp' form (in standard deviations of u when relative).
    eps: offset inside the log of the 'kendall' form.
    threshold: absolute uncertainty threshold of the 'threshold' form (may be traced).
    keep_fraction: fraction of valid pixels the relative 'threshold' form keeps, in (0, 1]
      (may be traced).
    num_channels: `C`, the channel count of the stabilizer output (`0 <= u <= 1/C`); used by
      the relative 'kendall' form.

  Returns:
    `(loss, weights)`: scalar float32 loss and `[B, *G]` float32 weights without gradient, 0
    on invalid pixels; the relative weight each valid pixel's `d` has in the loss (`exp(-s)`
    for 'kendall', the keep mask for 'threshold', the valid mask for 'none').
  """
  if form not in WEIGHTING_FORMS:
    raise ValueError(f'method.weighting must be one of {WEIGHTING_FORMS}, got {form!r}')
  if scale not in WEIGHTING_SCALES:
    raise ValueError(f'method.weighting_scale must be one of {WEIGHTING_SCALES}, got {scale!r}')
  if discrepancy.shape != valid.shape or discrepancy.shape != uncertainty.shape:
    raise ValueError(f'discrepancy {discrepancy.shape}, valid {valid.shape} and uncertainty '
                     f'{uncertainty.shape} must have the same shape')
  d = discrepancy.astype(jnp.float32)
  u = uncertainty.astype(jnp.float32)
  mask = valid.astype(jnp.float32)
  relative = scale == 'relative'
  if form == 'exp':
    if tau <= 0:
      raise ValueError(f'method.tau must be > 0, got {tau}')
    u_const = jax.lax.stop_gradient(u)
    if relative:
      mean, std = _masked_mean_std(u_const, mask)
      # All-equal u (no dropout, one sample) gives z = 0: uniform weights, not 0 / 0.
      z = jnp.clip((u_const - mean) / jnp.where(std > 0, std, 1.0), -Z_CLIP, Z_CLIP)
      w = jnp.exp(-z / tau) * mask
    else:
      w = jnp.exp(-u_const / tau) * mask
    return _safe_ratio(jnp.sum(w * d), jnp.sum(w)), w
  if form == 'kendall':
    if eps <= 0:
      raise ValueError(f'method.kendall_eps must be > 0, got {eps}')
    s = jnp.log((num_channels * u if relative else u) + eps)
    loss = _safe_ratio(jnp.sum(mask * (d * jnp.exp(-s) + s)), jnp.sum(mask))
    return loss, jax.lax.stop_gradient(jnp.exp(-s)) * mask
  if form == 'threshold':
    u_const = jax.lax.stop_gradient(u)
    if relative:
      n_keep = jnp.maximum(jnp.floor(keep_fraction * jnp.sum(mask) + 0.5), 1.0)
      mask = mask * (valid_ranks(u_const, mask > 0) < n_keep).astype(jnp.float32)
    else:
      mask = mask * (u_const < threshold).astype(jnp.float32)
  return _safe_ratio(jnp.sum(mask * d), jnp.sum(mask)), mask


# The calibration term compares log u with d; u is offset by this fraction of its valid mean
# first, so a cell whose u is 0 (a hidden layer the ReLU zeroes) gets a finite log and gradient
# at any scale of u.
CALIBRATION_OFFSET = 0.1


def uncertainty_calibration(uncertainty: jnp.ndarray, discrepancy: jnp.ndarray,
                            valid: jnp.ndarray) -> jnp.ndarray:
  """How badly the uncertainty ranks the pixels by their discrepancy: 1 - Pearson correlation.

  `L = 1 - corr_m(log(u + CALIBRATION_OFFSET mean_m u), rank_m(d))` over the valid cells `m`,
  in [0, 2], with `rank_m(d)` the ordinal rank of `d` among them. The discrepancy is a target
  (no gradient); only `u` learns. The correlation is unchanged when `u` is scaled, so the term
  asks the uncertainty to order the pixels as the discrepancy does, not to match its size: the
  MC-dropout spread can stay small, and with it the noise in the stabilizer's mean prediction.
  The relative `exp` weighting reads `u` the same scale-free way.

  Args:
    uncertainty: `[...]` per-pixel `u >= 0` (differentiable).
    discrepancy: `[...]` per-pixel `d`.
    valid: `[...]` bool or {0,1} mask.

  Returns:
    float32 scalar; 1 (no signal either way) with fewer than two valid cells or a constant
    `u` or `d`.
  """
  mask = valid.astype(jnp.float32)
  u = uncertainty.astype(jnp.float32)
  # The target is the rank of d among the valid cells, so a few pixels of very large d cannot
  # dominate the correlation, and the term asks for what Spearman(u, d) measures.
  d = valid_ranks(jax.lax.stop_gradient(discrepancy), mask > 0).astype(jnp.float32)
  u_mean, _ = _masked_mean_std(jax.lax.stop_gradient(u), mask)
  # u >= 0, so a zero mean means every valid u is 0: log(u + 1) is then a constant 0.
  log_u = jnp.log(u + jnp.where(u_mean > 0, CALIBRATION_OFFSET * u_mean, 1.0))
  n = jnp.maximum(jnp.sum(mask), 1.0)
  x = mask * (log_u - jnp.sum(mask * log_u) / n)
  y = mask * (d - jnp.sum(mask * d) / n)
  var_x, var_y = jnp.sum(jnp.square(x)) / n, jnp.sum(jnp.square(y)) / n
  # Below these variances u or d is constant up to rounding: no order to learn. The square root
  # is taken only where positive, since its gradient at 0 would turn into NaN.
  ordered = (var_x > 1e-10) & (var_y > 1e-10)
  norm = jnp.sqrt(jnp.where(ordered, var_x * var_y, 1.0))
  return 1.0 - jnp.where(ordered, jnp.sum(x * y) / n / norm, 0.0)


def weight_statistics(weights: jnp.ndarray, valid: jnp.ndarray
                      ) -> dict[str, jnp.ndarray]:
  """How far the pixel weights are from uniform, over the valid pixels.

  Args:
    weights: `[...]` non-negative weights.
    valid: `[...]` bool or {0,1} mask.

  Returns:
    float32 scalars: `weight_cv`, the coefficient of variation std/mean of the weights (0 for
    uniform weights); `weight_ess`, the effective sample fraction `(sum w)^2 / (n sum w^2)`
    (1 for uniform weights, k/n for k equal weights and n - k zeros); `keep_fraction`, the
    fraction of valid pixels with a nonzero weight. All 0 without a valid pixel.
  """
  mask = valid.astype(jnp.float32)
  w = jax.lax.stop_gradient(weights.astype(jnp.float32)) * mask
  n = jnp.sum(mask)
  mean, std = _masked_mean_std(w, mask)
  total = jnp.sum(w)
  return {
      'weight_cv': _safe_ratio(std, mean),
      'weight_ess': _safe_ratio(jnp.square(total), n * jnp.sum(jnp.square(w))),
      'keep_fraction': _safe_ratio(jnp.sum(mask * (w > 0)), n),
  }


def spearman(x: jnp.ndarray, y: jnp.ndarray, valid: jnp.ndarray,
             max_cells: int = SPEARMAN_CELLS) -> jnp.ndarray:
  """Spearman's rank correlation of `x` and `y` over the valid entries.

  Computed on a fixed strided subsample of at most `max_cells` entries of the flattened
  arrays (two sorts of that size), ranks without tie averaging.

  Args:
    x, y: `[...]` values of the same shape.
    valid: `[...]` bool or {0,1} mask.
    max_cells: size bound of the subsample (static).

  Returns:
    float32 scalar in [-1, 1]; 0 with fewer than two valid entries or a constant `x` or `y`.
  """
  x = jax.lax.stop_gradient(x.astype(jnp.float32)).reshape(-1)
  y = jax.lax.stop_gradient(y.astype(jnp.float32)).reshape(-1)
  mask = valid.astype(bool).reshape(-1)
  if x.size > max_cells:
    stride = -(-x.size // max_cells)
    x, y, mask = x[::stride], y[::stride], mask[::stride]
  m = mask.astype(jnp.float32)
  rx = valid_ranks(x, mask).astype(jnp.float32)
  ry = valid_ranks(y, mask).astype(jnp.float32)
  mx, sx = _masked_mean_std(rx, m)
  my, sy = _masked_mean_std(ry, m)
  rho = _safe_ratio(_safe_ratio(jnp.sum(m * (rx - mx) * (ry - my)), jnp.sum(m)), sx * sy)
  # Ordinal ranks of a constant give an arbitrary order: no correlation to report.
  _, std_x = _masked_mean_std(x, m)
  _, std_y = _masked_mean_std(y, m)
  return jnp.where((std_x > 0) & (std_y > 0), rho, 0.0)
