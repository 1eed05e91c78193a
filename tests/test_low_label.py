"""benchmarks/low_label.py: its statistics on hand-made numbers, and one end-to-end --quick run."""

import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from benchmarks import low_label_stats as stats
from pixssl_jax import config_files
from pixssl_jax.data import pipeline
from pixssl_jax.train import config_checks
from pixssl_jax.train import finetune

REPO = pathlib.Path(__file__).resolve().parents[1]


def _record(arm, fseed, dice_by_case, pseed=None, budget='1'):
  return {'kind': 'finetune', 'arm': arm, 'budget': budget, 'pretrain_seed': pseed,
          'finetune_seed': fseed,
          'cases': {c: {'dice': d, 'hd95': 10.0 * (1 - d)} for c, d in dice_by_case.items()},
          'organs': {'liver': {'dice': float(np.mean(list(dice_by_case.values()))),
                               'hd95': 5.0}}}


def _runs(rng, seeds=(0, 1, 2), cases=('a', 'b', 'c', 'd'), shift=0.0, arm='scratch',
          pseed=None):
  return [_record(arm, s, {c: float(rng.uniform(0.5, 0.9)) + shift for c in cases}, pseed)
          for s in seeds]


def test_case_means_average_the_scored_organs_and_skip_excluded_ones():
  rows = [
      {'case_id': 'a', 'organ': 'liver', 'dice': 0.8, 'hd95': 4.0, 'status': 'ok'},
      {'case_id': 'a', 'organ': 'spleen', 'dice': 0.0, 'hd95': 300.0, 'status': 'failure'},
      {'case_id': 'a', 'organ': 'aorta', 'dice': None, 'hd95': None, 'status': 'excluded'},
      {'case_id': 'b', 'organ': 'liver', 'dice': 0.6, 'hd95': 8.0, 'status': 'ok'},
  ]
  assert stats.case_means(rows) == {'a': {'dice': 0.4, 'hd95': 152.0},
                                    'b': {'dice': 0.6, 'hd95': 8.0}}
  organs = stats.organ_means(rows)
  assert organs['liver'] == {'dice': pytest.approx(0.7), 'hd95': pytest.approx(6.0)}
  assert 'aorta' not in organs


def test_bootstrap_of_a_constant_shift_is_exactly_the_shift():
  d = np.full((1, 3, 8), 0.04)
  ci = stats.bootstrap_mean_ci(d, num_resamples=2000)
  assert ci['mean'] == pytest.approx(0.04)
  assert ci['low'] == pytest.approx(0.04) and ci['high'] == pytest.approx(0.04)
  assert ci['p_le_0'] == 0.0


def test_bootstrap_interval_is_centred_and_covers_the_true_mean():
  rng = np.random.default_rng(0)
  d = 0.03 + rng.normal(0.0, 0.02, size=(1, 1, 120))
  ci = stats.bootstrap_mean_ci(d, num_resamples=10_000, seed=1)
  assert ci['low'] < 0.03 < ci['high']
  assert ci['low'] < ci['mean'] < ci['high']
  # Percentile interval of a mean of 120 normal values: nearly symmetric, and about 1.96
  # standard errors either side.
  assert (ci['high'] - ci['mean']) == pytest.approx(ci['mean'] - ci['low'], rel=0.2)
  se = d.std() / np.sqrt(d.size)
  assert (ci['high'] - ci['low']) / 2 == pytest.approx(1.96 * se, rel=0.1)
  # The same 120 cells as 3 seeds x 40 volumes: resampling both axes is conservative.
  crossed = stats.bootstrap_mean_ci(d.reshape(1, 3, 40), seed=1)
  assert crossed['mean'] == pytest.approx(ci['mean'])
  assert crossed['high'] - crossed['low'] > ci['high'] - ci['low']


