r"""Per-device memory of the train step as XLA plans it, and the CPU demo's peak resident memory.

  PYTHONPATH=. python benchmarks/memory.py [--presets tpu_pod,btcv_3d] [--batches 1,2,4]
      [--demo-steps 20 | --demo-steps 0]

For each preset and per-device batch, the jitted train step is compiled for ONE device with
that batch (what each chip of a data-parallel mesh runs: the state is replicated, the batch
split) and `compiled.memory_analysis()` gives the bytes XLA plans: arguments (state and batch),
outputs, temporaries, minus the donated state that outputs reuse. A line through the measured
points gives the largest per-device batch that fits a 16 GiB and a 32 GiB chip.

The step is planned with the layers accelerators run (`model.layers='flax'`, what 'auto' picks
there; not the CPU layer set's folded and phase forms). Caveat: the plans come from XLA:CPU. A
TPU compile of the same step schedules, fuses and pads differently (bf16 tiles, layout padding
of small channel counts), so treat the numbers as a proxy and leave headroom; run the same
script on the accelerator host for its own plan.

Then (unless `--demo-steps 0`) the 2-D demo runs for that many steps in a subprocess,
`python -m pixssl_jax.main --config configs/pretrain.py:demo`, and its peak resident memory
(ru_maxrss of the child) is reported.
"""

import argparse
import datetime
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import train_step as bench
from pixssl_jax.models import pixssl
from pixssl_jax.train import loop
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import optimizers
from pixssl_jax.train import pretrain

GIB = 1024 ** 3
REPO = pathlib.Path(__file__).resolve().parents[1]


def planned_bytes(config, batch: int) -> dict[str, float]:
  """XLA's memory plan of one device's train step at a per-device batch (nothing runs)."""
  config = config.copy_and_resolve_references()
  config.batch_size = batch
  # Plan the layers an accelerator runs, not XLA:CPU's forms.
  config.model.layers = 'flax'
  mesh = mesh_lib.make_data_mesh(jax.devices()[:1])
  model = pixssl.build_model(config.model, config.data.ndim)
  tx = optimizers.make_optimizer(config.optim, config.num_steps)
  state = pretrain.abstract_train_state(model, tx, config, mesh)
  patch, n = tuple(config.data.patch_size), len(config.data.patch_size)
  sharding = mesh_lib.batch_sharded(mesh)
  view = jax.ShapeDtypeStruct((batch, *patch, 1), np.float32, sharding=sharding)
  transform = jax.ShapeDtypeStruct((batch, n, n + 1), np.float32, sharding=sharding)
  batch_spec = dict(view1=view, view2=view, transform1=transform, transform2=transform)
  start = time.perf_counter()
  jitted = loop.jit_train_step(pretrain.train_step, model, tx, config, mesh)
  compiled = jitted.lower(state, batch_spec).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes
           + stats.generated_code_size_in_bytes)
  return dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
              temp=stats.temp_size_in_bytes, alias=stats.alias_size_in_bytes, total=total,
              compile_s=seconds)


def largest_fitting_batch(batches, totals, capacity: float) -> int:
  """Largest integer batch under `capacity` on the least-squares line through the points."""
  slope, intercept = np.polyfit(np.asarray(batches, float), np.asarray(totals, float), 1)
  if slope <= 0:
    return max(batches)
  return max(int((capacity - intercept) // slope), 0)


def demo_peak_rss(steps: int) -> tuple[float, float]:
  """Runs the demo preset for `steps` steps; returns (peak RSS in GiB, wall seconds)."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, '-m', 'pixssl_jax.main', '--config', 'configs/pretrain.py:demo',
               '--workdir', workdir, f'--config.num_steps={steps}']
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
  # ru_maxrss is in KiB on Linux: the largest of the waited-for children, i.e. this run.
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2, seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--presets', default='tpu_pod,btcv_3d')
  parser.add_argument('--batches', default='1,2,4', help='per-device batches to compile')
  parser.add_argument('--demo-steps', type=int, default=20, help='0 skips the demo run')
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(',')]
  print(f'{datetime.datetime.now():%Y-%m-%d %H:%M}, jax {jax.__version__}, plans compiled '
        f'by XLA:{jax.devices()[0].platform.upper()} for one device\n')
  print('| preset | compute dtype | patch | per-device batch | arguments GiB | temporaries GiB '
        '| total GiB | compile s |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  fits = []
  for name in args.presets.split(','):
    config = bench.preset_config(name)
    totals = []
    for batch in batches:
      plan = planned_bytes(config, batch)
      totals.append(plan['total'])
      print(f'| {name} | {config.model.dtype} | {"x".join(map(str, config.data.patch_size))} '
            f'| {batch} | {plan["arguments"] / GIB:.2f} | {plan["temp"] / GIB:.2f} '
            f'| {plan["total"] / GIB:.2f} | {plan["compile_s"]:.1f} |', flush=True)
    slope = np.polyfit(batches, totals, 1)[0] if len(batches) > 1 else totals[0] / batches[0]
    fits.append((name, slope, largest_fitting_batch(batches, totals, 16 * GIB),
                 largest_fitting_batch(batches, totals, 32 * GIB)))
  print('\n| preset | GiB per extra sample | largest per-device batch in 16 GiB '
        '| in 32 GiB |')
  print('| --- | --- | --- | --- |')
  for name, slope, fit16, fit32 in fits:
    print(f'| {name} | {slope / GIB:.2f} | {fit16} | {fit32} |')
  if args.demo_steps:
    rss, seconds = demo_peak_rss(args.demo_steps)
    print(f'\nCPU demo, {args.demo_steps} steps (`python -m pixssl_jax.main --config '
          f'configs/pretrain.py:demo --config.num_steps={args.demo_steps}`): peak RSS '
          f'{rss:.2f} GiB, {seconds:.0f} s wall; load average {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
