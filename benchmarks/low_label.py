r"""The low-label benchmark: does pre-training beat scratch when only 10% of the labels exist?

  PYTHONPATH=. python benchmarks/low_label.py [--quick] [--out runs/low_label] \
      [--seeds 0,1,2] [--methods full,global_only,pixel_only,no_stabilizer,no_uncertainty,scratch]
      [--pretrain_per_seed] [--finetune_steps N] [--finetune_lr LR] [--linear_probe]

Pre-train with the full method and with each ablation, fine-tune each on the 10% label split
with every seed, fine-tune the same network from scratch with every seed, and evaluate every
fine-tuned network on the held-out test cases (sliding window, original grid, Dice and HD95 as
in docs/evaluation.md). Prints and saves (`OUT/results.json`, `OUT/results.md`) the mean, std
and range over seeds of the test Dice and HD95 per method. `--linear_probe` replaces the
fine-tuning by a dense linear probe of the frozen features (`OUT/probe_results.*`), reusing
the pre-trainings already in OUT.

By default each method is pre-trained once (seed 0) and the seeds vary the fine-tuning (head
initialisation, or the whole network for scratch, crop order and sampling, dropout): 15
pre-trainings do not fit the hour on 2 CPU cores, 5 do. `--pretrain_per_seed` pre-trains again
for every seed (about 2.5 times longer). Beyond the default list, `--methods` takes
`full_no_spread` (the full method without the anti-collapse terms), `init_only` (the control:
the random backbone all pre-trained methods start from, after one step), `full_no_mirror` and
`full_pixel_bn` (see METHODS).

Everything runs on a dedicated phantom store: 40 cases (train_10 = 2 labelled cases, 8 val,
8 test) on a 3 x 3 x 4 mm grid (about 125 x 125 x 60 voxels), 2-D 64 x 64 patches, so the
whole benchmark fits an hour on 2 CPU cores. Finished runs are skipped when the command is
repeated with the same --out (delete the folder to start over). --quick is a smoke run: one
seed, two methods, a few steps.
"""

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

import jax

from pixssl_jax import config_files
from pixssl_jax.train import evaluate
from pixssl_jax.train import finetune
from pixssl_jax.train import pretrain


# Pre-training overrides per method (configs/pretrain.py fields); None: no pre-training.
METHODS = {
    'full': {},
    'global_only': {'method.use_pixel': False},
    'pixel_only': {'method.use_global': False},
    'no_stabilizer': {'method.use_stabilizer': False},
    'no_uncertainty': {'method.weighting': 'none'},
    'scratch': None,
    # Not in the default list: the full method without mirroring augmentations (flips and
    # rot90, which includes 180-degree turns), the diagnosis in docs/BENCHMARKS.md.
    'full_no_mirror': {'data.flip': False, 'data.rot90': False},
    # The full method with batch statistics in the pixel projector (the first collapse fix
    # tried, without the anti-collapse terms' success; docs/BENCHMARKS.md).
    'full_pixel_bn': {'model.pixel_norm': 'batch'},
    # The full method without the VICReg variance/covariance terms, i.e. as it collapsed.
    'full_no_spread': {'method.lambda_variance': 0.0, 'method.lambda_covariance': 0.0},
    # A control: the backbone every pre-trained method starts from (pre-training seed 0), after
    # one step. Against it, a method's gain is the pre-training's, not that of its random init.
    'init_only': {'num_steps': 1, 'checkpoint_every': 1},
}
DEFAULT_METHODS = ('full', 'global_only', 'pixel_only', 'no_stabilizer', 'no_uncertainty',
                   'scratch')

# Shared by pre-training and fine-tuning: one store, one patch size.
DATA = {
    'data.num_phantoms': 40,
    'data.phantom_spacing': (3.0, 3.0, 4.0),
    'data.patch_size': (64, 64),
}
PRETRAIN = {
    **DATA,
    'num_steps': 300,
    'batch_size': 16,
    'log_every': 50,
    'checkpoint_every': 300,
    'image_every': 0,
    'keep_checkpoints': 1,
}
FINETUNE = {
    **DATA,
    'label_fraction': 0.1,
    # 500 steps left the fine-tunings unconverged: whether the two kidneys (the same tissue, told
    # apart only by their side) got separated depended on the starting backbone and the crop
    # order, so single seeds ranged from 53% to 88% (docs/BENCHMARKS.md). At 1000 steps the
    # full method and scratch both reached 89.8-90.4% on all three seeds.
    'num_steps': 1000,
    'batch_size': 8,
    'log_every': 100,
    # Whole-volume inference dominates on CPU: validate once, at the end, on 2 val cases (the
    # model selection it drives is then simply the last checkpoint); test on all 8.
    'eval_every': 1000,
    'eval.val_max_cases': 2,
    'keep_checkpoints': 1,
    'eval.batch_size': 64,
}
QUICK = {'num_steps': 6, 'checkpoint_every': 6, 'eval_every': 3, 'log_every': 3}


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


