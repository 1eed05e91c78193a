"""The fine-tuning state, its jitted train step, and the jitted inference functions."""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pixssl_jax import xla_options
from pixssl_jax.losses import segmentation as seg_losses
from pixssl_jax.models import segmentation
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import state as state_lib
from pixssl_jax.train import step as step_lib


@flax.struct.dataclass
class SegState:
  """Everything a fine-tuning step updates; checkpointed as one pytree."""
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The pre-training optimizer family for the head and the backbone.

  With `linear_probe` only the head is updated; otherwise the backbone trains at
  `optim.backbone_lr_scale` times the head's rate (the same optimizer and schedule, its own
  moments). Scale 1 (or a config without the field) is one optimizer over all parameters, the
  optimizer state of fine-tuning runs written before the field existed.
  """
  tx = state_lib.make_optimizer(config.optim, config.num_steps)
  if config.linear_probe:
    labels = lambda params: {k: 'frozen' if k == 'backbone' else 'trained' for k in params}
    return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  scale = float(config.optim.get('backbone_lr_scale', 1.0))
  if scale == 1.0:
    return tx
  # One global-norm clip over all gradients, as at scale 1; then a rate per group.
  unclipped = config.optim.copy_and_resolve_references()
  unclipped.grad_clip = 0.0
  backbone = unclipped.copy_and_resolve_references()
  backbone.learning_rate = unclipped.learning_rate * scale
  groups = {'head': state_lib.make_optimizer(unclipped, config.num_steps),
            'backbone': (state_lib.make_optimizer(backbone, config.num_steps) if scale > 0
                         else optax.set_to_zero())}
  labels = lambda params: {k: 'backbone' if k == 'backbone' else 'head' for k in params}
  grouped = optax.multi_transform(groups, labels)
  if config.optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), grouped)
  return grouped


def create_state(params: Any, tx: optax.GradientTransformation) -> SegState:
  return SegState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(state: SegState, batch: dict[str, jax.Array], *,
               model: segmentation.SegmentationModel, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> tuple[SegState, dict[str, jax.Array]]:
  """One optimizer step on a labelled batch (`image [B, *P, 1]`, `label [B, *P]`)."""
  def loss_fn(params):
    if config.linear_probe:
      # No backward pass through the frozen backbone at all, not just zero updates.
      params = dict(params, backbone=jax.lax.stop_gradient(params['backbone']))
    logits = model.apply({'params': params}, batch['image'], deterministic=False,
                         rngs={'dropout': step_lib.step_key(config.seed, state.step)})
    return seg_losses.segmentation_loss(logits, batch['label'],
                                        dice_weight=config.loss.dice_weight,
                                        ce_weight=config.loss.ce_weight)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  schedule = state_lib.learning_rate_schedule(config.optim, config.num_steps)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(model, tx, config, mesh) -> Callable:
  """`train_step` jitted once: state replicated and donated, batch sharded over 'data'."""
  replicated = mesh_lib.replicated(mesh)
  return jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                 in_shardings=(replicated, mesh_lib.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=xla_options.compiler_options())


def jit_probabilities(model: segmentation.SegmentationModel) -> Callable:
  """`(params, x [B, *P, 1]) -> softmax probabilities [B, *P, K]`, jitted once."""
  def probabilities(params, x):
    return jax.nn.softmax(model.apply({'params': params}, x), axis=-1)
  return jax.jit(probabilities)


def jit_mc_probabilities(model: segmentation.SegmentationModel, num_samples: int,
                         seed: int) -> Callable:
  """MC dropout: `(params, x) -> [B, *P, K + 1]`: mean probabilities and their variance.

  The backbone runs once; the dropout + 1x1 head runs `num_samples` times. The last channel is
  the uncertainty: the variance of the softmax probabilities over the samples, summed over
  classes (0 when every sample agrees, never above 1). Every call uses the same `seed`, so
  overlapping windows average the same sampling noise and reruns reproduce the map.
  """
  def mc(params, x):
    features = model.apply({'params': params}, x, method=model.features_of)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_samples)
    # A Python list, not a stacked axis: XLA:CPU reduces a leading sample axis slowly.
    samples = [jax.nn.softmax(model.apply({'params': params}, features, x.shape[1:-1], False,
                                          method=model.head, rngs={'dropout': k}), axis=-1)
               for k in keys]
    mean = sum(samples) / num_samples
    variance = sum(jnp.square(s - mean) for s in samples) / num_samples
    return jnp.concatenate([mean, jnp.sum(variance, axis=-1, keepdims=True)], axis=-1)
  return jax.jit(mc)
