"""The pre-training objective: the weighted sum of the enabled loss terms (`registry.TERMS`).

`pretrain_loss` is what the jitted train step differentiates with respect to the student
params. It is a pure function; `model`, `method_cfg` and `num_steps` are static (bind them with
`functools.partial`). Nothing depends on the batch size, so the same function serves any
global batch and any sharding of it.
"""

import jax
import jax.numpy as jnp
import ml_collections

from pixssl_jax.losses import l2_normalize
from pixssl_jax.models.pixssl import PixSSLModel
from pixssl_jax.objective import pixel_term
from pixssl_jax.objective import registry
from pixssl_jax.objective.parts import TermInputs


def method_problems(method_cfg: ml_collections.ConfigDict) -> list[str]:
  """What in the `method` config no term can run with (config_checks reports the same)."""
  problems = []
  nothing = registry.nothing_to_learn(method_cfg)
  if nothing:
    problems.append(nothing)
  for field, choices in registry.METHOD_CHOICES.items():
    if field in method_cfg and method_cfg[field] not in choices:
      problems.append(f'config.method.{field}={method_cfg[field]!r}: choose one of {choices}.')
  return problems


def student_input(batch: dict[str, jax.Array], views: jax.Array) -> jax.Array:
  """`views` with the cells the student must not see set to 0 (`data.mask_ratio`)."""
  if 'student_mask1' not in batch:
    return views
  hidden = jnp.concatenate([batch['student_mask1'], batch['student_mask2']], axis=0)
  return jnp.where(hidden, jnp.zeros((), views.dtype), views)


def pretrain_loss(params, ema_params, batch: dict[str, jax.Array], key: jax.Array,
                  step: jax.Array, *, model: PixSSLModel, method_cfg: ml_collections.ConfigDict,
                  num_steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pre-training loss of one batch: the enabled terms' weighted parts, summed in order.

  Args:
    params: student params pytree (differentiated).
    ema_params: teacher params pytree (EMA of the student; receives no gradient).
    batch: `view1, view2 [B, *P, 1]` float32, `transform1, transform2 [B, n, n+1]` float32;
      optionally `student_mask1, student_mask2 [B, *P, 1]` bool (hidden from the student).
    key: the step's dropout / MC key (already folded with the step).
    step: current step (scalar, may be traced), drives the 'threshold' ramp.
    model: the `PixSSLModel` (static).
    method_cfg: the `method` ConfigDict (static), configs/pretrain.py's fields.
    num_steps: total training steps (static).

  Returns:
    `(loss, metrics)`: scalar float32 loss and the float32 scalars `registry.metric_names()`
    (a disabled term's metrics are 0). Uncertainty and weight statistics are over valid
    (matched) cells.
  """
  problems = method_problems(method_cfg)
  if problems:
    raise ValueError(' '.join(problems))
  view1, view2 = batch['view1'], batch['view2']
  if view1.shape != view2.shape:
    raise ValueError(f'batch view1 {view1.shape} and view2 {view2.shape} differ in shape')
  terms = registry.enabled_terms(method_cfg)

  # 1. Student forward on both views as one batch [2B, *P, 1]: rows :B are view 1, B: view 2.
  views = jnp.concatenate([view1, view2], axis=0)
  student = model.apply({'params': params}, student_input(batch, views),
                        with_predictor=any(t.needs_predictor for t in terms))
  # 2. Teacher forward on the whole views; the teacher never runs the predictor or stabilizer.
  teacher = None
  if any(t.needs_teacher for t in terms):
    teacher = jax.lax.stop_gradient(
        model.apply({'params': ema_params}, views, with_predictor=False))
  inputs = TermInputs(params=params, batch=batch, views=views, student=student,
                      teacher=teacher, key=key, step=step, model=model,
                      method_cfg=method_cfg, num_steps=num_steps)

  # 3. Each enabled term's parts and metrics; a disabled term is absent from the loss.
  parts, metrics = [], {}
  for term in registry.TERMS:
    if term in terms:
      term_parts, term_metrics = term.compute(inputs)
      parts += term_parts
      metrics.update(term_metrics)
    else:
      metrics.update({name: jnp.zeros((), jnp.float32) for name in term.metric_names})
  loss = parts[0]
  for part in parts[1:]:  # In order: the sum is the same float32 sum on every run.
    loss = loss + part
  # Collapse monitor (SimSiam): per-dimension std over the batch of the unit-normalised student
  # projections; about 1/sqrt(D) when healthy, 0 when every view maps to the same vector.
  metrics['projection_std'] = jnp.mean(jnp.std(
      l2_normalize(jax.lax.stop_gradient(student['global_proj'])), axis=0))
  return loss, {'loss': loss, **metrics}


def pixel_maps(params, ema_params, batch: dict[str, jax.Array], key: jax.Array, *,
               model: PixSSLModel, method_cfg: ml_collections.ConfigDict
               ) -> dict[str, jax.Array]:
  """What the logs show of the batch's first pair: its views, overlap and uncertainty.

  Returns:
    `view1`, `view2` `[*P]`; `overlap` (1 where view 1's feature cell has a match in view 2)
    and `uncertainty` `[*G]`, on view 1's feature grid.
  """
  first = jax.tree.map(lambda x: x[:1], batch)
  views = jnp.concatenate([first['view1'], first['view2']], axis=0)
  student = model.apply({'params': params}, views, with_predictor=False)
  teacher = model.apply({'params': ema_params}, views, with_predictor=False)
  _, uncertainty, _, valid = pixel_term.pixel_predictions(
      params, student['pixel_proj'], teacher['pixel_proj'], first, key, model=model,
      method_cfg=method_cfg)
  return {'view1': views[0, ..., 0], 'view2': views[1, ..., 0],
          'overlap': valid[0].astype(jnp.float32), 'uncertainty': uncertainty[0]}
