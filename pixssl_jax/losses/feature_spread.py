"""VICReg's variance and covariance terms, used to keep dense features from collapsing.

The pixel consistency loss is satisfied by a network that maps every pixel to one vector (a
per-sample normalisation makes that easy); docs/BENCHMARKS.md measured exactly that collapse
(mean pairwise cosine 0.998, effective rank 1 of 64). Bardes et al. (VICReg, ICLR 2022)
prevent it with two terms on the embeddings of a batch: a hinge that keeps every channel's
standard deviation at or above `gamma`, and the squared off-diagonal covariances, which stop
the channels from carrying the same information.
"""

import jax.numpy as jnp

# VICReg's defaults: the target standard deviation and the epsilon inside its square root.
TARGET_STD = 1.0
STD_EPS = 1e-4


def variance_covariance(features: jnp.ndarray, target_std: float = TARGET_STD
                        ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """VICReg's variance and covariance losses of `[..., C]` feature vectors.

  Every leading position is one sample (for pixel features: every pixel of every view), so the
  statistics are over the whole (global) batch and do not depend on how it is sharded.

  Args:
    features: `[..., C]` raw (not normalised) features, at least two samples.
    target_std: the hinge's target standard deviation `gamma`.

  Returns:
    `(variance, covariance)` float32 scalars: the channel mean of `relu(gamma - std_c)`, and the
    sum of the squared off-diagonal covariances divided by `C`. Both are 0 for features whose
    channels have standard deviation >= gamma and are uncorrelated.
  """
  c = features.shape[-1]
  z = features.reshape(-1, c).astype(jnp.float32)
  centred = z - jnp.mean(z, axis=0)
  # Unbiased, as VICReg; max(n - 1, 1) keeps a one-sample batch finite.
  cov = centred.T @ centred / max(z.shape[0] - 1, 1)
  std = jnp.sqrt(jnp.diagonal(cov) + STD_EPS)
  variance = jnp.mean(jnp.maximum(target_std - std, 0.0))
  off_diagonal = cov * (1.0 - jnp.eye(c, dtype=cov.dtype))
  covariance = jnp.sum(jnp.square(off_diagonal)) / c
  return variance, covariance
