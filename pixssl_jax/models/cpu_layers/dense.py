"""`nn.Dense` with the kernel gradient computed in the operand order XLA:CPU runs fast.

Why: for a per-pixel layer `y = x @ W` on `M` pixels, the kernel gradient contracts the
`[M, Cin]` input with the `[M, Cout]` output gradient over the pixels. Written as JAX's
autodiff writes it, `x^T @ dy`, XLA:CPU stores the output gradient transposed (`[Cout, M]`)
before the product, a strided copy of a large array. Computing `(dy^T @ x)^T` instead (the same
sums, a `[Cout, Cin]` result transposed) needs no such copy (`benchmarks/layer_forms.py --only
dense`, docs/performance.md). Used by the pixel projector and by `conv_ops.conv_transpose_2x`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """`x @ kernel` for `x: [..., Cin]`, `kernel: [Cin, Cout]`."""
  return x @ kernel


def _forward(x, kernel):
  return x @ kernel, (x, kernel)


def _backward(residuals, dy):
  x, kernel = residuals
  rows = ((0,), (0,)), ((), ())  # Contract over the pixels (rows) of both.
  kernel_grad = lax.dot_general(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), rows)
  return dy @ kernel.T, kernel_grad.T


matmul.defvjp(_forward, _backward)


class Dense(nn.Module):
  """`nn.Dense(features)`: the same parameters, initial values and outputs.

  Attributes:
    features: output channels.
    dtype: compute dtype (parameters float32).
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               defer_bias: bool = False) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """`[..., Cin] -> [..., features]`; with `defer_bias`, `(x @ kernel, bias)` (as `Conv`)."""
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if defer_bias:
      return y, bias
    return y + bias.astype(self.dtype)