def test_bootstrap_is_seeded_and_resamples_seeds_too():
  rng = np.random.default_rng(3)
  # Volumes agree within a seed, seeds disagree: only resampling seeds makes the interval wide.
  d = np.repeat(np.array([0.0, 0.05, 0.10])[None, :, None], 10, axis=2)
  d = d + rng.normal(0.0, 1e-4, size=d.shape)
  a = stats.bootstrap_mean_ci(d, seed=5)
  assert a == stats.bootstrap_mean_ci(d, seed=5)
  assert a['high'] - a['low'] > 0.05
  with pytest.raises(ValueError):
    stats.bootstrap_mean_ci(np.zeros((3, 10)))


def test_paired_differences_pair_by_seed_and_volume_not_by_order():
  rng = np.random.default_rng(0)
  base = _runs(rng)
  arm = [_record('full', r['finetune_seed'],
                 {c: v['dice'] + 0.01 * (i + 1) for c, v in r['cases'].items()}, pseed=0)
         for i, r in enumerate(base)]
  # Shuffle both the run order and the case order of one run.
  arm = arm[::-1]
  arm[0]['cases'] = dict(reversed(list(arm[0]['cases'].items())))
  d, axes = stats.paired_differences(arm, base)
  assert d.shape == (1, 3, 4)
  assert axes['finetune_seeds'] == [0, 1, 2] and axes['cases'] == ['a', 'b', 'c', 'd']
  np.testing.assert_allclose(d[0], np.array([[0.01] * 4, [0.02] * 4, [0.03] * 4]))


def test_paired_differences_use_only_shared_seeds_and_cases():
  rng = np.random.default_rng(1)
  base = _runs(rng, seeds=(0, 1, 2))
  arm = _runs(rng, seeds=(1, 2, 3), arm='full', pseed=0)
  del arm[0]['cases']['d']  # Seed 1 of the arm did not score case d.
  d, axes = stats.paired_differences(arm, base)
  assert axes['finetune_seeds'] == [1, 2] and axes['cases'] == ['a', 'b', 'c']
  assert d.shape == (1, 2, 3)
  with pytest.raises(ValueError):
    stats.paired_differences(arm, base[:1])  # Seed 0 only: nothing pairs.


def test_pretrain_seeds_are_an_axis_and_each_pairs_with_the_same_scratch_run():
  rng = np.random.default_rng(2)
  base = _runs(rng, seeds=(0, 1))
  arm = []
  for p, shift in ((0, 0.1), (1, 0.3)):
    arm += [_record('full', r['finetune_seed'],
                    {c: v['dice'] + shift for c, v in r['cases'].items()}, pseed=p)
            for r in base]
  d, axes = stats.paired_differences(arm, base)
  assert axes['pretrain_seeds'] == [0, 1] and d.shape == (2, 2, 4)
  np.testing.assert_allclose(d[0], 0.1)
  np.testing.assert_allclose(d[1], 0.3)
  row = stats.compare_to_baseline(arm, base, num_resamples=2000)
  assert row['mean'] == pytest.approx(0.2)
  assert row['low'] == pytest.approx(0.1) and row['high'] == pytest.approx(0.3)
  assert row['n_pairs'] == 16 and row['wins'] == 1.0


def test_a_pretrained_baseline_pairs_by_pretraining_seed_too():
  rng = np.random.default_rng(3)
  scratch = _runs(rng, seeds=(0, 1))
  full = [_record('full', r['finetune_seed'], {c: v['dice'] + 0.1 * (1 + p)
                                               for c, v in r['cases'].items()}, pseed=p)
          for p in (0, 1) for r in scratch]
  ablation = [_record('pixel_only', r['finetune_seed'],
                      {c: v['dice'] - 0.05 for c, v in r['cases'].items()},
                      pseed=r['pretrain_seed']) for r in full]
  d, axes = stats.paired_differences(ablation, full)
  assert axes['pretrain_seeds'] == [0, 1] and d.shape == (2, 2, 4)
  np.testing.assert_allclose(d, -0.05)  # Each with the full run of its own seeds.


