"""pause_flax.training."""
