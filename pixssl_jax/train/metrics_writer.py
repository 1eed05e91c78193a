"""What a person reads during a run: a progress line, TensorBoard scalars, metrics.jsonl.

Only process 0 writes; the others get a writer that does nothing, so call sites need no
`if jax.process_index() == 0`. TensorBoard event files come from tensorboardX, which needs no
TensorFlow (flax's and clu's writers import it).
"""

import json
import math
import time
from typing import Mapping

import numpy as np
from etils import epath


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'


class MetricsWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` and prints a progress line.

  Args:
    workdir: the run directory; events go to `workdir/tensorboard`.
    num_steps: total steps of the run, for the ETA.
    voxels_per_step: input voxels consumed per step (both views, global batch), for voxels/s.
    enabled: False on every process but 0.
    print_fn: where progress lines go (tests capture it).
    loss_parts: the pre-training loss metrics the progress line shows beside the total
      (`loss_<name>`, the enabled terms' own losses); the others are 0 in such a run.
  """

  def __init__(self, workdir: str, *, num_steps: int, voxels_per_step: int,
               enabled: bool = True, print_fn=print, loss_parts: tuple[str, ...] = ()):
    self._enabled = enabled
    self._loss_parts = loss_parts
    self._num_steps = num_steps
    self._voxels_per_step = voxels_per_step
    self._print = print_fn
    self._last_time = None
    self._last_step = None
    self._tb = None
    self._jsonl_path = epath.Path(workdir) / 'metrics.jsonl'
    # Cloud storage objects cannot be appended to: there the file is rewritten whole.
    self._appendable = '://' not in str(workdir)
    self._jsonl_lines = []
    if enabled:
      from tensorboardX import SummaryWriter  # Import only where it is used: process 0.
      self._tb = SummaryWriter(logdir=str(epath.Path(workdir) / 'tensorboard'))
      if not self._appendable and self._jsonl_path.exists():
        self._jsonl_lines = self._jsonl_path.read_text().splitlines(keepends=True)

  def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = 'train') -> None:
    """Logs `scalars` at `step` (the number of completed steps) and prints a progress line."""
    if not self._enabled:
      return
    values = {f'{prefix}/{k}': float(v) for k, v in scalars.items()}
    now = time.perf_counter()
    if self._last_time is not None and step > self._last_step:
      steps_per_sec = (step - self._last_step) / (now - self._last_time)
      values[f'{prefix}/steps_per_sec'] = steps_per_sec
      values[f'{prefix}/voxels_per_sec'] = steps_per_sec * self._voxels_per_step
    self._last_time, self._last_step = now, step
    for key, value in values.items():
      self._tb.add_scalar(key, value, step)
    self._tb.flush()
    line = json.dumps({'step': int(step), **values}) + '\n'
    if self._appendable:
      with self._jsonl_path.open('a') as f:
        f.write(line)
    else:
      self._jsonl_lines.append(line)
      self._jsonl_path.write_text(''.join(self._jsonl_lines))
    self._print(self._progress_line(step, values, prefix))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Logs `[H, W]` images to TensorBoard, each scaled to [0, 1] by its own range."""
    if not self._enabled:
      return
    for key, image in images.items():
      image = np.asarray(image, np.float32)
      low, high = float(image.min()), float(image.max())
      image = (image - low) / (high - low) if high > low else np.zeros_like(image)
      self._tb.add_image(key, image[None], step, dataformats='CHW')
    self._tb.flush()

  def _progress_line(self, step: int, values: Mapping[str, float], prefix: str) -> str:
    get = lambda k: values.get(f'{prefix}/{k}', float('nan'))
    has = lambda *keys: all(f'{prefix}/{k}' in values for k in keys)
    parts = [f'step {step}/{self._num_steps}' if prefix == 'train'
             else f'{prefix} at step {step}']
    if has('loss_global', 'loss_pixel'):  # Pre-training.
      shown = ', '.join(f"{k.removeprefix('loss_')} {get(k):.4f}" for k in self._loss_parts)
      parts.append(f"loss {get('loss'):.4f}" + (f' ({shown})' if shown else ''))
      if 'loss_pixel' in self._loss_parts:
        parts.append(f"uncertainty {get('uncertainty_mean'):.2e}"
                     f" (Spearman with d {get('uncertainty_spearman'):+.2f})")
    elif has('dice_loss', 'ce_loss'):  # Fine-tuning.
      parts.append(f"loss {get('loss'):.4f} (dice {get('dice_loss'):.4f}, "
                   f"ce {get('ce_loss'):.4f})")
    if has('dice', 'hd95'):  # Validation.
      parts.append(f"Dice {100 * get('dice'):.1f}% HD95 {get('hd95'):.1f} mm")
    if has('lr'):
      parts.append(f"lr {get('lr'):.2e}")
    rate = values.get(f'{prefix}/steps_per_sec')
    if rate:
      eta = (self._num_steps - step) / rate
      parts.append(f'{rate:.2f} steps/s, {rate * self._voxels_per_step / 1e6:.2f} Mvox/s, '
                   f'ETA {_format_duration(eta)}')
    return ' | '.join(parts)

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
