r"""Which fine-tuning recipe every arm uses, by validation Dice alone (docs/BENCHMARKS.md).

  python benchmarks/low_label_recipe.py runs/ll/ft250 runs/ll/ft1000 runs/ll/aug1000 ... \
      [--bases scratch,full,restoration] [--budget 1] [--arms_only]

Each folder is one `benchmarks/low_label.py` benchmark (a recipe at one fine-tuning length).
An arm `<base>_<recipe>` (`full_aug`) is `<base>` under `<recipe>`; `<base>` alone is under
today's recipe, `crops`. Each arm's length is the one its mean validation Dice picks
(`low_label_lengths.picked_length`); a recipe's score is the mean, over its arms, of the
validation Dice at those lengths. The adopted recipe is the best score among the recipes
that have every base arm, and one recipe serves every arm. Test Dice is never read.
Prints a table and the adopted recipe (`--arms_only`: its arms, comma-separated).
"""

import argparse
import pathlib
import sys
from typing import Any, Mapping, Sequence

import numpy as np

# Runnable as `python benchmarks/low_label_recipe.py` from anywhere, without PYTHONPATH.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import low_label_lengths as lengths  # noqa: E402
from benchmarks.low_label import RECIPES  # noqa: E402

TODAY = 'crops'  # Today's fine-tuning: random crops only.


def split_arm(arm: str, recipes: Sequence[str]) -> tuple[str, str]:
  """`full_aug` -> ('full', 'aug'); `full` -> ('full', 'crops')."""
  base, _, suffix = arm.rpartition('_')
  return (base, suffix) if base and suffix in recipes else (arm, TODAY)


def scores(runs: Sequence[Mapping[str, Any]], bases: Sequence[str], recipes: Sequence[str],
           budget: str) -> list[dict]:
  """A row per recipe: each base arm's picked length and validation Dice, and their mean."""
  by_recipe: dict[str, dict[str, list]] = {}
  for r in runs:
    base, recipe = split_arm(r['arm'], recipes)
    if r['budget'] == budget and base in bases and r.get('val_dice') is not None:
      by_recipe.setdefault(recipe, {}).setdefault(base, []).append(r)
  rows = []
  for recipe, arms in by_recipe.items():
    row = {'recipe': recipe, 'arms': {}}
    for base in bases:
      if base in arms:
        steps = lengths.picked_length(arms[base])
        val = np.mean([r['val_dice'] for r in arms[base] if r['finetune_steps'] == steps])
        row['arms'][base] = {'steps': steps, 'val_dice': float(val),
                             'runs': sum(r['finetune_steps'] == steps for r in arms[base])}
    complete = len(row['arms']) == len(bases)
    row['score'] = float(np.mean([a['val_dice'] for a in row['arms'].values()])) if complete \
        else None
    rows.append(row)
  return sorted(rows, key=lambda row: -1.0 if row['score'] is None else -row['score'])


def adopted(rows: Sequence[Mapping[str, Any]]) -> str | None:
  """The recipe with the best score (rows from `scores`), or None if none is complete."""
  complete = [row for row in rows if row['score'] is not None]
  return complete[0]['recipe'] if complete else None


def arm_name(base: str, recipe: str) -> str:
  return base if recipe == TODAY else f'{base}_{recipe}'


def markdown(rows: Sequence[Mapping[str, Any]], bases: Sequence[str]) -> str:
  lines = ['| recipe | ' + ' | '.join(f'{b}: val Dice @ picked steps' for b in bases)
           + ' | mean val Dice |', '| --- ' * (len(bases) + 2) + '|']
  for row in rows:
    cells = [f"{100 * a['val_dice']:.2f} @ {a['steps']} ({a['runs']} runs)"
             if (a := row['arms'].get(b)) else 'missing' for b in bases]
    score = 'incomplete' if row['score'] is None else f"{100 * row['score']:.2f}"
    lines.append(f"| {row['recipe']} | " + ' | '.join(cells) + f' | {score} |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('folders', nargs='+', help='low_label.py --out folders')
  parser.add_argument('--bases', default='scratch,full,restoration')
  parser.add_argument('--recipes', default=','.join(RECIPES),
                      help="recipe suffixes of low_label.py's arms")
  parser.add_argument('--budget', default='1')
  parser.add_argument('--arms_only', action='store_true',
                      help="print only the adopted recipe's arms, for scripts")
  args = parser.parse_args(argv)
  bases, recipes = args.bases.split(','), args.recipes.split(',')
  rows = scores(lengths.load_runs(args.folders), bases, recipes, args.budget)
  recipe = adopted(rows)
  if recipe is None:
    parser.error(f'no recipe has a finished run of every arm {bases} in {args.folders}')
  arms = ','.join(arm_name(b, recipe) for b in bases)
  if args.arms_only:
    print(arms)
    return
  print(markdown(rows, bases))
  print(f'Adopted: {recipe} (arms {arms})')


if __name__ == '__main__':
  main()
