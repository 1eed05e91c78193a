"""Matplotlib figures of CT slices, feature PCA, uncertainty, separability and loss curves.

Every function builds a `matplotlib.figure.Figure` without pyplot (no global figure registry,
so nothing leaks in loops and any backend works, Agg included) and returns it; a notebook shows
it with `display(fig)` or as a cell's last value.

Slices are cut from RAS `[X, Y, Z]` volumes: 'axial' is `[:, :, k]`, 'coronal' `[:, k, :]`,
'sagittal' `[k, :, :]`. They are drawn in the radiological convention (patient's right on the
viewer's left, anterior / superior up) with the physical aspect of the voxel spacing. Feature
maps at a stride are drawn over the same extent in mm as the CT, so they line up.
"""

from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from pixssl_jax.analysis.features import PairAnalysis
from pixssl_jax.analysis.probes import PcaBasis
from pixssl_jax.analysis.probes import Separability
from pixssl_jax.analysis.probes import fit_pca
from pixssl_jax.analysis.probes import labels_on_grid

PLANES = {'sagittal': 0, 'coronal': 1, 'axial': 2}


def slice_of(volume: np.ndarray, plane: str = 'axial', index: int | None = None) -> np.ndarray:
  """Cuts `[X, Y, Z, ...]` at `index` (default: the middle) across `plane`'s axis."""
  if plane not in PLANES:
    raise ValueError(f'plane must be one of {sorted(PLANES)}, got {plane!r}')
  volume = np.asarray(volume)
  if volume.ndim < 3:
    raise ValueError(f'slice_of needs an [X, Y, Z, ...] volume, got shape {volume.shape}')
  axis = PLANES[plane]
  index = volume.shape[axis] // 2 if index is None else int(index)
  if not 0 <= index < volume.shape[axis]:
    raise ValueError(f'{plane} index {index} is outside [0, {volume.shape[axis]})')
  return np.take(volume, index, axis=axis)


def _in_plane_spacing(spacing: Sequence[float], plane: str) -> tuple[float, float]:
  kept = [s for a, s in enumerate(spacing) if a != PLANES[plane]]
  return float(kept[0]), float(kept[1])


def _show(ax, image: np.ndarray, extent_mm: tuple[float, float], **imshow_kwargs):
  """Draws `[A, B(, 3)]` (first axis horizontal) radiologically over `extent_mm` (A, B) mm."""
  # Rows of imshow run top to bottom, so transpose (B vertical) and flip both axes: B
  # (anterior or superior) increases upwards and A (towards the patient's right) to the left.
  picture = np.flip(np.swapaxes(image, 0, 1), axis=(0, 1))
  ax.imshow(picture, extent=(0, extent_mm[0], 0, extent_mm[1]), interpolation='nearest',
            **imshow_kwargs)
  ax.set_xticks([])
  ax.set_yticks([])


def _ct_panel(ax, ct2d, spacing2d, title):
  extent = (ct2d.shape[0] * spacing2d[0], ct2d.shape[1] * spacing2d[1])
  _show(ax, ct2d, extent, cmap='gray', vmin=0.0, vmax=1.0)
  ax.set_title(title)
  return extent


def _ct_slice(ct: np.ndarray, plane: str, index: int | None,
              spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, float], int | None]:
  """A 2-D CT image and its in-plane spacing from a volume or an already cut slice."""
  ct = np.asarray(ct, np.float32)
  if ct.ndim == 2:
    return ct, (float(spacing[0]), float(spacing[1])), None
  axis = PLANES.get(plane)
  index = ct.shape[axis] // 2 if (axis is not None and index is None) else index
  return slice_of(ct, plane, index), _in_plane_spacing(spacing, plane), index


def _feature_slice(features: np.ndarray, ct_shape: Sequence[int], plane: str,
                   index: int | None) -> np.ndarray:
  """The feature slice under CT slice `index` (feature grids may be strided per axis)."""
  if features.ndim == 3:  # Already one slice, [A, B, C].
    return features
  axis = PLANES[plane]
  cells = features.shape[axis]
  f_index = min(cells - 1, int(index * cells / ct_shape[axis]))
  return slice_of(features, plane, f_index)


