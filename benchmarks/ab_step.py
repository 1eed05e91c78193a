r"""A/B of one code change on the train step, both forms compiled in one process, timed interleaved.

  PYTHONPATH=. python benchmarks/ab_step.py --variant threefry_bits [--presets demo,3d64]
      [--rounds 10] [--batch btcv_3d=1]

Why: on this shared VM the same step's median moves by 5-15% between processes a few minutes
apart (docs/performance.md), as much as the changes being judged. Here the current code and a
variant (one function patched back to an earlier form, or one config field changed) are compiled
side by side and stepped alternately, A B, B A, ..., so slow spells hit both alike; the ratio
of their medians is the change's effect.

Variants:
  * flax_layers: the step with `model.layers='flax'` (Flax's own layers) instead of the
    preset's (`auto`: the CPU forms on CPU); a config change, no code is patched.
  * threefry_bits: the dropout masks' bits from `jax.random.bits` (threefry) instead of
    `models/dropout_bits.hashed_bits`, the form the hashed bits replaced.
  * ynn_convolutions: XLA:CPU hands the convolutions to YNNPACK too, not only the reductions
    (`pixssl_jax/xla_options.py`).
  * serial_scheduler: `xla_cpu_enable_concurrency_optimized_scheduler` off (XLA:CPU's
    scheduler then does not try to run independent ops side by side).
  * Other forms of the CPU layer set's stride-1 folded 3-D convolution
    (`cpu_layers/conv_ops.conv_folding_first_axis`, tried and dropped, docs/performance.md
    "Tried and not kept"): depth_taps_shared (one 2-D
    convolution per depth tap over the whole depth-padded input, the outputs shifted and
    summed: no slab), depth_taps_sliced (the same on depth-shifted slices of the padded
    input, `layer_forms.conv_by_depth_taps`, the per-tap form first tried), taps_on_outputs
    (one 2-D convolution to `3 Cout` channels, then the same shifted sum), two_output_slices (where `Cout <= 16`: two output depth slices per fold from four input
    slices, `[4 Cin] -> [2 Cout]` with zero blocks in the kernel, a third more FLOPs).
  * chunked_kernel_grad: every `Conv`'s kernel gradient as a sum over 16 chunks of its batch
    (in the 3-D presets all are folded 3-D convolutions, whose batch is `B * D`;
    `layer_forms.py --only kernel_grad` times one layer).
  * no_kernel_grad: NOT a correct step, an attribution: every `Conv`'s kernel (2-D, and 3-D
    folded) under `stop_gradient`, so the ratio says what their kernel gradients (and the
    transposed copies XLA:CPU makes for them) cost.
"""

import argparse
import contextlib
import functools
import statistics

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import layer_forms
from benchmarks import train_step as bench
from pixssl_jax import xla_options
from pixssl_jax.models import dropout_bits
from pixssl_jax.models.cpu_layers import conv_ops


@contextlib.contextmanager
def _threefry_bits():
  hashed = dropout_bits.hashed_bits
  dropout_bits.hashed_bits = lambda key, shape: jax.random.bits(key, shape, jnp.uint32)
  try:
    yield
  finally:
    dropout_bits.hashed_bits = hashed


@contextlib.contextmanager
def _cpu_options(**extra):
  """Compiles with `extra` added to xla_options' CPU options; an error if this jaxlib rejects it.

  (xla_options would fall back to XLA's defaults, and the A/B would measure those instead.)
  """
  saved = xla_options._CPU_OPTIONS  # pylint: disable=protected-access
  xla_options._CPU_OPTIONS = {**saved, **extra}  # pylint: disable=protected-access
  xla_options.compiler_options.cache_clear()
  try:
    if xla_options.compiler_options() is None:
      raise ValueError(f'this jaxlib rejects the XLA:CPU options {extra}')
    yield
  finally:
    xla_options._CPU_OPTIONS = saved  # pylint: disable=protected-access
    xla_options.compiler_options.cache_clear()


_FOLDED = conv_ops.conv_folding_first_axis
_SPATIAL = conv_ops.spatial_conv


@contextlib.contextmanager
def _conv_ops_patched(name, form):
  """`conv_ops.<name>` is `form` (`Conv` looks its functions up there at trace time)."""
  original = getattr(conv_ops, name)
  setattr(conv_ops, name, form)
  try:
    yield
  finally:
    setattr(conv_ops, name, original)


def _conv_form(form):
  """`Conv` computes its 3-D convolutions by `form(x, kernel, stride)` instead."""
  return _conv_ops_patched('conv_folding_first_axis', form)


def _pad_depth(x):
  """`[B, D, *S, C]` -> `[B, D + 2, *S, C]`: a zero depth slice on either side."""
  return jnp.pad(x, ((0, 0), (1, 1)) + ((0, 0),) * (x.ndim - 2))


def _stride_one(form):
  """`form(x, kernel)` for stride-1 convolutions; strided ones stay folded."""
  return lambda x, kernel, stride=1: (form(x, kernel) if stride == 1
                                      else _FOLDED(x, kernel, stride))


def _depth_taps_shared(x, kernel):
  (batch, depth), flat = x.shape[:2], _pad_depth(x).reshape(-1, *x.shape[2:])
  outputs = [conv_ops.spatial_conv(flat, kernel[t], 1) for t in range(3)]
  return sum(z.reshape(batch, depth + 2, *z.shape[1:])[:, t:t + depth]
             for t, z in enumerate(outputs))


