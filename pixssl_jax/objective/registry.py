"""The pre-training loss terms, in the order their weighted parts are summed."""

import ml_collections

from pixssl_jax.losses import WEIGHTING_FORMS
from pixssl_jax.losses import WEIGHTING_SCALES
from pixssl_jax.objective import global_term
from pixssl_jax.objective import pixel_term
from pixssl_jax.objective import restoration_term
from pixssl_jax.objective import spread_term
from pixssl_jax.objective.parts import Term

TERMS: tuple[Term, ...] = (spread_term.TERM, global_term.TERM, pixel_term.TERM,
                           restoration_term.TERM)
# Terms that give the backbone something to learn on their own: the spread terms only keep
# the pixel projections apart and are no objective by themselves.
OBJECTIVES = ('global', 'pixel', 'restoration')
# The `method` fields that name a form, with the forms the terms implement (config_checks
# reads the same table).
METHOD_CHOICES: dict[str, tuple[str, ...]] = {
    'match': pixel_term.MATCH_MODES,
    'weighting': WEIGHTING_FORMS,
    'weighting_scale': WEIGHTING_SCALES,
    'restoration_loss': restoration_term.RESTORATION_LOSSES,
}


def enabled_terms(method_cfg: ml_collections.ConfigDict) -> tuple[Term, ...]:
  """The terms the `method` config turns on, in summation order."""
  return tuple(t for t in TERMS if t.enabled(method_cfg))


def nothing_to_learn(method_cfg: ml_collections.ConfigDict) -> str | None:
  """Why the config trains nothing, or None."""
  if not any(t.name in OBJECTIVES for t in enabled_terms(method_cfg)):
    return ('config.method: use_global and use_pixel are False and lambda_restoration is 0; '
            'nothing to learn.')
  return None


def model_heads(method_cfg: ml_collections.ConfigDict) -> dict:
  """`build_model` arguments for the heads the enabled terms need."""
  heads = {}
  for term in enabled_terms(method_cfg):
    heads.update(term.model_heads)
  return heads


def metric_names() -> tuple[str, ...]:
  """Every metric `pretrain_loss` reports, whichever terms are on."""
  return ('loss',) + tuple(n for t in TERMS for n in t.metric_names) + ('projection_std',)
