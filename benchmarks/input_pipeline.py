r"""Input pipeline speed: prepare seconds per case, view rendering, two-view batches/s.

  PYTHONPATH=. python benchmarks/input_pipeline.py [--workers 0,2] [--batches 12] \
      [--repeats 3] [--presets 2d,3d,3d_hard] [--prepare_cases 3] \
      [--store auto|phantom|synthetic]

1. prepare: writes `--prepare_cases` synthetic CT-like NIfTI cases (256x256x60 at
   0.8x0.8x2.5 mm, a CT slab at reduced in-plane size) and times
   `prepare.prepare_dataset` on them (resampling to 1.5x1.5x2.0 mm, clipping, TFDS
   ArrayRecord write), then the `CaseStore` `.npy` cache build.
2. The loaders read the phantom store (`default_dataset.ensure_phantom_store`; with
   `--store auto` when the phantom generator is installed), else that synthetic store,
   always through `CaseStore`.
3. Rendering one view: the exact slicing path and the separable path against
   `scipy.ndimage.affine_transform` on the same integer / resized (x1.2) transform.
4. `pretrain_loader` for the 2-D demo preset (128x128, batch 8), a 3-D 96^3 preset (batch 2)
   and the same with every intensity augmentation and the remap on (`3d_hard`), with the
   default scale range and with resizing off, for each worker count: two-view batches/s of
   wall time, and two-view samples per CPU-second of the pipeline (this process, its grain
   threads and its live worker processes), which is samples/s per fully used host core and
   does not depend on what else runs on the machine. The first batch (worker start) is not
   timed; each figure is the median of `--repeats` consecutive stretches of `--batches`.
Prints markdown tables and the machine/date for docs/BENCHMARKS.md.
"""
import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import timeit

from absl import flags
import nibabel as nib
import numpy as np

from pixssl_jax import config_files
from pixssl_jax.data import case_store
from pixssl_jax.data import pipeline
from pixssl_jax.data import prepare
from pixssl_jax.data import views

PRESETS = {  # key: (name, ndim, patch_size, batch_size, every intensity augmentation on)
    '2d': ('2-D demo 128x128, batch 8', 2, (128, 128), 8, False),
    '3d': ('3-D 96^3, batch 2', 3, (96, 96, 96), 2, False),
    '3d_hard': ('3-D 96^3, batch 2, every intensity augmentation + remap', 3, (96, 96, 96), 2,
                True),
}


def write_synthetic_nifti(raw_dir: str, num_cases: int, seed: int = 0) -> None:
  """Writes CT-like cases: air, an elliptic body of soft tissue, two labelled organs."""
  rng = np.random.default_rng(seed)
  shape, spacing = (256, 256, 60), (0.8, 0.8, 2.5)
  os.makedirs(os.path.join(raw_dir, 'images'))
  os.makedirs(os.path.join(raw_dir, 'labels'))
  x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing='ij')
  affine = np.diag(list(spacing) + [1.0])
  for i in range(num_cases):
    body = (x / rng.uniform(0.7, 0.9)) ** 2 + (y / rng.uniform(0.5, 0.7)) ** 2 < 1
    image = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape)
    label = np.zeros(shape, np.uint8)
    for value, (cx, cy) in enumerate([(-0.3, 0.1), (0.3, -0.1)], start=1):
      organ = ((x - cx) / 0.2) ** 2 + ((y - cy) / 0.15) ** 2 + (z / 0.6) ** 2 < 1
      image[organ] += 60 * value
      label[organ] = value
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine),
             os.path.join(raw_dir, 'images', f'case{i:03d}.nii.gz'))
    nib.save(nib.Nifti1Image(label, affine), os.path.join(raw_dir, 'labels', f'case{i:03d}.nii.gz'))


def time_prepare(work_dir: str, num_cases: int) -> tuple[str, float, float]:
  """Returns (store dir, prepare s/case, cache build s/case)."""
  raw, store_dir = os.path.join(work_dir, 'raw'), os.path.join(work_dir, 'store')
  write_synthetic_nifti(raw, num_cases)
  start = time.perf_counter()
  prepare.prepare_dataset(raw, store_dir, strict=True, verbose=False)
  prepare_s = (time.perf_counter() - start) / num_cases
  start = time.perf_counter()
  case_store.CaseStore(store_dir).ensure_cache()
  cache_s = (time.perf_counter() - start) / num_cases
  return store_dir, prepare_s, cache_s


