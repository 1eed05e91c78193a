"""One writer per workdir: a lock file that a second run finds held and stops at.

`held(workdir)` is taken by `pixssl_jax.main` around every job that writes into a workdir
(pre-training, fine-tuning, evaluation). The lock is `WORKDIR/.pixssl.lock`, holding the host,
pid and start time of the run, under an exclusive `flock` that the kernel drops when the
process ends however it ends; so a lock file left by a killed run is taken over with a warning,
and a live one refuses the second run at once, naming its holder. Where the filesystem has no
`flock` (some network mounts), a lock file on this host whose process is gone is stale, and one
of another host counts as live. The file is removed when the run ends, and so is a workdir the
lock created and nothing else filled, so a refused run leaves no trace.

A multi-process run is one job: process 0 takes the lock for all and tells the others whether
it got it. `gs://` and other URL workdirs have no lock (object stores have no `flock`); see
docs/running.md for what protects them.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator

LOCK_NAME = '.pixssl.lock'
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir, or the lock cannot be written; one line."""


def _describe(holder: dict) -> str:
  if not holder:
    return 'another run that has not written its name yet'
  since = holder.get('since', '?')
  return f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, since {since}'


def _read_holder(fd: int) -> dict:
  """The holder record in the open lock file; {} when empty or unreadable."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode('utf-8', 'replace')
    return json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {'host': '?', 'pid': '?', 'since': '? (the lock file does not parse)'}


def _alive_here(holder: dict) -> bool:
  """Without flock: whether the holder may still run (another host's always may)."""
  if holder.get('host') != socket.gethostname():
    return True
  try:
    os.kill(int(holder.get('pid')), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # Another user's live process, or a record we cannot judge: keep out.
  return True


def _created_dirs(path: str) -> list[str]:
  """Makes `path` and its missing parents; returns those it created, deepest first."""
  missing, probe = [], path
  while not os.path.exists(probe):
    missing.append(probe)
    probe = os.path.dirname(probe)
  os.makedirs(path, exist_ok=True)
  return missing


def _write_record(fd: int, lock_path: str) -> None:
  record = {'host': socket.gethostname(), 'pid': os.getpid(),
            'since': time.strftime('%Y-%m-%d %H:%M:%S'), 'argv': sys.argv}
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(record).encode())
  os.fsync(fd)


def acquire(workdir: str, warn: Callable[[str], None]) -> tuple[int, list[str]]:
  """Takes the lock of a local `workdir`: (open lock fd, folders the lock created).

  Raises:
    WorkdirLocked: another live run holds it, or the workdir cannot be written.
  """
  lock_path = os.path.join(workdir, LOCK_NAME)
  try:
    created = _created_dirs(workdir)
  except OSError as e:
    raise WorkdirLocked(f'--workdir {workdir}: cannot be created ({e.strerror or e})') from None
  for _ in range(10):  # A holder may remove the file between our open and our flock.
    try:
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      _remove_created(created)
      raise WorkdirLocked(f'--workdir {workdir}: not writable ({e.strerror or e})') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      has_flock = True
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirLocked(f'--workdir {workdir} is in use by another run ({_describe(holder)}); '
                          'wait for it to end or use another --workdir') from None
    except OSError as e:
      if e.errno not in _NO_FLOCK:
        os.close(fd)
        _remove_created(created)
        raise WorkdirLocked(f'--workdir {workdir}: cannot lock {lock_path} '
                            f'({e.strerror or e})') from None
      has_flock = False
    try:
      same_file = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
    except FileNotFoundError:
      same_file = False
    if not same_file:  # Locked a file its holder had just removed: try the new one.
      os.close(fd)
      continue
    previous = _read_holder(fd)
    if previous and not has_flock and _alive_here(previous):
      os.close(fd)
      raise WorkdirLocked(
          f'--workdir {workdir} is in use by another run ({_describe(previous)}); wait for it '
          f'to end or use another --workdir (if that run is gone, delete {lock_path})')
    if previous:
      warn(f'warning: {lock_path} was left by a run that has ended ({_describe(previous)}); '
           'taking it over.')
    try:
      _write_record(fd, lock_path)
    except OSError as e:
      os.close(fd)
      os.unlink(lock_path)
      _remove_created(created)
      raise WorkdirLocked(f'--workdir {workdir}: not writable ({e.strerror or e})') from None
    return fd, created
  raise WorkdirLocked(f'--workdir {workdir}: its lock file keeps changing; another run is '
                      'starting or ending there')


def _remove_created(created: list[str]) -> None:
  """Removes the folders the lock made, deepest first, while they are empty."""
  for path in created:
    try:
      os.rmdir(path)
    except OSError:
      return  # Not empty: the run wrote into it, so it stays, and so do its parents.


def release(workdir: str, fd: int, created: list[str]) -> None:
  """Removes the lock file (before unlocking, so no one locks the removed file) and the
  folders the lock created that are still empty."""
  with contextlib.suppress(FileNotFoundError):
    os.unlink(os.path.join(workdir, LOCK_NAME))
  os.close(fd)
  _remove_created(created)


def _warn(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _agree(ok: bool) -> bool:
  """Process 0's outcome, on every process of a multi-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return ok
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


@contextlib.contextmanager
def held(workdir: str, *, process_index: int = 0,
         warn: Callable[[str], None] = _warn) -> Iterator[None]:
  """Holds the lock of `workdir` for the body; `process_index` 0 takes it for the job.

  Raises:
    WorkdirLocked: on every process, when process 0 could not take it.
  """
  if '://' in workdir:
    yield
    return
  fd, created, failure = None, [], None
  if process_index == 0:
    try:
      fd, created = acquire(workdir, warn)
    except WorkdirLocked as e:
      failure = e
  if not _agree(failure is None):
    raise failure or WorkdirLocked(f'--workdir {workdir}: process 0 could not lock it (its '
                                   'log says why)')
  try:
    yield
  finally:
    if fd is not None:
      release(workdir, fd, created)
