"""GroupNorm as per-channel sums and one elementwise pass (same parameters as Flax's).

Why: `flax.linen.GroupNorm` reshapes `[B, *S, C]` to `[B, *S, G, C/G]`, reduces over
`(*S, C/G)` and normalises with the group statistics broadcast back, which XLA:CPU runs slowly
(`benchmarks/profile_step.py`, docs/performance.md). Here the statistics are plain sums over
the spatial axes, `[B, *S, C] -> [B, C]` (the same sums for the forward and, by autodiff, the
backward pass), the groups are summed on the tiny `[B, C]` result, and the normalisation is one
multiply-add with a per-(sample, channel) scale and shift.

The bias of the convolution before the norm (`pre_bias`) is folded into the statistics and the
shift instead of being added to the activations first, which saves a full read and write of
the largest arrays of the U-Net: `sum(y + b) = sum(y) + n b` and
`sum((y + b)^2) = sum(y^2) + 2 b sum(y) + n b^2`.

Same statistics as Flax's (biased variance as E[x^2] - E[x]^2, clipped at 0, epsilon 1e-6)
up to float rounding, and the same `scale`/`bias` parameters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# flax.linen.GroupNorm's default epsilon.
_EPSILON = 1e-6


def group_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, num_groups: int,
               pre_bias: jnp.ndarray | None = None,
               epsilon: float = _EPSILON) -> jnp.ndarray:
  """GroupNorm of `x + pre_bias` over the spatial axes and each group's channels, per sample.

  Args:
    x: `[B, *S, C]` activations (computed in float32).
    scale: `[C]` learned scale.
    bias: `[C]` learned shift.
    num_groups: `G`, dividing `C`.
    pre_bias: optional `[C]` added to `x` before normalising (a convolution's bias).
    epsilon: added to the variance.

  Returns:
    `[B, *S, C]` float32.
  """
  x = x.astype(jnp.float32)
  batch, channels = x.shape[0], x.shape[-1]
  per_group = channels // num_groups
  spatial_axes = tuple(range(1, x.ndim - 1))
  size = x.size // (batch * channels)
  # A missing pre_bias is zero: the extra arithmetic is on [B, C] only.
  pre_bias = (jnp.zeros((channels,), jnp.float32) if pre_bias is None
              else pre_bias.astype(jnp.float32))
  sums = jnp.sum(x, axis=spatial_axes)  # [B, C]
  square_sums = jnp.sum(jnp.square(x), axis=spatial_axes)
  square_sums = square_sums + 2 * pre_bias * sums + size * jnp.square(pre_bias)
  sums = sums + size * pre_bias

  def group_mean(per_channel):
    return per_channel.reshape(batch, num_groups, per_group).sum(-1) / (size * per_group)

  mean, mean_square = group_mean(sums), group_mean(square_sums)
  inverse_std = jax.lax.rsqrt(jnp.maximum(mean_square - jnp.square(mean), 0.0) + epsilon)
  # Per (sample, channel): out = x * factor + shift.
  factor = jnp.repeat(inverse_std, per_group, axis=1) * scale
  shift = bias + (pre_bias - jnp.repeat(mean, per_group, axis=1)) * factor
  shape = (batch,) + (1,) * len(spatial_axes) + (channels,)
  return x * factor.reshape(shape) + shift.reshape(shape)


class GroupNorm(nn.Module):
  """Drop-in for `nn.GroupNorm(num_groups)` with float32 params: the same `scale`, `bias`.

  Attributes:
    num_groups: number of channel groups.
  """
  num_groups: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, pre_bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """`[B, *S, C]` -> float32 GroupNorm of `x + pre_bias` (`pre_bias` `[C]`, optional)."""
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'GroupNorm: {channels} channels not divisible by {self.num_groups} '
                       'groups')
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups, pre_bias)
