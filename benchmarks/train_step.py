r"""Pre-training step time, the cost of the uncertainty, and the method's FLOP overhead.

  PYTHONPATH=. python benchmarks/train_step.py [--presets demo,3d64] [--steps 6]

For each preset, on this machine's default JAX devices (one CPU device uses every core):
  * median step time of the jitted train step and samples/s (random inputs, so the input
    pipeline is not measured here: see benchmarks/input_pipeline.py);
  * the uncertainty cost: step time with K = config.method.mc_samples (8) over K = 1,
    measured in the same run;
  * the method overhead: XLA cost-analysis FLOPs of the full step over those of a plain
    student forward+backward plus a teacher forward of the same two views.
Prints a markdown table for docs/BENCHMARKS.md.
"""

import argparse
import datetime
import importlib.util
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pixssl_jax.models import pixssl
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import state as state_lib
from pixssl_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def preset_config(name: str):
  """configs/pretrain.py presets, plus '3d64': 3-D 64^3 patches, batch 2, demo-width U-Net."""
  spec = importlib.util.spec_from_file_location('pretrain_config', REPO / 'configs/pretrain.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if name == '3d64':
    config = module.get_config('btcv_3d')
    config.data.patch_size = (64, 64, 64)
    config.batch_size = 2
    config.model.features = (16, 32, 64, 128)
    return config
  return module.get_config(name)


def random_batch(config, rng):
  patch = tuple(config.data.patch_size)
  n, b = len(patch), config.batch_size
  t1 = np.tile(np.concatenate([np.eye(n), np.zeros((n, 1))], 1), (b, 1, 1)).astype(np.float32)
  t2 = t1.copy()
  t2[:, :, n] = rng.integers(-patch[0] // 4, patch[0] // 4, size=(b, n))  # Offset crops.
  views = rng.uniform(size=(2, b, *patch, 1)).astype(np.float32)
  return dict(view1=views[0], view2=views[1], transform1=t1, transform2=t2)


def flops_of(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get('flops', float('nan')))


def time_step(config, mesh, steps: int):
  """Returns (median seconds per step, compiled step, state, batch)."""
  model = pixssl.build_model(config.model, config.data.ndim)
  tx = state_lib.make_optimizer(config.optim, config.num_steps)
  state = step_lib.init_train_state(model, tx, config, mesh)
  batch = mesh_lib.global_batch(random_batch(config, np.random.default_rng(0)), mesh)
  train_step = step_lib.jit_train_step(model, tx, config, mesh)
  compiled = train_step.lower(state, batch).compile()
  state, metrics = compiled(state, batch)  # Warm-up.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times), compiled, model, state, batch


def plain_flops(model, state, batch) -> float:
  """FLOPs of student forward+backward and teacher forward on both views, nothing else."""
  views = jnp.concatenate([batch['view1'], batch['view2']], axis=0)

  def plain(params, ema_params):
    def student_sum(p):
      out = model.apply({'params': p}, views)
      return sum(jnp.sum(v) for v in out.values())
    grads = jax.grad(student_sum)(params)
    teacher = model.apply({'params': ema_params}, views, with_predictor=False)
    return grads, teacher

  return flops_of(jax.jit(plain).lower(state.params, state.ema_params).compile())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--presets', default='demo,3d64')
  parser.add_argument('--steps', type=int, default=6)
  args = parser.parse_args()
  mesh = mesh_lib.make_data_mesh(jax.devices()[:1])
  rows = []
  for name in args.presets.split(','):
    config = preset_config(name)
    k = config.method.mc_samples
    seconds, compiled, model, state, batch = time_step(config, mesh, args.steps)
    full_flops = flops_of(compiled)
    base_flops = plain_flops(model, state, batch)
    config_k1 = preset_config(name)
    config_k1.method.mc_samples = 1
    seconds_k1, *_ = time_step(config_k1, mesh, args.steps)
    rows.append((name, tuple(config.data.patch_size), config.batch_size, seconds,
                 config.batch_size / seconds, k, seconds / seconds_k1, full_flops / base_flops,
                 full_flops / seconds / 1e9))
    print(f'{name}: {seconds:.3f} s/step', flush=True)
  print(f'\n{datetime.date.today()}, {platform.node()}, {jax.devices()[0].device_kind}, '
        f'jax {jax.__version__}, {args.steps} timed steps after one warm-up step\n')
  print('| preset | patch | batch | step s (median) | samples/s | K | time K/K=1 '
        '| FLOPs full/plain | GFLOP/s |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for row in rows:
    name, patch, batch, sec, sps, k, ratio_t, ratio_f, gflops = row
    print(f'| {name} | {"x".join(map(str, patch))} | {batch} | {sec:.3f} | {sps:.2f} | {k} '
          f'| {ratio_t:.3f} | {ratio_f:.3f} | {gflops:.1f} |')


if __name__ == '__main__':
  main()
