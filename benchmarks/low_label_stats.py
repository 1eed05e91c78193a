"""The pure parts of the low-label benchmark (benchmarks/low_label.py): statistics, tables, plot.

Everything here reads run records (the `result.json` dicts the benchmark writes) or command
line tokens and returns numbers, Markdown or a figure, so it can be tested on hand-made
numbers without training anything.

A run record holds, besides its identity (`arm`, `budget`, `pretrain_seed`, `finetune_seed`),
`cases`: {test case id: {'dice': mean Dice over the organs of that case, 'hd95': mean HD95}},
computed by `case_means` from the per-case rows `evaluate.evaluate` writes to `metrics.json`,
and `organs`: {organ: {'dice': mean over cases, 'hd95': mean over cases}}.

The comparison with scratch is paired: arm A's Dice on test volume v after fine-tuning seed s
(and pre-training seed p) minus scratch's on the same volume after the same fine-tuning seed,
which also drew the same labelled volumes. The 95% interval of the mean difference is a
percentile bootstrap that resamples the volumes, the fine-tuning seeds and the pre-training
seeds independently (each with replacement), so it reflects both the choice of test volumes
and the run-to-run spread.
"""

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Status of a (case, organ) pair that `metrics.case_metrics` leaves out of every mean.
_EXCLUDED = 'excluded'


