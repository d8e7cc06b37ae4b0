"""align_jax: aligning language models with pure, jitted JAX losses and functional trainers."""

__version__ = "0.1.0"
