"""lapa_jax: LAPA (Latent Action Pretraining from Videos) in JAX/Flax."""

__version__ = '0.1.0'
