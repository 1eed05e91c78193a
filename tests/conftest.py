"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# A pytest-xdist worker inherits the controller's environment, with the compilation cache set
# below: hidden from this process's jax, as without workers, and kept for its subprocesses.
_INHERITED_CACHE = (os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)
                    if 'PYTEST_XDIST_WORKER' in os.environ else None)

import jax  # noqa: E402,F401  pylint: disable=unused-import

if _INHERITED_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _INHERITED_CACHE

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's multiprocess prefetch reads absl flags; parse them once with no arguments.
if not flags.FLAGS.is_parsed():
  flags.FLAGS(['pytest'])

# The command-line tests start many `python -m pixssl_jax.main` processes that compile the same
# tiny steps: one persistent compilation cache for the session lets all but the first load
# them. Set after jax is imported, so it reaches only those subprocesses (their environment),
# and tests in this process that inspect compiled executables compile them themselves.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='pixssl_test_jax_cache_')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


@pytest.hookimpl(optionalhook=True)  # A hook of pytest-xdist: valid without it too.
def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  """Workers for `pytest -n auto` (pytest-xdist): one per core, at most 4.

  Most of the suite's time is single-threaded (XLA compiles, interpreter start-up of the
  `python -m pixssl_jax.main` runs the command-line tests start), so a worker per core pays;
  each worker with the training run it starts holds a few GB, hence the cap.
  """
  return max(1, min(len(os.sched_getaffinity(0)), 4))