def plot_overlay(ct: np.ndarray, overlay: np.ndarray, *, plane: str = 'axial',
                 index: int | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 label_names: Mapping[int, str] | None = None, alpha: float = 0.45,
                 title: str | None = None) -> Figure:
  """A CT slice with a label (or prediction) map drawn over it in colours, background clear.

  Args:
    ct: `[X, Y, Z]` volume in [0, 1] (or one `[A, B]` slice).
    overlay: integer labels of the same shape.
    plane, index: which slice (index default: middle).
    spacing: voxel size in mm `(3,)` (or `(2,)` for a slice).
    label_names: {value: name} for the legend.
    alpha: overlay opacity.
    title: figure title.
  """
  ct2d, sp, index = _ct_slice(ct, plane, index, spacing)
  overlay = np.asarray(overlay)
  lab2d = overlay if overlay.ndim == 2 else slice_of(overlay, plane, index)
  if lab2d.shape != ct2d.shape:
    raise ValueError(f'overlay slice {lab2d.shape} does not match the CT slice {ct2d.shape}')
  fig = Figure(figsize=(5, 5))
  ax = fig.add_subplot()
  extent = _ct_panel(ax, ct2d, sp, title or f'{plane} {index if index is not None else ""}')
  values = [int(v) for v in np.unique(lab2d) if v != 0]
  palette = [mcolors.to_rgba(c) for c in mcolors.TABLEAU_COLORS.values()]
  rgba = np.zeros(lab2d.shape + (4,), np.float32)
  for k, v in enumerate(values):
    rgba[lab2d == v] = palette[k % len(palette)][:3] + (alpha,)
  _show(ax, rgba, extent)
  names = label_names or {}
  handles = [ax.scatter([], [], color=palette[k % len(palette)], label=names.get(v, str(v)))
             for k, v in enumerate(values)]
  if handles:
    ax.legend(handles=handles, loc='lower left', fontsize='small', framealpha=0.6)
  return fig


