"""Projection heads: global projector/predictor, pixel projector, context stabilizer.

All heads act on the last (channel) axis only, so a `Dense` layer is exactly a 1x1(x1)
convolution and the same module serves `[B, C]` vectors and `[B, *G, C]` feature maps of any
spatial rank. Outputs are float32 so the losses never run in bfloat16.

No running statistics anywhere: the pixel heads use per-sample norms (GroupNorm / LayerNorm);
the global MLP heads normalise over the batch by default (`BatchStatsNorm`, as BYOL's
projector), which under jit is a global reduction, so nothing depends on how the batch is
split over devices and the EMA teacher has no statistics to keep in sync.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixssl_jax.models import dropout_bits
from pixssl_jax.models.layers import FLAX, LayerSet


def _layer_norm_f32(x: jnp.ndarray, name: str) -> jnp.ndarray:
  """LayerNorm over channels computed in float32, returned in `x.dtype`."""
  y = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


class BatchStatsNorm(nn.Module):
  """Normalises each feature over the batch axis, with a learned scale and bias; no state.

  BYOL's projector needs statistics across samples: with a per-sample norm the pooled global
  features of different views are nearly identical at initialisation and the global loss is
  trivially small (measured: projection_std 0.003 instead of about 1/sqrt(D) = 0.09). Under
  jit the mean over a batch sharded across devices is a global all-reduce, so the result does
  not depend on the sharding. Batch statistics are used for student and teacher alike and no
  running averages are kept: the heads exist only for pre-training.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # Statistics over every axis but the channels: the batch for `[B, C]` vectors, the batch
    # and all positions for `[B, *G, C]` feature maps (PixPro's BatchNorm in the projector).
    y = x.astype(jnp.float32)
    axes = tuple(range(y.ndim - 1))
    mean = jnp.mean(y, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=axes, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(var + 1e-5)
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return (y * scale + bias).astype(x.dtype)


class MLPHead(nn.Module):
  """Dense -> norm -> ReLU -> Dense, the BYOL projector/predictor shape.

  Attributes:
    hidden: hidden width.
    out: output width.
    dtype: compute dtype.
    norm: 'batch' (statistics over the batch, as BYOL; the default) or 'layer' (per sample).
    output_bias: False for the projector ahead of a batch-normed predictor, where the bias
      would get no gradient (the predictor's norm removes it) and drift on rounding noise.
  """
  hidden: int
  out: int
  dtype: Any = jnp.float32
  norm: str = 'batch'
  output_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps `[B, Cin]` to `[B, out]` float32."""
    # No bias before a batch norm: the norm removes it, so its gradient is pure rounding noise,
    # which Adam would scale up to full-size updates.
    x = nn.Dense(self.hidden, use_bias=self.norm != 'batch', dtype=self.dtype,
                 param_dtype=jnp.float32, name='dense0')(x)
    if self.norm == 'batch':
      x = BatchStatsNorm(name='norm')(x)
    elif self.norm == 'layer':
      x = _layer_norm_f32(x, 'norm')
    else:
      raise ValueError(f"model.head_norm must be 'batch' or 'layer', got {self.norm!r}")
    x = nn.Dense(self.out, use_bias=self.output_bias, dtype=self.dtype,
                 param_dtype=jnp.float32, name='dense1')(nn.relu(x))
    return x.astype(jnp.float32)


class PixelProjector(nn.Module):
  """1x1 conv -> norm -> ReLU -> 1x1 conv on a feature map (PixPro's projector shape).

  Attributes:
    hidden: hidden width (divisible by `num_groups`).
    out: output channels.
    num_groups: GroupNorm groups.
    dtype: compute dtype.
    norm: 'group' (per sample) or 'batch' (statistics over the batch and all positions, as
      PixPro's BatchNorm). Per-sample GroupNorm lets every pixel of a view map to the same
      vector, which satisfies the pixel loss trivially (measured in docs/BENCHMARKS.md: mean
      pairwise cosine 0.998, effective rank 1); batch statistics make that constant zero.
    layers: the layer set (`layers.py`).
  """
  hidden: int
  out: int
  num_groups: int
  dtype: Any = jnp.float32
  norm: str = 'group'
  layers: LayerSet = FLAX

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps `[B, *G, Cin]` to `[B, *G, out]` float32."""
    conv0 = self.layers.dense(self.hidden, dtype=self.dtype, name='conv0')
    if self.norm == 'batch':
      x = BatchStatsNorm(name='norm')(conv0(x))
    else:  # Per sample, computed in float32.
      norm = self.layers.group_norm(num_groups=self.num_groups, name='norm')
      x = self.layers.conv_norm(conv0, norm, x).astype(self.dtype)
    x = self.layers.dense(self.out, dtype=self.dtype, name='conv1')(nn.relu(x))
    return x.astype(jnp.float32)


def dropout_scale(shape: tuple[int, ...], rate: float, key: jax.Array) -> jnp.ndarray:
  """An inverted-dropout multiplier drawing 8 random bits per element instead of 32.

  On CPU the random bits of a standard dropout mask dominated the K-sample stabilizer (one
  32-bit draw per element); one 32-bit word here gives four 8-bit keep tests, so the drop
  probability is `rate` rounded to a multiple of 1/256. The words come from
  `dropout_bits.hashed_bits` (a counter hash keyed by threefry, cheaper than threefry itself),
  so the mask depends only on the key and the shape, not on how the array is sharded, nor on
  the backend or the layer set (`model.layers`): the MC samples are the same draws for all.

  Args:
    shape: `[..., C]` shape of the activations.
    rate: drop probability in [0, 1).
    key: PRNG key.

  Returns:
    float32 array of `shape`: 0 where dropped, 1 / keep probability where kept.
  """
  threshold = int(round(rate * 256))
  if threshold == 0:
    return jnp.ones(shape, jnp.float32)
  channels = shape[-1]
  words = -(-channels // 4)
  bits = dropout_bits.hashed_bits(key, tuple(shape[:-1]) + (words,))
  draws = jax.lax.bitcast_convert_type(bits, jnp.uint8).reshape(tuple(shape[:-1]) + (4 * words,))
  keep = draws[..., :channels] >= threshold
  return jnp.where(keep, 256.0 / (256 - threshold), 0.0).astype(jnp.float32)


class ContextStabilizer(nn.Module):
  """1x1 conv MLP with dropout between the layers (docs/method.md).

  1x1 conv -> LayerNorm -> ReLU -> Dropout -> 1x1 conv. It maps the student's pixel projection
  to a prediction of the teacher's. Run K times with independent 'dropout' keys it gives the
  Monte Carlo samples whose spread is the per-pixel uncertainty. The norm is per pixel
  (LayerNorm over channels) so each pixel's prediction depends on that pixel only.

  Everything before the dropout is the same for the K samples, and the last layer is affine, so
  the two halves are exposed (`hidden`, `output`): the caller computes the hidden layer once and
  can take the mean prediction as `output(mean of the K dropped hidden layers)`.

  Attributes:
    hidden_dim: hidden width.
    out: output channels (the pixel projection width).
    dropout_rate: dropout probability on the hidden layer (rounded to a multiple of 1/256,
      see `dropout_scale`).
    dtype: compute dtype.
  """
  hidden_dim: int
  out: int
  dropout_rate: float
  dtype: Any = jnp.float32

  def setup(self):
    self.conv0 = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32)
    self.norm = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32)
    self.conv1 = nn.Dense(self.out, dtype=self.dtype, param_dtype=jnp.float32)

  def hidden(self, x: jnp.ndarray) -> jnp.ndarray:
    """`[B, *G, Cin]` -> the hidden layer before dropout, `[B, *G, hidden_dim]`."""
    h = self.norm(self.conv0(x).astype(jnp.float32))
    return nn.relu(h).astype(self.dtype)

  def output(self, h: jnp.ndarray) -> jnp.ndarray:
    """The affine last layer on `[..., hidden_dim]` (any leading axes), float32."""
    return self.conv1(h).astype(jnp.float32)

  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """Maps `[B, *G, Cin]` to `[B, *G, out]` float32; uses the 'dropout' rng if not deterministic."""
    h = self.hidden(x)
    if not deterministic:
      h = h * dropout_scale(h.shape, self.dropout_rate, self.make_rng('dropout')).astype(h.dtype)
    return self.output(h)
