"""pause_flax.evaluation."""
