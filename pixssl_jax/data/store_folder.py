"""The store folder of `prepare`: where a store may go, its temporary folders, the rename.

A store is built in a temporary folder beside `STORE` and moved into place by `move_into_place`
once complete, so no run leaves a partial store; `remove_stale_temps` clears what a killed run
left behind. Every refusal is a `PrepareError` raised before anything is touched.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from collections.abc import Mapping

from etils import epath

from pixssl_jax.data.raw_cases import PrepareError

# Temporary folders beside STORE: `.STORE.tmp-<host>-<pid>-<rand>` (the store being built)
# and `.STORE.old-<host>-<pid>-<rand>` (the store being replaced). The host tag and pid tell a
# later run whether the owner is gone; a folder without a host tag is judged by its pid.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(data_dir: str, kind: str) -> str:
  parent, name = os.path.split(data_dir)
  suffix = f'{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  return os.path.join(parent, f'.{name}.{kind}-{suffix}')


def _process_alive(pid: int) -> bool:
  if os.name != 'posix':
    return True  # os.kill(pid, 0) would terminate the process on Windows; never judge there.
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: alive, owned by another user.
    return True
  return True


def remove_stale_temps(data_dir: str) -> list[str]:
  """Removes temporary folders of earlier runs for `data_dir` whose process is gone.

  Only names of `temp_path`'s pattern, made on this host, are touched; a folder of a run
  still in progress (its pid alive) is left alone.

  Returns:
    The folders removed.
  """
  parent, name = os.path.split(data_dir)
  pattern = re.compile(
      rf'\.{re.escape(name)}\.(?:tmp|old)-(?:([0-9a-f]{{8}})-)?(\d+)-[0-9a-f]{{8}}')
  removed = []
  for entry in sorted(os.listdir(parent)):
    match = pattern.fullmatch(entry)
    path = os.path.join(parent, entry)
    if (not match or match.group(1) not in (None, HOST_TAG)
        or _process_alive(int(match.group(2)))
        or os.path.islink(path) or not os.path.isdir(path)):
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed


def _not_a_store(path: str) -> str | None:
  """Why `path` does not hold a store written by `prepare`; None when it does (a store.json
  with a format version)."""
  store_json = os.path.join(path, 'store.json')
  if not os.path.exists(store_json):
    return 'no store.json'
  try:
    with open(store_json) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError.
    return f'its store.json does not read: {type(e).__name__}'
  if not isinstance(meta, dict) or 'format_version' not in meta:
    return 'its store.json has no format_version'
  return None


def _is_store(path: str) -> bool:
  return _not_a_store(path) is None


def check_target(data_dir: str, overwrite: bool) -> None:
  """Raises PrepareError unless `data_dir` is absent, empty, or a store to overwrite."""
  if not os.path.lexists(data_dir):
    return
  if not os.path.isdir(data_dir):
    raise PrepareError(data_dir, '--data_dir exists and is not a folder')
  not_a_store = _not_a_store(data_dir)
  if not_a_store is None:
    if not overwrite:
      raise PrepareError(data_dir, 'store already exists; pass --overwrite to replace it')
  elif os.listdir(data_dir):
    raise PrepareError(data_dir, '--data_dir is not empty and is not a store written by '
                       f'prepare ({not_a_store}); ' + (
                           '--overwrite replaces only stores, nothing was touched' if overwrite
                           else 'choose a new or empty folder'))


def _inside(path: str, folder: str) -> bool:
  return path != folder and os.path.commonpath([path, folder]) == folder


def check_apart(data_dir: str, sources: Mapping[str, str | None]) -> None:
  """Raises PrepareError if `data_dir` is, contains or lies inside a source folder.

  A store inside the raw folder would be read back as raw data, and replacing a store that
  contains the raw folder would delete it; real paths, so symlinks cannot hide either.
  """
  store_real = os.path.realpath(data_dir)
  for flag, source in sources.items():
    if source is None:
      continue
    source_real = os.path.realpath(source)
    if store_real == source_real:
      relation = 'is the same folder as'
    elif _inside(store_real, source_real):
      relation = 'is inside'
    elif _inside(source_real, store_real):
      relation = 'contains'
    else:
      continue
    raise PrepareError(data_dir, f'--data_dir {relation} {flag} {source}; write the store to '
                       'a folder of its own')


@contextlib.contextmanager
def _signals_deferred():
  """Holds SIGINT and SIGTERM back (delivered on exit) so a rename pair is never cut."""
  can_block = (hasattr(signal, 'pthread_sigmask')
               and threading.current_thread() is threading.main_thread())
  held = {signal.SIGINT, signal.SIGTERM}
  old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if can_block else None
  try:
    yield
  finally:
    if can_block:
      signal.pthread_sigmask(signal.SIG_SETMASK, old)


def move_into_place(tmp_dir: str, data_dir: str, overwrite: bool) -> None:
  """Moves the finished store to `data_dir`; each rename is atomic on one filesystem."""
  check_target(data_dir, overwrite)  # Again: something may have appeared meanwhile.
  old = None
  with _signals_deferred():
    if _is_store(data_dir):
      old = temp_path(data_dir, 'old')
      os.rename(data_dir, old)
    try:
      # Onto an absent or empty folder; a folder filled meanwhile makes this fail, not vanish.
      os.rename(tmp_dir, data_dir)
    except OSError as e:
      if old is not None:
        os.rename(old, data_dir)
      raise PrepareError(data_dir, f'cannot move the finished store into place ({e.strerror}); '
                         'nothing was changed') from e
  if old is not None and os.path.islink(old):
    os.remove(old)  # A link to a store: drop the link, leave what it pointed to.
  elif old is not None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def temporary_store(data_dir: str, verbose: bool) -> Iterator[epath.Path]:
  """A new temporary folder beside `data_dir` to build the store in; removed on exit.

  Temporary folders that killed runs left for `data_dir` are removed first. Whatever the
  block does not move into place (`move_into_place`) is gone afterwards, also after an
  exception or SIGTERM turned into one.
  """
  os.makedirs(os.path.dirname(data_dir), exist_ok=True)
  for path in remove_stale_temps(data_dir):
    if verbose:
      print(f'removed {path}, left behind by an interrupted prepare run', flush=True)
  tmp_dir = epath.Path(temp_path(data_dir, 'tmp'))
  (tmp_dir / 'staging').mkdir(parents=True)
  try:
    yield tmp_dir
  finally:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir, ignore_errors=True)
