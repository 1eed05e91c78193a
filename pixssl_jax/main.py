r"""Command-line entry point: pre-train, fine-tune and evaluate from a config file.

  python -m pixssl_jax.main --config configs/pretrain.py:demo --workdir runs/demo \
      [--config.num_steps=50] [--config.data.data_dir=/path/to/store]
  python -m pixssl_jax.main --config configs/finetune.py:demo --workdir runs/demo_ft \
      --config.pretrained_workdir=runs/demo [--config.mode=evaluate]

`config.mode` picks the job: 'pretrain' (configs/pretrain.py), 'finetune' or 'evaluate'
(configs/finetune.py).

Multi-process (one process per host): on Cloud TPU `jax.distributed.initialize()` finds
everything itself; elsewhere pass --coordinator_address/--num_processes/--process_id, or set
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, or run under SLURM.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from pixssl_jax import config_loading

_CONFIG = flags.DEFINE_string(
    'config', None, 'Config file with an optional preset, e.g. configs/pretrain.py:demo; set '
    'any of its fields with --config.FIELD=VALUE.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints and logs (local or gs://).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])
_OVERRIDES = []  # (field, raw value) of each --config.FIELD=VALUE, taken out before absl parses.

# Exit codes (docs/running.md): 0 done or stopped by a signal after saving; 1 a fault while
# running; 2 refused before anything was written.
EXIT_FAULT, EXIT_REFUSED = 1, 2


def _stop(message: str, code: int, silence_after: bool = False) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  if silence_after:
    # The line says what failed and what survived; what Orbax's save threads print while the
    # interpreter shuts them down (a closed event loop, unretrieved futures) only repeats it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flags, once the config overrides (which absl does not know) are taken out."""
  rest, overrides = config_loading.split_overrides(argv)
  _OVERRIDES[:] = overrides
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    _stop(str(e).splitlines()[0], EXIT_REFUSED)


def _distributed_settings() -> dict | None:
  """Coordinator, process count and index from flags, then env vars, then SLURM; else None.

  Returns {} on a Cloud TPU pod (TPU_WORKER_HOSTNAMES set), where jax finds everything itself.
  """
  env = os.environ
  address = _COORDINATOR.value or env.get('JAX_COORDINATOR_ADDRESS')
  count = _NUM_PROCESSES.value or env.get('JAX_NUM_PROCESSES') or env.get('SLURM_NTASKS')
  index = _PROCESS_ID.value
  if index is None:
    index = env.get('JAX_PROCESS_ID', env.get('SLURM_PROCID'))
  if address and count is not None and int(count) > 1:
    if index is None:
      raise app.UsageError('--process_id (or JAX_PROCESS_ID) is required with --num_processes.')
    return dict(coordinator_address=address, num_processes=int(count), process_id=int(index))
  if 'SLURM_NTASKS' in env and int(env['SLURM_NTASKS']) > 1:
    return {}  # jax's SLURM cluster detection derives the rest.
  if len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    return {}  # A multi-host TPU slice.
  return None


def _run_job(config, workdir: str) -> None:
  from pixssl_jax.train import config_checks  # pylint: disable=g-import-not-at-top
  if config.mode == 'pretrain':
    from pixssl_jax.train import pretrain  # pylint: disable=g-import-not-at-top
    pretrain.train(config, workdir)
  elif config.mode == 'finetune':
    from pixssl_jax.train import finetune  # pylint: disable=g-import-not-at-top
    finetune.train_and_evaluate(config, workdir)
  elif config.mode == 'evaluate':
    from pixssl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir)
  else:
    raise config_checks.ConfigError(
        f"config.mode={config.mode!r}: choose 'pretrain' (configs/pretrain.py), 'finetune' "
        "or 'evaluate' (configs/finetune.py).")


def main(argv):
  if len(argv) > 1:
    _stop(f'unexpected arguments {argv[1:]}; set config fields with --config.FIELD=VALUE',
          EXIT_REFUSED)
  try:
    config = config_loading.load(_CONFIG.value, _OVERRIDES)
  except config_loading.ConfigLoadError as e:
    _stop(str(e), EXIT_REFUSED)
  if not flags.FLAGS['verbosity'].present:
    # Orbax and grain log every save and read at INFO; keep the console to our progress lines.
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top  # After flag parsing: --help is instant.

  try:
    settings = _distributed_settings()
  except app.UsageError as e:
    _stop(str(e), EXIT_REFUSED)
  if settings is not None:
    jax.distributed.initialize(**settings)
  # pylint: disable=g-import-not-at-top
  from pixssl_jax import paths
  from pixssl_jax import workdir_lock
  from pixssl_jax.rundir import orbax_noise
  from pixssl_jax.train import config_checks
  from pixssl_jax.train import save_errors
  # pylint: enable=g-import-not-at-top
  orbax_noise.quiet_abandoned_orbax_work()
  # Relative paths are taken from the current directory, here and in the config's path fields.
  workdir = paths.absolute(_WORKDIR.value)
  if jax.process_index() == 0:
    print(f'pixssl_jax: {jax.process_count()} process(es), {jax.device_count()} '
          f'{jax.devices()[0].platform} device(s); workdir {workdir}', flush=True)
  try:
    with workdir_lock.held(workdir, process_index=jax.process_index()):
      _run_job(config, workdir)
  except (config_checks.ConfigError, workdir_lock.WorkdirLocked) as e:
    _stop(str(e), EXIT_REFUSED)
  except save_errors.SaveError as e:
    _stop(str(e), EXIT_FAULT, silence_after=True)
  except FloatingPointError as e:
    _stop(str(e), EXIT_FAULT)


def run() -> None:
  """Console script `pixssl-train`: `--list` prints every preset and config field, `--help`
  the usage, them and the flags; otherwise the run."""
  asked = {'--list', '--help', '-h', '-?'} & set(sys.argv[1:])
  if asked:
    from pixssl_jax import config_listing  # pylint: disable=g-import-not-at-top
    if asked != {'--list'}:  # Also under a console script, whose __main__ defines no flags.
      print(__doc__)
    print(config_listing.render(), flush=True)
    if asked != {'--list'}:
      print(flags.FLAGS.module_help(__name__))
    return
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
