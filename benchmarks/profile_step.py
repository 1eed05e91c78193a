r"""Where the train step's time goes on this machine: XLA op times from a trace, by their source.

  PYTHONPATH=. python benchmarks/profile_step.py [--preset demo] [--steps 3] [--top 25]

Compiles the preset's train step, runs `--steps` steps under `jax.profiler.trace`, reads the
trace back (`jax._src.lib._profile_data`, the reader JAX ships) and sums the host events of
the XLA:CPU executable by op name. Prints the top ops, then the times grouped by the JAX
primitive, layer kind and pass (forward/backward) each op came from, read from the compiled
HLO's metadata (the op names do not say it: most are `ynn_fusion.N` or `*_fusion.N`). Times are
per step. XLA:CPU records no events for the convolutions it runs through Eigen (with
pixssl_jax.xla_options, all of them), so compare the recorded op time with the wall time
printed next to it: most of the difference is convolution.
"""

import argparse
import collections
import pathlib
import re
import tempfile
import time

import jax

from benchmarks import train_step as bench
from jax._src.lib import _profile_data  # pylint: disable=g-direct-tensorflow-import

def source_of_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """XLA op name -> (JAX primitive, layer kind, 'forward' | 'backward'), from HLO metadata.

  XLA:CPU names its ops after their kind (`ynn_fusion.N` for the reductions it hands to
  YNNPACK with pixssl_jax.xla_options, `*_fusion.N` for the rest), so the op names alone do
  not say what the time is spent on; each instruction's `op_name`
  metadata does (e.g. `jit(train_step)/transpose(jvp(PixSSLModel))/backbone/enc0/norm0/
  reduce_sum`). The layer kind is the module name without its index (norm, conv, up, ...).
  A fusion without metadata is named by its fused computation's root (XLA drops the metadata
  of, e.g., the kernel-gradient convolutions, which only the backward pass has).
  """
  instruction = re.compile(r'^\s*(ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(([^\n]*)', re.M)
  roots, lines = {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r'^%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      computation = header.group(1)
    match = instruction.match(line)
    if match:
      lines[match.group(2)] = (match.group(3), match.group(4))
      if match.group(1):
        roots[computation] = match.group(2)

  def describe(name):
    opcode, rest = lines[name]
    op_name = re.search(r'op_name="([^"]*)"', rest)
    called = re.search(r'calls=%?([\w.\-]+)', rest)
    if not op_name and called and called.group(1) in roots:
      return describe(roots[called.group(1)])
    if not op_name:
      return (opcode, '?', 'backward' if opcode == 'convolution' else '?')
    parts = op_name.group(1).split('/')
    layer = next((re.sub(r'\d+$', '', p) for p in reversed(parts[:-1])
                  if re.match(r'^(norm|conv|up|pixel|global|proj|head)', p)), 'other')
    return (parts[-1], layer, 'backward' if 'transpose(' in op_name.group(1) else 'forward')

  return {name: describe(name) for name in lines}


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
      start = time.perf_counter()
      for _ in range(args.steps):
        step()
      wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
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
  print(f'{args.preset}: {len(totals)} ops, {step_ms:.0f} ms of recorded op time per step '
        f'(ops on parallel threads add up) of {wall_ms:.0f} ms wall time; XLA:CPU records no '
        f'events for Eigen convolutions, which take most of the rest\n')
  print('| op | ms/step |\n| --- | --- |')
  for name, ms in totals.most_common(args.top):
    print(f'| {name} | {ms:.1f} |')
  by_source = collections.Counter()
  sources = source_of_ops(step.compiled.as_text())
  for name, ms in totals.items():
    by_source[sources.get(name, ('?', '?', name))] += ms
  print('\n| JAX primitive | layer kind | pass | ms/step | share |\n| --- | --- | --- | --- | --- |')
  for (primitive, layer, direction), ms in by_source.most_common(args.top):
    print(f'| {primitive} | {layer} | {direction} | {ms:.1f} | {100 * ms / step_ms:.0f}% |')


if __name__ == '__main__':
  main()
