"""Loss functions: pure functions of arrays and view transforms (no modules, no configs)."""

from pixssl_jax.losses.feature_spread import effective_rank
from pixssl_jax.losses.feature_spread import variance_covariance
from pixssl_jax.losses.global_consistency import cosine_discrepancy
from pixssl_jax.losses.global_consistency import global_consistency
from pixssl_jax.losses.global_consistency import l2_normalize
from pixssl_jax.losses.pixel_matching import cell_to_cell_affine
from pixssl_jax.losses.pixel_matching import linear_interpolate
from pixssl_jax.losses.pixel_matching import match_features
from pixssl_jax.losses.pixel_matching import match_features_by_distance
from pixssl_jax.losses.uncertainty import mc_dropout_statistics
from pixssl_jax.losses.uncertainty import mean_over_samples
from pixssl_jax.losses.uncertainty import ramp_threshold
from pixssl_jax.losses.uncertainty import spearman
from pixssl_jax.losses.uncertainty import uncertainty_calibration
from pixssl_jax.losses.uncertainty import uncertainty_weighting
from pixssl_jax.losses.uncertainty import valid_ranks
from pixssl_jax.losses.uncertainty import weight_statistics
from pixssl_jax.losses.uncertainty import WEIGHTING_FORMS
from pixssl_jax.losses.uncertainty import WEIGHTING_SCALES

__all__ = [
    'WEIGHTING_FORMS',
    'WEIGHTING_SCALES',
    'cell_to_cell_affine',
    'cosine_discrepancy',
    'effective_rank',
    'global_consistency',
    'l2_normalize',
    'linear_interpolate',
    'match_features',
    'match_features_by_distance',
    'mc_dropout_statistics',
    'mean_over_samples',
    'ramp_threshold',
    'spearman',
    'uncertainty_calibration',
    'uncertainty_weighting',
    'valid_ranks',
    'variance_covariance',
    'weight_statistics',
]
