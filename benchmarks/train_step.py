r"""Pre-training step time against PyTorch and the machine's matmul peak.

  PYTHONPATH=. python benchmarks/train_step.py [--presets demo,3d64,btcv_3d] [--steps 6]
      [--batch btcv_3d=1] [--no-torch] [--dtype bfloat16] [--cpu-library-fusions LIST]
      [--layers flax]

On a GPU host (JAX's default backend `gpu`, torch built with CUDA) the same command times
both frameworks on the GPU; `--dtype bfloat16` sets the JAX `model.dtype` and runs the
PyTorch forward passes under `torch.autocast(bfloat16)`, and the matmul peak is then a
bfloat16 one, so "% of peak" is the model FLOPs utilisation.

For each preset, on this machine's default JAX devices (one CPU device uses every core), with
random inputs (the input pipeline is benchmarks/input_pipeline.py's business):
  * compile time of the jitted train step (lower + compile);
  * median step time, samples/s and voxels/s (both views' input voxels);
  * achieved GFLOP/s: XLA cost-analysis FLOPs of the step (see `flops_of`) over the median
    step time, next to the dense float32 matmul peak measured in the same run (the best of
    XLA, NumPy and PyTorch on a large square matmul);
  * the uncertainty cost: step time with K = config.method.mc_samples (8) over K = 1, and
    the share of the step it takes, (t_K - t_1) / t_K;
  * the method overhead: cost-analysis FLOPs of the full step over those of a plain student
    forward+backward plus a teacher forward of the same two views;
  * the PyTorch reference step (benchmarks/torch_reference.py, same network, loss, optimizer
    and weights; at its faster thread count, 1 or all cores) and the JAX/PyTorch ratio. JAX
    K, JAX K=1 and PyTorch steps are timed interleaved, one of each per round in a rotating
    order, so load from other work hits all three alike;
  * an assertion that the jitted step compiled once: its jit cache holds one entry after the
    warm-up and after every timed step.
Prints a markdown table for docs/BENCHMARKS.md. `--no-torch` skips PyTorch (not installed).
"""

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pixssl_jax import config_files
from pixssl_jax import xla_options
from pixssl_jax.models import pixssl
from pixssl_jax.train import loop
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import optimizers
from pixssl_jax.train import pretrain



# The forms of the step that benchmarks/torch_reference.py ports (see `preset_config`).
PORTED = {'model.pixel_hypercolumn': False, 'method.weighting_scale': 'absolute',
          'optim.ema_final_init_share': 0.0}


def preset_config(name: str, batch_size: int | None = None):
  """configs/pretrain.py presets, plus '3d64' and 'tiny3d', as the PyTorch port computes them.

  '3d64': 3-D 64^3 patches, batch 2, the demo's U-Net widths. 'tiny3d': 3-D 16^3 patches,
  batch 2, the tiny preset's model (for quick 3-D checks). `batch_size` overrides the batch.
  The port (benchmarks/torch_reference.py) implements the single-level pixel loss, the absolute
  `exp` weighting and the fixed teacher momentum m0, so those are pinned here (`PORTED`): both
  frameworks then time the same computation. The multi-level pixel loss of the defaults makes
  the demo step about 1.6x longer on CPU (docs/performance.md).
  """
  if name == '3d64':
    config = config_files.load('pretrain', 'btcv_3d')
    config.data.patch_size = (64, 64, 64)
    config.batch_size = 2
    config.model.features = (16, 32, 64, 128)
  elif name == 'tiny3d':
    config = config_files.load('pretrain', 'tiny')
    config.data.ndim = 3
    config.data.patch_size = (16, 16, 16)
    config.batch_size = 2
  else:
    config = config_files.load('pretrain', name)
  if batch_size:
    config.batch_size = batch_size
  config.model.pixel_hypercolumn = PORTED['model.pixel_hypercolumn']
  config.method.weighting_scale = PORTED['method.weighting_scale']
  config.optim.ema_final_init_share = PORTED['optim.ema_final_init_share']
  return config


