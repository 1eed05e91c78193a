r"""Does the MC-dropout uncertainty predict the pixel discrepancy on held-out cases?

  python benchmarks/uncertainty_agreement.py WORKDIR [WORKDIR ...] [--split val] [--pairs 4] \
      [--map_dir DIR]

For every checkpoint of each pre-training workdir: Spearman(u, d) over the matched cells of
`--pairs` augmented view pairs per case of `--split` (outside the `pretrain` split by default),
with the student's stabilizer (`analysis.uncertainty_agreement`). With `--map_dir`, also the
whole-slice uncertainty map of the split's first case (middle axial slice) at the last
checkpoint, as DIR/uncertainty_map_<workdir name>.png. Numbers in docs/BENCHMARKS.md.
"""

import argparse
import pathlib
import sys

# Runnable as `python benchmarks/uncertainty_agreement.py` from anywhere, without PYTHONPATH.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pixssl_jax import analysis  # noqa: E402


def agreement_by_step(workdir: str, split: str, pairs: int) -> list[tuple[int, float, int]]:
  """(step, pooled Spearman(u, d), matched cells) for every checkpoint of `workdir`."""
  rows = []
  for step in analysis.available_steps(workdir):
    run = analysis.load_run(workdir, step=step, which='student')
    cases = run.store().split(split)
    result = analysis.uncertainty_agreement(
        [analysis.analyse_view_pair(run, case, seed=seed, augment=True, min_body_fraction=0.3)
         for case in cases for seed in range(pairs)])
    rows.append((step, result.spearman, result.cells))
  return rows


def save_map(workdir: str, split: str, out_dir: pathlib.Path) -> pathlib.Path:
  run = analysis.load_run(workdir, which='student')
  case = run.store().split(split)[0]
  volume = analysis.load_volume(run, case)
  z = volume.image.shape[2] // 2
  u = analysis.volume_uncertainty(run, volume, slices=[z], patch_size=(64, 64), overlap=0.25,
                                  batch_size=16)
  figure = analysis.plot_uncertainty(volume.image[:, :, z], u[:, :, 0],
                                     spacing=volume.spacing[:2],
                                     title=f'{pathlib.Path(workdir).name} step {run.step}, {case}')
  path = out_dir / f'uncertainty_map_{pathlib.Path(workdir).name}.png'
  figure.savefig(path, dpi=80)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='pre-training workdirs')
  parser.add_argument('--split', default='val')
  parser.add_argument('--pairs', type=int, default=4, help='view pairs per case')
  parser.add_argument('--map_dir', default=None)
  args = parser.parse_args(argv)
  for workdir in args.workdirs:
    rows = agreement_by_step(workdir, args.split, args.pairs)
    print(f'{workdir}: held-out Spearman(u, d) by step: ' + ', '.join(
        f'{step}: {rho:.3f}' for step, rho, _ in rows) + f' ({rows[-1][2]} matched cells)')
    if args.map_dir:
      out = pathlib.Path(args.map_dir)
      out.mkdir(parents=True, exist_ok=True)
      print(f'  wrote {save_map(workdir, args.split, out)}')


if __name__ == '__main__':
  main()
