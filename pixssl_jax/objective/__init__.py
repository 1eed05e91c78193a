"""The pre-training objective as parts: one module per loss term, summed by `pretrain_loss`.

Adding a term: a module here that defines `TERM` (`parts.Term`), its config field(s) in
configs/pretrain.py's `method` block, one line in `registry.TERMS`, and its tests
(docs/design.md, "Adding a loss term").
"""

from pixssl_jax.objective.pixel_term import has_mc_dropout
from pixssl_jax.objective.pixel_term import PIXEL_DIAGNOSTICS
from pixssl_jax.objective.pixel_term import pixel_predictions
from pixssl_jax.objective.pixel_term import stabilized_prediction
from pixssl_jax.objective.pretrain_loss import method_problems
from pixssl_jax.objective.pretrain_loss import pixel_maps
from pixssl_jax.objective.pretrain_loss import pretrain_loss
from pixssl_jax.objective.registry import enabled_terms
from pixssl_jax.objective.registry import metric_names
from pixssl_jax.objective.registry import model_heads

__all__ = [
    'PIXEL_DIAGNOSTICS',
    'enabled_terms',
    'has_mc_dropout',
    'method_problems',
    'metric_names',
    'model_heads',
    'pixel_maps',
    'pixel_predictions',
    'pretrain_loss',
    'stabilized_prediction',
]
