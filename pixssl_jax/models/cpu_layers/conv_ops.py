"""Convolutions in the forms XLA:CPU runs fast, with `nn.Conv` / `nn.ConvTranspose`'s parameters.

Why: XLA:CPU lowers `conv_general_dilated` to Eigen's spatial convolution (with
`xla_options.compiler_options()`). Its 2-D convolution runs near the machine's matmul speed for
our widths, but its 3-D convolution runs at a fraction of that, the input gradient of a strided
convolution (an input-dilated convolution) is a plain loop over zeros, and the backward pass of
the 2x2(x2) transposed convolution is several times slower than a matrix product doing the same
work (docs/performance.md). So here 3-D convolutions run as 2-D ones over depth slices, strided
ones' input gradients by phases (strided_conv.py), and the transposed convolution as one `dot`
and a reshape.

The modules create exactly the parameters `nn.Conv` / `nn.ConvTranspose` create (names
`kernel` `[*k, Cin, Cout]` and `bias` `[Cout]`, the same initialisers), so checkpoints and the
parameter tree do not depend on the layer set; the results equal the `lax` convolutions up to
float rounding (the products are summed in another order).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from pixssl_jax.models.cpu_layers import dense
from pixssl_jax.models.cpu_layers import strided_conv


def conv_folding_first_axis(x: jnp.ndarray, kernel: jnp.ndarray, stride: int = 1) -> jnp.ndarray:
  """A 'SAME' n-D convolution as one (n-1)-D convolution: first-axis taps folded into channels.

  The `k` taps along the first spatial axis are concatenated on the channel axis and that axis
  is folded into the batch: `[B, D, *S, C] -> [B * D_out, *S, k * C]`, convolved in n-1
  dimensions with the kernel `[*k_rest, k_first * Cin, Cout]`. For 3-D this turns XLA:CPU's
  3-D convolution into its 2-D one, much faster forward+backward on our shapes, strided ones
  most (docs/performance.md).

  Args:
    x: `[B, D, *S, Cin]`.
    kernel: `[kd, *k_rest, Cin, Cout]`.
    stride: the same stride on every spatial axis.

  Returns:
    `[B, *ceil((D, *S) / stride), Cout]`.
  """
  n = x.ndim - 2
  kd, cin, cout = kernel.shape[0], kernel.shape[-2], kernel.shape[-1]
  (lo, hi), = lax.padtype_to_pads(x.shape[1:2], (kd,), (stride,), 'SAME')
  x = jnp.pad(x, ((0, 0), (lo, hi), *((0, 0),) * n))
  depth = (x.shape[1] - kd) // stride + 1
  taps = [lax.slice_in_dim(x, d, d + stride * (depth - 1) + 1, stride, axis=1)
          for d in range(kd)]
  slab = jnp.concatenate(taps, axis=-1).reshape(-1, *x.shape[2:-1], kd * cin)
  weights = jnp.moveaxis(kernel, 0, n - 1).reshape(*kernel.shape[1:n], kd * cin, cout)
  y = spatial_conv(slab, weights, stride)
  return y.reshape(x.shape[0], depth, *y.shape[1:])


def conv_transpose_2x(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """`nn.ConvTranspose(kernel_size=2, strides=2, padding='SAME')` as one dot + depth-to-space.

  With kernel = stride = 2 the output windows do not overlap: output voxel `2 i + a` is
  `x[i] @ kernel[1 - a]` per axis (Flax does not flip the kernel, `transpose_kernel=False`,
  and 'SAME' pads the dilated input by one on each side), so one `[Cin, 2**n * Cout]` product
  computes every output voxel and a reshape interleaves them.

  Args:
    x: `[B, *S, Cin]`.
    kernel: `[2, ..., 2, Cin, Cout]` (Flax layout).

  Returns:
    `[B, *(2 S), Cout]`.
  """
  n = x.ndim - 2
  cin, cout = kernel.shape[-2:]
  flipped = kernel[(slice(None, None, -1),) * n]  # flipped[a] = kernel[1 - a].
  weights = jnp.moveaxis(flipped, n, 0).reshape(cin, (2 ** n) * cout)
  y = dense.matmul(x, weights).reshape(*x.shape[:-1], *(2,) * n, cout)
  # [B, S0..Sn-1, a0..an-1, C] -> [B, S0, a0, S1, a1, ..., C] -> [B, 2 S0, ..., C].
  order = [0]
  for axis in range(n):
    order += [1 + axis, 1 + n + axis]
  y = jnp.transpose(y, (*order, 2 * n + 1))
  return y.reshape(x.shape[0], *(2 * s for s in x.shape[1:-1]), cout)


def spatial_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """A 'SAME' convolution, channels last; a strided one's input gradient by phases.

  XLA:CPU runs the input-dilated convolution that JAX makes of a strided convolution's input
  gradient as a plain loop over the zeros; `strided_conv` computes it without them.
  """
  if stride > 1:
    return strided_conv.strided_conv(x, kernel, stride)
  return strided_conv.conv(x, kernel, stride)


def _check_same(module: str, padding: str) -> None:
  if padding != 'SAME':
    raise ValueError(f"{module}: only padding='SAME' is implemented, got {padding!r}")


class Conv(nn.Module):
  """`nn.Conv(features, kernel_size, strides, padding='SAME')`, 3-D ones folded to 2-D.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel shape (odd sizes).
    strides: one stride for every spatial axis.
    padding: 'SAME' only.
    dtype: compute dtype (parameters float32).
  """
  features: int
  kernel_size: Sequence[int]
  strides: int = 1
  padding: str = 'SAME'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               defer_bias: bool = False) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """`[B, *S, Cin] -> [B, *S / strides, features]`.

    With `defer_bias`, returns `(convolution, bias)` without adding the bias, for a GroupNorm
    that folds it into its statistics and shift (group_norm.py), which saves a pass over the
    activations.
    """
    _check_same('Conv', self.padding)
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if x.ndim == 5:
      y = conv_folding_first_axis(x, kernel, self.strides)
    else:
      y = spatial_conv(x, kernel, self.strides)
    if defer_bias:
      return y, bias
    return y + bias.astype(self.dtype)


class ConvTranspose2x(nn.Module):
  """`nn.ConvTranspose(features, (2,)*n, strides=(2,)*n, padding='SAME')` by `conv_transpose_2x`.

  Attributes:
    features: output channels.
    kernel_size: 2 on every axis (None: 2 on every axis of the input).
    strides: 2 on every axis (None: the same).
    padding: 'SAME' only.
    dtype: compute dtype (parameters float32).
  """
  features: int
  kernel_size: Sequence[int] | None = None
  strides: Sequence[int] | None = None
  padding: str = 'SAME'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n = x.ndim - 2
    _check_same('ConvTranspose2x', self.padding)
    for field, value in (('kernel_size', self.kernel_size), ('strides', self.strides)):
      if value is not None and tuple(value) != (2,) * n:
        raise ValueError(f'ConvTranspose2x: {field} must be {(2,) * n}, got {tuple(value)}')
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*(2,) * n, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y = conv_transpose_2x(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)
