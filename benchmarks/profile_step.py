r"""Where the train step's time goes on this machine: XLA ops grouped by kind, from a trace.

  PYTHONPATH=. python benchmarks/profile_step.py [--preset demo] [--steps 3] [--top 25]

Compiles the preset's train step, runs `--steps` steps under `jax.profiler.trace`, reads the
trace back (`jax._src.lib._profile_data`, the reader JAX ships) and sums the host events of
the XLA:CPU executable by op name. Prints the top ops and a grouping by kind (convolution,
dot, reduce/norm, fusion, copy/transpose, ...). Times are per step; op names are XLA's, so
`convolution.12` and its `fusion` neighbours map back to the model through the HLO dump
(`XLA_FLAGS=--xla_dump_to=DIR`), not one-to-one to layers.
"""

import argparse
import collections
import pathlib
import re
import tempfile

import jax

from benchmarks import train_step as bench
from jax._src.lib import _profile_data  # pylint: disable=g-direct-tensorflow-import

_KINDS = (('convolution', 'convolution'), ('dot', 'dot'), ('reduce', 'reduce'),
          ('transpose', 'copy/transpose'), ('copy', 'copy/transpose'),
          ('concatenate', 'concatenate/slice/pad'), ('slice', 'concatenate/slice/pad'),
          ('pad', 'concatenate/slice/pad'), ('gather', 'gather/scatter'),
          ('scatter', 'gather/scatter'), ('rng', 'random bits'), ('threefry', 'random bits'),
          ('sort', 'sort'), ('fusion', 'other fusion'))


def kind_of(name: str) -> str:
  base = re.sub(r'[.\d]+$', '', name)
  for key, kind in _KINDS:
    if key in base:
      return kind
  return 'other'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='demo')
  parser.add_argument('--batch', type=int, default=None)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args()
  mesh = bench.mesh_lib.make_data_mesh(jax.devices()[:1])
  step = bench.JaxStep(bench.preset_config(args.preset, args.batch), mesh)
  step()  # Warm-up outside the trace.
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir):
      for _ in range(args.steps):
        step()
    path = next(pathlib.Path(logdir).rglob('*.xplane.pb'))
    profile = _profile_data.ProfileData.from_file(str(path))
  totals = collections.Counter()
  for plane in profile.planes:
    if not plane.name.startswith('/host:'):
      continue
    for line in plane.lines:
      for event in line.events:
        name = event.name
        # XLA:CPU thunks are named after their HLO instruction; skip Python/runtime markers.
        if re.match(r'^[a-z][a-z_\-]*(\.\d+)*$', name) and not name.startswith('end'):
          totals[name] += event.duration_ns / 1e6 / args.steps
  step_ms = sum(totals.values())
  print(f'{args.preset}: {len(totals)} ops, {step_ms:.0f} ms of op time per step '
        f'(ops on parallel threads add up)\n')
  print('| op | ms/step |\n| --- | --- |')
  for name, ms in totals.most_common(args.top):
    print(f'| {name} | {ms:.1f} |')
  kinds = collections.Counter()
  for name, ms in totals.items():
    kinds[kind_of(name)] += ms
  print('\n| kind | ms/step | share |\n| --- | --- | --- |')
  for kind, ms in kinds.most_common():
    print(f'| {kind} | {ms:.1f} | {100 * ms / step_ms:.0f}% |')


if __name__ == '__main__':
  main()
