"""Quiet for what Orbax's abandoned concurrent reads and writes print after a failure.

When one array of a checkpoint fails to restore (a refused resume, a damaged step) or to
save, the run reports it in one `error:` line; the entry points (`main`, `pixssl-evaluate`,
`pixssl-predict`) install this so that Python's reports of the abandoned sibling work do not
print tracebacks around that line.
"""

import logging
import os
import sys
import warnings


class _QuietUnretrievedWrites(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records: after a failed save or restore
  the other arrays' futures failed the same way, and no one awaits them after the first
  failure, so they log it when they are collected."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'exception was never retrieved' not in record.getMessage()


def _drop_orbax_coroutines(unraisable) -> None:
  """`sys.unraisablehook` without Orbax's abandoned coroutines; others reported as usual."""
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename:
    return
  sys.__unraisablehook__(unraisable)


def quiet_abandoned_orbax_work() -> None:
  """Silences what Orbax's abandoned concurrent reads and writes print when collected.

  Orbax's sibling coroutines and futures of a failed array are left unawaited, and Python
  reports each (a traceback per array, "was never awaited", "exception was never retrieved")
  whenever it collects them. The run's own code awaits nothing, so only Orbax's are dropped.
  """
  if sys.unraisablehook is _drop_orbax_coroutines:
    return  # Installed already (main, then a failed save): the filters would pile up.
  sys.unraisablehook = _drop_orbax_coroutines
  warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)
  logging.getLogger('asyncio').addFilter(_QuietUnretrievedWrites())
