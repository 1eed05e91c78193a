"""The fine-tuning recipe fields: defaults that change nothing, L2-SP, layer decay, LP-FT and
the distance the backbone moved, each checked against a hand computation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixssl_jax import config_files
from pixssl_jax.losses import segmentation as seg_losses
from pixssl_jax.models import segmentation
from pixssl_jax.rundir import config_upgrade
from pixssl_jax.train import config_checks
from pixssl_jax.train import finetune
from pixssl_jax.train import finetune_recipe
from pixssl_jax.train import loop
from pixssl_jax.train import optimizers

FEATURES = (8, 16, 32)  # The tiny preset's U-Net: blocks enc0-2, up0-1, dec0-1.


def _config(**optim):
  config = config_files.load('finetune', 'tiny')
  config.model.head_level = 0
  for key, value in optim.items():
    config.optim[key] = value
  return config


def _model_and_params():
  model = segmentation.SegmentationModel(ndim=2, num_classes=3, features=FEATURES, num_groups=4)
  params = segmentation.init_segmentation_params(model, jax.random.PRNGKey(0), (1, 32, 32, 1))
  return model, jax.device_get(params)


def _batch():
  image = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 1))
  label = jax.random.randint(jax.random.PRNGKey(2), (2, 32, 32), 0, 3)
  return {'image': image, 'label': label}


def _moved(params, scale=0.05, seed=3):
  """`params` with every backbone leaf shifted by seeded noise, the head as it was."""
  leaves, tree = jax.tree.flatten(params['backbone'])
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  shifted = [w + scale * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)]
  return dict(params, backbone=jax.tree.unflatten(tree, shifted))


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _previous_step(state, batch, *, model, tx, config):
  """The fine-tuning step as it is without any recipe field: the reference for the defaults."""
  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], deterministic=False,
                         rngs={'dropout': loop.step_key(config.seed, state.step)})
    return seg_losses.segmentation_loss(logits, batch['label'],
                                        dice_weight=config.loss.dice_weight,
                                        ce_weight=config.loss.ce_weight)
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state, metrics


def test_defaults_give_the_plain_optimizer_and_the_same_steps_bit_for_bit():
  config = _config()
  model, params = _model_and_params()
  tx = finetune.make_optimizer(config)
  plain = optimizers.make_optimizer(config.optim, config.num_steps)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
  step = jax.jit(lambda s, b: finetune.train_step(s, b, model=model, tx=tx, config=config))
  previous = jax.jit(lambda s, b: _previous_step(s, b, model=model, tx=plain, config=config))
  state = finetune.create_state(params, tx)
  ref_params, ref_opt = params, plain.init(params)
  for _ in range(2):
    ref = state.replace(params=ref_params, opt_state=ref_opt)
    ref_params, ref_opt, ref_metrics = previous(ref, _batch())
    state, metrics = step(state, _batch())
    assert 'l2_sp' not in metrics
    assert float(metrics['loss']) == float(ref_metrics['loss'])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)):
      np.testing.assert_array_equal(a, b)
  # The start is kept as it was, whatever the steps did.
  for a, b in zip(jax.tree.leaves(state.start_backbone), jax.tree.leaves(params['backbone'])):
    np.testing.assert_array_equal(a, b)


def test_l2_sp_gradient_is_alpha_times_the_distance_to_the_start():
  alpha = 0.5
  config = _config(l2_sp=alpha)
  config.loss.dice_weight = config.loss.ce_weight = 0.0  # No data gradient at all.
  model, params = _model_and_params()
  sgd = optax.sgd(1.0)  # params - new params = the gradient.
  state = finetune.create_state(params, sgd)
  state = state.replace(params=_moved(params))
  new_state, metrics = jax.jit(lambda s, b: finetune.train_step(
      s, b, model=model, tx=sgd, config=config))(state, _batch())
  gradient = jax.tree.map(jnp.subtract, state.params, new_state.params)
  offset = jax.tree.map(jnp.subtract, state.params['backbone'], params['backbone'])
  for g, d in zip(jax.tree.leaves(gradient['backbone']), jax.tree.leaves(offset)):
    np.testing.assert_allclose(g, alpha * d, rtol=1e-4, atol=1e-7)
  assert not any(np.any(g) for g in jax.tree.leaves(gradient['seg_head']))
  distance = np.linalg.norm(_flat(offset))
  assert float(metrics['l2_sp']) == pytest.approx(alpha / 2 * distance ** 2, rel=1e-5)
  assert float(metrics['grad_norm']) == pytest.approx(alpha * distance, rel=1e-5)
  assert float(metrics['loss']) == 0.0  # The segmentation loss alone.


@pytest.mark.parametrize('head_level, depths', [
    (0, {'dec0': 1, 'up0': 1, 'dec1': 2, 'up1': 2, 'enc2': 3, 'enc1': 4, 'enc0': 5}),
    (1, {'dec0': 0, 'up0': 0, 'dec1': 1, 'up1': 1, 'enc2': 2, 'enc1': 3, 'enc0': 4}),
])
def test_block_depth_counts_along_the_u_from_the_head(head_level, depths):
  assert {b: finetune_recipe.block_depth(b, 3, head_level) for b in depths} == depths
  with pytest.raises(ValueError, match="'enc3'"):
    finetune_recipe.block_depth('enc3', 3, head_level)


def _first_update(config, params, grads):
  tx = finetune.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize('backbone_lr_scale', [1.0, 0.1])
def test_layer_decay_scales_each_block_by_decay_to_its_depth(backbone_lr_scale):
  _, params = _model_and_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  fields = dict(warmup_steps=0, weight_decay=0.0, backbone_lr_scale=backbone_lr_scale)
  plain = _first_update(_config(**fields), params, grads)
  decayed = _first_update(_config(layer_decay=0.5, **fields), params, grads)
  # Adam's first step is lr * g / (|g| + eps) on every leaf: the ratio is the factor exactly.
  depth = {'dec0': 1, 'up0': 1, 'dec1': 2, 'up1': 2, 'enc2': 3, 'enc1': 4, 'enc0': 5}
  for block, d in depth.items():
    for a, b in zip(jax.tree.leaves(decayed['backbone'][block]),
                    jax.tree.leaves(plain['backbone'][block])):
      np.testing.assert_allclose(np.asarray(a) / np.asarray(b), 0.5 ** d, rtol=1e-6)
  np.testing.assert_array_equal(decayed['seg_head']['kernel'], plain['seg_head']['kernel'])
  # The first step's rate is the schedule's at step 0, times the backbone's scale.
  config = _config(**fields)
  lr = float(optimizers.learning_rate_schedule(config.optim, config.num_steps)(0))
  enc0 = np.abs(np.asarray(decayed['backbone']['enc0']['conv0']['kernel']))
  np.testing.assert_allclose(enc0, lr * backbone_lr_scale * 0.5 ** 5, rtol=1e-5)


def test_lp_ft_trains_the_head_alone_then_everything_from_a_fresh_optimizer():
  _, params = _model_and_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  config = _config(warmup_steps=2, linear_probe_steps=4)
  config.num_steps = 10
  tx = finetune.make_optimizer(config)
  state = tx.init(params)
  probe = optimizers.make_optimizer(config.optim, 4)  # The head's own clip and schedule.
  probe_state = probe.init(params['seg_head'])
  for _ in range(4):
    updates, state = tx.update(grads, state, params)
    head, probe_state = probe.update(grads['seg_head'], probe_state, params['seg_head'])
    assert not any(np.any(u) for u in jax.tree.leaves(updates['backbone']))
    np.testing.assert_allclose(updates['seg_head']['kernel'], head['kernel'], rtol=1e-6)
  # Step 4 is the first of a plain fine-tuning of everything over the 6 remaining steps.
  plain = config.copy_and_resolve_references()
  plain.optim.linear_probe_steps, plain.num_steps = 0, 6
  updates, _ = tx.update(grads, state, params)
  fresh = _first_update(plain, params, grads)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(fresh)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  lr = finetune_recipe.head_schedule(config.optim, 10, 4)
  assert float(lr(4)) == pytest.approx(float(optimizers.learning_rate_schedule(
      config.optim, 6)(0)))
  # The probe's last step: its cosine (2 warm-up steps, decay to step 5) at point 4.
  peak = config.optim.learning_rate
  assert float(lr(3)) == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 2 / 3)), rel=1e-6)


def test_relative_distance_is_zero_at_the_start_and_the_hand_computed_norm_after():
  _, params = _model_and_params()
  start = params['backbone']
  assert float(finetune_recipe.relative_distance(start, start)) == 0.0
  moved = _moved(params)['backbone']
  expected = np.linalg.norm(_flat(moved) - _flat(start)) / np.linalg.norm(_flat(start))
  assert float(finetune_recipe.relative_distance(moved, start)) == pytest.approx(expected,
                                                                                rel=1e-6)


def test_the_fields_are_checked_and_old_runs_read_as_their_defaults():
  config = _config(l2_sp=-1.0, layer_decay=1.5, linear_probe_steps=6)
  config.init = 'scratch'
  problems = config_checks.finetune_config_problems(config, device_count=1, process_count=1)
  problems += config_checks.range_problems(config)
  text = '\n'.join(problems)
  assert 'config.optim.l2_sp=-1.0: must be >= 0' in text
  assert 'config.optim.layer_decay=1.5: must be in (0, 1]' in text
  assert 'config.optim.linear_probe_steps=6: must be below config.num_steps=6' in text
  both = _config(linear_probe_steps=2, head_warmup_steps=2)
  assert any('use one' in p for p in config_checks.recipe_problems(both))
  old = config_files.load('finetune', 'tiny')
  for field in ('l2_sp', 'layer_decay', 'linear_probe_steps'):
    del old.optim[field]
  upgraded = config_upgrade.upgrade(old)
  assert (upgraded.optim.l2_sp, upgraded.optim.layer_decay,
          upgraded.optim.linear_probe_steps) == (0.0, 1.0, 0)


def test_a_scratch_run_with_the_whole_recipe_logs_the_distance_it_moved(tmp_path):
  config = config_files.load('finetune', 'tiny')
  config.init = 'scratch'
  config.optim.l2_sp, config.optim.layer_decay, config.optim.linear_probe_steps = 0.1, 0.8, 2
  state = finetune.train_and_evaluate(config, str(tmp_path), print_fn=lambda _: None)
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  moved = [r['val/backbone_moved'] for r in rows if 'val/dice' in r]
  assert len(moved) == 2 and 0.0 < moved[0] < moved[1]
  assert moved[-1] == pytest.approx(float(finetune_recipe.relative_distance(
      state.params['backbone'], state.start_backbone)), rel=1e-6)
  assert all('train/l2_sp' in r for r in rows if 'train/loss' in r)
  # From scratch the start is the seeded random initialisation.
  model = finetune.networks.segmentation_model(finetune.resolve(config, str(tmp_path)),
                                               state.params['seg_head']['bias'].shape[0])
  init = jax.jit(segmentation.init_segmentation_params, static_argnums=(0, 2))(
      model, jax.random.key(config.seed, impl='rbg'), (1, *config.data.patch_size, 1))
  for a, b in zip(jax.tree.leaves(state.start_backbone), jax.tree.leaves(init['backbone'])):
    np.testing.assert_array_equal(a, b)
