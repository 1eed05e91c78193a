"""Fine-tuning building blocks: losses, strict loading, label splits, 2-D volume inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixssl_jax import config_files
from pixssl_jax.evaluation import evaluate
from pixssl_jax.evaluation import inference
from pixssl_jax.losses import segmentation as seg_losses
from pixssl_jax.models import pixssl
from pixssl_jax.models import segmentation
from pixssl_jax.train import config_checks
from pixssl_jax.train import finetune
from pixssl_jax.train import load_pretrained
from pixssl_jax.train import optimizers
from tests.helpers import load_config


def test_dice_loss_is_zero_for_a_perfect_prediction_and_one_for_a_miss():
  labels = jnp.asarray([[0, 1, 1, 2]])
  perfect = 50.0 * jax.nn.one_hot(labels, 3)
  assert float(seg_losses.soft_dice_loss(perfect, labels)) == pytest.approx(0.0, abs=1e-6)
  miss = 50.0 * jax.nn.one_hot(jnp.asarray([[0, 2, 2, 1]]), 3)
  assert float(seg_losses.soft_dice_loss(miss, labels)) == pytest.approx(1.0, abs=1e-5)
  # A class absent from the batch and never predicted costs nothing.
  absent = 50.0 * jax.nn.one_hot(jnp.asarray([[0, 1, 1, 1]]), 4)
  assert float(seg_losses.soft_dice_loss(absent, jnp.asarray([[0, 1, 1, 1]]))) == pytest.approx(
      0.0, abs=1e-5)


def test_segmentation_loss_is_the_weighted_sum_and_ce_matches_log_softmax():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  labels = jax.random.randint(jax.random.PRNGKey(1), (2, 4, 4), 0, 3)
  loss, terms = seg_losses.segmentation_loss(logits, labels, dice_weight=0.5, ce_weight=2.0)
  expected_ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))
  assert float(terms['ce_loss']) == pytest.approx(float(expected_ce), rel=1e-5)
  assert float(loss) == pytest.approx(0.5 * float(terms['dice_loss']) + 2.0 * float(expected_ce),
                                      rel=1e-5)


def _params(features=(8, 16, 32), ndim=2, patch=(32, 32)):
  model = segmentation.SegmentationModel(ndim=ndim, num_classes=3, features=features,
                                         num_groups=4)
  return jax.device_get(segmentation.init_segmentation_params(
      model, jax.random.PRNGKey(0), (1, *patch, 1)))


def _pretrain_params(features=(8, 16, 32)):
  config = load_config('tiny')
  config.model.features = features
  model = pixssl.build_model(config.model, 2)
  return jax.device_get(pixssl.init_params(model, jax.random.PRNGKey(1), (1, 32, 32, 1)))


def _first_update(scale: float, grads, params):
  config = config_files.load('finetune', 'tiny')
  config.optim.backbone_lr_scale = scale
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.0
  tx = finetune.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_backbone_lr_scale_scales_only_the_backbone_updates():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  full, tenth, frozen = (_first_update(s, grads, params) for s in (1.0, 0.1, 0.0))
  for name in ('backbone', 'seg_head'):
    ratio = jax.tree.map(lambda a, b: np.asarray(a) / np.asarray(b), tenth[name], full[name])
    expected = 0.1 if name == 'backbone' else 1.0
    for leaf in jax.tree.leaves(ratio):
      np.testing.assert_allclose(leaf, expected, rtol=1e-5)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(frozen['backbone']))
  np.testing.assert_array_equal(frozen['seg_head']['kernel'], full['seg_head']['kernel'])


def test_head_warmup_holds_the_backbone_then_starts_its_schedule():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  config = config_files.load('finetune', 'tiny')
  config.num_steps, config.optim.warmup_steps = 10, 2
  config.optim.head_warmup_steps = 4
  tx = finetune.make_optimizer(config)
  state = tx.init(params)
  plain = finetune.make_optimizer(config_files.load('finetune', 'tiny'))
  backbone = []
  for step in range(6):
    updates, state = tx.update(grads, state, params)
    backbone.append(max(float(np.abs(x).max()) for x in jax.tree.leaves(updates['backbone'])))
    if step == 0:  # The head trains from the first step, as without the warm-up.
      head_update, _ = plain.update(grads, plain.init(params), params)
      np.testing.assert_allclose(updates['seg_head']['kernel'],
                                 head_update['seg_head']['kernel'], rtol=1e-6)
  assert backbone[:4] == [0.0] * 4
  # Step 4 is the backbone's first: Adam's first step on its own warm-up (rate peak / 2 on a
  # 2-step warm-up of the 6 remaining steps), the same size as an optimizer started then.
  unclipped = config.optim.copy_and_resolve_references()
  unclipped.grad_clip = 0.0
  fresh = optimizers.make_optimizer(unclipped, 6)
  first, _ = fresh.update(grads['backbone'], fresh.init(params['backbone']), params['backbone'])
  assert backbone[4] == pytest.approx(max(float(np.abs(x).max()) for x in jax.tree.leaves(first)),
                                      rel=1e-5)
  assert backbone[5] > backbone[4] > 0


def test_merge_loads_the_backbone_and_leaves_the_head():
  target, source = _params(), _pretrain_params()
  merged, loaded = load_pretrained.merge_backbone(target, source, part='encoder_decoder')
  np.testing.assert_array_equal(merged['backbone']['dec0']['conv1']['kernel'],
                                source['backbone']['dec0']['conv1']['kernel'])
  np.testing.assert_array_equal(merged['seg_head']['kernel'], target['seg_head']['kernel'])
  assert 'backbone/up0/kernel' in loaded and not any('projector' in k for k in loaded)
  enc_only, loaded = load_pretrained.merge_backbone(target, source, part='encoder')
  assert all(k.startswith('backbone/enc') for k in loaded)
  np.testing.assert_array_equal(enc_only['backbone']['dec0']['conv1']['kernel'],
                                target['backbone']['dec0']['conv1']['kernel'])


def test_strict_loading_names_a_renamed_parameter_and_skip_list_allows_it():
  target, source = _params(), _pretrain_params()
  source['backbone']['dec0']['conv_renamed'] = source['backbone']['dec0'].pop('conv1')
  with pytest.raises(config_checks.ConfigError) as error:
    load_pretrained.merge_backbone(target, source, part='encoder_decoder')
  message = str(error.value)
  assert 'missing in the checkpoint: backbone/dec0/conv1/kernel (3, 3, 8, 8)' in message
  assert 'unexpected (in the checkpoint, not in the model): backbone/dec0/conv_renamed/kernel' \
      in message
  assert 'config.skip_params' in message
  merged, _ = load_pretrained.merge_backbone(target, source, part='encoder_decoder',
                                        skip=('backbone/dec0/conv1', 'backbone/dec0/conv_renamed'))
  np.testing.assert_array_equal(merged['backbone']['dec0']['conv1']['kernel'],
                                target['backbone']['dec0']['conv1']['kernel'])


def test_strict_loading_names_every_shape_mismatch():
  with pytest.raises(config_checks.ConfigError,
                     match=r'shape mismatch: backbone/enc0/conv0/kernel checkpoint '
                           r'\(3, 3, 1, 16\) vs model \(3, 3, 1, 8\)'):
    load_pretrained.merge_backbone(_params(), _pretrain_params(features=(16, 32, 64)),
                                   part='encoder')


class _FakeStore:
  def __init__(self, splits):
    self._splits = splits

  def split(self, name):
    return list(self._splits[name])


def test_label_fraction_picks_the_seeded_split_or_a_seeded_subset():
  store = _FakeStore({'train_10': ['c3'], 'train_100': [f'c{i}' for i in range(10)]})
  assert finetune.label_split(store, 0.1, seed=0)[1] == ['c3']
  assert finetune.label_split(store, 1.0, seed=0)[1] == store.split('train_100')
  half = finetune.label_split(store, 0.5, seed=4)[1]
  assert len(half) == 5 and set(half) <= set(store.split('train_100'))
  assert half == finetune.label_split(store, 0.5, seed=4)[1]
  assert half != finetune.label_split(store, 0.5, seed=5)[1]


def test_2d_volume_inference_covers_every_slice_once_with_one_shape():
  shapes = []

  @jax.jit
  def prob_fn(params, x):  # Per-pixel: out = [x * params, 1 - x * params].
    shapes.append(x.shape)
    return jnp.concatenate([x * params, 1 - x * params], -1)

  predictor = inference.volume_predictor(prob_fn, ndim=2)
  image = np.random.default_rng(0).uniform(size=(40, 27, 5, 1)).astype(np.float32)
  out = inference.predict_volume(predictor, 2.0, image, ndim=2, patch_size=(16, 16),
                                 overlap=0.5, batch_size=8)
  assert out.shape == (40, 27, 5, 2)
  np.testing.assert_allclose(out[..., 0], 2.0 * image[..., 0], rtol=1e-5)
  assert shapes == [(8, 16, 16, 1)]  # Traced once, for the one window shape.


def test_best_checkpoint_is_chosen_by_saved_validation_dice(tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  from pixssl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from pixssl_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  manager = checkpointing.make_manager(str(tmp_path), keep=1, best_metric='val_dice',
                                       async_save=False)
  data_iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  for step, dice in ((1, 0.5), (2, 0.9), (3, None), (4, 0.6)):
    checkpointing.save(manager, step, {'w': np.full(2, step, np.float32)}, data_iterator,
                       force=True, metrics=None if dice is None else {'val_dice': dice})
  assert 2 in manager.all_steps() and 4 in manager.all_steps()  # Best and latest kept.
  assert evaluate.choose_checkpoint(manager, 'best') == 2
  assert evaluate.choose_checkpoint(manager, 'last') == 4
  assert evaluate.choose_checkpoint(manager, '4') == 4
  with pytest.raises(config_checks.ConfigError, match=r'config.eval.checkpoint=3: no such'):
    evaluate.choose_checkpoint(manager, 3)
  with pytest.raises(config_checks.ConfigError, match="use 'best', 'last' or a step"):
    evaluate.choose_checkpoint(manager, 'newest')


def test_evaluating_a_pretraining_workdir_is_a_clear_error(tmp_path):
  # A pre-training run's config.json has no head_level: say which workdir to evaluate instead.
  (tmp_path / 'config.json').write_text(
      config_files.load('pretrain', 'tiny').to_json_best_effort())
  config = config_files.load('finetune', 'tiny')
  config.mode = 'evaluate'
  with pytest.raises(config_checks.ConfigError, match='holds no fine-tuning run.*mode=finetune'):
    evaluate.run_config(str(tmp_path), config)
