"""pause_flax.data."""
