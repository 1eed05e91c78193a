r"""One layer at the U-Net's shapes in the form kept and in the forms tried.

  PYTHONPATH=. python benchmarks/layer_forms.py
      [--only strided,dense,depth_taps,libraries,onednn,kernel_grad] [--reps 5]

Each comparison jits both forms with `pixssl_jax.xla_options` (as the train step is compiled),
checks that they compute the same values, and prints the median time of `--reps` calls:
  * strided: the input gradient of a stride-2 3x3(x3) convolution, JAX's own (an
    input-dilated convolution) against `strided_conv.input_gradient` (by phases);
  * dense: forward+backward of the pixel projector (1x1 conv -> GroupNorm -> ReLU -> 1x1
    conv, 3d64's `[4, 16^3, 64]` -> 1024 -> 64) built from the Flax layer set, with `nn.Dense`
    and the CPU set's GroupNorm, and from the CPU layer set (`dense.Dense`);
  * depth_taps: a 3-D convolution folded to 2-D (`conv_folding_first_axis`, the depth taps
    concatenated on the channels) against three 2-D convolutions summed (one per depth tap),
    forward and forward+backward; the second wins here but lost 37% in the whole 3d64 step
    (docs/performance.md);
  * libraries: 2-D convolutions' forward, input gradient and kernel gradient with XLA's
    default library fusions (YNNPACK) against the kept options (XLA's own Eigen kernels);
  * onednn: a 2-D convolution with XLA:CPU's oneDNN options, to see whether this jaxlib
    routes convolutions to oneDNN (identical outputs and times: it does not);
  * kernel_grad: a 2-D convolution's forward against its kernel gradient (the same FLOPs), in
    GFLOP/s, and the kernel gradient as a sum over 16 chunks of the batch, at the folded 3-D
    slabs of 3d64's and btcv_3d's full-resolution level and at demo's.
Shapes are per step (2 views x batch): demo's full-resolution level is `[16, 128, 128, 16]`.
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixssl_jax import xla_options
from pixssl_jax.models import heads
from pixssl_jax.models import layers
from pixssl_jax.models.cpu_layers import conv_ops
from pixssl_jax.models.cpu_layers import group_norm
from pixssl_jax.models.cpu_layers import strided_conv


def median_ms(fn, *args, reps: int, options=None) -> tuple[float, object]:
  """Median milliseconds of a compiled call, and its output."""
  options = xla_options.compiler_options() if options is None else options
  compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), out


def max_relative_difference(a, b) -> float:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30)) for x, y in pairs)


def normal(rng, shape, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def compare_strided(reps: int) -> None:
  rng = np.random.default_rng(0)
  for shape, cout in [((16, 128, 128, 16), 32), ((16, 64, 64, 32), 64),
                      ((128, 64, 64, 48), 32), ((4, 64, 64, 64, 16), 32)]:
    x = normal(rng, shape)
    kernel = normal(rng, (3,) * (len(shape) - 2) + (shape[-1], cout), 0.1)
    dy = normal(rng, strided_conv.conv(x, kernel, 2).shape)
    lax_ms, expected = median_ms(
        lambda x, w, dy: jax.vjp(lambda x: strided_conv.conv(x, w, 2), x)[1](dy)[0],
        x, kernel, dy, reps=reps)
    phase_ms, got = median_ms(
        lambda x, w, dy: strided_conv.input_gradient(dy, w, x.shape, 2), x, kernel, dy,
        reps=reps)
    print(f'strided input gradient {shape} -> {cout}: JAX {lax_ms:.1f} ms, phases '
          f'{phase_ms:.1f} ms (max rel. difference '
          f'{max_relative_difference(expected, got):.1e})', flush=True)


class _FlaxProjector(nn.Module):
  """The pixel projector with nn.Dense and the bias added before the norm (the old form)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(1024, name='conv0')(x)
    x = nn.relu(group_norm.GroupNorm(8, name='norm')(x))
    return nn.Dense(64, name='conv1')(x)


