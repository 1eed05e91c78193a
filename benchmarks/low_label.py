r"""The low-label benchmark: where does pre-training beat training from scratch?

  python benchmarks/low_label.py [--data_dir STORE] [--ndim 2|3] [--patch 64,64] \
      [--budgets s8,1] [--arms scratch,full] [--pretrain_seeds 0] [--finetune_seeds 0,1] \
      [--probe_arms full] [--probe_fractions 0.25,0.5,1] [--out DIR] [--quick]

For every arm that pre-trains (`full`, its ablations, the `init_only` control) and every
pre-training seed, pre-train once; then fine-tune every arm at every label budget with every
fine-tuning seed and score it on the store's test split (sliding window, original grid, Dice
and HD95 as in docs/evaluation.md). The fine-tuning seed also draws the labelled volumes, so
two arms with the same seed and budget see the same labels, and their per-volume test Dice
pair up. Then a dense linear probe (frozen backbone, 1x1 head on the pre-training's pixel
level) of the pre-trained features after several fractions of the pre-training.

Label budgets: `N` = N labelled volumes drawn from train_100 (nested: for one seed, 1 volume
is within 2, within 4); `all` = train_100; `sK` = K axial slices of one labelled volume,
evenly spaced over its labelled z-range (2-D only: a 3-D crop would see the unlabelled slices
between them as background).

Writes OUT/results.json (settings, per-arm summaries with the validation Dice and how far
fine-tuning moved the backbone, paired differences against scratch, and of each pre-trained arm
against full, with 95% bootstrap intervals over volumes and seeds, per-organ Dice and HD95, each
pre-training's losses on their plateau, the probes, every run), OUT/results.md (the same as
Markdown tables) and OUT/dice_vs_budget.png. Each run keeps
its `result.json` (and the evaluation's `metrics.json`) in its folder; finished runs are
skipped when the command is repeated with the same --out, so an interrupted benchmark resumes
and more arms, budgets or seeds can be added later; `--report_only` runs nothing and reports
the finished runs of the selection. The statistics are in benchmarks/low_label_stats.py.

Two sizes. The default (CPU, 2-D): a dedicated phantom store of 40 cases on a 3 x 3 x 4 mm grid
(24 train_100, 8 val, 8 test), 64 x 64 patches, the demo widths; scratch and full, budgets s8
and 1, fine-tuning seeds 0 and 1, probes of full at 25, 50 and 100% of 600 pre-training steps:
about 50 minutes on 2 CPU cores (42 with 300 pre-training steps; docs/BENCHMARKS.md).
`--ndim 3`: 96^3 patches and the btcv_3d widths, for a GPU (benchmarks/gpu_low_label.sh).
`--quick`: a smoke run (tiny widths, a few steps, one seed, scratch and full, budget 1).
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

# Runnable as `python benchmarks/low_label.py` from anywhere, without PYTHONPATH.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import low_label_stats as stats  # noqa: E402
from pixssl_jax import config_files  # noqa: E402
from pixssl_jax.data import case_store  # noqa: E402
from pixssl_jax.evaluation import evaluate  # noqa: E402
from pixssl_jax.evaluation import metrics as metrics_lib  # noqa: E402
from pixssl_jax.train import finetune  # noqa: E402
from pixssl_jax.train import loop  # noqa: E402
from pixssl_jax.train import pretrain  # noqa: E402



class Arm(NamedTuple):
  """One arm: how it pre-trains and how it fine-tunes.

  Attributes:
    pretrain: configs/pretrain.py overrides; None: no pre-training (from scratch).
    finetune_length: fine-tuning steps relative to the other arms.
    finetune: configs/finetune.py overrides.
    pretrained_as: reuse this arm's pre-training (an arm that changes only fine-tuning).
  """
  pretrain: dict | None
  finetune_length: int = 1
  finetune: dict = {}
  pretrained_as: str | None = None


# Every ablation changes one field of `full`.
ARMS = {
    'scratch': Arm(None),
    # Scratch with twice the fine-tuning steps: whether a pre-trained start is worth more than
    # simply training longer.
    'scratch_long': Arm(None, finetune_length=2),
    # The random backbone every pre-trained arm of that pre-training seed starts from, after
    # one step: against it, an arm's gain is the pre-training's, not its initialisation's.
    'init_only': Arm({'num_steps': 1, 'checkpoint_every': 1, 'keep_checkpoints': 1}),
    'full': Arm({}),
    'global_only': Arm({'method.use_pixel': False}),
    'pixel_only': Arm({'method.use_global': False}),
    'no_stabilizer': Arm({'method.use_stabilizer': False}),
    'no_uncertainty': Arm({'method.weighting': 'none'}),
    # The uncertainty learned as a predicted discrepancy (its gradient trains the stabilizer).
    'kendall': Arm({'method.weighting': 'kendall'}),
    # The MC-dropout uncertainty trained to rank pixels as the discrepancy does.
    'calibrated': Arm({'method.lambda_calibration': 1.0}),
    # Candidates for a default whose uncertainty means something without taking the weight
    # off the cells where the views disagree: the calibrated `u` with weights a third as
    # steep, or kept as a map only (the loss unweighted).
    'calibrated_mild': Arm({'method.lambda_calibration': 1.0, 'method.tau': 3.0}),
    'calibrated_unweighted': Arm({'method.lambda_calibration': 1.0, 'method.weighting': 'none'}),
    # One stabilizer pass without dropout: no MC samples, so no uncertainty either.
    'no_mc': Arm({'method.mc_samples': 1}),
    # Diagnostics from docs/BENCHMARKS.md: no VICReg terms (the collapsed pixel branch),
    # batch statistics in the pixel projector, mirroring augmentations in the views.
    'full_no_spread': Arm({'method.lambda_variance': 0.0, 'method.lambda_covariance': 0.0}),
    'full_pixel_bn': Arm({'model.pixel_norm': 'batch'}),
    'full_mirror': Arm({'data.flip': True, 'data.rot90': True}),
    # The fine-tuning recipe: `full`'s pre-training, the backbone fine-tuned at a tenth of the
    # head's rate, so it moves less from what pre-training learned.
    'full_backbone_lr_0.1': Arm({}, finetune={'optim.backbone_lr_scale': 0.1},
                                pretrained_as='full'),
    # ... or held for the first 200 steps (a fifth of the CPU default's fine-tuning) while the
    # new head adapts (measured on the calibrated pre-training).
    'calibrated_head_warmup': Arm({}, finetune={'optim.head_warmup_steps': 200},
                                  pretrained_as='calibrated'),
}
# The positive control: a plain dense pretext task on the same U-Net and store, masked-image
# restoration (MAE / Models Genesis in-painting): 60% of the 8-voxel cells of each view hidden.
RESTORATION = {'method.use_global': False, 'method.use_pixel': False,
               'method.lambda_variance': 0.0, 'method.lambda_covariance': 0.0,
               'method.lambda_restoration': 1.0, 'data.mask_ratio': 0.6}
# Harder views: intensity augmentations more often and stronger, non-linear remaps that can
# reorder tissue intensities (as contrast phases do), wider crop scales, less overlap.
HARD_VIEWS = {'data.intensity.prob': 0.8, 'data.intensity.contrast': 0.5,
              'data.intensity.gamma': 0.6, 'data.intensity.window_jitter': 0.3,
              'data.intensity.remap_prob': 0.8, 'data.scale_range': (0.5, 2.0),
              'data.min_overlap': 0.2}
ARMS.update({
    'restoration': Arm(RESTORATION),
    'restoration_hard': Arm({**RESTORATION, **HARD_VIEWS}),
    'full_hard': Arm(HARD_VIEWS),
    # The student also restores nothing but sees 40% of its cells hidden (the teacher sees all).
    'full_masked': Arm({'data.mask_ratio': 0.4}),
})
# The fine-tuning recipe, the same for every arm: each recipe below makes a `<arm>_<recipe>`
# arm of scratch, full and restoration, compared with `scratch_<recipe>` (`--baseline`).
# aug: nnU-Net-like intensity and scale augmentation of the labelled crops (no mirroring);
# lpft: a linear probe of 200 steps, then everything (LP-FT); l2sp: a pull towards the start
# weights (L2-SP); decay: the learning rate 0.7x per block away from the head.
RECIPES = {
    'aug': {'data.intensity.enabled': True, 'data.scale_range': (0.8, 1.25)},
    'lpft': {'optim.linear_probe_steps': 200},
    'l2sp': {'optim.l2_sp': 0.01},
    'decay': {'optim.layer_decay': 0.7},
}
for _recipe, _fields in RECIPES.items():
  for _arm in ('scratch', 'full', 'restoration'):
    ARMS[f'{_arm}_{_recipe}'] = Arm(ARMS[_arm].pretrain, finetune=_fields,
                                    pretrained_as=None if _arm == 'scratch' else _arm)
BASELINE = 'scratch'
# Every pre-trained arm is also paired with it: an ablation's loss against the full method.
REFERENCE = 'full'


def pretrained_as(arm: str) -> str:
  """The arm whose pre-training `arm` fine-tunes."""
  return ARMS[arm].pretrained_as or arm

# Per size: config presets, data, lengths and the default selection of runs.
SIZES = {
    # Fits an hour on 2 CPU cores: 1 pre-training, 8 fine-tunes and 3 probes (a 1000-step
    # fine-tune with its evaluation 3-5 minutes, 300 pre-training steps 3.5, a 500-step probe
    # through the frozen backbone under 2; docs/BENCHMARKS.md). 600 pre-training steps: the
    # linear probe of the frozen features improves up to there and flattens after.
    'cpu_2d': {
        'presets': ('demo', 'demo'), 'patch': (64, 64),
        'pretrain': {'num_steps': 600, 'batch_size': 16},
        # 500 steps left 2-volume fine-tunings unconverged (whether the kidneys got separated
        # depended on the seed); 1000 converge (docs/BENCHMARKS.md).
        'finetune': {'num_steps': 1000, 'batch_size': 8, 'eval.batch_size': 64},
        'probe': {'num_steps': 500},
        'arms': 'scratch,full', 'budgets': 's8,1', 'pretrain_seeds': '0',
        'finetune_seeds': '0,1', 'probe_arms': 'full', 'probe_fractions': '0.25,0.5,1',
    },
    'gpu_3d': {
        'presets': ('btcv_3d', 'btcv_3d'), 'patch': (96, 96, 96),
        'pretrain': {'num_steps': 2000, 'batch_size': 8},
        'finetune': {'num_steps': 2000, 'batch_size': 4, 'eval.batch_size': 8},
        'probe': {'num_steps': 1000},
        'arms': 'scratch,scratch_long,init_only,full', 'budgets': '1,2,4,all',
        'pretrain_seeds': '0', 'finetune_seeds': '0,1,2', 'probe_arms': 'full',
        'probe_fractions': '0.25,0.5,1',
    },
}
# --quick: tiny widths (the 'tiny' presets), a few steps, one seed.
QUICK = {
    'presets': ('tiny', 'tiny'),
    'pretrain': {'num_steps': 4, 'batch_size': 8},
    'finetune': {'num_steps': 6, 'batch_size': 8},
    'probe': {'num_steps': 4},
    'arms': 'scratch,full', 'budgets': '1', 'pretrain_seeds': '0', 'finetune_seeds': '0',
    'probe_arms': 'full', 'probe_fractions': '0.5,1',
}
QUICK_PATCH = {2: (32, 32), 3: (32, 32, 32)}
# The dedicated phantom store (without --data_dir): small volumes keep whole-volume
# inference cheap on a CPU.
PHANTOMS = {'data.num_phantoms': 40, 'data.phantom_spacing': (3.0, 3.0, 4.0)}
PROBE_LR = 1e-2  # One linear layer: 1e-3 leaves it far from converged in 500 steps.


def override(config, values: dict):
  """Applies {'a.b': value} overrides (only to existing fields) and returns the config."""
  for key, value in values.items():
    *path, leaf = key.split('.')
    node = config
    for part in path:
      node = node[part]
    if leaf not in node:
      raise KeyError(f'{key} is not a config field')
    node[leaf] = value
  return config


class Benchmark:
  """The runs of one benchmark folder: configs, jobs, their results."""

  def __init__(self, args):
    self.args = args
    self.out = pathlib.Path(args.out).resolve()
    size = SIZES['gpu_3d' if args.ndim == 3 else 'cpu_2d']
    self.size = {**size, **(QUICK if args.quick else {})}
    patch = (args.patch or (QUICK_PATCH[args.ndim] if args.quick else size['patch']))
    if len(patch) != args.ndim:
      raise ValueError(f'--patch {patch} does not have {args.ndim} sizes')
    data = {'data.ndim': args.ndim, 'data.patch_size': tuple(patch)}
    if args.data_dir:
      data['data.data_dir'] = os.path.abspath(args.data_dir)
    else:
      data.update(PHANTOMS)
    self.data = data
    self.family = None
    if not args.data_dir:
      # The phantom family is a data field where this version has it; older code has only
      # the basic phantoms, which it then uses.
      # Pre-training and fine-tuning must read the same store: both configs need the field.
      if all('phantom_family' in config_files.load(name, preset).data
             for name, preset in zip(('pretrain', 'finetune'), self.size['presets'])):
        self.family = args.phantom_family
        data['data.phantom_family'] = args.phantom_family
      elif args.phantom_family != 'basic':
        print(f'Note: this version has no data.phantom_family; using the basic phantoms, not '
              f'{args.phantom_family!r}.', flush=True)
    self.pretrain_steps = args.pretrain_steps or self.size['pretrain']['num_steps']
    self.finetune_steps = args.finetune_steps or self.size['finetune']['num_steps']
    self.probe_num_steps = args.probe_steps or self.size['probe']['num_steps']
    self.probe_at = stats.probe_steps(self.pretrain_steps, args.probe_fractions)
    self.store = case_store.CaseStore(loop.resolve_data_dir(self.finetune_config().data))

  # Configs.

  def pretrain_config(self, arm: str, seed: int):
    pre = config_files.load('pretrain', self.size['presets'][0])
    override(pre, self.data)
    # Checkpoints at every step a probe reads (and so at the end); kept.
    every = math.gcd(*self.probe_at) if self.probe_at else self.pretrain_steps
    override(pre, {**self.size['pretrain'], 'num_steps': self.pretrain_steps, 'seed': seed,
                   'log_every': max(1, min(50, self.pretrain_steps)), 'image_every': 0,
                   'checkpoint_every': every,
                   'keep_checkpoints': -(-self.pretrain_steps // every) + 1})
    return override(pre, ARMS[arm].pretrain)

  def finetune_config(self, arm: str = BASELINE, budget: dict | None = None, seed: int = 0,
                      pretrain_dir: pathlib.Path | None = None, step: int | None = None,
                      probe: bool = False):
    ft = config_files.load('finetune', self.size['presets'][1])
    override(ft, self.data)
    steps = (self.probe_num_steps if probe else self.finetune_steps * ARMS[arm].finetune_length)
    # Whole-volume validation costs minutes on a CPU: once, at the end, on 2 val cases (model
    # selection is then the last checkpoint); the test split is scored in full.
    override(ft, {**self.size['finetune'], 'num_steps': steps, 'eval_every': steps,
                  'log_every': max(1, min(100, steps)), 'seed': seed, 'keep_checkpoints': 1,
                  'eval.val_max_cases': 2, 'eval.export': False})
    if budget is not None:
      override(ft, {k: budget[k] for k in ('label_fraction', 'label_count', 'label_slices')})
    if self.args.finetune_lr:
      ft.optim.learning_rate = self.args.finetune_lr
    if not probe:
      override(ft, ARMS[arm].finetune)
    if pretrain_dir is None:
      ft.init = 'scratch'
    else:
      ft.pretrained_workdir = str(pretrain_dir)
      ft.pretrained_step = step
    if probe:
      ft.linear_probe = True
      ft.optim.learning_rate = PROBE_LR
      pixel_level = config_files.load('pretrain', self.size['presets'][0]).model.pixel_level
      ft.model.head_level = pixel_level  # Where pre-training trained the features.
    return ft

  def settings(self) -> dict:
    """What a result depends on besides its arm, budget and seeds (checked on resume)."""
    return {'ndim': self.args.ndim, 'data': {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in self.data.items()},
            'presets': list(self.size['presets']), 'pretrain_steps': self.pretrain_steps,
            'pretrain_batch': self.size['pretrain']['batch_size'],
            'finetune_steps': self.finetune_steps,
            'finetune_batch': self.size['finetune']['batch_size'],
            'finetune_lr': self.finetune_config().optim.learning_rate,
            'probe_steps': self.probe_num_steps, 'probe_at': self.probe_at,
            'quick': bool(self.args.quick)}

  # Jobs.

  def repeated_label_sets(self) -> list[str]:
    """A line per budget at which several fine-tuning seeds draw the same labelled cases."""
    notes = []
    for budget in self.args.budgets:
      drawn = {}
      for seed in self.args.finetune_seeds:
        _, cases = finetune.label_split(self.store, budget['label_fraction'], seed,
                                        count=budget['label_count'])
        drawn.setdefault(tuple(cases), []).append(seed)
      for cases, seeds in drawn.items():
        if len(seeds) > 1:
          notes.append(f'fine-tuning seeds {", ".join(map(str, seeds))} draw the same labelled '
                       f'cases at budget {budget["name"]} ({", ".join(cases)}): they repeat '
                       'one labelled set, not independent ones')
    return notes

  def pretrain_dir(self, arm: str, seed: int) -> pathlib.Path:
    root = pathlib.Path(self.args.pretrain_dir).resolve() if self.args.pretrain_dir else (
        self.out / 'pretrain')
    return root / f'{arm}_p{seed}'

  def jobs(self) -> list[dict]:
    """Every job of this invocation, in run order: pre-trainings, fine-tunings, probes."""
    a = self.args
    pretrained = [pretrained_as(arm) for arm in a.arms if ARMS[arm].pretrain is not None]
    probed = [pretrained_as(arm) for arm in a.probe_arms if ARMS[arm].pretrain is not None]
    jobs = [{'kind': 'pretrain', 'arm': arm, 'pretrain_seed': p}
            for p in a.pretrain_seeds for arm in dict.fromkeys(pretrained + probed)]
    for s in a.finetune_seeds:
      for budget in a.budgets:
        for arm in a.arms:
          for p in (a.pretrain_seeds if ARMS[arm].pretrain is not None else [None]):
            jobs.append({'kind': 'finetune', 'arm': arm, 'budget': budget['name'],
                         'pretrain_seed': p, 'finetune_seed': s})
    probe_seed = a.finetune_seeds[0]
    if BASELINE in a.probe_arms:  # Random features: the baseline a probe has to beat.
      jobs.append({'kind': 'probe', 'arm': BASELINE, 'budget': a.probe_budget['name'],
                   'pretrain_seed': None, 'finetune_seed': probe_seed, 'step': 0})
    for arm in probed:
      # A pre-training shorter than the probed steps (init_only) is probed at its end.
      length = self.pretrain_config(arm, 0).num_steps
      for p in a.pretrain_seeds:
        for step in [s for s in self.probe_at if s <= length] or [length]:
          jobs.append({'kind': 'probe', 'arm': arm, 'budget': a.probe_budget['name'],
                       'pretrain_seed': p, 'finetune_seed': probe_seed, 'step': step})
    return jobs

  def job_dir(self, job: dict) -> pathlib.Path:
    if job['kind'] == 'pretrain':
      return self.pretrain_dir(job['arm'], job['pretrain_seed'])
    p = '' if job['pretrain_seed'] is None else f'_p{job["pretrain_seed"]}'
    if job['kind'] == 'probe':
      return self.out / 'probe' / f'{job["arm"]}_step{job["step"]}_{job["budget"]}{p}_f' \
          f'{job["finetune_seed"]}'
    return self.out / 'finetune' / f'{job["arm"]}_{job["budget"]}{p}_f{job["finetune_seed"]}'

  def result_path(self, job: dict) -> pathlib.Path:
    name = 'done.json' if job['kind'] == 'pretrain' else 'result.json'
    return self.job_dir(job) / name

  def run(self, job: dict, print_fn) -> dict:
    """Runs one job (resuming its own checkpoints) and writes its result file."""
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    run_dir = self.job_dir(job)
    if job['kind'] == 'pretrain':
      config = self.pretrain_config(job['arm'], job['pretrain_seed'])
      pretrain.train(config, str(run_dir), print_fn=print_fn)
      result = {**job, 'seconds': time.perf_counter() - start,
                'cpu_seconds': _cpu_seconds() - cpu_start}
      _write_json(self.result_path(job), result)
      return result
    budget = next(b for b in self.args.budgets + [self.args.probe_budget]
                  if b['name'] == job['budget'])
    pre_dir = (None if job['pretrain_seed'] is None
               else self.pretrain_dir(pretrained_as(job['arm']), job['pretrain_seed']))
    config = self.finetune_config(job['arm'], budget, job['finetune_seed'], pre_dir,
                                  job.get('step'), probe=job['kind'] == 'probe')
    workdir = run_dir / 'run'
    finetune.train_and_evaluate(config, str(workdir), print_fn=print_fn)
    config.mode = 'evaluate'
    summary = evaluate.evaluate(config, str(workdir), print_fn=print_fn)
    rows = json.loads((workdir / 'metrics.json').read_text())['cases']
    described, train_ids = finetune.label_split(
        self.store, config.label_fraction, config.seed, count=config.label_count)
    result = {**job, **metrics_lib.mean_scores(summary), **final_validation(workdir),
              'labelled': {'described': described, 'cases': train_ids,
                           'slices': config.label_slices},
              'cases': stats.case_means(rows), 'organs': stats.organ_means(rows),
              'finetune_steps': config.num_steps, 'seconds': time.perf_counter() - start,
              'cpu_seconds': _cpu_seconds() - cpu_start}
    _write_json(self.result_path(job), result)
    if not self.args.keep_checkpoints:  # The result is written; the weights are not needed.
      shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)
    return result


def _logged(workdir: pathlib.Path) -> list[dict]:
  path = workdir / 'metrics.jsonl'
  return list(map(json.loads, path.read_text().splitlines())) if path.exists() else []


def final_validation(workdir: pathlib.Path) -> dict[str, float | None]:
  """A fine-tuning's last validation Dice (the selection score: val, not test) and how far it
  had moved the backbone from its start (relative L2); None where not logged."""
  rows = _logged(workdir)
  last = lambda key: next((row[key] for row in reversed(rows) if key in row), None)
  return {'val_dice': last('val/dice'), 'backbone_moved': last('val/backbone_moved')}


def loss_plateau(workdir: pathlib.Path) -> dict[str, float]:
  """Each pre-training loss the run optimised, averaged over its last quarter of logged steps."""
  rows = [row for row in _logged(workdir) if 'train/loss' in row]
  last = rows[len(rows) - max(1, len(rows) // 4):]
  names = [k for k in (last[0] if last else {}) if k.startswith('train/loss_')]
  means = {k.removeprefix('train/'): float(np.mean([row[k] for row in last])) for k in names}
  return {k: v for k, v in means.items() if v != 0.0}  # A term that is off logs 0.


def _cpu_seconds() -> float:
  # CPU time of this process (user + system): on a shared machine, with the wall clock, it
  # tells how much of a run's time was spent waiting for cores.
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _write_json(path: pathlib.Path, payload: dict) -> None:
  # Temp name, then rename: a run stopped mid-write must not leave a result that resumes.
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(json.dumps(payload, indent=1))
  tmp.replace(path)


def job_name(job: dict) -> str:
  parts = [job['kind'], job['arm']]
  if 'budget' in job:
    parts.append(f'budget {job["budget"]}')
  if job.get('step') is not None:
    parts.append(f'pre-training step {job["step"]}')
  if job.get('pretrain_seed') is not None:
    parts.append(f'p{job["pretrain_seed"]}')
  if 'finetune_seed' in job:
    parts.append(f'f{job["finetune_seed"]}')
  return ' '.join(parts)


def aggregate(bench: Benchmark, results: list[dict], seconds: float) -> dict:
  """results.json's content: header, settings, summaries, paired comparisons, probes, runs."""
  a = bench.args
  budgets = [b['name'] for b in sorted(a.budgets, key=lambda b: b['order'])]
  tables = stats.group_results(results, a.arms, budgets, a.baseline, REFERENCE,
                               num_resamples=a.bootstrap_resamples)
  header = {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'host': platform.node(), 'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'platform': jax.devices()[0].platform, 'jax': jax.__version__,
      'store': bench.store.data_dir, 'phantom_family': bench.family,
      'train_100': len(bench.store.split('train_100')), 'test': len(bench.store.split('test')),
      'arms': a.arms, 'budgets': budgets, 'probe_budget': a.probe_budget['name'],
      'pretrain_seeds': a.pretrain_seeds, 'finetune_seeds': a.finetune_seeds,
      'bootstrap_resamples': a.bootstrap_resamples, 'seconds_this_invocation': seconds}
  return {'header': header, 'settings': bench.settings(), **tables, 'runs': results}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default=None,
                      help='a prepared store (phantoms, BTCV, MSD); default: the dedicated '
                      '40-case phantom store')
  parser.add_argument('--phantom_family', default='clinical', choices=('basic', 'clinical'),
                      help='phantom family of the dedicated store (without --data_dir)')
  parser.add_argument('--ndim', type=int, default=2, choices=(2, 3))
  parser.add_argument('--patch', default=None, help='patch size, e.g. 64,64 or 96,96,96')
  parser.add_argument('--arms', default=None, help=f'comma-separated, from {list(ARMS)}')
  parser.add_argument('--budgets', default=None,
                      help='comma-separated: N labelled volumes, all, sK = K slices of one')
  parser.add_argument('--pretrain_seeds', default=None)
  parser.add_argument('--finetune_seeds', default=None)
  parser.add_argument('--probe_arms', default=None,
                      help="arms whose features are probed ('' for none; scratch = random)")
  parser.add_argument('--probe_fractions', default=None,
                      help='fractions of the pre-training whose checkpoints are probed')
  parser.add_argument('--probe_budget', default='1', help='label budget of the probes')
  parser.add_argument('--pretrain_steps', type=int, default=None)
  parser.add_argument('--finetune_steps', type=int, default=None)
  parser.add_argument('--probe_steps', type=int, default=None)
  parser.add_argument('--finetune_lr', type=float, default=None)
  parser.add_argument('--bootstrap_resamples', type=int, default=10_000)
  parser.add_argument('--keep_checkpoints', action='store_true',
                      help='keep fine-tuned weights (deleted once scored by default)')
  parser.add_argument('--out', default=None, help='default runs/low_label[_3d][_quick]')
  parser.add_argument('--baseline', default=BASELINE,
                      help='the arm every other is paired with (scratch under the same recipe, '
                      'e.g. scratch_aug)')
  parser.add_argument('--pretrain_dir', default=None,
                      help='folder of the pre-trainings (default OUT/pretrain): benchmarks of '
                      'other fine-tuning lengths or recipes on the same store share them')
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: tiny widths, a few steps, 1 seed, scratch + full, budget 1')
  parser.add_argument('--verbose', action='store_true', help="print the runs' own progress")
  parser.add_argument('--report_only', action='store_true',
                      help='run nothing: report the finished runs of this selection')
  args = parser.parse_args(argv)
  size = {**SIZES['gpu_3d' if args.ndim == 3 else 'cpu_2d'], **(QUICK if args.quick else {})}
  for name in ('arms', 'budgets', 'pretrain_seeds', 'finetune_seeds', 'probe_arms',
               'probe_fractions'):
    if getattr(args, name) is None:
      setattr(args, name, size[name])
  split = lambda text: [t for t in text.split(',') if t.strip()]
  args.arms = split(args.arms)
  args.probe_arms = split(args.probe_arms)
  unknown = sorted(set(args.arms + args.probe_arms) - set(ARMS))
  if unknown:
    parser.error(f'unknown arms {unknown}; choose from {list(ARMS)}')
  if args.baseline not in args.arms:
    parser.error(f'--baseline {args.baseline} is not among --arms {args.arms}')
  try:
    args.budgets = [stats.parse_budget(t) for t in split(args.budgets)]
    args.probe_budget = stats.parse_budget(args.probe_budget)
  except ValueError as e:
    parser.error(str(e))
  slices = [b['name'] for b in args.budgets + [args.probe_budget] if b['label_slices']]
  if args.ndim == 3 and slices:
    parser.error(f'slice budgets {slices} are 2-D only (a 3-D crop would train on the '
                 'unlabelled slices between them as background)')
  args.pretrain_seeds = [int(s) for s in split(args.pretrain_seeds)]
  args.finetune_seeds = [int(s) for s in split(args.finetune_seeds)]
  args.probe_fractions = [float(f) for f in split(args.probe_fractions)]
  if not args.finetune_seeds or (not args.pretrain_seeds and any(
      ARMS[arm].pretrain is not None for arm in args.arms + args.probe_arms)):
    parser.error('give at least one fine-tuning seed, and a pre-training seed for '
                 'pre-trained arms')
  if any(not 0 < f <= 1 for f in args.probe_fractions):
    parser.error('--probe_fractions must be in (0, 1]')
  if args.patch:
    args.patch = tuple(int(v) for v in args.patch.split(','))
  if args.out is None:
    args.out = 'runs/low_label' + ('_3d' if args.ndim == 3 else '') + (
        '_quick' if args.quick else '')
  return args


