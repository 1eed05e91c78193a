r"""Pre-training's gain against fine-tuning length, from low-label benchmarks of several lengths.

  python benchmarks/low_label_lengths.py runs/ll/ft250 runs/ll/ft1000 [--baseline scratch] \
      [--budget 1] [--out runs/ll/lengths]

Each folder is one `benchmarks/low_label.py --finetune_steps N` benchmark on the same store and
seeds (they may share pre-trainings through `--pretrain_dir`). Two readings of each arm against
the baseline (paired by labelled case and test volume, 95% bootstrap interval):
- at equal fine-tuning compute: the arm and the baseline at the same length;
- at the picked length: each arm, the baseline included, at the length its own mean
  validation Dice picks (never the test Dice), and the steps the arm needs to reach the
  baseline's best test Dice.
Writes OUT/lengths.md, OUT/lengths.json and OUT/dice_vs_steps.png.
"""

import argparse
import json
import pathlib
import sys
from typing import Any, Mapping, Sequence

import numpy as np

# Runnable as `python benchmarks/low_label_lengths.py` from anywhere, without PYTHONPATH.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import low_label_stats as stats  # noqa: E402


def load_runs(folders: Sequence[str]) -> list[dict]:
  """The scored fine-tuning records of the folders (each run's result.json)."""
  runs = []
  for folder in folders:
    for path in sorted(pathlib.Path(folder).glob('finetune/*/result.json')):
      runs.append(json.loads(path.read_text()))
  return runs


def picked_length(runs: Sequence[Mapping[str, Any]]) -> int | None:
  """The fine-tuning length with the best mean validation Dice (ties: the shorter)."""
  by_length = {}
  for r in runs:
    if r.get('val_dice') is not None:
      by_length.setdefault(r['finetune_steps'], []).append(r['val_dice'])
  if not by_length:
    return None
  return max(sorted(by_length), key=lambda n: np.mean(by_length[n]))


def _mean_dice(runs) -> float:
  return float(np.mean([r['dice'] for r in runs]))


def compare(runs: Sequence[Mapping[str, Any]], baseline: str, budget: str,
            num_resamples: int = 10_000) -> dict[str, list[dict]]:
  """Both readings of every arm against `baseline` at `budget`.

  Returns:
    {'lengths': a row per arm and length (mean val and test Dice, and the paired difference
    against the baseline at that length), 'picked': a row per arm (its picked length, its test
    Dice there, the paired difference against the baseline at the baseline's picked length,
    and the shortest length at which it reaches the baseline's best mean test Dice)}.
  """
  runs = [r for r in runs if r['budget'] == budget]
  arms = list(dict.fromkeys(r['arm'] for r in runs))
  group = lambda arm, n: [r for r in runs if r['arm'] == arm and r['finetune_steps'] == n]
  lengths = sorted({r['finetune_steps'] for r in runs})
  rows = []
  for arm in arms:
    for n in lengths:
      mine, base = group(arm, n), group(baseline, n)
      if not mine:
        continue
      row = {'arm': arm, 'steps': n, 'dice': _mean_dice(mine), 'n': len(mine),
             'val_dice': float(np.mean([r['val_dice'] for r in mine]))}
      if arm != baseline and base:
        row['vs_baseline'] = stats.compare_to_baseline(mine, base, 'dice', num_resamples)
      rows.append(row)
  base_steps = picked_length([r for r in runs if r['arm'] == baseline])
  base_best = max((row['dice'] for row in rows if row['arm'] == baseline), default=None)
  picked = []
  for arm in arms:
    steps = picked_length([r for r in runs if r['arm'] == arm])
    row = {'arm': arm, 'steps': steps, 'dice': _mean_dice(group(arm, steps))}
    if arm != baseline and base_steps is not None:
      row['vs_baseline'] = stats.compare_to_baseline(group(arm, steps), group(baseline, base_steps),
                                                     'dice', num_resamples)
    row['steps_to_baseline_best'] = next(
        (n for n in lengths if group(arm, n) and base_best is not None
         and _mean_dice(group(arm, n)) >= base_best), None)
    picked.append(row)
  return {'lengths': rows, 'picked': picked, 'baseline': baseline,
          'baseline_steps': base_steps, 'budget': budget}


def _difference(row) -> str:
  d = row.get('vs_baseline')
  if not d:
    return ''
  return f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"


def markdown(result: Mapping[str, Any]) -> str:
  base = result['baseline']
  lines = [f"Budget {result['budget']}; baseline `{base}` (its validation Dice picks "
           f"{result['baseline_steps']} steps).", '',
           f'| arm | fine-tuning steps | val Dice | test Dice | vs {base} at equal steps |',
           '| --- | --- | --- | --- | --- |']
  for row in result['lengths']:
    lines.append(f"| {row['arm']} | {row['steps']} | {100 * row['val_dice']:.2f} | "
                 f"{100 * row['dice']:.2f} | {_difference(row)} |")
  lines += ['', f'| arm | picked steps (val) | test Dice | vs {base} at its picked steps | '
                f'steps to reach {base}\'s best |', '| --- | --- | --- | --- | --- |']
  for row in result['picked']:
    lines.append(f"| {row['arm']} | {row['steps']} | {100 * row['dice']:.2f} | "
                 f"{_difference(row)} | {row['steps_to_baseline_best'] or 'not reached'} |")
  return '\n'.join(lines) + '\n'


def plot(result: Mapping[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for arm in dict.fromkeys(row['arm'] for row in result['lengths']):
    rows = [row for row in result['lengths'] if row['arm'] == arm]
    ax.plot([row['steps'] for row in rows], [100 * row['dice'] for row in rows], 'o-',
            label=arm)
  ax.set_xscale('log')
  ax.set_xlabel('fine-tuning steps')
  ax.set_ylabel('mean test Dice (%)')
  ax.set_title(f"budget {result['budget']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('folders', nargs='+', help='low_label.py --out folders, one per length')
  parser.add_argument('--baseline', default='scratch')
  parser.add_argument('--budget', default='1')
  parser.add_argument('--out', default=None, help='default: beside the first folder')
  args = parser.parse_args(argv)
  runs = load_runs(args.folders)
  if not any(r['arm'] == args.baseline for r in runs):
    parser.error(f'no finished {args.baseline} run in {args.folders}')
  result = compare(runs, args.baseline, args.budget)
  out = pathlib.Path(args.out or pathlib.Path(args.folders[0]).parent / 'lengths')
  out.mkdir(parents=True, exist_ok=True)
  text = markdown(result)
  (out / 'lengths.md').write_text(text)
  (out / 'lengths.json').write_text(json.dumps(result, indent=1))
  plot(result, str(out / 'dice_vs_steps.png'))
  print(text)
  print(f'Wrote {out}/lengths.md, lengths.json and dice_vs_steps.png')


if __name__ == '__main__':
  main()
