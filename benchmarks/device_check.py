r"""The parts of benchmarks/device_check.sh that no other benchmark script covers.

  PYTHONPATH=. python benchmarks/device_check.py plan --out DIR [--dry-run]
  PYTHONPATH=. python benchmarks/device_check.py torch --out DIR [--dry-run] [--steps 10]
  PYTHONPATH=. python benchmarks/device_check.py trace --out DIR [--dry-run] [--top 30]
  PYTHONPATH=. python benchmarks/device_check.py sliding --out DIR [--dry-run]

`plan`: XLA's memory plan of one device's bfloat16 train step (benchmarks/memory.py) at
per-device batches 1 and 2 for `btcv_3d` and `tpu_pod`, and the largest batch whose line
through them stays under 90% of the memory JAX may use on this device; written to
`DIR/plan.json` ({preset: batch}), which the other sections read. `torch`: the PyTorch port
(benchmarks/torch_reference.py) of the same step at that batch, eager and under
`torch.compile` (student and teacher modules compiled), median seconds per step. `trace`: a
`jax.profiler` trace of 3 steps of each preset (`DIR/trace/`, opens in TensorBoard or
Perfetto) and the top ops by summed event time, device planes where there are any (a GPU),
else the host's XLA ops. `sliding`: whole-volume sliding-window inference
(`pixssl_jax.evaluation.sliding_window`, the fine-tuning `btcv_3d` network, 50% overlap,
Gaussian weighting) on a random 256 x 256 x 160 volume: windows and voxels per second.
`--dry-run` uses tiny shapes and CPU memory figures, to test the script anywhere.
"""

import argparse
import collections
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from benchmarks import memory
from benchmarks import train_step as bench

PRESETS = ('btcv_3d', 'tpu_pod')
DRY_PRESETS = ('tiny3d',)
MAX_BATCH = 32  # Past this the step times grow linearly and the run would not fit 8 minutes.
MEMORY_SHARE = 0.9  # Headroom under the plan: XLA's runtime allocator fragments a little.


def device_bytes(dry_run: bool) -> float:
  """Bytes JAX may allocate on the first device (a nominal 4 GiB on a CPU or in a dry run)."""
  stats = jax.devices()[0].memory_stats() or {}
  if dry_run or 'bytes_limit' not in stats:
    return 4 * memory.GIB
  return float(stats['bytes_limit'])


def bf16_config(name: str, batch: int | None = None):
  config = bench.preset_config(name, batch)
  config.model.dtype = 'bfloat16'
  return config


def plan(args) -> dict:
  capacity = MEMORY_SHARE * device_bytes(args.dry_run)
  batches, chosen = (1, 2), {}
  lines = [f'capacity {capacity / memory.GIB:.2f} GiB ({MEMORY_SHARE:.0%} of what JAX may use)',
           '| preset | batch 1 GiB | batch 2 GiB | GiB per sample | chosen batch |',
           '| --- | --- | --- | --- | --- |']
  for name in (DRY_PRESETS if args.dry_run else PRESETS):
    config = bf16_config(name)
    totals = [memory.planned_bytes(config, b)['total'] for b in batches]
    most = 2 if args.dry_run else MAX_BATCH
    batch = int(np.clip(memory.largest_fitting_batch(batches, totals, capacity), 1, most))
    chosen[name] = batch
    lines.append(f'| {name} | {totals[0] / memory.GIB:.2f} | {totals[1] / memory.GIB:.2f} '
                 f'| {(totals[1] - totals[0]) / memory.GIB:.2f} | {batch} |')
  (args.out / 'plan.json').write_text(json.dumps(chosen))
  print('\n'.join(lines))
  return chosen


def _planned(args) -> dict:
  return json.loads((args.out / 'plan.json').read_text())


def _median_seconds(fn, steps: int) -> float:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def torch_steps(args) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  torch.set_default_device(bench.torch_device())
  torch.backends.cudnn.benchmark = True
  mesh = bench.mesh_lib.make_data_mesh(jax.devices()[:1])
  print('| preset | batch | PyTorch eager s | torch.compile s | compile + first step s |\n'
        '| --- | --- | --- | --- | --- |')
  for name, batch in _planned(args).items():
    config = bf16_config(name, batch)
    jax_step = bench.JaxStep(config, mesh)
    params = jax.device_get((jax_step.state.params, jax_step.state.ema_params))
    del jax_step  # Frees the JAX state before PyTorch allocates its own.
    step = torch_reference.TorchPretrainStep(
        bench.pixssl.build_model(config.model, config.data.ndim), config, *params,
        lr_steps=4 * args.steps + 4, compute_dtype=torch.bfloat16)
    batch_t = torch_reference.TorchPretrainStep.to_torch_batch(
        bench.random_batch(config, np.random.default_rng(0)))
    run = lambda: bench.torch_synchronized(step.step, batch_t)  # pylint: disable=cell-var-from-loop
    run()  # Warm-up (cuDNN picks its algorithms).
    eager = _median_seconds(run, args.steps)
    step.student, step.teacher = torch.compile(step.student), torch.compile(step.teacher)
    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    compiled = _median_seconds(run, args.steps)
    print(f'| {name} | {batch} | {eager:.4f} | {compiled:.4f} | {compile_s:.1f} |', flush=True)


