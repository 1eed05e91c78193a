"""pixssl_jax: pixel-global self-supervised learning with an uncertainty-aware context stabilizer for CT."""