def compare_dense(reps: int) -> None:
  x = normal(np.random.default_rng(0), (4, 16, 16, 16, 64))
  params = _FlaxProjector().init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.01, params)  # Nonzero biases.
  results = {}
  for name, module in (('flax set', heads.PixelProjector(1024, 64, 8, layers=layers.FLAX)),
                       ('nn.Dense', _FlaxProjector()),
                       ('cpu set (dense.Dense)',
                        heads.PixelProjector(1024, 64, 8, layers=layers.CPU))):
    loss = lambda p, x, m=module: jnp.sum(jnp.sin(m.apply(p, x)))
    results[name] = median_ms(jax.grad(loss, argnums=(0, 1)), params, x, reps=reps)
  difference = max(max_relative_difference(results['flax set'][1], grads)
                   for _, grads in results.values())
  print('pixel projector [4, 16^3, 64] -> 1024 -> 64, forward+backward: '
        + ', '.join(f'{name} {ms:.1f} ms' for name, (ms, _) in results.items())
        + f' (max rel. difference {difference:.1e})', flush=True)


def conv_by_depth_taps(x, kernel):
  """The tried form: one 2-D convolution per depth tap on depth-shifted slices, summed."""
  batch, depth = x.shape[:2]
  padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  y = sum(strided_conv.conv(padded[:, d:d + depth].reshape(batch * depth, *x.shape[2:]),
                            kernel[d], 1) for d in range(3))
  return y.reshape(batch, depth, *y.shape[1:])


def compare_depth_taps(reps: int) -> None:
  rng = np.random.default_rng(0)
  for shape, cout in [((4, 64, 64, 64, 16), 16), ((4, 32, 32, 32, 32), 32)]:
    x, kernel = normal(rng, shape), normal(rng, (3, 3, 3, shape[-1], cout), 0.1)
    dy = normal(rng, shape[:-1] + (cout,))
    row = []
    for name, conv in (('folded', lambda x, w: conv_ops.conv_folding_first_axis(x, w)),
                       ('per depth tap', conv_by_depth_taps)):
      forward_ms, y = median_ms(conv, x, kernel, reps=reps)
      backward_ms, grads = median_ms(lambda x, w, dy, c=conv: jax.vjp(c, x, w)[1](dy),
                                     x, kernel, dy, reps=reps)
      row.append((name, forward_ms, backward_ms, y, grads))
    difference = max(max_relative_difference(row[0][3], row[1][3]),
                     max_relative_difference(row[0][4], row[1][4]))
    print(f'3-D convolution {shape} -> {cout}, forward / forward+backward: ' + '; '.join(
        f'{name} {f:.0f} / {b:.0f} ms' for name, f, b, _, _ in row)
          + f' (max rel. difference {difference:.1e})', flush=True)


def compare_libraries(reps: int) -> None:
  """Each convolution's forward, input and kernel gradient: YNNPACK (XLA's default) vs Eigen."""
  rng = np.random.default_rng(0)
  xla_default = {}  # No options: XLA's default library fusions.
  for shape, cout in [((16, 64, 64, 32), 32), ((16, 128, 128, 32), 16),
                      ((256, 64, 64, 48), 16)]:
    x, kernel = normal(rng, shape), normal(rng, (3, 3, shape[-1], cout), 0.1)
    dy = normal(rng, shape[:-1] + (cout,))
    conv = lambda x, w: strided_conv.conv(x, w, 1)
    passes = dict(forward=conv,
                  input_grad=lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0],
                  kernel_grad=lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    cells = []
    for name, fn in passes.items():
      args = (x, kernel) if name == 'forward' else (x, kernel, dy)
      times = [median_ms(fn, *args, reps=reps, options=options)[0]
               for options in (xla_default, xla_options.compiler_options())]
      cells.append(f'{name} {times[0]:.1f} / {times[1]:.1f} ms')
    print(f'2-D convolution {shape} -> {cout}, XLA default (YNNPACK) / kept options (Eigen): '
          + ', '.join(cells), flush=True)


