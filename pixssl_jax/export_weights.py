r"""Writes a run's network weights to a plain file (console script `pixssl-export`).

  python -m pixssl_jax.export_weights --workdir RUN --out FILE.safetensors|FILE.npz \
      [--checkpoint best|last|STEP]

A pre-training run exports its student's U-Net backbone (`backbone/...`, the part fine-tuning
loads); a fine-tuning run its whole segmentation network (`backbone/...` and `seg_head/...`)
with its class names and preprocessing. Tensor names, layout and metadata:
`pixssl_jax/weights_file.py`. Fine-tuning starts from such a file with
`--config.init=file --config.init_file=FILE`.

`--checkpoint`: a pre-training run's latest checkpoint that restores (default) or a step; a
fine-tuning run's 'best' (default), 'last' or a step. Exit status 2 when the run or the file
name is unusable.
"""

import argparse
import sys
from collections.abc import Sequence

import jax

from pixssl_jax import paths
from pixssl_jax import weights_file
from pixssl_jax.rundir import config_io
from pixssl_jax.rundir import networks
from pixssl_jax.rundir import run_record


def export(workdir: str, out: str, checkpoint: str | None = None) -> tuple[str, dict]:
  """Writes `workdir`'s network to `out`; returns (path, metadata).

  Raises:
    ConfigError: not a run, no checkpoint, a step that does not restore.
    WeightsFileError: `out` is not a .safetensors or .npz name.
  """
  config = config_io.read_config(workdir, what='--workdir')
  if config.get('mode') == 'pretrain':
    step = None if checkpoint in (None, 'last') else int(checkpoint)
    params, step, _ = networks.restore_student_params(
        workdir, step, what='--workdir', choose='--checkpoint')
    params = {'backbone': params['backbone']}
    meta = weights_file.metadata('backbone', config, step=step, workdir=workdir)
  else:
    record = run_record.read(workdir, config)
    model = networks.segmentation_model(config, record['num_classes'])
    params, step = networks.restore_segmentation_params(
        workdir, config, model, checkpoint or 'best', field='checkpoint')
    meta = weights_file.metadata(
        'segmentation', config, step=step, workdir=workdir, num_classes=record['num_classes'],
        label_names={str(k): v for k, v in record['label_names'].items()},
        preprocessing={'orientation': record['orientation'],
                       'spacing': list(record['spacing']),
                       'hu_window': list(record['hu_window'])})
  return weights_file.save(out, jax.device_get(params), meta), meta


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (module docstring); returns the exit status."""
  parser = argparse.ArgumentParser(prog='pixssl-export', description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a pre-training or fine-tuning run')
  parser.add_argument('--out', required=True, help='FILE.safetensors or FILE.npz')
  parser.add_argument('--checkpoint', default=None,
                      help="pre-training: the latest (default) or a step; fine-tuning: 'best' "
                           "(default), 'last' or a step")
  args = parser.parse_args(argv)
  try:
    path, meta = export(paths.absolute(args.workdir), paths.absolute(args.out), args.checkpoint)
  except (config_io.ConfigError, weights_file.WeightsFileError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote the {meta["kind"]} of {args.workdir} (step {meta["source"]["step"]}) to {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
