"""The notebook analysis API on one tiny run trained with 8 simulated devices."""

import dataclasses
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import matplotlib
import numpy as np
import pytest
from scipy import ndimage

matplotlib.use('Agg')

from pixssl_jax import analysis  # noqa: E402
from pixssl_jax.losses.pixel_matching import cell_to_cell_affine  # noqa: E402
from pixssl_jax.models.pixssl import PixSSLModel  # noqa: E402
from pixssl_jax.train import checkpointing  # noqa: E402
from pixssl_jax.train import config_checks  # noqa: E402
from pixssl_jax.train import mesh as mesh_lib  # noqa: E402
from pixssl_jax.train import optimizers  # noqa: E402
from pixssl_jax.train import pretrain  # noqa: E402
from tests.helpers import damage  # noqa: E402
from tests.helpers import load_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ENCODE = dict(patch_size=(64, 64), batch_size=4)  # One window shape: one encoder compile.


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('analysis_run')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'pixssl_jax.main', '--config', 'configs/pretrain.py:tiny',
         '--workdir', str(workdir), '--config.image_every=0']
  result = subprocess.run(['timeout', '-s', 'KILL', '600', *cmd], cwd=REPO, env=env,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def run(workdir):
  return analysis.load_run(workdir)


@pytest.fixture(scope='module')
def volume(run):
  store = run.store()
  case = next(c for c in store.split('val') + store.split('test') if store.has_label(c))
  return analysis.load_volume(run, case)


def test_load_run_restores_the_eight_device_checkpoint_on_one_device(workdir, run):
  assert jax.device_count() == 8
  assert run.step == 4 and run.steps == [2, 4] and run.which == 'teacher'
  assert run.config.preset == 'tiny' and run.ndim == 2
  for leaf in jax.tree.leaves(run.params):
    assert leaf.sharding.device_set == {jax.local_devices()[0]}
  # The same checkpoint restored onto all 8 devices, as the training loop does.
  config = load_config('tiny')
  mesh = mesh_lib.make_data_mesh()
  tx = optimizers.make_optimizer(config.optim, config.num_steps)
  template = pretrain.abstract_train_state(run.model, tx, config, mesh)
  manager = checkpointing.make_manager(str(workdir), keep=3)
  state, step, _ = checkpointing.restore_latest(manager, template, None)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params),
               jax.device_get(state.ema_params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.student_params),
               jax.device_get(state.params))
  differs = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         run.student_params, run.teacher_params)
  assert any(jax.tree.leaves(differs))  # 4 EMA steps apart.
  early = analysis.load_run(workdir, step=2, which='student')
  assert early.step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(early.params),
               jax.device_get(early.student_params))


def test_load_run_errors_name_the_workdir_and_the_steps(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='no such run directory'):
    analysis.load_run(tmp_path / 'missing')
  (tmp_path / 'config.json').write_text((workdir / 'config.json').read_text())
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}: no checkpoint'):
    analysis.load_run(tmp_path)
  assert not (tmp_path / 'checkpoints').exists()  # Analysis never writes into a workdir.
  with pytest.raises(ValueError, match=r'no checkpoint at step 3; available steps: \[2, 4\]'):
    analysis.load_run(workdir, step=3)
  with pytest.raises(ValueError, match='which must be one of'):
    analysis.load_run(workdir, which='ema')


