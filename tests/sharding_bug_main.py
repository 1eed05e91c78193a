"""`python -m pixssl_jax.main` with an injected sharding bug: every process reads shard 0.

The topology tests run this beside the correct program to show that their tolerance, derived
from rounding, still catches a real sharding fault: with two processes the global batch then
holds process 0's examples twice, as when a loader ignores `jax.process_index()`.
"""

import runpy

from pixssl_jax.data import pipeline

_correct_loader = pipeline.pretrain_loader


def _loader_reading_shard_zero(*args, **kwargs):
  kwargs['shard_index'] = 0
  return _correct_loader(*args, **kwargs)


if __name__ == '__main__':
  pipeline.pretrain_loader = _loader_reading_shard_zero
  runpy.run_module('pixssl_jax.main', run_name='__main__', alter_sys=True)
