r"""Throughput of `pixssl_jax.predict`: input voxels per second, with and without --uncertainty.

  python benchmarks/predict_throughput.py [--shape 160,160,48] [--repeats 2]

For each network (the fine-tuning presets `tiny` and `demo`, 2-D, and `tiny` made 3-D with
32^3 windows) a `predict.Predictor` with randomly initialised weights (the time does not depend
on their values) segments one synthetic CT scan written as NIfTI (1 mm x 1 mm x 2.5 mm, LPS):
the whole path of one scan, from the file to the written labels: load, reorient, resample,
sliding windows, resampling back, writing. The first call compiles and is not timed; the
table gives the best of `--repeats` timed calls. Takes about 2 minutes on 2 CPU cores.
"""

import argparse
import os
import tempfile
import time

import jax
import nibabel as nib
import numpy as np

from pixssl_jax import config_files
from pixssl_jax import predict
from pixssl_jax.models import segmentation
from pixssl_jax.rundir import networks

RECORD = {'spacing': (1.5, 1.5, 2.0), 'hu_window': (-175.0, 250.0), 'orientation': 'RAS',
          'num_classes': 7, 'label_names': {i: f'class_{i}' for i in range(7)}}


def _config(preset: str, ndim: int):
  config = config_files.load('finetune', preset)
  config.model.head_level = 0
  if ndim == 3:
    config.data.ndim, config.data.patch_size = 3, (32, 32, 32)
    config.eval.batch_size = 4
  return config


def _scan(path: str, shape) -> None:
  rng = np.random.default_rng(0)
  hu = rng.normal(0.0, 30.0, shape).astype(np.float32) - 1000.0
  hu[shape[0] // 6:-shape[0] // 6, shape[1] // 6:-shape[1] // 6] += 1040.0  # A body.
  affine = np.diag([-1.0, -1.0, 2.5, 1.0])  # LPS: reoriented on the way in.
  nib.save(nib.Nifti1Image(hu, affine), path)


def measure(name: str, config, scan: str, out_dir: str, uncertainty: bool,
            repeats: int) -> float:
  model = networks.segmentation_model(config, RECORD['num_classes'])
  params = segmentation.init_segmentation_params(
      model, jax.random.key(0), (1, *config.data.patch_size, 1))
  predictor = predict.Predictor(model, params, config, RECORD, uncertainty=uncertainty)
  quiet = lambda _: None
  predict.predict_files(predictor, [scan], out_dir, print_fn=quiet)  # Compiles.
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    predict.predict_files(predictor, [scan], out_dir, print_fn=quiet)
    best = min(best, time.perf_counter() - start)
  voxels = int(np.prod(nib.load(scan).shape))
  print(f'| {name} | {"yes" if uncertainty else "no"} | {best:.2f} | '
        f'{voxels / best / 1e6:.2f} |', flush=True)
  return voxels / best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', default='160,160,48')
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  shape = tuple(int(s) for s in args.shape.split(','))
  with tempfile.TemporaryDirectory() as tmp:
    scan = os.path.join(tmp, 'scan.nii.gz')
    _scan(scan, shape)
    print(f'scan {shape} voxels, {jax.devices()[0].platform}')
    print('| network | --uncertainty | s per scan | input Mvoxel/s |')
    print('| --- | --- | --- | --- |')
    for name, preset, ndim in (('tiny 2-D (32^2)', 'tiny', 2), ('demo 2-D (128^2)', 'demo', 2),
                               ('tiny 3-D (32^3)', 'tiny', 3)):
      for uncertainty in (False, True):
        measure(name, _config(preset, ndim), scan, os.path.join(tmp, 'out'), uncertainty,
                args.repeats)


if __name__ == '__main__':
  main()
