"""VICReg's variance and covariance terms, used to keep dense features from collapsing.

The pixel consistency loss is satisfied by a network that maps every pixel to one vector (a
per-sample normalisation makes that easy); docs/BENCHMARKS.md measured exactly that collapse
(mean pairwise cosine 0.998, effective rank 1 of 64). Bardes et al. (VICReg, ICLR 2022)
prevent it with two terms on the embeddings of a batch: a hinge that keeps every channel's
standard deviation at or above `gamma`, and the squared off-diagonal covariances, which stop
the channels from carrying the same information.
"""

import jax
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


# The effective rank is a diagnostic: a fixed strided subsample of at most this many feature
# vectors keeps its covariance cheap for any batch and grid size.
EFFECTIVE_RANK_SAMPLES = 8192


def effective_rank(features: jnp.ndarray, max_samples: int = EFFECTIVE_RANK_SAMPLES
                   ) -> jnp.ndarray:
  """Roy & Vetterli's effective rank of `[..., C]` feature vectors.

  `exp(H(p))` with `p` the singular values of the centred `[N, C]` matrix normalised to sum 1
  and `H` their entropy: C for features spread evenly over C directions, 1 when every vector
  lies on one line (collapse). The singular values are the square roots of the eigenvalues of
  the `[C, C]` scatter matrix, so only a `C x C` eigendecomposition is needed. Computed on a
  fixed strided subsample of at most `max_samples` vectors, without gradient.

  Args:
    features: `[..., C]` features; every leading position is one sample.
    max_samples: size bound of the subsample (static).

  Returns:
    float32 scalar in [1, C]; 0 for all-equal vectors.
  """
  c = features.shape[-1]
  z = jax.lax.stop_gradient(features.astype(jnp.float32)).reshape(-1, c)
  if z.shape[0] > max_samples:
    z = z[::-(-z.shape[0] // max_samples)]
  centred = z - jnp.mean(z, axis=0)
  eigenvalues = jnp.linalg.eigvalsh(centred.T @ centred)
  singular = jnp.sqrt(jnp.maximum(eigenvalues, 0.0))
  total = jnp.sum(singular)
  p = singular / jnp.where(total > 0, total, 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.where(total > 0, jnp.exp(entropy), 0.0)
