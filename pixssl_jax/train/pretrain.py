"""Pre-training: the train state (student, EMA teacher, optimizer), the jitted step, the loop.

Sections: the train state with the teacher's EMA schedule; `train_step`, the pure step that
`loop.jit_train_step` jits; `train(config, workdir)`, which pre-trains from scratch or resumes.
"""

import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from pixssl_jax import objective
from pixssl_jax import paths
from pixssl_jax import xla_options
from pixssl_jax.data import case_store
from pixssl_jax.data import pipeline
from pixssl_jax.models import pixssl
from pixssl_jax.rundir import networks
from pixssl_jax.train import checkpointing
from pixssl_jax.train import config_checks
from pixssl_jax.train import loop
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import metrics_writer
from pixssl_jax.train import optimizers

# ---- Train state ----

# The derived m0 aims this fraction below the configured share, so the float32 rounding of the
# per-step momenta cannot leave the product of a whole run above it.
_SHARE_MARGIN = 1e-3


@flax.struct.dataclass
class TrainState:
  """Everything the pre-training step updates; checkpointed as one pytree.

  Attributes:
    step: number of optimizer steps taken so far (int32 scalar).
    params: the student's parameters.
    ema_params: the teacher's parameters, an exponential moving average of `params`.
    opt_state: the optimizer state of `params`.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def ema_momentum(step: jax.Array, num_steps: int, base_momentum: float) -> jax.Array:
  """BYOL's teacher momentum: m0 at step 0, rising to 1 on a cosine at `num_steps`.

  m(k) = 1 - (1 - m0) * (cos(pi * k / K) + 1) / 2.
  """
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base_momentum) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def _ramp_weights(num_steps: int) -> np.ndarray:
  """`(cos(pi k / K) + 1) / 2` for the steps `k = 0 .. K - 1` of a run of K steps, float64."""
  k = np.arange(max(num_steps, 1), dtype=np.float64)
  return (np.cos(np.pi * k / max(num_steps, 1)) + 1.0) / 2.0


def derived_ema_momentum(num_steps: int, final_init_share: float) -> float:
  """The m0 whose cosine schedule leaves the teacher `final_init_share` of its initialisation.

  After K steps the teacher holds `prod_{k<K} m(k)` of its initial (random) parameters, with
  `m(k) = 1 - (1 - m0) c_k` and `c_k = (cos(pi k / K) + 1) / 2`. The log of the product,
  `sum_k log(1 - (1 - m0) c_k)`, falls monotonically in `1 - m0` (from 0 to -inf, `c_0 = 1`),
  so bisection finds the m0 that makes it `log(final_init_share)` (less a 0.1% margin).

  Args:
    num_steps: K, the run's length (>= 1).
    final_init_share: the share to leave, in (0, 1).

  Returns:
    m0 in (0, 1), as a Python float.
  """
  if not 0.0 < final_init_share < 1.0:
    raise ValueError(f'optim.ema_final_init_share must be in (0, 1), got {final_init_share}')
  c = _ramp_weights(num_steps)
  target = math.log(final_init_share) + math.log1p(-_SHARE_MARGIN)
  lo, hi = 0.0, 1.0  # Bracket of 1 - m0: log-share(lo) = 0 > target > log-share(hi) = -inf.
  for _ in range(100):
    mid = (lo + hi) / 2.0
    if np.sum(np.log1p(-mid * c)) > target:
      lo = mid
    else:
      hi = mid
  return 1.0 - hi  # The side whose share is at most the target.


def base_ema_momentum(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> float:
  """The run's teacher momentum m0: `optim.ema_momentum`, lowered for short runs.

  With `optim.ema_final_init_share` in (0, 1), m0 is the smaller of `optim.ema_momentum` and
  the m0 that leaves the teacher that share of its initialisation after `num_steps` steps
  (`derived_ema_momentum`); long runs keep BYOL's m0, short ones get a faster teacher. With it
  0 (or None), m0 is `optim.ema_momentum`.
  """
  m0 = float(optim_cfg.ema_momentum)
  share = optim_cfg.ema_final_init_share
  if not share:
    return m0
  return min(m0, derived_ema_momentum(num_steps, float(share)))


def teacher_init_share(step: jax.Array | int, num_steps: int, base_momentum: float
                       ) -> jax.Array:
  """The share of its initialisation the teacher holds after `step` EMA updates.

  `prod_{k < step} m(k)` for the cosine schedule of `ema_momentum` (1 at step 0): each update
  keeps `m` of the teacher, and the teacher starts as the student's initialisation. Computed
  from the step in closed form over the schedule (a masked sum of `log m(k)` over the run's
  K steps), so the train state needs no extra field.

  Args:
    step: number of updates done (may be traced).
    num_steps: K (static).
    base_momentum: m0.

  Returns:
    float32 scalar in (0, 1]; constant from step K on (m = 1 there).
  """
  log_m = np.log1p(-(1.0 - base_momentum) * _ramp_weights(num_steps)).astype(np.float32)
  taken = jnp.arange(log_m.size) < jnp.asarray(step, jnp.int32)
  return jnp.exp(jnp.sum(jnp.where(taken, jnp.asarray(log_m), 0.0)))


def ema_update(ema_params: Any, params: Any, momentum: jax.Array) -> Any:
  """teacher <- m * teacher + (1 - m) * student, leaf by leaf."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, ema_params, params)


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """The state at step 0: the teacher starts as a copy of the student."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                     ) -> TrainState:
  """Creates the step-0 state directly in its replicated sharding (no host round trip)."""
  sample_shape = (1, *config.data.patch_size, 1)

  def create(key):
    params = pixssl.init_params(model, key, sample_shape)
    return create_train_state(params, tx)

  # An 'rbg' key: initialisers under threefry take several times longer to compile on CPU, and
  # the replicated init needs no sharding-invariant bits. Step keys stay threefry.
  init_key = jax.random.key(config.seed, impl='rbg')
  return jax.jit(create, out_shardings=mesh_lib.replicated(mesh))(init_key)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                         ) -> TrainState:
  """Shapes, dtypes and replicated shardings of the state (a restore target)."""
  return mesh_lib.abstract_replicated(lambda: init_train_state(model, tx, config, mesh), mesh)


# ---- The jitted step ----

def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> tuple[TrainState, loop.Metrics]:
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
                                   loop.step_key(config.seed, state.step), state.step,
                                   model=model, method_cfg=config.method,
                                   num_steps=config.num_steps)

  # Only the student is differentiated; the teacher enters as a constant.
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # m0 is a Python float fixed by the config and the run length (base_ema_momentum).
  base_momentum = base_ema_momentum(config.optim, config.num_steps)
  momentum = ema_momentum(state.step, config.num_steps, base_momentum)
  ema_params = ema_update(state.ema_params, params, momentum)

  schedule = optimizers.learning_rate_schedule(config.optim, config.num_steps)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), ema_momentum=momentum,
                 teacher_init_share=teacher_init_share(
                     state.step + 1, config.num_steps, base_momentum),
                 lr=schedule(state.step))
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, metrics


def jit_pixel_maps(model: nn.Module, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh) -> Callable[[TrainState, Any], loop.Metrics]:
  """`objective.pixel_maps` of a state and a global batch, replicated for logging."""

  def maps(state, batch):
    return objective.pixel_maps(state.params, state.ema_params, batch,
                                loop.step_key(config.seed, state.step), model=model,
                                method_cfg=config.method)

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(maps, in_shardings=(replicated, mesh_lib.batch_sharded(mesh)),
                 out_shardings=replicated, compiler_options=xla_options.compiler_options())


# ---- The loop ----

def _make_data_iterator(store, config: ml_collections.ConfigDict, first_batch: int = 0):
  loader = pipeline.pretrain_loader(
      store, config.data, batch_size=config.batch_size // jax.process_count(),
      seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
      worker_count=config.data.worker_count, first_batch=first_batch)
  return iter(loader)


def _loss_parts(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The losses the enabled terms add, for the progress line."""
  return tuple(name for term in objective.enabled_terms(config.method)
               for name in term.losses(config.method))


