"""Quick numpy probes of pixel features: PCA colours, view correspondence, organ separability.

All take plain arrays (channels last), so they work on any features: `encode`'s output, the
projections in a `PairAnalysis`, or raw intensities as a baseline.
"""

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from pixssl_jax.analysis.features import PairAnalysis


@dataclasses.dataclass
class PcaBasis:
  """The top principal directions of a feature set and the colour range of each.

  Attributes:
    mean: `[C]` feature mean.
    components: `[3, C]` unit principal directions, largest variance first.
    low, high: `[3]` 1st and 99th percentiles of the projections (mapped to 0 and 1).
  """
  mean: np.ndarray
  components: np.ndarray
  low: np.ndarray
  high: np.ndarray

  def rgb(self, features: np.ndarray) -> np.ndarray:
    """`[..., C]` -> float32 `[..., 3]` in [0, 1] (clipped at the fitted percentiles)."""
    features = np.asarray(features, np.float32)
    if features.shape[-1] != self.mean.shape[0]:
      raise ValueError(f'features have {features.shape[-1]} channels, the PCA basis was fitted '
                       f'on {self.mean.shape[0]}')
    proj = (features - self.mean) @ self.components.T
    scaled = (proj - self.low) / np.maximum(self.high - self.low, 1e-12)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def fit_pca(features: np.ndarray, *, mask: np.ndarray | None = None, max_points: int = 20000,
            seed: int = 0) -> PcaBasis:
  """Fits a 3-component PCA to the pixels of a feature map.

  Args:
    features: `[..., C]` with `C >= 1` (fewer than 3 channels repeat the last component).
    mask: bool `[...]`: fit only on these pixels (e.g. the body, not the air around it).
    max_points: fit on at most this many randomly chosen pixels.
    seed: the subsampling seed.

  Returns:
    The `PcaBasis`. Each component's sign is chosen so its largest loading is positive, which
    makes the colours of related feature maps comparable.
  """
  features = np.asarray(features, np.float32)
  points = features.reshape(-1, features.shape[-1])
  if mask is not None:
    mask = np.asarray(mask, bool)
    if mask.shape != features.shape[:-1]:
      raise ValueError(f'mask shape {mask.shape} differs from the feature grid '
                       f'{features.shape[:-1]}')
    points = points[mask.reshape(-1)]
  if points.shape[0] < 2:
    raise ValueError(f'PCA needs at least 2 pixels, got {points.shape[0]}')
  if points.shape[0] > max_points:
    points = points[np.random.default_rng(seed).choice(points.shape[0], max_points, False)]
  mean = points.mean(axis=0)
  _, _, vt = np.linalg.svd(points - mean, full_matrices=False)
  components = vt[:3]
  if components.shape[0] < 3:
    components = np.concatenate([components] + [components[-1:]] * (3 - components.shape[0]))
  signs = np.sign(components[np.arange(3), np.argmax(np.abs(components), axis=1)])
  components = components * np.where(signs == 0, 1.0, signs)[:, None]
  proj = (points - mean) @ components.T
  return PcaBasis(mean, components.astype(np.float32), np.percentile(proj, 1, axis=0),
                  np.percentile(proj, 99, axis=0))


def pca_rgb(features: np.ndarray, basis: PcaBasis | None = None,
            mask: np.ndarray | None = None) -> np.ndarray:
  """Pixel features as an RGB image: the top 3 principal components as colours.

  Args:
    features: `[..., C]`.
    basis: a fitted basis (to colour several maps alike); None fits one on `features`.
    mask: bool `[...]` pixels to fit on when `basis` is None.

  Returns:
    float32 `[..., 3]` in [0, 1].
  """
  basis = fit_pca(features, mask=mask) if basis is None else basis
  return basis.rgb(features)


@dataclasses.dataclass
class Correspondence:
  """Nearest-neighbour matches of view 1's cells among view 2's, against the true ones.

  Attributes:
    accuracy: fraction of overlapping cells of view 1 whose most similar view-2 cell lies
      within `tolerance` cells (Euclidean) of where the transforms put it.
    mean_error: mean distance in cells between the matched and the true position.
    num_cells: overlapping cells evaluated.
    tolerance: the distance counted as correct, in cells.
    chance: the accuracy of picking a view-2 cell at random (same cells, same tolerance).
    error_map: float32 `[*G]` distance per view-1 cell, NaN outside the overlap.
  """
  accuracy: float
  mean_error: float
  num_cells: int
  tolerance: float
  chance: float
  error_map: np.ndarray


def _cell_grid(shape: Sequence[int]) -> np.ndarray:
  return np.stack(np.meshgrid(*[np.arange(g) for g in shape], indexing='ij'),
                  axis=-1).reshape(-1, len(shape)).astype(np.float64)