def _top_ops(profile, steps: int) -> tuple[str, collections.Counter]:
  """Event time per op name (ms per step): device planes if any, else the host's XLA ops."""
  device = [p for p in profile.planes if p.name.startswith('/device:')]
  planes = device or [p for p in profile.planes if p.name.startswith('/host:')]
  totals = collections.Counter()
  for plane in planes:
    for line in plane.lines:
      # Device planes also carry the XLA module and step lines, which span the ops.
      if device and line.name not in ('XLA Ops', 'Ops', 'Stream #0', '') and \
         not line.name.startswith('Stream'):
        continue
      for event in line.events:
        totals[event.name] += event.duration_ns / 1e6 / steps
  return ('device' if device else 'host'), totals


def trace(args) -> None:
  from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
  mesh = bench.mesh_lib.make_data_mesh(jax.devices()[:1])
  steps = 3
  for name, batch in _planned(args).items():
    step = bench.JaxStep(bf16_config(name, batch), mesh)
    step()  # Warm-up outside the trace.
    logdir = args.out / 'trace' / name
    with jax.profiler.trace(str(logdir)):
      start = time.perf_counter()
      for _ in range(steps):
        step()
      wall_ms = (time.perf_counter() - start) * 1e3 / steps
    path = next(logdir.rglob('*.xplane.pb'))
    where, totals = _top_ops(_profile_data.ProfileData.from_file(str(path)), steps)
    print(f'\n{name}, batch {batch}: {wall_ms:.1f} ms wall per step; {where} events, '
          f'{sum(totals.values()):.1f} ms summed per step (ops on parallel streams add up)\n')
    print('| op | ms/step |\n| --- | --- |')
    for op, ms in totals.most_common(args.top):
      print(f'| {op[:90]} | {ms:.2f} |')


def sliding(args) -> None:
  from pixssl_jax import config_files  # pylint: disable=g-import-not-at-top
  from pixssl_jax.evaluation import sliding_window  # pylint: disable=g-import-not-at-top
  from pixssl_jax.models import segmentation  # pylint: disable=g-import-not-at-top
  config = config_files.load('finetune', 'tiny' if args.dry_run else 'btcv_3d')
  config.model.dtype, config.model.head_level = 'bfloat16', 0
  patch = (16, 16, 16) if args.dry_run else tuple(config.data.patch_size)
  shape = (24, 24, 16) if args.dry_run else (256, 256, 160)
  model = segmentation.build_segmentation_model(config.model, 3, num_classes=14)
  params = segmentation.init_segmentation_params(model, jax.random.key(0), (1, *patch, 1))
  apply = jax.jit(lambda x: jax.nn.softmax(model.apply({'params': params}, x), -1))
  volume = np.random.default_rng(0).uniform(size=(*shape, 1)).astype(np.float32)
  run = lambda: np.asarray(sliding_window.sliding_window_inference(
      apply, volume, patch_size=patch, overlap=0.5, gaussian=True,
      batch_size=4 if args.dry_run else int(config.eval.batch_size)))
  run()  # Compiles.
  seconds = _median_seconds(run, 3)
  windows = np.prod([len(sliding_window.window_starts(s, p, 0.5)) for s, p in zip(shape, patch)])
  print(f'sliding window, {"x".join(map(str, shape))} volume, {"x".join(map(str, patch))} '
        f'windows, 50% overlap, bfloat16: {seconds:.3f} s per '
        f'volume, {windows / seconds:.1f} windows/s, {np.prod(shape) / seconds / 1e6:.2f} '
        'Mvoxel/s')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('section', choices=('plan', 'torch', 'trace', 'sliding'))
  parser.add_argument('--out', type=pathlib.Path, required=True)
  parser.add_argument('--dry-run', action='store_true')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--top', type=int, default=30)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  {'plan': plan, 'torch': torch_steps, 'trace': trace, 'sliding': sliding}[args.section](args)


if __name__ == '__main__':
  main()