def test_group_results_and_markdown():
  rng = np.random.default_rng(4)
  base = _runs(rng)
  arm = [_record('full', r['finetune_seed'],
                 {c: v['dice'] + 0.05 for c, v in r['cases'].items()}, pseed=0) for r in base]
  ablation = [_record('global_only', r['finetune_seed'],
                      {c: v['dice'] - 0.02 for c, v in r['cases'].items()}, pseed=0) for r in arm]
  longer = [_record('scratch_long', r['finetune_seed'], {c: v['dice'] for c, v in r['cases'].items()})
            for r in base]
  probe = [{**_record('full', 0, {'a': 0.3}, pseed=0), 'kind': 'probe', 'step': 2},
           {**_record('scratch', 0, {'a': 0.2}), 'kind': 'probe', 'step': 0}]
  tables = stats.group_results(base + arm + ablation + longer + probe,
                               ['scratch', 'scratch_long', 'full', 'global_only'], ['1'],
                               'scratch', 'full', num_resamples=500)
  assert [(r['arm'], r['runs']) for r in tables['summary']] == [
      ('scratch', 3), ('scratch_long', 3), ('full', 3), ('global_only', 3)]
  dice = {(r['arm'], r['baseline']): r for r in tables['paired'] if r['metric'] == 'dice'}
  # Scratch_long is not pre-trained: it is paired with scratch only.
  assert sorted(dice) == [('full', 'scratch'), ('global_only', 'full'),
                          ('global_only', 'scratch'), ('scratch_long', 'scratch')]
  assert dice[('full', 'scratch')]['mean'] == pytest.approx(0.05)
  assert dice[('full', 'scratch')]['low'] == pytest.approx(0.05)
  assert dice[('global_only', 'full')]['mean'] == pytest.approx(-0.02)
  assert dice[('global_only', 'scratch')]['mean'] == pytest.approx(0.03)
  full = tables['summary'][2]
  assert full['dice_min'] <= full['dice_mean'] <= full['dice_max']
  assert {r['arm'] for r in tables['probe']} == {'full', 'random init'}
  table = stats.markdown_paired(tables['paired'])
  assert '| full | scratch | 1 | +5.00 | [+5.00, +5.00]' in table
  assert '| global_only | full | 1 | -2.00 | [-2.00, -2.00]' in table
  assert 'liver' in stats.markdown_organs(tables['summary'])


def test_budgets_probe_steps_and_eta():
  assert stats.parse_budget('all')['label_fraction'] == 1.0
  assert stats.parse_budget('4')['label_count'] == 4
  s8 = stats.parse_budget('s8')
  assert (s8['label_count'], s8['label_slices']) == (1, 8)
  names = [b['name'] for b in sorted(map(stats.parse_budget, ['all', '2', 's4', '1']),
                                     key=lambda b: b['order'])]
  assert names == ['s4', '1', '2', 'all']
  for bad in ('0', 's0', 'x', 'half'):
    with pytest.raises(ValueError):
      stats.parse_budget(bad)
  assert stats.probe_steps(300, [0.25, 0.5, 1]) == [75, 150, 300]
  assert stats.probe_steps(4, [0.1, 1]) == [1, 4]
  timed = {'pretrain': [100.0], 'finetune': [10.0, 30.0]}
  jobs = [{'kind': 'finetune'}, {'kind': 'probe'}, {'kind': 'pretrain'}]
  # finetune 20 + probe (no time yet: the mean of all, 140 / 3) + pretrain 100.
  assert stats.estimate_remaining(jobs, timed) == pytest.approx(20 + 140 / 3 + 100)
  assert stats.estimate_remaining(jobs, {}) is None
  assert stats.format_seconds(3725) == '1h02m' and stats.format_seconds(65) == '1m05s'


