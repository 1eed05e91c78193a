"""Segmentation metrics: Dice and HD95 in millimetres, per organ, per case and summarised.

HD95 follows MONAI (`monai.metrics.compute_hausdorff_distance(..., percentile=95)` with
`spacing`, built on `get_mask_edges` and `get_surface_distance`):

1. Boundary of a mask: the mask XOR its binary erosion by the connectivity-1 cross
   (`scipy.ndimage.generate_binary_structure(ndim, 1)`: 6 neighbours in 3-D, 4 in 2-D), with
   everything outside the array counted as background, so foreground voxels on the array
   border are boundary voxels. A one-voxel-thick object is all boundary.
2. Directed surface distances A -> B: for every boundary voxel of A, the Euclidean distance
   in mm to the nearest boundary voxel of B, from
   `scipy.ndimage.distance_transform_edt(~boundary_B, sampling=spacing)`.
3. HD95 = max(p95(A -> B), p95(B -> A)), with `np.percentile` (linear interpolation).

Libraries disagree on HD95 (medpy, DeepMind surface-distance and MONAI give different numbers
on the same pair: docs/pitfalls.md), so this exact definition is what the docs state.

Empty masks, per organ and case:
- both empty: the organ is absent and correctly predicted absent; Dice and HD95 are NaN and
  the pair is excluded from every mean (status 'excluded');
- exactly one empty: a failure (status 'failure'): Dice 0 and HD95 = `failure_penalty`, the
  diagonal of the volume's field of view in mm, `sqrt(sum((shape_i * spacing_i)^2))`. No two
  points of the volume are farther apart, so a failure never scores better than any real
  prediction, and the penalty has a physical meaning on every dataset (a fixed constant
  would be too small for a whole-body scan and too large for a cropped one).
"""
import csv
import io
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

STATUS_OK = 'ok'
STATUS_FAILURE = 'failure'
STATUS_EXCLUDED = 'excluded'

SUMMARY_FIELDS = ('organ', 'dice_mean', 'dice_std', 'hd95_mean', 'hd95_std', 'n', 'failures',
                  'excluded')
OVERALL = 'mean'