def _axial_slices(maps) -> dict[str, np.ndarray]:
  """`[H, W]` images of `objective.pixel_maps`: 3-D maps show their middle axial slice."""
  maps = jax.device_get(maps)
  return {f'images/{k}': v if v.ndim == 2 else v[..., v.shape[-1] // 2] for k, v in maps.items()}


def train(config: ml_collections.ConfigDict, workdir: str, print_fn=print) -> TrainState:
  """Pre-trains from scratch or resumes from the latest checkpoint in `workdir`.

  Args:
    config: a config from `configs/pretrain.py` (with overrides); never modified. Relative
      paths in it are taken from the current directory.
    workdir: where `config.json`, `checkpoints/`, `tensorboard/` and `metrics.jsonl` go (a
      local path, relative or absolute, or a gs:// URL).
    print_fn: receives the progress lines (process 0 only).

  Returns:
    The final train state (replicated over the mesh).
  """
  config, workdir = paths.with_absolute_paths(config), paths.absolute(workdir)
  config_checks.validate_pretrain(config, workdir, device_count=jax.device_count(),
                                  process_count=jax.process_count())
  store = case_store.CaseStore(loop.resolve_data_dir(config.data))
  is_chief = jax.process_index() == 0
  mesh = mesh_lib.make_data_mesh()

  data_iter = _make_data_iterator(store, config)
  model = networks.pixssl_model(config)
  tx = optimizers.make_optimizer(config.optim, config.num_steps)

  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  # Restore onto an abstract state first: initialising parameters only to overwrite them would
  # cost a compile and a pass on every resume.
  restored = checkpointing.restore_latest(
      manager, abstract_train_state(model, tx, config, mesh), data_iter)
  if restored is None:
    state, start_step = init_train_state(model, tx, config, mesh), 0
  else:
    state, start_step, data_restored = restored
    if not data_restored:
      # Another process count wrote the checkpoint, so its grain iterator state does not
      # apply; the global data stream is the same for any process count, so start it at the
      # batch of this step: the data continue exactly as in an uninterrupted run.
      data_iter = _make_data_iterator(store, config, first_batch=start_step)
    print_fn(f'Resumed from step {start_step} in {workdir}'
             + ('' if data_restored else ' (on another process count: data stream '
                                         'repositioned to this step)'))
  # Only now, past the last check that can refuse the run (a checkpoint of another model
  # shape does not restore), so a refused run leaves config.json as it was.
  if is_chief:
    loop.write_config(config, workdir)

  jitted_step = loop.jit_train_step(train_step, model, tx, config, mesh)
  make_maps = jit_pixel_maps(model, config, mesh)
  voxels_per_step = 2 * config.batch_size * math.prod(config.data.patch_size)
  writer = metrics_writer.MetricsWriter(workdir, num_steps=config.num_steps,
                                        voxels_per_step=voxels_per_step, enabled=is_chief,
                                        print_fn=print_fn, loss_parts=_loss_parts(config))

  def log_images(step, state, batch):
    if config.image_every and step % config.image_every == 0:
      # Every process runs it (the batch spans them all); process 0 writes.
      writer.write_images(step, _axial_slices(make_maps(state, batch)))

  def save(step, state):
    checkpointing.save(manager, step, state, data_iter, force=True)

  return loop.run(state, start_step, config=config, jitted_step=jitted_step,
                  data_iter=data_iter, mesh=mesh, manager=manager, writer=writer,
                  save_every=config.checkpoint_every, save=save, print_fn=print_fn,
                  before_step=log_images)