def test_labelled_slices_are_spread_over_the_foreground_and_crops_stay_on_them():
  label = np.zeros((8, 8, 40), np.int32)
  label[2:6, 2:6, 10:30] = 1
  z = pipeline.labelled_slice_indices(label, 4)
  np.testing.assert_array_equal(z, [12, 17, 22, 27])
  assert len(pipeline.labelled_slice_indices(label, 100)) == 20

  class Store:
    hu_window = (-100.0, 200.0)

    def image(self, case_id):
      return np.zeros((8, 8, 40), np.float32) + np.arange(40, dtype=np.float32)

    def label(self, case_id):
      return label

  crop = pipeline.LabelledCrop(Store(), (8, 8), foreground_prob=0.5, flip=False,
                               label_slices=4)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(60):
    out = crop.random_map('a', rng)
    # The image encodes z (scale_hu maps it linearly into [0, 1]); the centre is never padding.
    seen.add(int(round(float(out['image'][4, 4, 0]) * 300.0 - 100.0)))
  assert seen <= set(z.tolist()) and len(seen) > 1
  with pytest.raises(ValueError, match='2-D'):
    pipeline.LabelledCrop(Store(), (8, 8, 8), 0.5, False, label_slices=4)


def test_label_split_draws_label_count_cases_nested_across_counts():
  class Store:
    def split(self, name):
      return {'train_100': [f'c{i}' for i in range(10)], 'train_10': ['c3']}[name]

  store = Store()
  one, two, four = (finetune.label_split(store, 0.1, seed=5, count=n)[1] for n in (1, 2, 4))
  assert len(one) == 1 and len(two) == 2 and len(four) == 4
  assert set(one) <= set(two) <= set(four)
  assert finetune.label_split(store, 0.1, seed=6, count=4)[1] != four
  assert finetune.label_split(store, 0.1, seed=5, count=99)[1] == store.split('train_100')
  # Without a count, label_fraction as before: 0.1 is prepare's split.
  assert finetune.label_split(store, 0.1, seed=5) == ("split 'train_10'", ['c3'])


def test_seeds_that_draw_the_same_labelled_cases_are_named():
  from benchmarks import low_label

  class Store:
    def split(self, name):
      return [f'c{i}' for i in range(10)]

  seeds = list(range(8))
  first = {seed: finetune.label_split(Store(), 1.0, seed, count=1)[1] for seed in seeds}
  repeats = [s for s in seeds if list(first.values()).count(first[s]) > 1]
  bench = types.SimpleNamespace(store=Store(), args=types.SimpleNamespace(
      finetune_seeds=seeds, budgets=[stats.parse_budget('1'), stats.parse_budget('all')]))
  notes = low_label.Benchmark.repeated_label_sets(bench)
  # Budget 'all' is the same set for every seed; at budget 1, ten cases for eight seeds.
  assert any(n.startswith(f'fine-tuning seeds {", ".join(map(str, seeds))} draw the same')
             and 'budget all' in n for n in notes)
  named = {int(s) for n in notes if 'budget 1 ' in n
           for s in n.split(' draw')[0].removeprefix('fine-tuning seeds ').split(', ')}
  assert named == set(repeats)


def test_every_arm_sets_existing_fields_to_values_the_config_checks_accept():
  from benchmarks import low_label
  for name, arm in low_label.ARMS.items():
    pre = low_label.override(config_files.load('pretrain', 'demo'), arm.pretrain or {})
    ft = low_label.override(config_files.load('finetune', 'demo'), arm.finetune)
    ft.init = 'scratch'
    problems = (config_checks.pretrain_config_problems(pre, device_count=1, process_count=1)
                + config_checks.finetune_config_problems(ft, device_count=1, process_count=1))
    assert not problems, (name, problems)
    assert arm.pretrained_as is None or arm.pretrained_as in low_label.ARMS, name
  with pytest.raises(KeyError, match='method.tua is not a config field'):
    low_label.override(config_files.load('pretrain', 'demo'), {'method.tua': 3.0})


