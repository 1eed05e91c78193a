"""Notebook analysis of pre-training runs: load a checkpoint, encode volumes, probe, plot.

  from pixssl_jax import analysis
  run = analysis.load_run('runs/demo')                 # latest step, teacher, on one device
  volume = analysis.load_volume(run, 'case_0003')      # a store case or any NIfTI path
  feats = analysis.encode(run, volume)                 # [X/s, Y/s, Z, Cp] by sliding window
  analysis.plot_features(volume.image, feats, plane='coronal', spacing=volume.spacing)

See docs/analysis.md and notebooks/analysis.ipynb. Nothing else in the package imports this.
"""

from pixssl_jax.analysis.features import PairAnalysis
from pixssl_jax.analysis.features import Volume
from pixssl_jax.analysis.features import analyse_view_pair
from pixssl_jax.analysis.features import encode
from pixssl_jax.analysis.features import feature_stride
from pixssl_jax.analysis.features import load_volume
from pixssl_jax.analysis.features import stabilizer_uncertainty
from pixssl_jax.analysis.features import volume_uncertainty
from pixssl_jax.analysis.plots import plot_features
from pixssl_jax.analysis.plots import plot_loss_curves
from pixssl_jax.analysis.plots import plot_overlay
from pixssl_jax.analysis.plots import plot_pair_uncertainty
from pixssl_jax.analysis.plots import plot_separability
from pixssl_jax.analysis.plots import plot_uncertainty
from pixssl_jax.analysis.plots import slice_of
from pixssl_jax.analysis.probes import Correspondence
from pixssl_jax.analysis.probes import PcaBasis
from pixssl_jax.analysis.probes import Separability
from pixssl_jax.analysis.probes import UncertaintyAgreement
from pixssl_jax.analysis.probes import correspondence
from pixssl_jax.analysis.probes import fit_pca
from pixssl_jax.analysis.probes import labels_on_grid
from pixssl_jax.analysis.probes import organ_separability
from pixssl_jax.analysis.probes import pair_correspondence
from pixssl_jax.analysis.probes import pca_rgb
from pixssl_jax.analysis.probes import true_cell_positions
from pixssl_jax.analysis.probes import uncertainty_agreement
from pixssl_jax.analysis.runs import Run
from pixssl_jax.analysis.runs import available_steps
from pixssl_jax.analysis.runs import load_run
from pixssl_jax.analysis.runs import metrics_frame
from pixssl_jax.analysis.runs import read_config