def test_load_run_skips_a_damaged_newest_checkpoint_and_names_a_damaged_chosen_one(
    workdir, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  damage(copy / 'checkpoints' / '4', 'missing_manifest')
  warnings = []
  older = analysis.load_run(copy, warn=warnings.append)
  assert older.step == 2 and older.steps == [2, 4]
  assert len(warnings) == 1 and 'checkpoint step 4 cannot be restored' in warnings[0]
  assert 'using step 2 instead' in warnings[0]
  assert (copy / 'checkpoints' / '4').is_dir()  # Left where it is: analysis never writes.
  with pytest.raises(config_checks.ConfigError,
                     match=r'checkpoint step 4 cannot be restored .*other steps: \[2\]'):
    analysis.load_run(copy, step=4)


def test_metrics_frame_keeps_the_last_record_of_each_step(workdir, tmp_path):
  frame = analysis.metrics_frame(workdir)
  assert list(frame.index) == [1, 2, 3, 4]
  assert np.isfinite(frame['train/loss']).all()
  records = [{'step': 1, 'train/loss': 3.0}, {'step': 2, 'train/loss': 2.0},
             {'step': 2, 'train/loss': 1.5}, {'step': 3, 'train/loss': 1.0}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  frame = analysis.metrics_frame(tmp_path)
  assert list(frame.index) == [1, 2, 3] and frame.loc[2, 'train/loss'] == 1.5
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: not a JSON record'):
    analysis.metrics_frame(tmp_path)


def test_encode_shapes_and_wrong_dimensionality(run, volume):
  x, y, z = volume.image.shape
  k = z // 2
  feats = analysis.encode(run, volume, slices=[k, k + 1], **ENCODE)
  assert feats.shape == (-(-x // 2), -(-y // 2), 2, 16) and feats.dtype == np.float32
  assert np.isfinite(feats).all() and feats.std() > 0
  # A slice alone gives the same features as inside the volume; int16 HU are scaled.
  one = analysis.encode(run, volume.hu[:, :, k], **ENCODE)
  np.testing.assert_allclose(one, feats[:, :, 0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'volume of shape \(5,\) does not fit the 2-D model'):
    analysis.encode(run, np.zeros(5, np.float32))
  with pytest.raises(ValueError, match=r'shape \(4, 4, 4, 2\)'):
    analysis.encode(run, np.zeros((4, 4, 4, 2), np.float32))
  as_3d = dataclasses.replace(run, model=PixSSLModel(ndim=3, features=(8, 16, 32),
                                                     num_groups=4))
  with pytest.raises(ValueError, match=r'\(64, 64\) does not fit the 3-D model.*\[X, Y, Z\]'):
    analysis.encode(as_3d, np.zeros((64, 64), np.float32))
  with pytest.raises(ValueError, match='not axial slice indices'):
    analysis.encode(run, volume, slices=[z])
  with pytest.raises(ValueError, match='neither a case of the store'):
    analysis.load_volume(run, 'no_such_case')


def test_volume_uncertainty_lies_in_its_range(run, volume):
  k = volume.image.shape[2] // 2
  u = analysis.volume_uncertainty(run, volume, slices=[k], seed=3, **ENCODE)
  assert u.shape == (-(-volume.image.shape[0] // 2), -(-volume.image.shape[1] // 2), 1)
  assert u.min() >= 0.0 and u.max() <= 1.0 / 16 + 1e-6 and u.mean() > 0
  again = analysis.volume_uncertainty(run, volume, slices=[k], seed=3, **ENCODE)
  np.testing.assert_array_equal(u, again)


def test_view_pair_analysis(run, volume):
  pair = analysis.analyse_view_pair(run, volume, seed=0)
  assert pair.views.shape == (2, 32, 32) and pair.transforms.shape == (2, 2, 3)
  assert pair.views.min() >= 0 and pair.views.max() <= 1
  for view in pair.views:  # Both views show body (re-drawn until they do).
    assert np.mean(view > 0.1) >= 0.5
  assert pair.student_proj.shape == pair.teacher_proj.shape == (2, 16, 16, 16)
  assert pair.uncertainty.shape == pair.overlap.shape == pair.discrepancy.shape == (2, 16, 16)
  assert 0 <= pair.uncertainty.min() and pair.uncertainty.max() <= 1.0 / 16 + 1e-6
  assert pair.overlap.dtype == bool and pair.overlap.any()
  assert 0 <= pair.discrepancy.min() and pair.discrepancy.max() <= 4 + 1e-5
  match = analysis.pair_correspondence(pair)
  assert match.num_cells == pair.overlap[0].sum() and 0 <= match.accuracy <= 1


def test_uncertainty_agreement_ranks_u_against_d_over_matched_cells(run, volume):
  pair = analysis.analyse_view_pair(run, volume, seed=0)
  rng = np.random.default_rng(0)
  d = rng.uniform(size=pair.discrepancy.shape).astype(np.float32)
  overlap = np.zeros_like(pair.overlap)
  overlap[:, 2:14, 2:14] = True
  # u follows d on the matched cells; the unmatched cells disagree and must not count.
  u = np.where(overlap, d, 1.0 - d)
  tracking = dataclasses.replace(pair, uncertainty=u, discrepancy=d, overlap=overlap)
  result = analysis.uncertainty_agreement([tracking, tracking])
  assert result.spearman == pytest.approx(1.0) and result.per_pair == pytest.approx([1.0, 1.0])
  assert result.cells == 2 * overlap.sum()
  unrelated = dataclasses.replace(tracking, uncertainty=rng.uniform(size=u.shape))
  assert abs(analysis.uncertainty_agreement([unrelated]).spearman) < 0.1
  constant = dataclasses.replace(tracking, uncertainty=np.zeros_like(u))
  assert analysis.uncertainty_agreement([constant]).per_pair == [0.0]
  with pytest.raises(ValueError, match='at least one view pair'):
    analysis.uncertainty_agreement([])


def _transforms():
  t1 = np.array([[0.8, 0.0, 10.0], [0.0, 0.8, 20.0]])
  t2 = np.array([[0.0, 1.1, 14.0], [-1.1, 0.0, 60.0]])  # Turned a quarter and rescaled.
  return t1, t2


def test_true_cell_positions_match_the_loss_mapping_and_correspondence_finds_them():
  t1, t2 = _transforms()
  grid, stride = (16, 16), 2
  truth = analysis.true_cell_positions(t1, t2, grid, stride)
  rot, offset = cell_to_cell_affine(t1[None].astype(np.float32), t2[None].astype(np.float32),
                                    stride)
  np.testing.assert_allclose(truth[3, 5], np.asarray(rot[0]) @ [3, 5] + np.asarray(offset[0]),
                             atol=1e-4)
  # Features that are a smooth random function of the source position: matching is exact
  # up to the cell size; shuffled features are at chance.
  field = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(96, 96, 8)), (3, 3, 0))

  def features(t):
    cells = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing='ij'), -1)
    src = (stride * cells + 0.5) @ t[:, :2].T + t[:, 2]
    idx = np.clip(np.rint(src).astype(int), 0, 95)
    return field[idx[..., 0], idx[..., 1]]

  good = analysis.correspondence(features(t1), features(t2), t1, t2, stride)
  assert good.accuracy > 0.9 and good.mean_error < 1.0 and good.num_cells > 50
  assert good.chance < 0.1
  shuffled = np.random.default_rng(1).permutation(features(t2).reshape(-1, 8)).reshape(16, 16, 8)
  bad = analysis.correspondence(features(t1), shuffled, t1, t2, stride)
  assert bad.accuracy < 0.3 and bad.mean_error > 3
  assert np.isnan(good.error_map).sum() == 256 - good.num_cells


def test_pca_rgb_and_organ_separability():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(20, 20, 6)) * [5.0, 1, 1, 1, 1, 0.1]
  basis = analysis.fit_pca(feats)
  assert abs(basis.components[0, 0]) > 0.99
  rgb = analysis.pca_rgb(feats, basis)
  assert rgb.shape == (20, 20, 3) and rgb.min() >= 0 and rgb.max() <= 1
  # Labels [40, 40, 4]; features at stride 2 in x, y: one-hot of the label plus noise.
  label = np.zeros((40, 40, 4), np.uint8)
  label[5:20, 5:25] = 1
  label[22:36, 10:30] = 2
  label[8:30, 28:38] = 3
  grid_labels = analysis.labels_on_grid(label, (20, 20, 4))
  np.testing.assert_array_equal(grid_labels, label[1::2, 1::2])
  onehot = np.eye(4)[grid_labels] + 0.3 * rng.normal(size=(20, 20, 4, 4))
  names = {0: 'background', 1: 'liver', 2: 'spleen', 3: 'aorta'}
  good = analysis.organ_separability(onehot, label, label_names=names)
  assert good.balanced_accuracy > 0.95 and set(good.recall) == set(names.values())
  noise = analysis.organ_separability(rng.normal(size=(20, 20, 4, 4)), label)
  assert noise.balanced_accuracy < 0.45
  with pytest.raises(ValueError, match='different dimensionality'):
    analysis.organ_separability(onehot[:, :, 0], label)


def test_plots_return_figures(run, volume, workdir):
  k = volume.image.shape[2] // 2
  feats = analysis.encode(run, volume, slices=[k], **ENCODE)
  figures = {
      'overlay': analysis.plot_overlay(volume.image, volume.label, plane='coronal',
                                       spacing=volume.spacing,
                                       label_names=run.store().label_names),
      'features': analysis.plot_features(volume.image[:, :, k], {'a': feats[:, :, 0],
                                                                 'b': feats[:, :, 0]},
                                         spacing=volume.spacing[:2]),
      'pair': analysis.plot_pair_uncertainty(analysis.analyse_view_pair(run, volume)),
      'uncertainty': analysis.plot_uncertainty(volume.image[:, :, k], np.ones((8, 8)),
                                               spacing=(1.5, 1.5)),
      'loss': analysis.plot_loss_curves(analysis.metrics_frame(workdir)),
  }
  separability = analysis.organ_separability(volume.image[..., None], volume.label)
  figures['separability'] = analysis.plot_separability({'CT': separability})
  expected_axes = {'overlay': 1, 'features': 3, 'pair': 10, 'uncertainty': 3, 'loss': 3,
                   'separability': 1}  # Colour bars are axes too.
  for name, fig in figures.items():
    assert isinstance(fig, matplotlib.figure.Figure), name
    assert len(fig.axes) == expected_axes[name], (name, len(fig.axes))
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    assert buffer.getvalue()[:4] == b'\x89PNG', name
  with pytest.raises(ValueError, match='plane must be one of'):
    analysis.slice_of(volume.image, 'oblique')
