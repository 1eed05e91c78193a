"""Evaluation: Dice/HD95 metrics, sliding-window inference and NIfTI export of predictions.

Modules are imported directly (`from pixssl_jax.evaluation import metrics`), so reading the
metrics does not import JAX.
"""
