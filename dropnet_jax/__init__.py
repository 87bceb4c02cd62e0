"""dropnet_jax: DropNet (Tan & Motani, ICML 2020) and related pruning in JAX/Flax."""

__version__ = '0.1.0'

# models registers the large models (ResNet18, VGG19) from its last line, and large_models builds on
# models' helpers: importing models first makes `import dropnet_jax.large_models` work on its own too.
from dropnet_jax import models  # noqa: E402,F401