def random_batch(config, rng):
  patch = tuple(config.data.patch_size)
  n, b = len(patch), config.batch_size
  t1 = np.tile(np.concatenate([np.eye(n), np.zeros((n, 1))], 1), (b, 1, 1)).astype(np.float32)
  t2 = t1.copy()
  t2[:, :, n] = rng.integers(-patch[0] // 4, patch[0] // 4, size=(b, n))  # Offset crops.
  views = rng.uniform(size=(2, b, *patch, 1)).astype(np.float32)
  return dict(view1=views[0], view2=views[1], transform1=t1, transform2=t2)


def cpu_abstract(tree):
  """Shapes and dtypes of `tree`, for lowering on the CPU backend whatever the default one."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def cpu_mesh() -> jax.sharding.Mesh:
  return mesh_lib.make_data_mesh(jax.devices('cpu')[:1])


def flops_of(lowered) -> float:
  """FLOPs from XLA's cost analysis of a function lowered for the CPU backend.

  Lowered for the CPU, the count does not depend on where the step runs: XLA:CPU's count of
  the lowered HLO is within 1% of its count of the compiled step. On a GPU neither works:
  jax 0.11's lowered cost analysis there is None, and XLA:GPU's compiled one counted 44
  instead of 217 GFLOP for the bfloat16 3d64 step (it leaves out work it hands to libraries
  such as cuDNN), which made the model FLOPs utilisation 5x too low.
  """
  analysis = lowered.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get('flops', float('nan')))


def best_seconds(fn, reps: int) -> float:
  fn()  # Warm-up (and compile, for jitted functions).
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def matmul_peak(n: int = 4096, reps: int = 3, dtype: str = 'float32') -> dict[str, float]:
  """Dense `dtype` [n, n] @ [n, n] GFLOP/s of XLA, NumPy (CPU, float32) and PyTorch.

  XLA runs on JAX's default device, PyTorch on its default device (see `torch_device`).
  """
  flops = 2.0 * n ** 3
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  out = {}
  x = jnp.asarray(a, dtype)
  dot = jax.jit(jnp.dot)
  out['XLA'] = flops / best_seconds(lambda: dot(x, x).block_until_ready(), reps) / 1e9
  if jax.default_backend() == 'cpu' and dtype == 'float32':
    out['NumPy'] = flops / best_seconds(lambda: a @ a, reps) / 1e9
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return out
  t = torch.from_numpy(a).to(torch.get_default_device(), getattr(torch, dtype))
  out['PyTorch'] = flops / best_seconds(lambda: torch_synchronized(torch.mm, t, t), reps) / 1e9
  return out


def torch_device() -> str:
  """'cuda' when JAX runs on a GPU and torch can too (so both time the same chip), else 'cpu'."""
  import torch  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'gpu' and torch.cuda.is_available():
    return 'cuda'
  return 'cpu'


def torch_synchronized(fn, *args):
  """Calls `fn` and waits for the GPU (torch launches CUDA work asynchronously)."""
  import torch  # pylint: disable=g-import-not-at-top
  out = fn(*args)
  if torch.get_default_device().type == 'cuda':
    torch.cuda.synchronize()
  return out


class JaxStep:
  """The jitted train step of one config, compiled ahead of the timed steps."""

  def __init__(self, config, mesh):
    self.config = config
    self.model = pixssl.build_model(config.model, config.data.ndim)
    self.tx = optimizers.make_optimizer(config.optim, config.num_steps)
    self.state = pretrain.init_train_state(self.model, self.tx, config, mesh)
    self.batch = mesh_lib.global_batch(random_batch(config, np.random.default_rng(0)), mesh)
    self.jitted = loop.jit_train_step(pretrain.train_step, self.model, self.tx, config, mesh)
    start = time.perf_counter()
    lowered = self.jitted.lower(self.state, self.batch)
    self.compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - start
    if jax.default_backend() != 'cpu':  # Count on the CPU backend (see `flops_of`).
      cpu_step = loop.jit_train_step(pretrain.train_step, self.model, self.tx, config,
                                     cpu_mesh())
      lowered = cpu_step.lower(*cpu_abstract((self.state, self.batch)))
    self.flops = flops_of(lowered)

  def __call__(self):
    """One step through the jitted function (as the training loop calls it)."""
    self.state, metrics = self.jitted(self.state, self.batch)
    jax.block_until_ready(metrics)

  def assert_compiled_once(self):
    # One cache entry: the ahead-of-time compile and every later call share one executable.
    size = self.jitted._cache_size()  # pylint: disable=protected-access
    if size != 1:
      raise AssertionError(f'the jitted train step compiled {size} times')


def pick_torch_threads(run) -> int:
  """Sets and returns PyTorch's faster intra-op thread count: 1 or every core.

  On this shared 2-core machine, with another process busy, PyTorch's OpenMP threads wait at
  every barrier for a descheduled peer: a tiny 3-D step took 1.8 s on 2 threads and 0.03 s on
  1. Each count runs one step after a warm-up step and the faster is kept, so the reference
  is timed at its best.
  """
  import torch  # pylint: disable=g-import-not-at-top
  counts = sorted({1, os.cpu_count() or 1})
  seconds = {}
  for count in counts:
    torch.set_num_threads(count)
    run()
    start = time.perf_counter()
    run()
    seconds[count] = time.perf_counter() - start
  best = min(seconds, key=seconds.get)
  torch.set_num_threads(best)
  return best


def interleaved_seconds(runners: dict[str, Callable[[], Any]], rounds: int,
                        after_round: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
  """Seconds of each runner's steps, one step of each per round in an order that rotates.

  Rotating the order each round means no runner always runs right after the same other one
  (the K = 8 step used to follow PyTorch's in every round; the uncertainty share, a difference
  of two medians, is the number that order biases most), and load from other work hits all
  runners alike. With two runners the rounds go A B, B A, A B, ...
  """
  times = {name: [] for name in runners}
  names = list(runners)
  for round_index in range(rounds):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - start)
    after_round()
  return times


def time_preset(config, mesh, steps: int, with_torch: bool) -> dict[str, float]:
  """Everything one table row needs; JAX K, JAX K=1 and PyTorch steps timed interleaved."""
  k = int(config.method.mc_samples)
  full = JaxStep(config, mesh)
  config_k1 = config.copy_and_resolve_references()
  config_k1.method.mc_samples = 1
  single = JaxStep(config_k1, mesh)
  runners = {'jax': full, 'jax_k1': single}
  if with_torch:
    from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    compute_dtype = None if config.model.dtype == 'float32' else getattr(torch, config.model.dtype)
    torch_step = torch_reference.TorchPretrainStep(
        full.model, config, jax.device_get(full.state.params),
        jax.device_get(full.state.ema_params), lr_steps=steps + 1, compute_dtype=compute_dtype)
    torch_batch = torch_reference.TorchPretrainStep.to_torch_batch(
        random_batch(config, np.random.default_rng(0)))
    runners['torch'] = lambda: torch_synchronized(torch_step.step, torch_batch)
    torch_threads = (pick_torch_threads(runners['torch'])
                     if torch.get_default_device().type == 'cpu' else 'GPU')
  first = {}
  for name, run in runners.items():  # Warm-up: the first step of each.
    start = time.perf_counter()
    run()
    first[name] = time.perf_counter() - start
  full.assert_compiled_once()
  def check():
    full.assert_compiled_once()
    single.assert_compiled_once()
  times = interleaved_seconds(runners, steps, after_round=check)
  median = {name: statistics.median(t) for name, t in times.items()}
  patch = tuple(config.data.patch_size)
  row = dict(
      patch='x'.join(map(str, patch)), batch=config.batch_size, k=k,
      compile_s=full.compile_seconds, first_step_s=first['jax'], step_s=median['jax'],
      samples_per_s=config.batch_size / median['jax'],
      mvoxels_per_s=2 * config.batch_size * np.prod(patch) / median['jax'] / 1e6,
      gflops=full.flops / median['jax'] / 1e9, step_gflop=full.flops / 1e9,
      k_ratio=median['jax'] / median['jax_k1'],
      uncertainty_share=(median['jax'] - median['jax_k1']) / median['jax'],
      flops_ratio=full.flops / plain_flops(full.model, full.state, full.batch))
  if with_torch:
    row.update(torch_s=median['torch'], ratio=median['jax'] / median['torch'],
               torch_threads=torch_threads,
               torch_gflops=full.flops / median['torch'] / 1e9)
  return row


def plain_flops(model, state, batch) -> float:
  """FLOPs of student forward+backward and teacher forward on both views, nothing else."""

  def plain(params, ema_params, view1, view2):
    views = jnp.concatenate([view1, view2], axis=0)

    def student_sum(p):
      out = model.apply({'params': p}, views)
      return sum(jnp.sum(v) for v in out.values())
    grads = jax.grad(student_sum)(params)
    teacher = model.apply({'params': ema_params}, views, with_predictor=False)
    return grads, teacher

  args = cpu_abstract((state.params, state.ema_params, batch['view1'], batch['view2']))
  return flops_of(jax.jit(plain, in_shardings=mesh_lib.replicated(cpu_mesh())).lower(*args))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--presets', default='demo,3d64')
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--batch', action='append', default=[],
                      help='PRESET=B: run PRESET with global batch B (e.g. btcv_3d=1 on CPU)')
  parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
  parser.add_argument('--peak-size', type=int, default=4096, help='matmul side for the peak')
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                      help="compute dtype of both models and of the matmul peak (default: "
                      "each preset's model.dtype, a float32 peak)")
  parser.add_argument('--layers', default=None, choices=('auto', 'flax', 'cpu'),
                      help="the JAX model's layer set, model.layers (default: each preset's)")
  parser.add_argument('--cpu-library-fusions', default=None,
                      help="XLA:CPU library fusions for the jitted steps instead of "
                      "pixssl_jax.xla_options' choice: 'xla-default', or a comma list such as "
                      "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE")
  args = parser.parse_args()
  if args.cpu_library_fusions:
    # The sweep that chose xla_options' setting (docs/performance.md); {} = XLA's defaults.
    xla_options._CPU_OPTIONS = ({} if args.cpu_library_fusions == 'xla-default' else  # pylint: disable=protected-access
                                {'xla_cpu_experimental_ynn_fusion_type': args.cpu_library_fusions})
    xla_options.compiler_options.cache_clear()
  peak_dtype = args.dtype or 'float32'
  batches = {k: int(v) for k, v in (item.split('=') for item in args.batch)}
  with_torch = not args.no_torch
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_default_device(torch_device())
    # cuDNN picks its fastest convolution algorithm per shape, as XLA's GPU autotuner does.
    torch.backends.cudnn.benchmark = True
  mesh = mesh_lib.make_data_mesh(jax.devices()[:1])
  load_start = os.getloadavg()
  peak = matmul_peak(args.peak_size, dtype=peak_dtype)
  best = max(peak.values())
  print('matmul peak GFLOP/s: ' + ', '.join(f'{k} {v:.1f}' for k, v in peak.items()), flush=True)
  rows = []
  for name in args.presets.split(','):
    config = preset_config(name, batches.get(name))
    config.model.dtype = args.dtype or config.model.dtype
    config.model.layers = args.layers or config.model.layers
    row = time_preset(config, mesh, args.steps, with_torch)
    rows.append((name, row))
    print(f'{name}: {row}', flush=True)
  versions = f'jax {jax.__version__}'
  if with_torch:
    versions += f', torch {torch.__version__} on {torch.get_default_device()}'
  print(f'\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, '
        f'{jax.devices()[0].device_kind}, compute dtype {args.dtype or "of each preset"}, '
        f'XLA options {xla_options.compiler_options()}, {versions}; '
        f'{args.steps} timed rounds after one '
        f'warm-up step; load average {load_start[0]:.2f} at the start, '
        f'{os.getloadavg()[0]:.2f} at the end\n')
  print(f'Matmul peak ({args.peak_size}^2 {peak_dtype}): '
        + ', '.join(f'{k} {v:.1f}' for k, v in peak.items()) + f' GFLOP/s; best {best:.1f}\n')
  print('| preset | patch | batch | compile s | JAX step s | PyTorch step s | JAX/PyTorch '
        '| PyTorch threads | samples/s | Mvoxel/s | GFLOP/step | JAX GFLOP/s | % of peak '
        '| PyTorch % of peak | K | time K/K=1 | uncertainty share | FLOPs full/plain |')
  print('|' + ' --- |' * 18)
  for name, r in rows:
    torch_cols = (f'{r["torch_s"]:.3f} | {r["ratio"]:.2f} | {r["torch_threads"]} '
                  if with_torch else '- | - | - ')
    torch_peak = f'{100 * r["torch_gflops"] / best:.0f}%' if with_torch else '-'
    print(f'| {name} | {r["patch"]} | {r["batch"]} | {r["compile_s"]:.1f} | {r["step_s"]:.3f} '
          f'| {torch_cols}| {r["samples_per_s"]:.2f} | {r["mvoxels_per_s"]:.2f} '
          f'| {r["step_gflop"]:.1f} | {r["gflops"]:.1f} | {100 * r["gflops"] / best:.0f}% '
          f'| {torch_peak} | {r["k"]} | {r["k_ratio"]:.3f} | {100 * r["uncertainty_share"]:.1f}% '
          f'| {r["flops_ratio"]:.3f} |')
  print('\nThe jitted step compiled once per preset and config (asserted after every step).')


if __name__ == '__main__':
  main()
