"""pause_flax.model."""