def run_method(method: str, seed: int, out: pathlib.Path, quick: bool, pretrain_per_seed: bool,
               probe: bool, finetune_steps: int | None, finetune_lr: float | None,
               log) -> dict:
  """Pre-trains (unless scratch, or already done), fine-tunes and evaluates one (method, seed).

  With `probe`, the fine-tuning is a linear probe: backbone frozen, a 1x1 head on the pixel
  level (for scratch: on random features, the baseline a probe must beat).
  """
  run_dir = out / f'{method}_{"probe_" if probe else ""}seed{seed}'
  result_path = run_dir / 'result.json'
  if result_path.exists():
    return json.loads(result_path.read_text())
  quiet = lambda line: None
  start = time.perf_counter()
  ft = override(config_files.load('finetune', 'demo'), {**FINETUNE, 'seed': seed})
  if finetune_steps:
    ft.num_steps = ft.eval_every = finetune_steps
  if probe:
    ft.linear_probe = True
    ft.model.head_level = config_files.load('pretrain', 'demo').model.pixel_level
    ft.optim.learning_rate = 1e-2  # One linear layer: 1e-3 leaves it far from converged.
  if finetune_lr:
    ft.optim.learning_rate = finetune_lr
  if METHODS[method] is None:
    ft.init = 'scratch'
  else:
    pretrain_seed = seed if pretrain_per_seed else 0
    pre = override(config_files.load('pretrain', 'demo'),
                   {**PRETRAIN, **METHODS[method], 'seed': pretrain_seed})
    if quick:
      override(pre, {k: v for k, v in QUICK.items() if k in pre})
    pretrain_dir = out / f'{method}_pretrain_seed{pretrain_seed}'
    # Resumes, i.e. returns at once, when an earlier seed already pre-trained this method.
    pretrain.train_and_evaluate(pre, str(pretrain_dir), print_fn=quiet)
    ft.pretrained_workdir = str(pretrain_dir)
  pretrain_seconds = time.perf_counter() - start
  if quick:
    override(ft, {k: v for k, v in QUICK.items() if k in ft})
  finetune.train_and_evaluate(ft, str(run_dir / 'finetune'), print_fn=quiet)
  ft.mode = 'evaluate'
  summary = evaluate.evaluate(ft, str(run_dir / 'finetune'), print_fn=quiet)
  scores = evaluate.mean_scores(summary)
  result = {'method': method, 'seed': seed, **scores,
            'organs': {r['organ']: r['dice_mean'] for r in summary if r['organ'] != 'mean'},
            'pretrain_seconds': pretrain_seconds,
            'total_seconds': time.perf_counter() - start}
  result_path.write_text(json.dumps(result, indent=1))
  log(f'{method:>15} seed {seed}: test Dice {100 * scores["dice"]:.2f}%, HD95 '
      f'{scores["hd95"]:.1f} mm ({result["total_seconds"]:.0f} s)')
  return result


def summarize(results: list[dict], methods: list[str]) -> list[dict]:
  rows = []
  for method in methods:
    runs = [r for r in results if r['method'] == method]
    dice = [100 * r['dice'] for r in runs]
    hd = [r['hd95'] for r in runs]
    rows.append({
        'method': method, 'seeds': len(runs),
        'dice_mean': statistics.mean(dice), 'dice_std': statistics.pstdev(dice),
        'dice_min': min(dice), 'dice_max': max(dice),
        'hd95_mean': statistics.mean(hd), 'hd95_std': statistics.pstdev(hd)})
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ['| method | seeds | test Dice % (mean ± std) | Dice range | HD95 mm (mean ± std) |',
           '| --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(f"| {r['method']} | {r['seeds']} | {r['dice_mean']:.2f} ± {r['dice_std']:.2f} "
                 f"| {r['dice_min']:.2f} - {r['dice_max']:.2f} "
                 f"| {r['hd95_mean']:.1f} ± {r['hd95_std']:.1f} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='runs/low_label')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--methods', default=','.join(DEFAULT_METHODS),
                      help=f'comma-separated, from {list(METHODS)}')
  parser.add_argument('--pretrain_per_seed', action='store_true',
                      help='pre-train every method again for every seed')
  parser.add_argument('--finetune_steps', type=int, default=None,
                      help=f'fine-tuning steps (default {FINETUNE["num_steps"]})')
  parser.add_argument('--finetune_lr', type=float, default=None,
                      help='fine-tuning peak learning rate (default: configs/finetune.py demo)')
  parser.add_argument('--linear_probe', action='store_true',
                      help='linear probes of the frozen features instead of fine-tuning')
  parser.add_argument('--quick', action='store_true', help='smoke run: seed 0, full + scratch, '
                      'a few steps')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  methods = args.methods.split(',')
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f'unknown methods {unknown}; choose from {list(METHODS)}')
  if args.quick:
    seeds, methods = seeds[:1], ['full', 'scratch']
    args.out = args.out.rstrip('/') + '_quick'
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  # Every run compiles the same few functions: keep the executables across runs.
  jax.config.update('jax_compilation_cache_dir', str(out / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

  start = time.perf_counter()
  log = lambda line: print(f'[{time.perf_counter() - start:6.0f} s] {line}', flush=True)
  results = [run_method(m, s, out, args.quick, args.pretrain_per_seed, args.linear_probe,
                        args.finetune_steps, args.finetune_lr, log)
             for s in seeds for m in methods]
  rows = summarize(results, methods)
  table = markdown(rows)
  header = (f'{datetime.date.today()}, {platform.node()}, {jax.device_count()} '
            f'{jax.devices()[0].platform} device(s), jax {jax.__version__}; seeds {seeds}, '
            f'pre-training {"per seed" if args.pretrain_per_seed else "once per method"}'
            f'{"; LINEAR PROBE" if args.linear_probe else ""}'
            f'{f"; {args.finetune_steps} fine-tuning steps" if args.finetune_steps else ""}; '
            f'total {time.perf_counter() - start:.0f} s this invocation')
  print(header)
  print(table)
  name = 'probe_results' if args.linear_probe else 'results'
  (out / f'{name}.json').write_text(json.dumps({'header': header, 'rows': rows,
                                                'runs': results}, indent=1))
  (out / f'{name}.md').write_text(header + '\n\n' + table + '\n')


if __name__ == '__main__':
  main()