def case_means(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
  """Per case, the mean Dice and HD95 over its scored organs.

  This is the per-volume number MONAI's 'mean' reduction and `metrics.summarize` average
  (excluded pairs, where the organ is absent from both masks, count nowhere).

  Args:
    rows: per-case rows of `metrics.json` (`case_id`, `organ`, `dice`, `hd95`, `status`);
      NaN may be None, as the JSON writes it.

  Returns:
    {case_id: {'dice': float, 'hd95': float}} for every case with a scored organ.
  """
  return _means_by(rows, 'case_id')


def organ_means(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
  """Per organ, the mean Dice and HD95 over the cases where it was scored."""
  return _means_by(rows, 'organ')


def _means_by(rows: Iterable[Mapping[str, Any]], key: str) -> dict[str, dict[str, float]]:
  """Mean Dice and HD95 of the scored rows, grouped by `row[key]` (NaN HD95 written as None)."""
  acc: dict[str, dict[str, list[float]]] = {}
  for row in rows:
    if row['status'] == _EXCLUDED or row['dice'] is None:
      continue
    group = acc.setdefault(row[key], {'dice': [], 'hd95': []})
    group['dice'].append(float(row['dice']))
    group['hd95'].append(float('nan') if row['hd95'] is None else float(row['hd95']))
  return {name: {'dice': float(np.mean(v['dice'])), 'hd95': float(np.mean(v['hd95']))}
          for name, v in acc.items()}


def run_mean(record: Mapping[str, Any], metric: str = 'dice') -> float:
  """A run's test score: the mean over its test cases of the per-case mean."""
  return float(np.mean([c[metric] for c in record['cases'].values()]))


def paired_differences(arm_runs: Sequence[Mapping[str, Any]],
                       base_runs: Sequence[Mapping[str, Any]],
                       metric: str = 'dice') -> tuple[np.ndarray, dict[str, list]]:
  """Per-volume differences arm - baseline, paired by seeds and test case.

  Each arm run is paired with the baseline run of its fine-tuning seed: of its pre-training
  seed too when the baseline is pre-trained (`full` against its ablations), of any when it is
  not (scratch). Only seeds both have, and only test cases every run scored, are used, so
  every cell of the result is a true pair.

  Args:
    arm_runs: records of one arm and budget, any pre-training and fine-tuning seeds.
    base_runs: baseline records of the same budget, one per (pre-training, fine-tuning) seed.
    metric: 'dice' or 'hd95'.

  Returns:
    (d, axes): d `[P, S, V]` with d[p, s, v] = arm(p, s, v) - base(p or None, s, v), and
    axes {'pretrain_seeds', 'finetune_seeds', 'cases'} naming the rows of each axis.

  Raises:
    ValueError: a seed has two baseline runs or two arm runs, or nothing pairs.
  """
  def by_seeds(runs, what):
    table = {}
    for r in runs:
      key = (r.get('pretrain_seed'), r['finetune_seed'])
      if key in table:
        raise ValueError(f'two {what} runs with (pretrain seed, fine-tuning seed) {key}')
      table[key] = r['cases']
    return table
  base, arm = by_seeds(base_runs, 'baseline'), by_seeds(arm_runs, 'arm')
  pair = lambda p, s: base.get((p, s), base.get((None, s)))
  pseeds = sorted({p for p, s in arm if pair(p, s) is not None}, key=str)
  # Keep only the fine-tuning seeds paired for every pre-training seed, so the array is full.
  fseeds = sorted({s for p, s in arm if all(
      (q, s) in arm and pair(q, s) is not None for q in pseeds)}, key=str)
  if not fseeds or not pseeds:
    raise ValueError('no seed is shared by the arm and the baseline')
  tables = [t for p in pseeds for s in fseeds for t in (arm[(p, s)], pair(p, s))]
  cases = sorted(set.intersection(*(set(t) for t in tables)))
  if not cases:
    raise ValueError('no test case is scored by every run')
  d = np.array([[[arm[(p, s)][c][metric] - pair(p, s)[c][metric] for c in cases]
                 for s in fseeds] for p in pseeds], np.float64)
  return d, {'pretrain_seeds': pseeds, 'finetune_seeds': fseeds, 'cases': cases}


def bootstrap_mean_ci(d: np.ndarray, num_resamples: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
  """Mean of a `[P, S, V]` array of paired differences and its percentile bootstrap interval.

  Each resample draws P pre-training seeds, S fine-tuning seeds and V volumes with
  replacement, independently (a crossed design: every volume is scored after every seed), and
  takes the mean over the resampled cells. Drawing counts from a multinomial and weighting
  makes that one einsum for all resamples.

  Args:
    d: differences, axes (pre-training seed, fine-tuning seed, test volume). Use a leading
      axis of 1 when the arm has no pre-training seed.
    num_resamples: bootstrap resamples.
    level: coverage of the interval.
    seed: numpy seed of the resampling (the result is deterministic).

  Returns:
    {'mean', 'low', 'high', 'p_le_0'}: the observed mean difference, the interval bounds and
    the fraction of resampled means <= 0 (a one-sided bootstrap p-value for "arm > base").
  """
  d = np.asarray(d, np.float64)
  if d.ndim != 3 or not d.size:
    raise ValueError(f'expected a non-empty [P, S, V] array, got shape {d.shape}')
  if not np.all(np.isfinite(d)):
    raise ValueError('differences must be finite')
  rng = np.random.default_rng(seed)
  n_p, n_s, n_v = d.shape
  counts = [rng.multinomial(n, np.full(n, 1.0 / n), size=num_resamples).astype(np.float64)
            for n in (n_p, n_s, n_v)]
  means = np.einsum('bp,bs,bv,psv->b', *counts, d) / (n_p * n_s * n_v)
  alpha = (1.0 - level) / 2.0
  low, high = np.quantile(means, [alpha, 1.0 - alpha])
  return {'mean': float(d.mean()), 'low': float(low), 'high': float(high),
          'p_le_0': float(np.mean(means <= 0.0))}


def compare_to_baseline(arm_runs, base_runs, metric: str = 'dice', num_resamples: int = 10_000,
                        seed: int = 0) -> dict[str, Any]:
  """`paired_differences` + `bootstrap_mean_ci` + counts, as one table row."""
  d, axes = paired_differences(arm_runs, base_runs, metric)
  ci = bootstrap_mean_ci(d, num_resamples=num_resamples, seed=seed)
  return {**ci, 'wins': float(np.mean(d > 0)), 'n_pairs': int(d.size),
          'n_pretrain_seeds': len(axes['pretrain_seeds']),
          'n_finetune_seeds': len(axes['finetune_seeds']), 'n_cases': len(axes['cases'])}


def summarize_group(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean, std and seed range of the test Dice (and HD95), and per-organ means, of a group.

  The range is over runs (every pre-training and fine-tuning seed): the spread the plot shows.
  `val_dice_mean` is the mean of the runs' final validation Dice (None where not logged): the
  score a choice between arms may use, since choosing on the test Dice would tune on it.
  `moved_mean`: how far fine-tuning moved the backbone from its start (relative L2, mean).
  """
  dice = [run_mean(r, 'dice') for r in runs]
  val = [r['val_dice'] for r in runs if r.get('val_dice') is not None]
  moved = [r['backbone_moved'] for r in runs if r.get('backbone_moved') is not None]
  hd = [run_mean(r, 'hd95') for r in runs]
  organs: dict[str, dict[str, list[float]]] = {}
  for r in runs:
    for name, m in r['organs'].items():
      acc = organs.setdefault(name, {'dice': [], 'hd95': []})
      acc['dice'].append(m['dice'])
      acc['hd95'].append(m['hd95'])
  return {'runs': len(runs), 'dice_mean': float(np.mean(dice)), 'dice_std': float(np.std(dice)),
          'dice_min': float(np.min(dice)), 'dice_max': float(np.max(dice)),
          'hd95_mean': float(np.mean(hd)), 'hd95_std': float(np.std(hd)),
          'val_dice_mean': float(np.mean(val)) if len(val) == len(runs) else None,
          'moved_mean': float(np.mean(moved)) if len(moved) == len(runs) else None,
          'organs': {name: {k: float(np.mean(v)) for k, v in acc.items()}
                     for name, acc in organs.items()}}


def group_results(results: Sequence[Mapping[str, Any]], arms: Sequence[str],
                  budgets: Sequence[str], baseline: str, reference: str | None = None,
                  num_resamples: int = 10_000) -> dict[str, list[dict]]:
  """The tables of a benchmark from its run records.

  Args:
    results: fine-tuning and probe records (`kind` 'finetune' or 'probe').
    arms, budgets: the order of the rows.
    baseline: the arm every other arm is paired with (scratch).
    reference: a second arm every other pre-trained arm is paired with (the full method,
      against its ablations), or None.
    num_resamples: bootstrap resamples.

  Returns:
    {'summary': a `summarize_group` row per arm and budget, 'paired': a
    `compare_to_baseline` row per other arm, baseline, budget and metric ('dice', 'hd95'),
    'probe': a `summarize_group` row per probed arm and pre-training step}.
  """
  finetuned = [r for r in results if r['kind'] == 'finetune']
  summary, paired = [], []
  for base_arm in [baseline] + ([reference] if reference else []):
    for arm in arms:
      for budget in budgets:
        runs = [r for r in finetuned if r['arm'] == arm and r['budget'] == budget]
        if base_arm == baseline and runs:
          summary.append({'arm': arm, 'budget': budget, **summarize_group(runs)})
        base = [r for r in finetuned if r['arm'] == base_arm and r['budget'] == budget]
        if arm in (baseline, base_arm) or not runs or not base:
          continue
        if base_arm == reference and all(r.get('pretrain_seed') is None for r in runs):
          continue  # Not pre-trained (scratch_long): only the baseline comparison applies.
        for metric in ('dice', 'hd95'):
          paired.append({'arm': arm, 'budget': budget, 'metric': metric, 'baseline': base_arm,
                         **compare_to_baseline(runs, base, metric, num_resamples)})
  probes = []
  probe_runs = [r for r in results if r['kind'] == 'probe']
  for arm in dict.fromkeys(r['arm'] for r in probe_runs):
    for step in sorted({r['step'] for r in probe_runs if r['arm'] == arm}):
      runs = [r for r in probe_runs if r['arm'] == arm and r['step'] == step]
      # A probe of the baseline is a probe of random features (its step is 0).
      probes.append({'arm': 'random init' if arm == baseline else arm, 'step': step,
                     'budget': runs[0]['budget'], **summarize_group(runs)})
  return {'summary': summary, 'paired': paired, 'probe': probes}


def _pct(x: float) -> str:
  return 'n/a' if x is None or not math.isfinite(x) else f'{100 * x:.2f}'


def markdown_summary(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table: mean test Dice (seed range) and HD95 per arm and budget."""
  lines = ['| arm | budget | runs | test Dice % mean ± std | seed range | HD95 mm mean ± std '
           '| val Dice % | backbone moved |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    val, moved = r.get('val_dice_mean'), r.get('moved_mean')
    lines.append(f"| {r['arm']} | {r['budget']} | {r['runs']} | {_pct(r['dice_mean'])} ± "
                 f"{_pct(r['dice_std'])} | {_pct(r['dice_min'])} - {_pct(r['dice_max'])} | "
                 f"{r['hd95_mean']:.1f} ± {r['hd95_std']:.1f} | "
                 f"{'-' if val is None else _pct(val)} | "
                 f"{'-' if moved is None else f'{moved:.3f}'} |")
  return '\n'.join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table of `header` and `rows` (cells already formatted)."""
  lines = ['| ' + ' | '.join(header) + ' |', '| ' + ' | '.join('---' for _ in header) + ' |']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def markdown_pretrain_losses(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table: each pre-training's losses on their plateau (the last quarter of logged steps)."""
  names = list(dict.fromkeys(k for r in rows for k in r['losses']))
  return _table(['arm', 'pre-training seed', *names],
                [[r['arm'], r['pretrain_seed'],
                  *(f"{r['losses'][k]:.4f}" if k in r['losses'] else '-' for k in names)]
                 for r in rows])


def markdown_paired(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table: paired Dice difference against the baseline with its bootstrap interval."""
  lines = ['| arm | against | budget | Δ Dice (points) | 95% bootstrap CI | P(Δ ≤ 0) | '
           'pairs better | pairs (pre-train seeds x fine-tune seeds x volumes) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(f"| {r['arm']} | {r['baseline']} | {r['budget']} | {100 * r['mean']:+.2f} | "
                 f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}] | {r['p_le_0']:.3f} | "
                 f"{100 * r['wins']:.0f}% | {r['n_pairs']} ({r['n_pretrain_seeds']} x "
                 f"{r['n_finetune_seeds']} x {r['n_cases']}) |")
  return '\n'.join(lines)


def markdown_organs(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table: per-organ Dice % / HD95 mm per arm and budget (mean over runs and cases)."""
  organs = list(dict.fromkeys(name for r in rows for name in r['organs']))
  cell = lambda m: '' if m is None else f"{_pct(m['dice'])} / {m['hd95']:.1f}"
  return _table(['arm', 'budget', *organs],
                [[r['arm'], r['budget'], *(cell(r['organs'].get(n)) for n in organs)]
                 for r in rows])


def markdown_probe(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table: linear-probe test Dice of the frozen features per pre-training length."""
  lines = ['| features | pre-training step | runs | probe test Dice % | HD95 mm |',
           '| --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(f"| {r['arm']} | {r['step']} | {r['runs']} | {_pct(r['dice_mean'])} | "
                 f"{r['hd95_mean']:.1f} |")
  return '\n'.join(lines)


def plot_dice_vs_budget(rows: Sequence[Mapping[str, Any]], budgets: Sequence[str], path: str,
                        title: str = '', labels: Mapping[str, str] | None = None) -> None:
  """Mean test Dice against label budget per arm, seed min-max range as error bars and band.

  Budgets are categories in the given order (fewest labels first), since slice budgets and
  volume counts share no numeric scale.

  Args:
    rows: `summarize_group` rows with `arm` and `budget`.
    budgets: budget names, in plotting order.
    path: PNG to write.
    title: figure title.
    labels: tick label per budget name (default: the name).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  arms = list(dict.fromkeys(r['arm'] for r in rows))
  fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(budgets) + 3), 4.2))
  width = 0.3 / max(len(arms), 1)
  for i, arm in enumerate(arms):
    by_budget = {r['budget']: r for r in rows if r['arm'] == arm}
    xs = [j for j, b in enumerate(budgets) if b in by_budget]
    if not xs:
      continue
    shift = (i - (len(arms) - 1) / 2) * width
    mean = np.array([100 * by_budget[budgets[j]]['dice_mean'] for j in xs])
    low = np.array([100 * by_budget[budgets[j]]['dice_min'] for j in xs])
    high = np.array([100 * by_budget[budgets[j]]['dice_max'] for j in xs])
    x = np.array(xs, np.float64) + shift
    line = ax.errorbar(x, mean, yerr=[mean - low, high - mean], marker='o', capsize=3,
                       label=arm)
    if len(xs) > 1:
      ax.fill_between(x, low, high, alpha=0.12, color=line[0].get_color())
  ax.set_xticks(range(len(budgets)), [(labels or {}).get(b, b) for b in budgets])
  ax.set_xlim(-0.5, len(budgets) - 0.5)
  ax.set_xlabel('label budget (N volumes; sK: K slices of one volume)')
  ax.set_ylabel('test Dice % (bars: seed min-max)')
  if title:
    ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_budget(token: str) -> dict:
  """'N' (labelled volumes), 'all' (train_100) or 'sK' (K slices of one volume) as fields.

  Returns:
    {'name', 'label_fraction', 'label_count', 'label_slices', 'order'}; `order` sorts budgets
    from the fewest labels to the most.
  """
  token = token.strip().lower()
  if token == 'all':
    return {'name': 'all', 'label_fraction': 1.0, 'label_count': 0, 'label_slices': 0,
            'order': (2, 0)}
  try:
    if token.startswith('s'):
      k = int(token[1:])
      if k >= 1:
        return {'name': f's{k}', 'label_fraction': 1.0, 'label_count': 1, 'label_slices': k,
                'order': (0, k)}
    else:
      n = int(token)
      if n >= 1:
        return {'name': str(n), 'label_fraction': 1.0, 'label_count': n, 'label_slices': 0,
                'order': (1, n)}
  except ValueError:
    pass
  raise ValueError(f'budget {token!r}: use N (labelled volumes), all, or sK (K slices)')


def probe_steps(num_steps: int, fractions) -> list[int]:
  """The pre-training steps the probes read: round(f * num_steps), at least 1, distinct."""
  return sorted({max(1, int(round(f * num_steps))) for f in fractions})


def format_seconds(seconds: float) -> str:
  """'1h02m' or '3m05s'."""
  seconds = int(round(seconds))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else (
      f'{seconds // 60}m{seconds % 60:02d}s')


def estimate_remaining(remaining: Sequence[Mapping[str, Any]],
                       timed: Mapping[str, Sequence[float]]) -> float | None:
  """Seconds left: the mean time of each job kind so far (of all kinds where none ran yet)."""
  every = [t for ts in timed.values() for t in ts]
  if not every:
    return None
  mean_all = sum(every) / len(every)
  return sum((sum(timed[j['kind']]) / len(timed[j['kind']])) if timed.get(j['kind'])
             else mean_all for j in remaining)


def report_markdown(report: Mapping[str, Any]) -> str:
  """results.md: the header line and every table of a `low_label.aggregate` report."""
  h, s = report['header'], report['settings']
  lines = [
      '# Low-label benchmark', '',
      f"{h['date']}, {h['host']}, {h['devices']} ({h['platform']}), jax {h['jax']}; "
      f"store {h['store']} (train_100 {h['train_100']} cases, test {h['test']})"
      + (f", phantom family {h['phantom_family']}" if h['phantom_family'] else '') + '; '
      f"{s['ndim']}-D patches {s['data']['data.patch_size']}, presets {s['presets']}; "
      f"pre-training {s['pretrain_steps']} steps (batch {s['pretrain_batch']}), fine-tuning "
      f"{s['finetune_steps']} steps (batch {s['finetune_batch']}, lr {s['finetune_lr']}); "
      f"pre-training seeds {h['pretrain_seeds']}, fine-tuning seeds {h['finetune_seeds']}"
      + ('; QUICK (smoke run, numbers meaningless)' if s['quick'] else '')
      + f"; {h['seconds_this_invocation']:.0f} s this invocation.", '',
      '## Test Dice per arm and label budget', '',
      markdown_summary(report['summary']), '',
      '## Paired differences (same fine-tuning seed, same labelled volumes, same test '
      'volumes; against a pre-trained arm also the same pre-training seed)', '',
      f"Mean per-volume difference, 95% percentile bootstrap interval ({h['bootstrap_resamples']}"
      ' resamples of volumes, fine-tuning seeds and pre-training seeds).', '',
      markdown_paired([r for r in report['paired'] if r['metric'] == 'dice']), '',
      '## Per organ: Dice % / HD95 mm', '',
      markdown_organs(report['summary']), '']
  if report.get('pretrain_losses'):
    lines += ['## Pre-training losses on their plateau (mean of the last quarter of logged '
              'steps; a term that is off is left out)', '',
              markdown_pretrain_losses(report['pretrain_losses']), '']
  if report['probe']:
    lines += ['## Linear probe of the frozen features, by pre-training length', '',
              f"Budget {report['probe'][0]['budget']}, {s['probe_steps']} probe steps.", '',
              markdown_probe(report['probe']), '']
  return '\n'.join(lines)