def plot_features(ct: np.ndarray, features: np.ndarray | Mapping[str, np.ndarray], *,
                  plane: str = 'axial', index: int | None = None,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  basis: PcaBasis | None = None, body_threshold: float | None = 0.05,
                  title: str | None = None) -> Figure:
  """The CT slice beside the PCA colours of one or more feature maps of the same slice.

  Args:
    ct: `[X, Y, Z]` in [0, 1] (or one `[A, B]` slice).
    features: `[*F, C]` features of that volume (any stride per axis; or one `[A', B', C]`
      slice), or {panel title: features}, e.g. early and late checkpoints.
    plane, index, spacing: as `plot_overlay`.
    basis: a PCA basis for every panel; None fits one per panel on the slice's body cells.
    body_threshold: when fitting, ignore cells whose CT value is below this (air); None fits
      on every cell.
    title: figure title.
  """
  maps = dict(features) if isinstance(features, Mapping) else {'features (PCA)': features}
  ct3 = np.asarray(ct, np.float32)
  ct2d, sp, index = _ct_slice(ct3, plane, index, spacing)
  fig = Figure(figsize=(4 * (1 + len(maps)), 4.2))
  axes = fig.subplots(1, 1 + len(maps), squeeze=False)[0]
  extent = _ct_panel(axes[0], ct2d, sp, f'CT {plane} {index if index is not None else ""}')
  for ax, (name, fmap) in zip(axes[1:], maps.items()):
    fmap = np.asarray(fmap, np.float32)
    f2d = fmap if ct3.ndim == 2 else _feature_slice(fmap, ct3.shape, plane, index)
    panel_basis = basis
    if panel_basis is None:
      mask = None
      if body_threshold is not None:
        mask = labels_on_grid(ct2d >= body_threshold, f2d.shape[:-1]).astype(bool)
        mask = mask if mask.sum() >= 2 else None
      panel_basis = fit_pca(f2d, mask=mask)
    _show(ax, panel_basis.rgb(f2d), extent)
    ax.set_title(name)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_pair_uncertainty(pair: PairAnalysis, title: str | None = None) -> Figure:
  """Both views of a `PairAnalysis` with their uncertainty and discrepancy maps.

  Cells without a match in the other view are drawn grey (outside the overlap the loss
  ignores them). 3-D pairs show their middle axial slice.
  """
  def axial(x):
    return x if x.ndim == 2 else x[..., x.shape[-1] // 2]

  fig = Figure(figsize=(11, 7))
  axes = fig.subplots(2, 3)
  vmax_u = float(np.max(pair.uncertainty)) or 1.0
  vmax_d = float(np.max(pair.discrepancy[pair.overlap])) if pair.overlap.any() else 1.0
  for row in range(2):
    view = axial(pair.views[row])
    extent = view.shape[:2]
    _show(axes[row, 0], view, extent, cmap='gray', vmin=0.0, vmax=1.0)
    axes[row, 0].set_title(f'view {row + 1}')
    for col, (values, vmax, cmap, name) in enumerate(
        [(pair.uncertainty, vmax_u, 'magma', 'MC-dropout uncertainty'),
         (pair.discrepancy, vmax_d, 'viridis', 'discrepancy 2-2cos')], start=1):
      shown = np.ma.masked_where(~axial(pair.overlap[row]), axial(values[row]))
      cmap_obj = _masked_cmap(cmap)
      _show(axes[row, col], shown, extent, cmap=cmap_obj, vmin=0.0, vmax=vmax)
      axes[row, col].set_title(name)
      fig.colorbar(axes[row, col].images[-1], ax=axes[row, col], fraction=0.046, pad=0.04)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def _masked_cmap(name: str):
  return colormaps[name].with_extremes(bad='0.6')


def plot_uncertainty(ct: np.ndarray, uncertainty: np.ndarray, *, plane: str = 'axial',
                     index: int | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                     title: str | None = None) -> Figure:
  """A CT slice beside the MC-dropout uncertainty of the same slice (from `volume_uncertainty`)."""
  ct3 = np.asarray(ct, np.float32)
  ct2d, sp, index = _ct_slice(ct3, plane, index, spacing)
  u = np.asarray(uncertainty, np.float32)
  u2d = u if ct3.ndim == 2 else _feature_slice(u[..., None], ct3.shape, plane, index)[..., 0]
  fig = Figure(figsize=(9, 4.2))
  axes = fig.subplots(1, 2)
  extent = _ct_panel(axes[0], ct2d, sp, f'CT {plane} {index if index is not None else ""}')
  # The top of the colour scale at the 99th percentile: a few extreme cells would otherwise
  # leave the rest of the map in one colour.
  finite = u2d[np.isfinite(u2d)]
  vmax = float(np.percentile(finite, 99)) if finite.size else None
  _show(axes[1], u2d, extent, cmap='magma', vmin=0.0, vmax=vmax or None)
  axes[1].set_title('MC-dropout uncertainty')
  fig.colorbar(axes[1].images[-1], ax=axes[1], fraction=0.046, pad=0.04)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_separability(results: Mapping[str, Separability], title: str | None = None) -> Figure:
  """Per-organ test recall of one or more probes as grouped bars, balanced accuracy in the legend."""
  if not results:
    raise ValueError('plot_separability needs at least one result')
  organs = list(dict.fromkeys(o for r in results.values() for o in r.recall))
  fig = Figure(figsize=(max(6.0, 1.1 * len(organs) + 2), 4))
  ax = fig.add_subplot()
  width = 0.8 / len(results)
  x = np.arange(len(organs))
  for k, (name, result) in enumerate(results.items()):
    heights = [result.recall.get(o, np.nan) for o in organs]
    ax.bar(x + (k - (len(results) - 1) / 2) * width, heights, width,
           label=f'{name} (balanced acc. {result.balanced_accuracy:.2f})')
  ax.set_xticks(x, organs, rotation=30, ha='right')
  ax.set_ylim(0, 1)
  ax.set_ylabel('test recall')
  ax.legend(fontsize='small')
  ax.set_title(title or 'Per-organ linear separability')
  fig.tight_layout()
  return fig


_CURVE_GROUPS = (
    ('loss', ('train/loss', 'train/loss_global', 'train/loss_pixel')),
    ('uncertainty', ('train/uncertainty_mean', 'train/uncertainty_p90')),
    ('health', ('train/overlap_fraction', 'train/projection_std', 'train/ema_momentum')),
)


def plot_loss_curves(frame, columns: Sequence[str] | None = None,
                     title: str | None = None) -> Figure:
  """Logged scalars against the step (from `metrics_frame`).

  Args:
    frame: DataFrame indexed by step.
    columns: which columns, in one panel; None draws the losses, the uncertainty and the
      health monitors (overlap, projection std, EMA momentum) in three panels.
    title: figure title.
  """
  groups = [('scalars', tuple(columns))] if columns is not None else _CURVE_GROUPS
  groups = [(name, [c for c in cols if c in frame.columns]) for name, cols in groups]
  groups = [(name, cols) for name, cols in groups if cols]
  if not groups:
    raise ValueError(f'none of the requested columns are logged; columns: {list(frame.columns)}')
  fig = Figure(figsize=(5 * len(groups), 3.6))
  axes = fig.subplots(1, len(groups), squeeze=False)[0]
  for ax, (name, cols) in zip(axes, groups):
    for col in cols:
      ax.plot(frame.index, frame[col], marker='.' if len(frame) < 30 else None,
              label=col.split('/', 1)[-1])
    ax.set_xlabel('step')
    ax.set_title(name)
    ax.legend(fontsize='small')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig
