"""A strided 'SAME' convolution whose input gradient skips the zeros of the dilated input.

Why: JAX differentiates a stride-`s` convolution into an input-dilated one (`lhs_dilation`):
the output gradient with `s - 1` zeros between its elements, convolved with the flipped
kernel. XLA:CPU has no library kernel for that form and runs it as a plain loop nest
(`convolution-base-dilated` in a profile), multiplying all those zeros (docs/performance.md).

The same gradient without the zeros is a polyphase (sub-pixel) convolution: input element
`s * m + p` (phase `p` per axis) only ever meets the kernel taps `t` with `p + lo - t`
divisible by `s`, and those taps meet output-gradient elements `m + d` at small offsets `d`.
So one stride-1 convolution of the output gradient, with a kernel that holds each phase's
taps (`s^n * Cin` output channels, zeros where a phase has fewer taps), computes every phase
at once, and a depth-to-space reshape interleaves them. The kernel gradient stays JAX's own.
"""

import functools
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
  spatial = 'DHW'[3 - n:]
  return lax.conv_dimension_numbers((1,) * (n + 2), (1,) * (n + 2),
                                    (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'))


def conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """`lax.conv_general_dilated(x, kernel, (stride,) * n, 'SAME')`, channels last."""
  n = x.ndim - 2
  return lax.conv_general_dilated(x, kernel, (stride,) * n, 'SAME',
                                  dimension_numbers=_dimension_numbers(n))


def _axis_phases(size: int, k: int, stride: int) -> tuple[np.ndarray, int]:
  """Per spatial axis: the tap selection `[stride, window, k]` and its first offset.

  Input element `stride * m + p` receives `dy[m + d] * w[t]` for every tap `t` with
  `d = (p + lo - t) / stride` an integer (`lo`: the 'SAME' padding before the axis).
  `select[p, j, t] = 1` where tap `t` meets offset `d_min + j` in phase `p`.
  """
  out = -(-size // stride)
  lo = max((out - 1) * stride + k - size, 0) // 2
  pairs = [(p, (p + lo - t) // stride, t) for p in range(stride) for t in range(k)
           if (p + lo - t) % stride == 0]
  d_min = min(d for _, d, _ in pairs)
  window = max(d for _, d, _ in pairs) - d_min + 1
  select = np.zeros((stride, window, k), np.float32)
  for p, d, t in pairs:
    select[p, d - d_min, t] = 1.0
  return select, d_min


def input_gradient(dy: jnp.ndarray, kernel: jnp.ndarray, input_shape: tuple[int, ...],
                   stride: int) -> jnp.ndarray:
  """The gradient of `conv(x, kernel, stride)` with respect to `x`, by phases.

  Args:
    dy: `[B, *out, Cout]`, the output gradient.
    kernel: `[*k, Cin, Cout]`.
    input_shape: the shape of `x`, `[B, *S, Cin]`.
    stride: the convolution's stride on every spatial axis.

  Returns:
    `[B, *S, Cin]`.
  """
  n = dy.ndim - 2
  sizes, cin, cout = input_shape[1:-1], kernel.shape[-2], kernel.shape[-1]
  axes = [_axis_phases(size, k, stride) for size, k in zip(sizes, kernel.shape[:n])]
  # Phase kernel [*window, Cout, (p_1..p_n, Cin)]: each phase's taps, transposed (Cout in).
  p, j, t = string.ascii_lowercase[:n], string.ascii_lowercase[n:2 * n], 'tuv'[:n]
  spec = (','.join(f'{p[a]}{j[a]}{t[a]}' for a in range(n)) + f',{t}io->{j}o{p}i')
  phase_kernel = jnp.einsum(spec, *(jnp.asarray(s, kernel.dtype) for s, _ in axes), kernel)
  windows = [s.shape[1] for s, _ in axes]
  phase_kernel = phase_kernel.reshape(*windows, cout, stride ** n * cin)
  # Each phase has ceil(S / stride) elements: pad dy so that every offset d_min .. d_max of
  # every such element exists (zeros outside dy are the 'SAME' padding's contributions).
  pads = [(-d_min, d_min + w - 1) for (_, d_min), w in zip(axes, windows)]
  phases = lax.conv_general_dilated(dy, phase_kernel, (1,) * n, pads,
                                    dimension_numbers=_dimension_numbers(n))
  # [B, *m, (p_1..p_n, Cin)] -> [B, m_1, p_1, ..., m_n, p_n, Cin] -> [B, *(stride m), Cin].
  batch, counts = phases.shape[0], phases.shape[1:-1]
  phases = phases.reshape(batch, *counts, *(stride,) * n, cin)
  order = [0] + [i for a in range(n) for i in (1 + a, 1 + n + a)] + [2 * n + 1]
  dx = jnp.transpose(phases, order).reshape(batch, *(stride * c for c in counts), cin)
  return dx[(slice(None), *(slice(0, size) for size in sizes))]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def strided_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """`conv(x, kernel, stride)`, with the input gradient by `input_gradient`."""
  return conv(x, kernel, stride)


def _forward(x, kernel, stride):
  return conv(x, kernel, stride), (x, kernel)


def _backward(stride, residuals, dy):
  x, kernel = residuals
  # The convolution is linear in the kernel: transposing it gives JAX's kernel gradient
  # without tracing the forward convolution again (as `jax.vjp` would).
  kernel_grad, = jax.linear_transpose(lambda w: conv(x, w, stride), kernel)(dy)
  return input_gradient(dy, kernel, x.shape, stride), kernel_grad


strided_conv.defvjp(_forward, _backward)