def loader_store(which: str, synthetic_store_dir: str):
  """The phantom store ('phantom', or 'auto' when the generator exists), else the synthetic one."""
  if which == 'auto':
    try:
      from pixssl_jax.data import phantoms  # pylint: disable=g-import-not-at-top
      which = 'phantom' if hasattr(phantoms, 'generate_dataset') else 'synthetic'
    except ImportError:
      which = 'synthetic'
  if which == 'synthetic':
    return case_store.CaseStore(synthetic_store_dir), 'synthetic NIfTI store'
  from pixssl_jax.data import default_dataset  # pylint: disable=g-import-not-at-top
  return case_store.CaseStore(default_dataset.ensure_phantom_store()), 'phantom store'


def time_crop_sources(store, crop: int = 96, repeats: int = 20) -> tuple[float, float]:
  """Median ms for a random crop^3 from the .npy memory map and from decoding the TFDS record.

  Why the CaseStore keeps a memory-mapped cache: a whole-volume ArrayRecord record must be
  decoded completely for every crop.
  """
  import json  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with open(os.path.join(store.data_dir, 'store.json')) as f:
    info = json.load(f)['tfds']
  source = tfds.builder_from_directory(
      os.path.join(store.data_dir, info['builder_dir'])).as_data_source(split=info['split'])
  rng = np.random.default_rng(0)
  ids = store.split('pretrain')

  def random_crop(volume):
    o = [rng.integers(0, max(s - crop, 0) + 1) for s in volume.shape]
    return np.array(volume[o[0]:o[0] + crop, o[1]:o[1] + crop, o[2]:o[2] + crop])

  memmap_ms, record_ms = [], []
  for i in range(repeats):
    tic = time.perf_counter()
    random_crop(store.image(ids[i % len(ids)]))
    memmap_ms.append((time.perf_counter() - tic) * 1e3)
    tic = time.perf_counter()
    random_crop(source[i % len(source)]['image'])
    record_ms.append((time.perf_counter() - tic) * 1e3)
  return float(np.median(memmap_ms)), float(np.median(record_ms))


