r"""Does the MC-dropout uncertainty predict the pixel discrepancy on held-out cases?

  python benchmarks/uncertainty_agreement.py WORKDIR [WORKDIR ...] [--split val] [--pairs 4] \
      [--mc_samples K] [--map_dir DIR] [--ridge]

For every checkpoint of each pre-training workdir: Spearman(u, d) over the matched cells of
`--pairs` augmented view pairs per case of `--split` (outside the `pretrain` split by default),
with the student's stabilizer (`analysis.uncertainty_agreement`). With `--map_dir`, also the
whole-slice uncertainty map of the split's first case (middle axial slice) at the last
checkpoint, as DIR/uncertainty_map_<workdir name>.png. With `--ridge`, also how well simple
functions of one view rank the held-out discrepancy (`predictability`): what an uncertainty
could reach. Numbers in docs/BENCHMARKS.md.
"""

import argparse
import pathlib
import sys

import numpy as np
from scipy import stats

# Runnable as `python benchmarks/uncertainty_agreement.py` from anywhere, without PYTHONPATH.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pixssl_jax import analysis  # noqa: E402


def view_pairs(run, cases: list[str], pairs: int, mc_samples: int | None) -> list:
  """`pairs` augmented view pairs of each of `cases` through `run` (seeds 0 .. pairs - 1)."""
  return [analysis.analyse_view_pair(run, case, seed=seed, augment=True, min_body_fraction=0.3,
                                     mc_samples=mc_samples)
          for case in cases for seed in range(pairs)]


def _cells(pairs) -> dict[str, np.ndarray]:
  """Per matched cell of each view: d, the student's pixel projection, the view's mean
  intensity and gradient magnitude over the cell."""
  out = {'d': [], 'features': [], 'intensity': [], 'gradient': []}
  for pair in pairs:
    for row, view in enumerate(pair.views):
      s, valid = pair.stride, pair.overlap[row]
      cells = lambda image: image.reshape(image.shape[0] // s, s, image.shape[1] // s, s
                                          ).mean(axis=(1, 3))[valid]
      gy, gx = np.gradient(view)
      out['d'].append(pair.discrepancy[row][valid])
      out['features'].append(pair.student_proj[row][valid])
      out['intensity'].append(cells(view))
      out['gradient'].append(cells(np.hypot(gx, gy)))
  return {k: np.concatenate(v) for k, v in out.items()}


def predictability(run, held: list, mc_samples: int | None, fit_cases: int = 16,
                   ridge: float = 100.0) -> dict[str, float]:
  """How well simple functions of view 1 rank the d of the `held` pairs of `run`.

  A ridge regression of d on the standardised student pixel projection (the stabilizer's
  input) is fitted on 2 view pairs of each of the first `fit_cases` cases of the `pretrain`
  split.
  """
  fit = _cells(view_pairs(run, run.store().split('pretrain')[:fit_cases], 2, mc_samples))
  held = _cells(held)
  mean, std = fit['features'].mean(0), fit['features'].std(0) + 1e-6
  design = lambda x: np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
  a = design(fit['features'])
  weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ fit['d'])
  rho = lambda x: float(stats.spearmanr(x, held['d']).statistic)
  return {'ridge on the pixel projection': rho(design(held['features']) @ weights),
          'cell mean intensity': rho(held['intensity']),
          'cell gradient magnitude': rho(held['gradient'])}


def save_map(run, name: str, split: str, mc_samples: int | None, out_dir: pathlib.Path
             ) -> pathlib.Path:
  case = run.store().split(split)[0]
  volume = analysis.load_volume(run, case)
  z = volume.image.shape[2] // 2
  u = analysis.volume_uncertainty(run, volume, mc_samples=mc_samples, slices=[z],
                                  patch_size=(64, 64), overlap=0.25, batch_size=16)
  figure = analysis.plot_uncertainty(volume.image[:, :, z], u[:, :, 0],
                                     spacing=volume.spacing[:2],
                                     title=f'{name} step {run.step}, {case}')
  path = out_dir / f'uncertainty_map_{name}.png'
  figure.savefig(path, dpi=80)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='pre-training workdirs')
  parser.add_argument('--split', default='val')
  parser.add_argument('--pairs', type=int, default=4, help='view pairs per case')
  parser.add_argument('--mc_samples', type=int, default=None,
                      help="dropout samples per estimate of u (default: the run's K)")
  parser.add_argument('--map_dir', default=None)
  parser.add_argument('--ridge', action='store_true',
                      help='also how well a ridge regression on the student pixel projection '
                           '(fitted on pretrain-split pairs) and the image rank d')
  args = parser.parse_args(argv)
  for workdir in args.workdirs:
    rows = []
    for step in analysis.available_steps(workdir):
      run = analysis.load_run(workdir, step=step, which='student')
      pairs = view_pairs(run, run.store().split(args.split), args.pairs, args.mc_samples)
      result = analysis.uncertainty_agreement(pairs)
      rows.append((step, result.spearman, result.cells))
    print(f'{workdir}: held-out Spearman(u, d) by step: ' + ', '.join(
        f'{step}: {rho:.3f}' for step, rho, _ in rows) + f' ({rows[-1][2]} matched cells)')
    # `run` and `pairs` are the last checkpoint's.
    if args.ridge:
      scores = predictability(run, pairs, args.mc_samples)
      print('  held-out Spearman with d at the last step: '
            + ', '.join(f'{name} {rho:.3f}' for name, rho in scores.items()))
    if args.map_dir:
      out = pathlib.Path(args.map_dir)
      out.mkdir(parents=True, exist_ok=True)
      path = save_map(run, pathlib.Path(workdir).name, args.split, args.mc_samples, out)
      print(f'  wrote {path}')

if __name__ == '__main__':
  main()