def compare_onednn(reps: int) -> None:
  rng = np.random.default_rng(0)
  x, kernel = normal(rng, (16, 128, 128, 16)), normal(rng, (3, 3, 16, 16), 0.1)
  conv = lambda x, w: strided_conv.conv(x, w, 1)
  base_ms, expected = median_ms(conv, x, kernel, reps=reps)
  onednn = dict(
      xla_options.compiler_options() or {}, xla_cpu_use_onednn=True,
      xla_cpu_experimental_onednn_custom_call=True,
      xla_cpu_experimental_onednn_fusion_type='LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')
  onednn_ms, got = median_ms(conv, x, kernel, reps=reps, options=onednn)
  print(f'2-D convolution [16, 128, 128, 16] 16->16: kept options {base_ms:.1f} ms, with the '
        f'oneDNN options {onednn_ms:.1f} ms (max abs. difference '
        f'{float(jnp.max(jnp.abs(expected - got))):.1e}: 0 means the same kernel ran)',
        flush=True)


def kernel_gradient(x, kernel, dy, stride: int = 1):
  """JAX's kernel gradient of `strided_conv.conv` (which `strided_conv.strided_conv` keeps)."""
  return jax.vjp(lambda k: strided_conv.conv(x, k, stride), kernel)[1](dy)[0]


def chunked_kernel_gradient(x, kernel, dy, stride: int = 1, chunks: int = 16):
  """`kernel_gradient` summed over `chunks` slices of the batch (one, if it does not divide)."""
  chunks = chunks if x.shape[0] % chunks == 0 else 1
  xs, dys = (a.reshape(chunks, -1, *a.shape[1:]) for a in (x, dy))
  return sum(kernel_gradient(xs[i], kernel, dys[i], stride) for i in range(chunks))


def compare_kernel_gradient(reps: int) -> None:
  rng = np.random.default_rng(0)
  conv = lambda x, w: strided_conv.conv(x, w, 1)

  for shape, cout in [((256, 64, 64, 48), 16), ((256, 64, 64, 96), 16),
                      ((192, 96, 96, 96), 32), ((16, 128, 128, 16), 16)]:
    x, kernel = normal(rng, shape), normal(rng, (3, 3, shape[-1], cout), 0.1)
    dy = normal(rng, shape[:-1] + (cout,))
    gflop = 2 * np.prod(shape) * 9 * cout / 1e9
    forward_ms, _ = median_ms(conv, x, kernel, reps=reps)
    grad_ms, grad = median_ms(kernel_gradient, x, kernel, dy, reps=reps)
    chunked_ms, chunked_grad = median_ms(chunked_kernel_gradient, x, kernel, dy, reps=reps)
    print(f'2-D convolution {shape} -> {cout}: forward {forward_ms:.0f} ms '
          f'({1e3 * gflop / forward_ms:.0f} GFLOP/s), kernel gradient {grad_ms:.0f} ms '
          f'({1e3 * gflop / grad_ms:.0f} GFLOP/s), in 16 chunks {chunked_ms:.0f} ms (max rel. '
          f'difference {max_relative_difference(grad, chunked_grad):.1e})', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only',
                      default='strided,dense,depth_taps,libraries,onednn,kernel_grad')
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()
  comparisons = dict(strided=compare_strided, dense=compare_dense,
                     depth_taps=compare_depth_taps, libraries=compare_libraries,
                     onednn=compare_onednn, kernel_grad=compare_kernel_gradient)
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, XLA options '
        f'{xla_options.compiler_options()}', flush=True)
  for name in args.only.split(','):
    comparisons[name](args.reps)


if __name__ == '__main__':
  main()
