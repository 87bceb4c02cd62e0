"""Optional on-device training augmentation: random crop (zero padding) and horizontal flip, and the
composition `batch_augmenter` the trainer uses (crop/flip, then AutoAugment from training.autoaugment).

`random_crop_flip` is pure and jittable, works on uint8 batches and returns
uint8, and can be vmapped (e.g. over a leading axis of keys and batches), so it
can run inside a jitted/scanned training step: one call per batch with a key
folded from the epoch and batch index keeps runs reproducible.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dropnet_jax.training.autoaugment import autoaugment

AUTOAUGMENT_SALT = 0xAA0  # AutoAugment's key of batch i: fold_in(fold_in(augmentation key, i), salt)


def _one(key: jax.Array, image: jax.Array, padding: int, flip: bool) -> jax.Array:
  h, w, c = image.shape
  k_y, k_x, k_f = jax.random.split(key, 3)
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  dy = jax.random.randint(k_y, (), 0, 2 * padding + 1)
  dx = jax.random.randint(k_x, (), 0, 2 * padding + 1)
  out = jax.lax.dynamic_slice(padded, (dy, dx, jnp.zeros((), dy.dtype)), (h, w, c))
  if flip:
    out = jnp.where(jax.random.bernoulli(k_f), out[:, ::-1, :], out)
  return out


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4, flip: bool = True) -> jax.Array:
  """Per image: zero-pad by `padding`, crop a random HxW window, flip left-right with probability 1/2.

  Args:
    key: a PRNG key; the same key gives the same output.
    images: (B, H, W, C) (any dtype; uint8 in -> uint8 out). The offsets (dy, dx) are uniform
      in [0, 2 * padding] per image, independent of the flip.
    padding: static, >= 0. With padding=0 and flip=False the output is the input.
    flip: static; False disables the random horizontal flip.
  """
  if images.ndim != 4:
    raise ValueError(f'images must be (batch, height, width, channels), got shape {images.shape}')
  if padding < 0:
    raise ValueError(f'padding must be >= 0, got {padding}')
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: _one(k, x, padding, flip))(keys, images).astype(images.dtype)


def batch_augmenter(kind: str, key: jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(batch images, batch index i) -> the augmented batch for TrainConfig.augment `kind` ('none', 'flip',
  'crop', 'crop,flip', 'autoaugment', 'crop,flip,autoaugment'): random crops (zero padding 4) and/or flips
  from fold_in(key, i), as before AutoAugment existed (so those runs are unchanged), then AutoAugment from
  fold_in(fold_in(key, i), AUTOAUGMENT_SALT): torchvision's CIFAR order, crop -> flip -> AutoAugment."""
  if kind == 'none':
    return lambda x, i: x
  padding, flip, auto = (4 if 'crop' in kind else 0), 'flip' in kind, 'autoaugment' in kind

  def augment(x: jax.Array, i: jax.Array) -> jax.Array:
    k = jax.random.fold_in(key, i)
    if padding or flip:
      x = random_crop_flip(k, x, padding=padding, flip=flip)
    return autoaugment(jax.random.fold_in(k, AUTOAUGMENT_SALT), x) if auto else x
  return augment
