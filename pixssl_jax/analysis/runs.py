"""Loading a finished (or running) pre-training run for analysis: config, params, scalars.

A run's workdir holds `config.json`, `checkpoints/<step>/` (Orbax items `state`, `data`,
`meta`), `metrics.jsonl` and `tensorboard/`. `load_run` restores one checkpoint's parameters
onto a single local device, whatever number of devices or hosts wrote it: the restore target is
an abstract train state whose leaves carry a one-device replicated sharding, and Orbax reshards
onto it (docs/pitfalls.md, Orbax). The data iterator item is never read.
"""

import dataclasses
import json
import logging
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from pixssl_jax.data import case_store
from pixssl_jax.models import pixssl
from pixssl_jax.train import checkpointing
from pixssl_jax.rundir import config_upgrade
from pixssl_jax.train import loop
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import optimizers
from pixssl_jax.train import pretrain

WHICH = ('teacher', 'student')


@dataclasses.dataclass
class Run:
  """One checkpoint of a pre-training run, restored on one device.

  Attributes:
    workdir: the run directory.
    config: the run's full config (from `config.json`).
    model: the `PixSSLModel` the config builds.
    step: the restored checkpoint's step.
    steps: every checkpointed step of the run, ascending.
    which: 'teacher' or 'student': whose parameters `params` are.
    params: the chosen network's parameters (what `encode` uses).
    student_params: the student's parameters (its context stabilizer gives the uncertainty).
    teacher_params: the EMA teacher's parameters.
    device: the device holding the parameters.
  """
  workdir: str
  config: ml_collections.ConfigDict
  model: pixssl.PixSSLModel
  step: int
  steps: list[int]
  which: str
  params: Any
  student_params: Any
  teacher_params: Any
  device: jax.Device

  @property
  def ndim(self) -> int:
    """2 (the model sees axial slices) or 3 (3-D patches)."""
    return self.model.ndim

  @property
  def patch_size(self) -> tuple[int, ...]:
    """The training view size `P`."""
    return tuple(int(p) for p in self.config.data.patch_size)

  def store(self) -> case_store.CaseStore:
    """The run's prepared store (the embedded phantom store is generated if missing)."""
    return case_store.CaseStore(loop.resolve_data_dir(self.config.data))

  def __repr__(self) -> str:
    return (f'Run(workdir={self.workdir!r}, step={self.step}, steps={self.steps}, '
            f'which={self.which!r}, ndim={self.ndim}, preset={self.config.get("preset")!r})')


def read_config(workdir) -> ml_collections.ConfigDict:
  """The run's config from `WORKDIR/config.json`.

  Raises:
    FileNotFoundError: the workdir or its `config.json` does not exist.
    ValueError: `config.json` is not valid JSON.
  """
  path = epath.Path(workdir) / 'config.json'
  if not epath.Path(workdir).exists():
    raise FileNotFoundError(f'{workdir}: no such run directory')
  if not path.exists():
    raise FileNotFoundError(f'{workdir}: no config.json; is this a pixssl_jax workdir? '
                            '(python -m pixssl_jax.main writes it at the start of a run)')
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  return config_upgrade.upgrade(config)


def _read_only_manager(workdir) -> ocp.CheckpointManager:
  # Read-only and create=False: analysing a run never writes into its workdir. Orbax warns at
  # WARNING level that a read-only manager is read-only; that is the point, so hide it.
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    return ocp.CheckpointManager(checkpointing.checkpoint_dir(str(workdir)), options=options,
                                 item_names=('state', 'data', 'meta'))
  finally:
    absl_logger.setLevel(level)


def available_steps(workdir) -> list[int]:
  """Steps of the complete checkpoints in `WORKDIR/checkpoints`, ascending ([] if none)."""
  if not checkpointing.checkpoint_dir(str(workdir)).exists():
    return []
  return sorted(int(s) for s in _read_only_manager(workdir).all_steps())


