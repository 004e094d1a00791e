"""pause_flax: pretrain, finetune and evaluate decoder-only LMs with <pause> tokens."""

import setuptools

setuptools.setup(
    name="pause-flax",
    version="0.1.0",
    description=(
        "JAX/Flax NNX framework for training language models with pause tokens "
        "(Goyal et al., ICLR 2024)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["pause_flax", "pause_flax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.5.0,<0.13",
        "jaxlib>=0.5.0,<0.13",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "chex>=0.1.87,<0.3",
        "seqio>=0.0.19,<0.1",
        "tensorflow-datasets>=4.9.4,<5",
        "tensorflow>=2.16,<2.23",
        "sentencepiece>=0.2.0,<0.3",
        "gin-config>=0.5.0,<0.6",
        "absl-py>=1.4,<3",
        "numpy>=1.26,<3",
        "matplotlib>=3.8,<4",
        "clu>=0.0.11,<0.1",
        "importlib_resources>=5",  # tensorflow-datasets' epath resources
        "tensorboard>=2.16,<2.23",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "hypothesis>=6.100,<7",
            "scipy>=1.11,<2",
            "torch==2.13.0",  # CPU build; builds the reference Llama in tests/test_hf_convert.py
            "transformers>=4.45,<6",
            "safetensors>=0.4.3,<1",
            "tokenizers>=0.20,<0.24",
            "wandb>=0.17,<1",  # tests/test_tracking.py reads an offline run
            "lm-eval>=0.4,<0.5",  # tests/test_lm_eval.py (pulls torch, already here)
        ],
        # Weights & Biases logging (WANDB_PROJECT; docs/training.md).
        "wandb": [
            "wandb>=0.17,<1",
        ],
        # Import/export of Hugging Face checkpoints and tokenizers (no torch needed).
        "hf": [
            "safetensors>=0.4.3,<1",
            "tokenizers>=0.20,<0.24",
        ],
        # The lm-evaluation-harness adapter (python -m pause_flax.lm_eval); pulls torch.
        "lm_eval": [
            "lm-eval>=0.4,<0.5",
        ],
    },
    entry_points={
        "console_scripts": [
            "pause-flax-train=pause_flax.train:console_main",
            "pause-flax-grid=pause_flax.grid:console_main",
            "pause-flax-eval=pause_flax.eval:console_main",
            "pause-flax-lm-eval=pause_flax.lm_eval:console_main",
        ],
    },
    include_package_data=True,
)
