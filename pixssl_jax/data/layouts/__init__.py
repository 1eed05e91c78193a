"""Raw-folder layouts for `prepare`, one module each, registered in order of precedence.

Adding a layout: write its module (a `registry.Layout` and a `registry.register` call, see
`images.py` for the smallest), import it below at the place where it should be tried, and add
its test.
"""
from pixssl_jax.data.layouts.registry import discover
from pixssl_jax.data.layouts.registry import Found
from pixssl_jax.data.layouts.registry import Layout
from pixssl_jax.data.layouts.registry import register
from pixssl_jax.data.layouts.registry import registered
from pixssl_jax.data.layouts.registry import unregister

# Registration order is the order `discover` tries them in: the most specific first.
from pixssl_jax.data.layouts import msd  # noqa: E402,F401  pylint: disable=g-bad-import-order
from pixssl_jax.data.layouts import btcv  # noqa: E402,F401  pylint: disable=g-bad-import-order
from pixssl_jax.data.layouts import folders  # noqa: E402,F401  pylint: disable=g-bad-import-order
from pixssl_jax.data.layouts import images  # noqa: E402,F401  pylint: disable=g-bad-import-order

__all__ = ['Found', 'Layout', 'discover', 'register', 'registered', 'unregister']
