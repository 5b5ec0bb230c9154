"""vigface_jax: VIGFace (virtual identity generation for privacy-free FR) in JAX/Flax."""

__version__ = "0.1.0"
