"""BYOL-style global consistency and the cosine discrepancy it is built on."""

import jax
import jax.numpy as jnp

# Norms below this are treated as this, so a zero vector gives a finite loss and gradient.
NORM_EPS = 1e-6


def l2_normalize(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """L2-normalises `x` along `axis`, safely at zero (no NaN value or gradient)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  # rsqrt(max(., eps^2)) instead of x / norm: the norm's gradient is NaN at 0.
  return x * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS ** 2))


def cosine_discrepancy(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """`2 - 2 cos(a, b)` along the last axis, computed in float32.

  Args:
    a: `[..., C]`.
    b: `[..., C]` (broadcastable to `a`).

  Returns:
    `[...]` values in `[0, 4]`: 0 for parallel, 2 for orthogonal, 4 for opposite vectors.
  """
  a = l2_normalize(a.astype(jnp.float32))
  b = l2_normalize(b.astype(jnp.float32))
  return 2.0 - 2.0 * jnp.sum(a * b, axis=-1)


def global_consistency(pred1: jnp.ndarray, pred2: jnp.ndarray, target1: jnp.ndarray,
                       target2: jnp.ndarray) -> jnp.ndarray:
  """Symmetrised BYOL loss.

  `mean_b [(2 - 2cos(pred1, target2)) + (2 - 2cos(pred2, target1))] / 2`. The caller is
  responsible for `stop_gradient` on the targets (teacher outputs).

  Args:
    pred1: `[B, D]` student predictions of view 1.
    pred2: `[B, D]` student predictions of view 2.
    target1: `[B, D]` teacher projections of view 1.
    target2: `[B, D]` teacher projections of view 2.

  Returns:
    Scalar float32 loss in `[0, 4]`.
  """
  per_sample = cosine_discrepancy(pred1, target2) + cosine_discrepancy(pred2, target1)
  return jnp.mean(per_sample) / 2.0