def _check_pair(pred_mask: np.ndarray, true_mask: np.ndarray,
                spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
  pred = np.asarray(pred_mask).astype(bool, copy=False)
  true = np.asarray(true_mask).astype(bool, copy=False)
  if pred.shape != true.shape:
    raise ValueError(f'prediction shape {pred.shape} does not match label shape {true.shape}')
  if spacing is not None:
    if len(spacing) != pred.ndim:
      raise ValueError(f'spacing {tuple(spacing)} has {len(spacing)} values but the masks '
                       f'have {pred.ndim} dimensions')
    if any(not s > 0 for s in spacing):
      raise ValueError(f'spacing must be positive, got {tuple(spacing)}')
  return pred, true


def failure_penalty(shape: Sequence[int], spacing: Sequence[float]) -> float:
  """HD95 given to a one-empty failure: the field-of-view diagonal in mm.

  Args:
    shape: volume shape `(X, Y, Z)` (or 2-D).
    spacing: voxel size in mm, one value per axis.

  Returns:
    `sqrt(sum((shape_i * spacing_i)^2))`.
  """
  return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
  """Dice coefficient `2|P & T| / (|P| + |T|)`.

  Args:
    pred_mask: predicted mask `[*S]` (bool or 0/1).
    true_mask: reference mask `[*S]`.

  Returns:
    Dice in [0, 1]; NaN when both masks are empty; 0 when exactly one is.
  """
  pred, true = _check_pair(pred_mask, true_mask)
  total = int(pred.sum()) + int(true.sum())
  if total == 0:
    return float('nan')
  return 2.0 * int(np.logical_and(pred, true).sum()) / total


def _boundary(mask: np.ndarray) -> np.ndarray:
  # scipy's default structure is the connectivity-1 cross and its border_value is 0, exactly
  # MONAI's `binary_erosion(mask) ^ mask`.
  return mask & ~ndimage.binary_erosion(mask)


def _crop_to_union(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Crops both masks to the bounding box of their union, with one voxel of background.

  Distances and boundaries are unchanged: every boundary voxel lies in the box, and the
  one-voxel margin keeps "outside the array is background" true at the box faces. Saves most
  of the distance transform's cost on whole CT volumes with small organs.
  """
  union = pred | true
  box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
  pad = [(1, 1)] * pred.ndim
  return np.pad(pred[box], pad), np.pad(true[box], pad)


def surface_distances(from_mask: np.ndarray, to_mask: np.ndarray,
                      spacing: Sequence[float]) -> np.ndarray:
  """Directed surface distances in mm from the boundary of one mask to that of another.

  Args:
    from_mask: mask `[*S]` whose boundary voxels are measured; must not be empty.
    to_mask: mask `[*S]` whose boundary is the target; must not be empty.
    spacing: voxel size in mm, one value per axis.

  Returns:
    float64 `[N]`: one distance per boundary voxel of `from_mask` (order: C order of voxels).
  """
  a, b = _check_pair(from_mask, to_mask, spacing)
  if not a.any() or not b.any():
    raise ValueError('surface distances need two non-empty masks')
  a, b = _crop_to_union(a, b)
  dist_to_b = ndimage.distance_transform_edt(~_boundary(b), sampling=spacing)
  return dist_to_b[_boundary(a)]


def hd95(pred_mask: np.ndarray, true_mask: np.ndarray, spacing: Sequence[float]) -> float:
  """95th-percentile symmetric Hausdorff distance in mm (MONAI's definition, module doc).

  Args:
    pred_mask: predicted mask `[*S]` (bool or 0/1).
    true_mask: reference mask `[*S]`.
    spacing: voxel size in mm, one value per axis.

  Returns:
    HD95 in mm; NaN when both masks are empty; `failure_penalty(shape, spacing)` when exactly
    one is (use `pair_status` to tell a failure from a real distance).
  """
  pred, true = _check_pair(pred_mask, true_mask, spacing)
  status = pair_status(pred, true)
  if status == STATUS_EXCLUDED:
    return float('nan')
  if status == STATUS_FAILURE:
    return failure_penalty(pred.shape, spacing)
  forward = np.percentile(surface_distances(pred, true, spacing), 95)
  backward = np.percentile(surface_distances(true, pred, spacing), 95)
  return float(max(forward, backward))


def pair_status(pred_mask: np.ndarray, true_mask: np.ndarray) -> str:
  """'excluded' if both masks are empty, 'failure' if exactly one is, else 'ok'."""
  pred_any, true_any = bool(np.any(pred_mask)), bool(np.any(true_mask))
  if not pred_any and not true_any:
    return STATUS_EXCLUDED
  if pred_any != true_any:
    return STATUS_FAILURE
  return STATUS_OK


def case_metrics(pred_labels: np.ndarray, true_labels: np.ndarray, spacing: Sequence[float],
                 label_names: Mapping[int, str]) -> dict[str, dict]:
  """Dice and HD95 of every organ of one case.

  Args:
    pred_labels: predicted label map `[*S]` (integer classes).
    true_labels: reference label map `[*S]`.
    spacing: voxel size in mm of this grid, one value per axis.
    label_names: {label value: organ name}; value 0 (background) is skipped.

  Returns:
    {organ name: {'dice': float, 'hd95': float (mm), 'status': 'ok'|'failure'|'excluded'}}
    in label-value order.
  """
  pred_labels = np.asarray(pred_labels)
  true_labels = np.asarray(true_labels)
  if pred_labels.shape != true_labels.shape:
    raise ValueError(f'prediction shape {pred_labels.shape} does not match label shape '
                     f'{true_labels.shape}')
  out = {}
  for value, name in sorted(label_names.items()):
    if int(value) == 0:
      continue
    pred, true = pred_labels == value, true_labels == value
    out[name] = {'dice': dice(pred, true), 'hd95': hd95(pred, true, spacing),
                 'status': pair_status(pred, true)}
  return out


def case_rows(case_id: str, organ_metrics: Mapping[str, Mapping]) -> list[dict]:
  """Flattens `case_metrics` output into rows `{case_id, organ, dice, hd95, status}`."""
  return [{'case_id': case_id, 'organ': organ, 'dice': float(m['dice']),
           'hd95': float(m['hd95']), 'status': m['status']}
          for organ, m in organ_metrics.items()]


def _mean_std(values: list[float]) -> tuple[float, float]:
  if not values:
    return float('nan'), float('nan')
  return float(np.mean(values)), float(np.std(values))


def summarize(per_case_rows: Sequence[Mapping]) -> list[dict]:
  """Per-organ and overall mean and standard deviation of Dice and HD95.

  Excluded pairs (both masks empty) count nowhere but in `excluded`; failures count with
  Dice 0 and HD95 = penalty. The overall row (organ 'mean') follows MONAI's 'mean' reduction:
  each case's mean over its non-excluded organs, then mean and std over cases. Standard
  deviations are population ones (ddof=0).

  Args:
    per_case_rows: rows as made by `case_rows` (`case_id`, `organ`, `dice`, `hd95`,
      `status`).

  Returns:
    Rows with the keys of `SUMMARY_FIELDS`: one per organ (first-seen order), then 'mean'.
    `n` counts the (case, organ) pairs used (cases, for the 'mean' row).
  """
  organs: dict[str, dict] = {}
  cases: dict[str, dict] = {}
  for row in per_case_rows:
    for key in ('case_id', 'organ', 'dice', 'hd95', 'status'):
      if key not in row:
        raise ValueError(f'metric row {dict(row)} has no {key!r} field')
    if row['status'] not in (STATUS_OK, STATUS_FAILURE, STATUS_EXCLUDED):
      raise ValueError(f'metric row {dict(row)}: unknown status {row["status"]!r}')
    organ = organs.setdefault(row['organ'], {'dice': [], 'hd95': [], 'failures': 0,
                                             'excluded': 0})
    case = cases.setdefault(row['case_id'], {'dice': [], 'hd95': [], 'failures': 0,
                                             'excluded': 0})
    for acc in (organ, case):
      if row['status'] == STATUS_EXCLUDED:
        acc['excluded'] += 1
        continue
      acc['failures'] += row['status'] == STATUS_FAILURE
      acc['dice'].append(float(row['dice']))
      acc['hd95'].append(float(row['hd95']))

  def summary_row(name, dice_values, hd_values, n, failures, excluded):
    dice_mean, dice_std = _mean_std(dice_values)
    hd_mean, hd_std = _mean_std(hd_values)
    return {'organ': name, 'dice_mean': dice_mean, 'dice_std': dice_std, 'hd95_mean': hd_mean,
            'hd95_std': hd_std, 'n': n, 'failures': failures, 'excluded': excluded}

  table = [summary_row(name, acc['dice'], acc['hd95'], len(acc['dice']), acc['failures'],
                       acc['excluded']) for name, acc in organs.items()]
  scored = [c for c in cases.values() if c['dice']]
  table.append(summary_row(
      OVERALL, [float(np.mean(c['dice'])) for c in scored],
      [float(np.mean(c['hd95'])) for c in scored], len(scored),
      sum(c['failures'] for c in cases.values()), sum(c['excluded'] for c in cases.values())))
  return table


def mean_scores(summary: list[dict]) -> dict[str, float]:
  """The 'mean' row of a summary as {'dice', 'hd95'} (mean over cases of the organ means)."""
  row = next(r for r in summary if r['organ'] == 'mean')
  return {'dice': float(row['dice_mean']), 'hd95': float(row['hd95_mean'])}


def format_table(summary: Sequence[Mapping]) -> str:
  """The summary as aligned text for logs: Dice in percent, HD95 in mm."""
  width = max([len(str(r['organ'])) for r in summary] + [5])
  lines = [f'{"organ":<{width}}  {"Dice %":>14}  {"HD95 mm":>16}  {"n":>4}  {"fail":>4}  '
           f'{"excl":>4}']
  for r in summary:
    lines.append(f'{r["organ"]:<{width}}  {100 * r["dice_mean"]:6.2f} ± {100 * r["dice_std"]:5.2f}'
                 f'  {r["hd95_mean"]:7.2f} ± {r["hd95_std"]:6.2f}  {r["n"]:>4}  '
                 f'{r["failures"]:>4}  {r["excluded"]:>4}')
  return '\n'.join(lines)


def _atomic_write_text(path: str, text: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}-'
                     f'{uuid.uuid4().hex[:8]}')
  try:
    with open(tmp, 'w', newline='') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _json_safe(value):
  # NaN is not valid JSON; strict readers (JavaScript, jq) reject it.
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_metrics(out_dir: str, per_case_rows: Sequence[Mapping],
                  summary: Sequence[Mapping] | None = None, *,
                  extra: Mapping | None = None) -> tuple[str, str]:
  """Writes `metrics.csv` (the summary table) and `metrics.json`, each atomically.

  Args:
    out_dir: folder to write into (created if needed), usually the workdir.
    per_case_rows: rows from `case_rows`.
    summary: `summarize(per_case_rows)`; computed when None.
    extra: JSON-serialisable facts stored under 'info' in the JSON (checkpoint step, split,
      failure penalty rule, ...).

  Returns:
    (csv path, json path). NaN values are empty cells in the CSV and null in the JSON.
  """
  if summary is None:
    summary = summarize(per_case_rows)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator='\n')
  writer.writeheader()
  for row in summary:
    writer.writerow({k: ('' if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in row.items()})
  csv_path = os.path.join(out_dir, 'metrics.csv')
  json_path = os.path.join(out_dir, 'metrics.json')
  _atomic_write_text(csv_path, buf.getvalue())
  payload = {'summary': list(summary), 'cases': [dict(r) for r in per_case_rows],
             'info': dict(extra or {})}
  _atomic_write_text(json_path, json.dumps(_json_safe(payload), indent=1, allow_nan=False))
  return csv_path, json_path
