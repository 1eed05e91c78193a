"""A checkpoint save that fails (no space, no permission, an I/O error) as one clear error.

Orbax writes a checkpoint in background threads; when a write fails, the failure comes back in
the main thread at the next `save` or `wait_until_finished`, as a TensorStore `ValueError`
whose text holds the OS error code, after each thread has logged its own traceback.
`SaveError` says in one line which step failed, where, why, and which step a resume will
continue from; the failed step's temporary folder is removed and the manager closed, so no
thread is left to write at interpreter shutdown.
"""

import logging
import os
import re
import weakref

import orbax.checkpoint as ocp
from etils import epath

from pixssl_jax.rundir import orbax_noise

_TMP_MARK = '.orbax-checkpoint-tmp'
_TMP_STEP = re.compile(r'/(\d+)' + re.escape(_TMP_MARK))
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_TS_STATUS = re.compile(r'\b(RESOURCE_EXHAUSTED|PERMISSION_DENIED|DATA_LOSS|UNAVAILABLE|'
                        r'INTERNAL|UNKNOWN|FAILED_PRECONDITION|NOT_FOUND)\b')
_REASON_CHARS = 160
# Step of the save each manager has in flight, and the managers whose failure was reported.
_in_flight: 'weakref.WeakKeyDictionary[ocp.CheckpointManager, int]' = weakref.WeakKeyDictionary()
_failed: 'weakref.WeakSet[ocp.CheckpointManager]' = weakref.WeakSet()


class SaveError(RuntimeError):
  """A checkpoint could not be written; one line: step, folder, reason, what a resume uses."""


class _QuietSaveThreadErrors(logging.Filter):
  """Drops Orbax's own error records (with tracebacks) from its background save threads.

  Every such failure reaches the main thread as an exception, which `SaveError` reports in
  one line; the records would print the same error a hundred lines over, several times.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR
                and f'{os.sep}orbax{os.sep}checkpoint{os.sep}' in record.pathname)


def quiet_orbax_save_logs() -> None:
  """Installs `_QuietSaveThreadErrors` on the absl logger (once per process)."""
  logger = logging.getLogger('absl')
  if not any(isinstance(f, _QuietSaveThreadErrors) for f in logger.filters):
    logger.addFilter(_QuietSaveThreadErrors())


def _errors(error: BaseException):
  """`error` and its causes and contexts, outermost first."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def reason(error: BaseException) -> str:
  """What went wrong, in a few words: the OS error where one is named, else the first line."""
  for e in _errors(error):
    if isinstance(e, OSError) and e.errno:
      return f'{os.strerror(e.errno)} [errno {e.errno}]'
    found = _OS_CODE.search(str(e))
    if found:
      code = int(found.group(1))
      return f'{os.strerror(code)} [errno {code}]'
  for e in _errors(error):
    status = _TS_STATUS.search(str(e))
    if status:
      return f'{status.group(1)} while writing'
  root = list(_errors(error))[-1]
  first = (str(root).strip().splitlines() or [''])[0]
  if len(first) > _REASON_CHARS:
    first = first[:_REASON_CHARS - 3] + '...'
  return f'{type(root).__name__}: {first}' if first else type(root).__name__


def _failed_step(error: BaseException, manager: ocp.CheckpointManager, step: int) -> int:
  """The step whose save failed: the one the error's path names, else the save in flight
  before `step` if it did not finish (called once the manager is closed), else `step`."""
  for e in _errors(error):
    found = _TMP_STEP.search(str(e))
    if found:
      return int(found.group(1))
  previous = _in_flight.get(manager)
  if previous is not None and previous != step and not (
      epath.Path(manager.directory) / str(previous)).exists():
    return previous
  return step


def _remove_tmp(directory: epath.Path, step: int) -> None:
  """Removes the unfinished folder(s) of `step` (Orbax names them STEP.orbax-checkpoint-tmp*)."""
  try:
    for path in directory.glob(f'{step}{_TMP_MARK}*'):
      path.rmtree(missing_ok=True) if path.is_dir() else path.unlink(missing_ok=True)
  except OSError:
    pass  # What cannot be removed, the next start's clean-up removes.


def _close_quietly(manager: ocp.CheckpointManager) -> None:
  """Joins the manager's threads; they raise the same failure again, already reported."""
  try:
    manager.close()
  except Exception:  # pylint: disable=broad-except
    pass


def failure(manager: ocp.CheckpointManager, step: int, error: BaseException) -> SaveError:
  """The `SaveError` for `error`, raised by a save of `step` or a wait after it.

  Closes the manager, removes the failed step's temporary folder and reads which steps are
  intact on disk, for the line.
  """
  _failed.add(manager)
  orbax_noise.quiet_abandoned_orbax_work()  # Also a library caller saving without `main`.
  _close_quietly(manager)  # First: a save still in flight finishes or fails for good.
  failed = _failed_step(error, manager, step)
  directory = epath.Path(manager.directory)
  _remove_tmp(directory, failed)
  try:  # Finished steps carry their bare number; a folder still being written does not.
    intact = sorted(int(p.name) for p in directory.iterdir()
                    if p.name.isdigit() and int(p.name) != failed)
  except OSError:
    intact = []
  resume = (f'a resume will continue from step {intact[-1]}, the newest intact checkpoint'
            if intact else 'no checkpoint is intact: a resume starts again from step 0')
  return SaveError(f'checkpoint step {failed} could not be saved to {directory / str(failed)} '
                   f'({reason(error)}); {resume}.')


def save(manager: ocp.CheckpointManager, step: int, *args, **kwargs) -> bool:
  """`manager.save(step, ...)`, a failure of this save or of the one in flight as SaveError."""
  quiet_orbax_save_logs()
  try:
    saved = manager.save(step, *args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    # TensorStore and Orbax raise ValueError, OSError or bare Exception for a failed write.
    raise failure(manager, step, e) from e
  _in_flight[manager] = step
  return saved


def wait(manager: ocp.CheckpointManager) -> None:
  """`manager.wait_until_finished()`, a failed save as SaveError (once: a manager whose
  failure was reported is closed and has nothing left to wait for)."""
  if manager in _failed:
    return
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise failure(manager, _in_flight.get(manager, -1), e) from e