def _taps_on_outputs(x, kernel):
  (batch, depth), (cin, cout) = x.shape[:2], kernel.shape[-2:]
  weights = jnp.moveaxis(kernel, 0, -2).reshape(*kernel.shape[1:-2], cin, 3 * cout)
  z = conv_ops.spatial_conv(_pad_depth(x).reshape(-1, *x.shape[2:]), weights, 1)
  z = z.reshape(batch, depth + 2, *x.shape[2:-1], 3, cout)
  return sum(z[:, t:t + depth, ..., t, :] for t in range(3))


def _two_output_slices(x, kernel):
  (batch, depth), (cin, cout) = x.shape[:2], kernel.shape[-2:]
  if cout > 16 or depth % 2:
    return _FOLDED(x, kernel)
  padded = _pad_depth(x)
  taps = [lax.slice_in_dim(padded, t, t + depth - 1, 2, axis=1) for t in range(4)]
  slab = jnp.concatenate(taps, axis=-1).reshape(-1, *x.shape[2:-1], 4 * cin)
  zero = jnp.zeros_like(kernel[0])
  # Output slice s (of each pair) reads input taps s .. s + 2 of the four.
  weights = jnp.concatenate(
      [jnp.concatenate([kernel[t - s] if 0 <= t - s <= 2 else zero for t in range(4)], axis=-2)
       for s in range(2)], axis=-1)
  y = conv_ops.spatial_conv(slab, weights, 1).reshape(batch, depth // 2, *x.shape[2:-1], 2, cout)
  return jnp.moveaxis(y, -2, 2).reshape(*x.shape[:-1], cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_chunked_kernel_grad(x, kernel, stride):
  return _SPATIAL(x, kernel, stride)


def _chunked_forward(x, kernel, stride):
  return _SPATIAL(x, kernel, stride), (x, kernel)


def _chunked_backward(stride, residuals, dy):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _SPATIAL(x, kernel, stride), x)[1](dy)[0]
  return dx, layer_forms.chunked_kernel_gradient(x, kernel, dy, stride)


_conv_chunked_kernel_grad.defvjp(_chunked_forward, _chunked_backward)


def _no_kernel_grad(x, kernel, stride):
  return _SPATIAL(x, lax.stop_gradient(kernel), stride)


# Variants that set config fields, not code.
CONFIG_VARIANTS = {'flax_layers': {'model.layers': 'flax'}}

VARIANTS = {
    'flax_layers': contextlib.nullcontext,
    'threefry_bits': _threefry_bits,
    'ynn_convolutions': functools.partial(
        _cpu_options, xla_cpu_experimental_ynn_fusion_type=(
            'LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')),
    'serial_scheduler': functools.partial(
        _cpu_options, xla_cpu_enable_concurrency_optimized_scheduler=False),
    'depth_taps_shared': functools.partial(_conv_form, _stride_one(_depth_taps_shared)),
    'depth_taps_sliced': functools.partial(_conv_form,
                                           _stride_one(layer_forms.conv_by_depth_taps)),
    'taps_on_outputs': functools.partial(_conv_form, _stride_one(_taps_on_outputs)),
    'two_output_slices': functools.partial(_conv_form, _stride_one(_two_output_slices)),
    'chunked_kernel_grad': functools.partial(_conv_ops_patched, 'spatial_conv',
                                             _conv_chunked_kernel_grad),
    'no_kernel_grad': functools.partial(_conv_ops_patched, 'spatial_conv', _no_kernel_grad),
}


def variant_config(config, variant: str):
  """A copy of `config` with `variant`'s `CONFIG_VARIANTS` fields set."""
  config = config.copy_and_resolve_references()
  for path, value in CONFIG_VARIANTS.get(variant, {}).items():
    section, field = path.split('.')
    config[section][field] = value
  return config


def compare(config, mesh, variant: str, rounds: int) -> dict[str, float]:
  """Median step seconds of the current code and of `variant`, and their ratio."""
  current = bench.JaxStep(config, mesh)
  current()  # The first call traces and caches the step: before the patch.
  with VARIANTS[variant]():
    patched = bench.JaxStep(variant_config(config, variant), mesh)
    patched()

  def check():
    current.assert_compiled_once()
    patched.assert_compiled_once()
  times = bench.interleaved_seconds({'current': current, variant: patched}, rounds,
                                    after_round=check)
  median = {name: statistics.median(t) for name, t in times.items()}
  return dict(current_s=median['current'], variant_s=median[variant],
              ratio=median['current'] / median[variant])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', required=True, choices=sorted(VARIANTS))
  parser.add_argument('--presets', default='demo,3d64')
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--batch', action='append', default=[],
                      help='PRESET=B: run PRESET with global batch B (e.g. btcv_3d=1 on CPU)')
  args = parser.parse_args()
  batches = {k: int(v) for k, v in (item.split('=') for item in args.batch)}
  mesh = bench.mesh_lib.make_data_mesh(jax.devices()[:1])
  print(f'| preset | current s | {args.variant} s | current / {args.variant} |\n'
        '| --- | --- | --- | --- |')
  for name in args.presets.split(','):
    row = compare(bench.preset_config(name, batches.get(name)), mesh, args.variant, args.rounds)
    print(f"| {name} | {row['current_s']:.3f} | {row['variant_s']:.3f} | {row['ratio']:.3f} |",
          flush=True)


if __name__ == '__main__':
  main()