def true_cell_positions(transform1: np.ndarray, transform2: np.ndarray,
                        grid_shape: Sequence[int], stride: int) -> np.ndarray:
  """Where each cell of view 1 lies in view 2's cell grid (docs/design.md, view transform).

  Cell `f` covers voxel centre `i = s f + (s - 1) / 2`; `src = T1 [i, 1]`; view 2's voxel is
  `T2^-1 (src)`; its cell `(i2 - (s - 1) / 2) / s`.

  Returns:
    float64 `[*G, n]` continuous view-2 cell coordinates.
  """
  t1, t2 = np.asarray(transform1, np.float64), np.asarray(transform2, np.float64)
  n = len(grid_shape)
  half = (stride - 1) / 2.0
  voxels = stride * _cell_grid(grid_shape) + half
  src = voxels @ t1[:, :n].T + t1[:, n]
  in_view2 = np.linalg.solve(t2[:, :n], (src - t2[:, n]).T).T
  return ((in_view2 - half) / stride).reshape(*grid_shape, n)


def correspondence(features1: np.ndarray, features2: np.ndarray, transform1: np.ndarray,
                   transform2: np.ndarray, stride: int, *, tolerance: float = 1.0,
                   block: int = 2048) -> Correspondence:
  """Nearest-neighbour (cosine similarity) pixel correspondence between two views.

  Args:
    features1, features2: `[*G, C]` pixel features of views 1 and 2 (same grid).
    transform1, transform2: `[n, n + 1]` view voxel -> source transforms.
    stride: the features' stride in voxels.
    tolerance: a match within this many cells of the truth counts as correct.
    block: view-1 cells per similarity block (bounds memory on 3-D grids).

  Returns:
    The `Correspondence` over view-1 cells whose true position lies inside view 2.
  """
  f1, f2 = np.asarray(features1, np.float32), np.asarray(features2, np.float32)
  if f1.shape != f2.shape:
    raise ValueError(f'features1 {f1.shape} and features2 {f2.shape} differ in shape')
  grid = f1.shape[:-1]
  truth = true_cell_positions(transform1, transform2, grid, stride).reshape(-1, len(grid))
  inside = np.all((truth >= 0) & (truth <= np.asarray(grid) - 1), axis=1)
  if not inside.any():
    raise ValueError('the two views do not overlap: nothing to match')

  def unit(f):
    f = f.reshape(-1, f.shape[-1])
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

  u1, u2 = unit(f1)[inside], unit(f2)
  cells2 = _cell_grid(grid)
  best = np.concatenate([np.argmax(u1[i:i + block] @ u2.T, axis=1)
                         for i in range(0, u1.shape[0], block)])
  errors = np.linalg.norm(cells2[best] - truth[inside], axis=1)
  within = [np.mean(np.linalg.norm(cells2 - t, axis=1) <= tolerance) for t in truth[inside]]
  error_map = np.full(inside.shape, np.nan, np.float32)
  error_map[inside] = errors
  return Correspondence(accuracy=float(np.mean(errors <= tolerance)),
                        mean_error=float(errors.mean()), num_cells=int(inside.sum()),
                        tolerance=float(tolerance), chance=float(np.mean(within)),
                        error_map=error_map.reshape(grid))


def pair_correspondence(pair: PairAnalysis, *, use: str = 'teacher',
                        tolerance: float = 1.0) -> Correspondence:
  """`correspondence` of a `PairAnalysis`'s 'teacher' or 'student' pixel projections."""
  if use not in ('teacher', 'student'):
    raise ValueError(f"use must be 'teacher' or 'student', got {use!r}")
  proj = pair.teacher_proj if use == 'teacher' else pair.student_proj
  return correspondence(proj[0], proj[1], pair.transforms[0], pair.transforms[1], pair.stride,
                        tolerance=tolerance)


@dataclasses.dataclass
class UncertaintyAgreement:
  """How well the MC-dropout uncertainty predicts the pixel discrepancy, over view pairs.

  Attributes:
    spearman: Spearman's rank correlation of u and d over the matched cells of every pair
      pooled (tie-averaged ranks).
    per_pair: the same within each pair (0 for a pair with a constant u or d).
    cells: number of pooled cells.
  """
  spearman: float
  per_pair: list[float]
  cells: int


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
  # Not losses.spearman: that one subsamples to a fixed cell budget and ranks without tie
  # averaging, to stay cheap inside the jitted step; here every held-out cell counts.
  if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return 0.0
  return float(stats.spearmanr(x, y).statistic)


def uncertainty_agreement(pairs: Sequence[PairAnalysis]) -> UncertaintyAgreement:
  """Spearman(u, d) over the matched cells of `pairs` (from `analyse_view_pair`).

  Measured on cases the run did not pre-train on, this is the held-out form of the loss's
  `uncertainty_spearman` diagnostic: whether the uncertainty ranks pixels as the discrepancy
  the weighting is meant to anticipate does.
  """
  if not pairs:
    raise ValueError('uncertainty_agreement needs at least one view pair')
  us = [p.uncertainty[p.overlap] for p in pairs]
  ds = [p.discrepancy[p.overlap] for p in pairs]
  u, d = np.concatenate(us), np.concatenate(ds)
  return UncertaintyAgreement(spearman=_spearman(u, d),
                              per_pair=[_spearman(a, b) for a, b in zip(us, ds)],
                              cells=int(u.size))