def load_run(workdir, step: int | None = None, which: str = 'teacher',
             device: jax.Device | None = None,
             warn: Callable[[str], None] | None = None) -> Run:
  """Restores a run's config and the parameters of one checkpoint onto one device.

  Args:
    workdir: the run directory (`--workdir` of `python -m pixssl_jax.main`).
    step: the checkpoint step; None takes the newest one that restores (a damaged newer one
      is skipped with a warning).
    which: 'teacher' (the EMA network, what the paper transfers) or 'student'; decides
      `Run.params`. Both trees are restored either way.
    device: where the parameters go; None is the first local device (a GPU if there is one).
    warn: receives one line per damaged checkpoint skipped (default: stderr).

  Returns:
    The `Run`.

  Raises:
    FileNotFoundError: no workdir, no `config.json`, or no checkpoint in it.
    ValueError: `which` is unknown, or `step` is not a checkpoint of the run (the message
      lists the steps that are).
    ConfigError: the given `step`, or with None every step, cannot be restored (the message
      names each step and why).
  """
  if which not in WHICH:
    raise ValueError(f'which must be one of {WHICH}, got {which!r}')
  workdir = str(workdir)
  config = read_config(workdir)
  steps = available_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f'{workdir}: no checkpoint in {checkpointing.checkpoint_dir(workdir)} (a run writes '
        f'its first one after config.checkpoint_every={config.get("checkpoint_every")} steps '
        'and at the end)')
  if step is not None and int(step) not in steps:
    raise ValueError(f'{workdir}: no checkpoint at step {step}; available steps: {steps}')

  model = pixssl.build_model(config.model, config.data.ndim)
  device = device if device is not None else jax.local_devices()[0]
  # Every leaf replicated on `device` only: a checkpoint from any topology restores there.
  tx = optimizers.make_optimizer(config.optim, config.num_steps)
  template = pretrain.abstract_train_state(model, tx, config, mesh_lib.make_data_mesh([device]))
  manager = _read_only_manager(workdir)

  def restore(s):
    return manager.restore(s, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template)))['state']

  try:
    if step is None:
      # As a resumed run does: a damaged newest checkpoint gives way, with a warning, to the
      # newest that restores; the workdir is left as it is.
      restored, step = checkpointing.newest_restorable(
          manager, restore, set_aside=False,
          advice='load a run whose checkpoints are intact', warn=warn)
    else:
      step = int(step)
      restored = checkpointing.restore_exact(manager, restore, step,
                                             choose='load_run(..., step=N)')
  finally:
    manager.close()
  params = restored.ema_params if which == 'teacher' else restored.params
  return Run(workdir=workdir, config=config, model=model, step=step, steps=steps, which=which,
             params=params, student_params=restored.params,
             teacher_params=restored.ema_params, device=device)


def metrics_frame(workdir):
  """The run's logged scalars as a pandas DataFrame indexed by step.

  A resumed run may log a step twice (the steps after its last checkpoint are replayed); the
  last record of each step wins, as it belongs to the run that continued.

  Args:
    workdir: the run directory.

  Returns:
    `pandas.DataFrame` with index `step` (ascending) and one column per scalar
    (`train/loss`, `train/loss_pixel`, ...); empty if nothing was logged yet.

  Raises:
    FileNotFoundError: the workdir does not exist.
    ValueError: a line of `metrics.jsonl` is not JSON (names the line).
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top  (an analysis-only dependency)

  workdir_path = epath.Path(workdir)
  if not workdir_path.exists():
    raise FileNotFoundError(f'{workdir}: no such run directory')
  path = workdir_path / 'metrics.jsonl'
  records = []
  if path.exists():
    for number, line in enumerate(path.read_text().splitlines(), start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not a JSON record ({e})') from e
  if not records:
    return pd.DataFrame(index=pd.Index([], name='step', dtype=int))
  frame = pd.DataFrame.from_records(records)
  if 'step' not in frame:
    raise ValueError(f'{path}: records have no "step" field')
  frame = frame.drop_duplicates('step', keep='last').set_index('step').sort_index()
  return frame
