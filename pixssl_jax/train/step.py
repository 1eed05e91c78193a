"""The pure pre-training step and its one jit over the data mesh."""

import functools
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import linen as nn

from pixssl_jax import xla_options
from pixssl_jax.models import pixssl
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import objective
from pixssl_jax.train import state as state_lib

Metrics = dict[str, jax.Array]


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The randomness of one step: a function of (seed, step) only, so resumes replay it."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> tuple[state_lib.TrainState, Metrics]:
  """One optimizer step of the student and one EMA step of the teacher.

  Args:
    state: the current state (donated by the jitted caller).
    batch: `view1`, `view2` `[B, *P, 1]` and `transform1`, `transform2` `[B, n, n + 1]`.
    model: the PixSSL module (static).
    tx: the optimizer (static).
    config: the run config (static); uses `seed`, `num_steps`, `method`, `optim`.

  Returns:
    The new state and scalar metrics of this step (computed before the update, except
    `teacher_init_share`, the share of its initialisation the updated teacher holds).
  """
  def loss_fn(params):
    return objective.pretrain_loss(params, state.ema_params, batch,
                                   step_key(config.seed, state.step), state.step,
                                   model=model, method_cfg=config.method,
                                   num_steps=config.num_steps)

  # Only the student is differentiated; the teacher enters as a constant.
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # m0 is a Python float fixed by the config and the run length (state.base_ema_momentum).
  base_momentum = state_lib.base_ema_momentum(config.optim, config.num_steps)
  momentum = state_lib.ema_momentum(state.step, config.num_steps, base_momentum)
  ema_params = state_lib.ema_update(state.ema_params, params, momentum)

  schedule = state_lib.learning_rate_schedule(config.optim, config.num_steps)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), ema_momentum=momentum,
                 teacher_init_share=state_lib.teacher_init_share(
                     state.step + 1, config.num_steps, base_momentum),
                 lr=schedule(state.step))
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, metrics


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> Callable[[state_lib.TrainState, Any], tuple[state_lib.TrainState, Metrics]]:
  """`train_step` jitted once: state replicated and donated, batch sharded over 'data'."""
  replicated = mesh_lib.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, config=config),
      in_shardings=(replicated, mesh_lib.batch_sharded(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,), compiler_options=xla_options.compiler_options())


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                     ) -> state_lib.TrainState:
  """Creates the step-0 state directly in its replicated sharding (no host round trip)."""
  sample_shape = (1, *config.data.patch_size, 1)

  def create(key):
    params = pixssl.init_params(model, key, sample_shape)
    return state_lib.create_train_state(params, tx)

  # An 'rbg' key: initialisers under threefry take several times longer to compile on CPU, and
  # the replicated init needs no sharding-invariant bits. Step keys stay threefry.
  init_key = jax.random.key(config.seed, impl='rbg')
  return jax.jit(create, out_shardings=mesh_lib.replicated(mesh))(init_key)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                         ) -> state_lib.TrainState:
  """Shapes, dtypes and replicated shardings of the state (a restore target)."""
  return mesh_lib.abstract_replicated(lambda: init_train_state(model, tx, config, mesh), mesh)


def jit_pixel_maps(model: nn.Module, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh) -> Callable[[state_lib.TrainState, Any], Metrics]:
  """`objective.pixel_maps` of a state and a global batch, replicated for logging."""

  def maps(state, batch):
    return objective.pixel_maps(state.params, state.ema_params, batch,
                                step_key(config.seed, state.step), model=model,
                                method_cfg=config.method)

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(maps, in_shardings=(replicated, mesh_lib.batch_sharded(mesh)),
                 out_shardings=replicated, compiler_options=xla_options.compiler_options())