@dataclasses.dataclass
class Separability:
  """A linear probe's score for telling organs apart from pixel features.

  Attributes:
    balanced_accuracy: mean over classes of the test recall (chance: 1 / num classes).
    recall: {class name: test recall}.
    num_train, num_test: probe training and test pixels.
  """
  balanced_accuracy: float
  recall: dict[str, float]
  num_train: int
  num_test: int


def labels_on_grid(label: np.ndarray, grid_shape: Sequence[int]) -> np.ndarray:
  """The label at each feature cell's centre (nearest voxel, ties up), for any stride.

  Cell `f` of an axis of `F` cells over `S` voxels covers voxels around `(f + 0.5) S / F - 0.5`.
  """
  label = np.asarray(label)
  if label.ndim != len(grid_shape):
    raise ValueError(f'label of shape {label.shape} and features of grid {tuple(grid_shape)} '
                     'have different dimensionality')
  # Half-way ties (even strides) go up, consistently on every axis.
  index = [np.clip(np.floor((np.arange(f) + 0.5) * s / f).astype(int), 0, s - 1)
           for f, s in zip(grid_shape, label.shape)]
  return label[np.ix_(*index)]


def organ_separability(features: np.ndarray, label: np.ndarray, *,
                       label_names: Mapping[int, str] | None = None,
                       train_fraction: float = 0.5, max_per_class: int = 2000,
                       min_per_class: int = 10, ridge: float = 1.0,
                       seed: int = 0) -> Separability:
  """Per-organ separability: a ridge classifier on pixel features, scored on held-out pixels.

  Pixels (at most `max_per_class` per class, so small organs are not swamped by background)
  are split at random into train and test; features are standardised on the train pixels; a
  one-vs-rest ridge regression onto +-1 targets is solved in closed form; the test score is the
  balanced accuracy. Neighbouring pixels are correlated, so a random pixel split measures how
  linearly separable the organs are in feature space, not generalisation to new scans.

  Args:
    features: `[*F, C]` pixel features (any stride: labels are read at the cell centres).
    label: `[*S]` integer labels of the same volume (or slice).
    label_names: {value: name} for `recall` (default: the values as strings).
    train_fraction: share of each class's pixels used for training.
    max_per_class: pixels sampled per class.
    min_per_class: classes with fewer pixels on the feature grid are left out.
    ridge: L2 penalty of the standardised problem.
    seed: sampling seed.

  Returns:
    The `Separability`.

  Raises:
    ValueError: fewer than two classes have `min_per_class` pixels.
  """
  features = np.asarray(features, np.float32)
  grid_labels = labels_on_grid(label, features.shape[:-1]).reshape(-1)
  flat = features.reshape(-1, features.shape[-1])
  rng = np.random.default_rng(seed)
  values, counts = np.unique(grid_labels, return_counts=True)
  classes = [int(v) for v, c in zip(values, counts) if c >= min_per_class]
  if len(classes) < 2:
    raise ValueError(f'need at least 2 classes with {min_per_class}+ pixels on the feature '
                     f'grid, got counts {dict(zip(values.tolist(), counts.tolist()))}')
  train_idx, test_idx = [], []
  for c in classes:
    idx = rng.permutation(np.flatnonzero(grid_labels == c))[:max_per_class]
    cut = max(1, min(len(idx) - 1, int(round(train_fraction * len(idx)))))
    train_idx.append(idx[:cut])
    test_idx.append(idx[cut:])
  train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
  to_class = {c: k for k, c in enumerate(classes)}
  y_train = np.array([to_class[int(v)] for v in grid_labels[train_idx]])
  y_test = np.array([to_class[int(v)] for v in grid_labels[test_idx]])

  x_train, x_test = flat[train_idx].astype(np.float64), flat[test_idx].astype(np.float64)
  mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  ones = lambda x: np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  x_train, x_test = ones(x_train), ones(x_test)
  targets = -np.ones((len(y_train), len(classes)))
  targets[np.arange(len(y_train)), y_train] = 1.0
  penalty = ridge * np.eye(x_train.shape[1])
  penalty[-1, -1] = 0.0  # The bias is not penalised.
  weights = np.linalg.solve(x_train.T @ x_train + penalty, x_train.T @ targets)
  predicted = np.argmax(x_test @ weights, axis=1)

  names = label_names or {}
  recall = {str(names.get(c, c)): float(np.mean(predicted[y_test == k] == k))
            for k, c in enumerate(classes)}
  return Separability(balanced_accuracy=float(np.mean(list(recall.values()))), recall=recall,
                      num_train=int(len(y_train)), num_test=int(len(y_test)))