@pytest.fixture(scope='module')
def tiny_store(tmp_path_factory):
  root = tmp_path_factory.mktemp('low_label')
  raw, store = root / 'raw', root / 'store'
  env = _env()
  subprocess.run([sys.executable, '-m', 'pixssl_jax.data.phantoms', '--out', str(raw),
                  '--num_cases', '8', '--shape_scale', '0.4'], check=True, env=env, timeout=300,
                 cwd=REPO, capture_output=True)
  subprocess.run([sys.executable, '-m', 'pixssl_jax.data.prepare', '--raw_dir', str(raw),
                  '--data_dir', str(store), '--spacing', '6,6,8', '--quiet'], check=True,
                 env=env, timeout=300, cwd=REPO, capture_output=True)
  return store


def _env():
  env = dict(os.environ)
  # One CPU device, as a user runs it (the suite simulates 8), and the repo importable.
  env.pop('XLA_FLAGS', None)
  env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
  return env


def test_quick_run_end_to_end_in_2d(tiny_store, tmp_path):
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, 'benchmarks/low_label.py', '--data_dir', str(tiny_store), '--quick',
       '--out', str(out)], cwd=REPO, env=_env(), timeout=600, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert '[5/5]' in proc.stdout and 'ETA' in proc.stdout
  report = json.loads((out / 'results.json').read_text())
  assert {'header', 'settings', 'summary', 'paired', 'probe', 'runs'} <= set(report)
  assert [(r['arm'], r['budget']) for r in report['summary']] == [('scratch', '1'),
                                                                  ('full', '1')]
  paired = next(r for r in report['paired'] if r['metric'] == 'dice')
  assert paired['arm'] == 'full' and paired['low'] <= paired['mean'] <= paired['high']
  assert paired['n_cases'] == len(report['runs'][0]['cases']) == 2
  assert [r['step'] for r in report['probe']] == [2, 4]
  for run in report['runs']:
    assert 0.0 <= run['dice'] <= 1.0 and run['organs'] and run['labelled']['cases']
    # Fine-tuning moves every arm's backbone from its start; a probe's stays frozen.
    assert (run['backbone_moved'] > 0.0) == (run['kind'] == 'finetune'), run['kind']
  [plateau] = report['pretrain_losses']
  assert plateau['arm'] == 'full' and {'loss_global', 'loss_pixel'} <= set(plateau['losses'])
  assert 'loss_restoration' not in plateau['losses']  # Off in `full`.
  table = (out / 'results.md').read_text()
  assert '| backbone moved |' in table and '## Pre-training losses on their plateau' in table
  assert '| scratch | 1 | 1 |' in table and 'bootstrap' in table
  assert (out / 'dice_vs_budget.png').stat().st_size > 1000
  # Run again with one more arm and --report_only: the finished runs are skipped and reported,
  # the new arm's runs are listed as not run.
  report_only = subprocess.run(
      [sys.executable, 'benchmarks/low_label.py', '--data_dir', str(tiny_store), '--quick',
       '--arms', 'scratch,full,global_only', '--report_only', '--out', str(out)], cwd=REPO,
      env=_env(), timeout=300, capture_output=True, text=True)
  assert report_only.returncode == 0, report_only.stderr[-3000:]
  assert report_only.stdout.count('done before, skipped') == 5
  assert report_only.stdout.count('not run (--report_only)') == 2  # Pre-training, fine-tuning.
  assert not (out / 'pretrain' / 'global_only_p0').exists()
  report = json.loads((out / 'results.json').read_text())
  assert [r['arm'] for r in report['summary']] == ['scratch', 'full']


def test_loss_plateau_is_the_last_quarter_of_logged_steps(tmp_path):
  from benchmarks import low_label
  rows = [{'step': 10 * i, 'train/loss': 1.0, 'train/loss_pixel': float(i),
           'train/loss_restoration': 0.0} for i in range(1, 9)]
  rows.insert(3, {'step': 35, 'val/dice': 0.5})  # Not a training row.
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  assert low_label.loss_plateau(tmp_path) == {'loss_pixel': 7.5}  # Steps 70 and 80.
  assert low_label.loss_plateau(tmp_path / 'missing') == {}