def time_render(volume: np.ndarray, repeats: int = 7) -> list[tuple[str, float]]:
  """Best-of-`repeats` milliseconds per view of each rendering path (integer and resized T).

  The minimum, not the mean: on a shared machine it is the least disturbed estimate.
  """
  rows = []
  for ndim, patch in [(2, (128, 128)), (3, (96, 96, 96))]:
    source = volume[:, :, volume.shape[2] // 2] if ndim == 2 else volume
    start = np.zeros(ndim)
    flips = (True,) + (False,) * (ndim - 1)
    t_int = views.crop_transform(start + 8, np.array(patch, float), patch, flips, 1)
    t_scaled = views.crop_transform(start + 8, 1.2 * np.array(patch, float), patch, flips, 1)
    for label, t, fast in [('exact slicing path', t_int, True),
                           ('same T via affine_transform', t_int, False),
                           ('resized x1.2, separable path', t_scaled, True),
                           ('resized x1.2 via affine_transform', t_scaled, False)]:
      render = lambda t=t, fast=fast: views.render_view(source, t, patch, -175.0, fast_paths=fast)
      number = 20 if ndim == 2 else 2
      best = min(timeit.repeat(render, number=number, repeat=repeats)) / number
      rows.append((f'{"x".join(map(str, patch))} {label}', 1e3 * best))
  return rows


def children_cpu_s() -> float:
  """CPU seconds (user + system) so far of this process's live children, from /proc.

  grain's worker processes run for the whole loop, and `RUSAGE_CHILDREN` counts only
  children that have exited, so their CPU time is read from `/proc/<pid>/stat` (Linux).
  """
  tick, total = os.sysconf('SC_CLK_TCK'), 0.0
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue  # Exited meanwhile.
    if int(fields[1]) == os.getpid():  # Fields after the name: state, ppid, ..., utime, stime.
      total += (int(fields[11]) + int(fields[12])) / tick
  return total


def time_loader(store, ndim, patch, batch_size, workers, scale_range, hard, num_batches,
                repeats) -> tuple[float, float]:
  """Median (batches/s of wall time, samples per CPU-second) over `repeats` stretches."""
  cfg = config_files.load('pretrain', 'demo').data
  cfg.ndim, cfg.patch_size, cfg.scale_range = ndim, patch, scale_range
  if hard:
    cfg.intensity.prob, cfg.intensity.remap_prob = 1.0, 1.0
  loader = pipeline.pretrain_loader(store, cfg, batch_size=batch_size, seed=0,
                                    worker_count=workers)
  iterator = iter(loader)
  next(iterator)  # Worker start-up and first reads are not steady state.
  wall_rates, cpu_rates = [], []
  for _ in range(repeats):
    # process_time covers every thread of this process (grain's read threads included).
    tic, cpu = time.perf_counter(), time.process_time() + children_cpu_s()
    for _ in range(num_batches):
      next(iterator)
    cpu = time.process_time() + children_cpu_s() - cpu
    wall_rates.append(num_batches / (time.perf_counter() - tic))
    cpu_rates.append(num_batches * batch_size / cpu)
  return float(np.median(wall_rates)), float(np.median(cpu_rates))


def cpu_model() -> str:
  """The CPU's model name as lscpu prints it (Linux), else what platform knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', default='0,2')
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--presets', default=','.join(PRESETS))
  parser.add_argument('--prepare_cases', type=int, default=3)
  parser.add_argument('--store', choices=('auto', 'phantom', 'synthetic'), default='auto')
  args = parser.parse_args()
  flags.FLAGS(sys.argv[:1])  # grain worker processes read absl flags.

  with tempfile.TemporaryDirectory() as work_dir:
    store_dir, prepare_s, cache_s = time_prepare(work_dir, args.prepare_cases)
    store, store_name = loader_store(args.store, store_dir)
    first = store.split('pretrain')[0]
    volume = np.asarray(store.image(first))
    render_rows = time_render(volume)
    memmap_ms, record_ms = time_crop_sources(store)
    loader_rows = []
    for key in args.presets.split(','):
      name, ndim, patch, batch_size, hard = PRESETS[key]
      for scale_name, scale_range in [('0.7-1.4', (0.7, 1.4)), ('off (exact path)', None)]:
        for workers in (int(w) for w in args.workers.split(',')):
          rate, per_cpu = time_loader(store, ndim, patch, batch_size, workers, scale_range,
                                      hard, args.batches if ndim == 2
                                      else max(args.batches // 2, 3), args.repeats)
          loader_rows.append((name, scale_name, workers, rate, batch_size * rate, per_cpu))
          print(f'  {name}, scale {scale_name}, {workers} workers: {rate:.2f} batches/s, '
                f'{per_cpu:.1f} samples per CPU-second', file=sys.stderr, flush=True)

  print(f'Input pipeline, {datetime.date.today()}, {platform.node()}, '
        f'{cpu_model()}, {os.cpu_count()} CPUs, '
        f'Python {platform.python_version()}, load average at the end '
        f'{os.getloadavg()[0]:.1f} (other work on the machine slows the numbers)\n')
  print(f'prepare (synthetic 256x256x60 NIfTI at 0.8x0.8x2.5 mm -> 1.5x1.5x2.0 mm): '
        f'{prepare_s:.2f} s/case; CaseStore .npy cache build: {cache_s:.2f} s/case\n')
  print(f'Loader store: {store_name}, volumes like {first} {volume.shape}\n')
  print(f'Random 96^3 crop, median of 20: {memmap_ms:.2f} ms from the .npy memory map, '
        f'{record_ms:.1f} ms decoding the TFDS ArrayRecord record\n')
  print('| view rendering | ms per view |\n| --- | --- |')
  for label, ms in render_rows:
    print(f'| {label} | {ms:.2f} |')
  print(f'\n| preset | crop scale | workers | two-view batches/s | samples/s | '
        f'samples per CPU-second |\n| --- | --- | --- | --- | --- | --- |')
  for name, scale_name, workers, rate, samples, per_cpu in loader_rows:
    print(f'| {name} | {scale_name} | {workers} | {rate:.2f} | {samples:.1f} | {per_cpu:.1f} |')


if __name__ == '__main__':
  main()
