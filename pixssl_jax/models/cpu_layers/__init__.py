"""The layer forms XLA:CPU runs fast: the `CPU` layer set of `pixssl_jax/models/layers.py`."""
