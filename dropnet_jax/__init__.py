"""dropnet_jax: DropNet (Tan & Motani, ICML 2020) and related pruning in JAX/Flax."""

__version__ = '0.1.0'