def main(argv=None):
  args = parse_args(argv)
  bench = Benchmark(args)
  out = bench.out
  out.mkdir(parents=True, exist_ok=True)
  settings_path = out / 'settings.json'
  if settings_path.exists():
    before = json.loads(settings_path.read_text())
    if before != json.loads(json.dumps(bench.settings())):
      sys.exit(f'{out} holds runs made with other settings:\n  {before}\nnow:\n  '
               f'{bench.settings()}\nUse another --out (or delete it to start over).')
  else:
    settings_path.write_text(json.dumps(bench.settings(), indent=1))
  # Every run compiles the same few functions: keep the executables across runs.
  jax.config.update('jax_compilation_cache_dir', str(out / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

  if not args.verbose:
    # Orbax logs a warning per read-only checkpoint manager (every evaluation and pre-trained
    # restore); the progress lines are what matters here.
    logging.set_verbosity(logging.ERROR)
  start = time.perf_counter()
  jobs = bench.jobs()
  print(f'Low-label benchmark: {len(jobs)} jobs into {out}; store {bench.store.data_dir}',
        flush=True)
  for note in bench.repeated_label_sets():
    print(f'Note: {note}', flush=True)
  inner = (lambda line: print('    ' + line, flush=True)) if args.verbose else (lambda line: None)
  timed: dict[str, list[float]] = {}
  results, plateaus = [], []
  for i, job in enumerate(jobs):
    path = bench.result_path(job)
    if path.exists():
      result = json.loads(path.read_text())
      if job['kind'] == 'finetune':  # Read again: results scored before these were kept.
        result = {**final_validation(bench.job_dir(job) / 'run'), **result}
      note = 'done before, skipped'
    elif args.report_only:
      print(f'[{i + 1}/{len(jobs)}] {job_name(job)}: not run (--report_only)', flush=True)
      continue
    else:
      result = bench.run(job, inner)
      timed.setdefault(job['kind'], []).append(result['seconds'])
      note = f'{result["seconds"]:.0f} s, CPU {result["cpu_seconds"]:.0f} s'
    if job['kind'] == 'pretrain':
      plateaus.append({'arm': job['arm'], 'pretrain_seed': job['pretrain_seed'],
                       'losses': loss_plateau(bench.job_dir(job))})
    else:
      note = f'test Dice {100 * result["dice"]:.2f}%, HD95 {result["hd95"]:.1f} mm ({note})'
      results.append(result)
    left = stats.estimate_remaining(jobs[i + 1:], timed)
    print(f'[{i + 1}/{len(jobs)}] {job_name(job)}: {note} | elapsed '
          f'{stats.format_seconds(time.perf_counter() - start)}, ETA '
          f'{"?" if left is None else stats.format_seconds(left)}', flush=True)

  report = aggregate(bench, results, time.perf_counter() - start)
  report['pretrain_losses'] = plateaus
  text = stats.report_markdown(report)
  (out / 'results.json').write_text(json.dumps(report, indent=1))
  (out / 'results.md').write_text(text)
  budgets = report['header']['budgets']
  stats.plot_dice_vs_budget(report['summary'], budgets, str(out / 'dice_vs_budget.png'),
                            title=f"{report['settings']['ndim']}-D, {bench.store.data_dir}",
                            labels={'all': f"all ({report['header']['train_100']})"})
  print(text)
  print(f'Wrote {out / "results.json"}, results.md and dice_vs_budget.png', flush=True)


if __name__ == '__main__':
  main()
