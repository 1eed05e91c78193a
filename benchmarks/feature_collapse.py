r"""Have the pixel features of a pre-trained network collapsed to one vector?

  PYTHONPATH=. python benchmarks/feature_collapse.py PRETRAIN_WORKDIR [PRETRAIN_WORKDIR ...]

For each workdir (and a randomly initialised network of the first one's config), encodes
four crops of the middle axial slice of the first test case of the run's store and prints,
for the pixel projection and the decoder features feeding it: the mean pairwise cosine
similarity of all pixel feature vectors (1.0: every pixel has the same direction) and the
effective rank of the centred features (exp of the entropy of the normalised squared singular
values; 1.0: one direction). A pixel loss that falls close to 0 with both near 1 was solved by
collapse, not by learning.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pixssl_jax.data import case_store
from pixssl_jax.data import intensity
from pixssl_jax.models import pixssl
from pixssl_jax.train import load_pretrained
from pixssl_jax.train import loop


def collapse_stats(features: np.ndarray) -> tuple[float, float]:
  """(mean pairwise cosine, effective rank) of `[..., C]` feature vectors."""
  f = np.asarray(features, np.float64).reshape(-1, features.shape[-1])
  unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  cosine = float(np.mean(unit @ unit.T))
  singular = np.linalg.svd(f - f.mean(0), compute_uv=False)
  share = singular ** 2 / max(np.sum(singular ** 2), 1e-30)
  return cosine, float(np.exp(-np.sum(share * np.log(share + 1e-12))))


def crops(config) -> np.ndarray:
  """Four overlapping 2-D crops of the patch size from the first test case."""
  store = case_store.CaseStore(loop.resolve_data_dir(config.data))
  case_id = store.split('test')[0]
  image = intensity.scale_hu(store.image(case_id), store.hu_window)
  z, (px, py) = image.shape[2] // 2, tuple(config.data.patch_size)
  x0, y0 = (image.shape[0] - px) // 2, (image.shape[1] - py) // 2
  offsets = [(dx, dy) for dx in (-px // 4, px // 4) for dy in (-py // 4, py // 4)]
  return np.stack([image[x0 + dx:x0 + dx + px, y0 + dy:y0 + dy + py, z]
                   for dx, dy in offsets])[..., None]


def report(name: str, model, params, x) -> None:
  out = model.apply({'params': params}, jnp.asarray(x), with_predictor=False)
  _, decoder = model.apply({'params': params}, jnp.asarray(x),
                           method=lambda m, v: m.backbone(v))
  for label, features in (('pixel_proj', out['pixel_proj']),
                          (f'decoder[{model.pixel_level}]', decoder[model.pixel_level])):
    cosine, rank = collapse_stats(np.asarray(features))
    print(f'| {name} | {label} | {cosine:.3f} | {rank:.1f} of {features.shape[-1]} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='pre-training workdirs (2-D runs)')
  args = parser.parse_args()
  first = load_pretrained.read_pretrain_config(args.workdirs[0])
  x = crops(first)
  print('| network | features | mean pairwise cosine | effective rank |')
  print('| --- | --- | --- | --- |')
  model = pixssl.build_model(first.model, first.data.ndim)
  report('random initialisation', model,
         pixssl.init_params(model, jax.random.PRNGKey(0), (1, *first.data.patch_size, 1)), x)
  for workdir in args.workdirs:
    config = load_pretrained.read_pretrain_config(workdir)
    params, step = load_pretrained.restore_student_params(workdir)
    report(f'{workdir} (step {step})', pixssl.build_model(config.model, config.data.ndim),
           params, x)


if __name__ == '__main__':
  main()
