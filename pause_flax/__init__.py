"""pause_flax: decoder-only language models trained with <pause> tokens.

Importing the package is cheap: seqio and TensorFlow load only when a data
module is imported.
"""

__version__ = "0.1.0"