def _length_record(arm, steps, fseed, dice, val, pseed=None):
  cases = {c: {'dice': dice + 0.01 * i, 'hd95': 1.0} for i, c in enumerate('abc')}
  return {'kind': 'finetune', 'arm': arm, 'budget': '1', 'pretrain_seed': pseed,
          'finetune_seed': fseed, 'finetune_steps': steps, 'dice': dice + 0.01,
          'val_dice': val, 'cases': cases}


def test_fine_tuning_lengths_pick_by_validation_and_pair_at_each_length():
  from benchmarks import low_label_lengths as lengths
  runs = []
  for f in (0, 1):
    # Scratch: better at 1000 steps on test, but validation picks 250 (test never chooses).
    runs += [_length_record('scratch', 250, f, 0.50, 0.60),
             _length_record('scratch', 1000, f, 0.70, 0.55)]
    # Pre-trained: ahead at 250 steps, level at 1000; validation picks 1000.
    runs += [_length_record('full', 250, f, 0.65, 0.50, 0),
             _length_record('full', 1000, f, 0.70, 0.62, 0)]
  result = lengths.compare(runs, 'scratch', '1', num_resamples=200)
  by = {(r['arm'], r['steps']): r for r in result['lengths']}
  assert by[('full', 250)]['vs_baseline']['mean'] == pytest.approx(0.15)
  assert by[('full', 1000)]['vs_baseline']['mean'] == pytest.approx(0.0, abs=1e-12)
  assert result['baseline_steps'] == 250
  picked = {r['arm']: r for r in result['picked']}
  assert picked['scratch']['steps'] == 250 and picked['full']['steps'] == 1000
  # Full at its 1000 steps against scratch at its own picked 250.
  assert picked['full']['vs_baseline']['mean'] == pytest.approx(0.20)
  assert picked['full']['steps_to_baseline_best'] == 1000  # Scratch's best test Dice: 0.71.
  text = lengths.markdown(result)
  assert '| full | 250 | 50.00 | 66.00 | +15.00' in text


def test_one_recipe_is_adopted_for_every_arm_by_mean_validation_dice():
  from benchmarks import low_label_recipe as recipe
  runs = []
  for f in (0, 1):
    # Today's recipe: each arm's validation picks its own length (full: 250).
    runs += [_length_record('scratch', 1000, f, 0.60, 0.70),
             _length_record('full', 250, f, 0.90, 0.72, 0),
             _length_record('full', 1000, f, 0.50, 0.66, 0)]
    # aug: better on validation on average, worse on test (test never chooses).
    runs += [_length_record('scratch_aug', 1000, f, 0.10, 0.74),
             _length_record('full_aug', 1000, f, 0.10, 0.73, 0)]
    # lpft: the best validation Dice, but one arm is missing: not adopted.
    runs += [_length_record('scratch_lpft', 1000, f, 0.90, 0.99)]
  rows = recipe.scores(runs, ['scratch', 'full'], ['aug', 'lpft'], '1')
  by = {row['recipe']: row for row in rows}
  assert by['crops']['arms']['full'] == {'steps': 250, 'val_dice': 0.72, 'runs': 2}
  assert by['crops']['score'] == pytest.approx(0.71)
  assert by['aug']['score'] == pytest.approx(0.735) and by['lpft']['score'] is None
  assert recipe.adopted(rows) == 'aug'
  assert recipe.split_arm('restoration_l2sp', ['l2sp']) == ('restoration', 'l2sp')
  assert recipe.split_arm('full_hard', ['aug']) == ('full_hard', 'crops')
  assert '| aug | 74.00 @ 1000 (2 runs) | 73.00 @ 1000 (2 runs) | 73.50 |' in recipe.markdown(
      rows, ['scratch', 'full'])
