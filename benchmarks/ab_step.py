r"""A/B of one code change on the train step, both forms compiled in one process, timed interleaved.

  PYTHONPATH=. python benchmarks/ab_step.py --variant threefry_bits [--presets demo,3d64]
      [--rounds 10] [--batch btcv_3d=1]

Why: on this shared VM the same step's median moves by 5-15% between processes a few minutes
apart (docs/performance.md), as much as the changes being judged. Here the current code and a
variant (the current code with one function patched back to an earlier form) are compiled
side by side and stepped alternately, A B, B A, ..., so slow spells hit both alike; the ratio
of their medians is the change's effect.

Variants:
  * threefry_bits: the dropout masks' bits from `jax.random.bits` (threefry) instead of
    `models/dropout_bits.hashed_bits`, the form before 2026-11-26 (session 6).
  * ynn_convolutions: XLA:CPU hands the convolutions to YNNPACK too, not only the reductions
    (`pixssl_jax/xla_options.py`).
  * serial_scheduler: `xla_cpu_enable_concurrency_optimized_scheduler` off (XLA:CPU's
    scheduler then does not try to run independent ops side by side).
"""

import argparse
import contextlib
import functools
import statistics

import jax
import jax.numpy as jnp

from benchmarks import train_step as bench
from pixssl_jax import xla_options
from pixssl_jax.models import dropout_bits


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


VARIANTS = {
    'threefry_bits': _threefry_bits,
    'ynn_convolutions': functools.partial(
        _cpu_options, xla_cpu_experimental_ynn_fusion_type=(
            'LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')),
    'serial_scheduler': functools.partial(
        _cpu_options, xla_cpu_enable_concurrency_optimized_scheduler=False),
}


def compare(config, mesh, variant: str, rounds: int) -> dict[str, float]:
  """Median step seconds of the current code and of `variant`, and their ratio."""
  current = bench.JaxStep(config, mesh)
  current()  # The first call traces and caches the step: before the patch.
  with VARIANTS[variant]():
    patched = bench.JaxStep(config, mesh)
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
