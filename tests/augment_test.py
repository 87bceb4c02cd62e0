"""random_crop_flip: uint8 in/out, real crops and flips, deterministic per key, jit/vmap-able."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax.training.augment import random_crop_flip

B, H, W, C = 64, 8, 6, 3


@pytest.fixture(scope='module')
def images():
  return jnp.asarray(np.random.default_rng(0).integers(1, 256, (B, H, W, C)), jnp.uint8)  # no zeros


def all_variants(image, padding):
  """Every crop (dy, dx) of the zero-padded image, flipped or not, computed in numpy."""
  p = np.pad(np.asarray(image), ((padding, padding), (padding, padding), (0, 0)))
  for dy, dx, f in itertools.product(range(2 * padding + 1), range(2 * padding + 1), (False, True)):
    crop = p[dy:dy + H, dx:dx + W]
    yield (dy, dx, f), (crop[:, ::-1] if f else crop)


def test_shape_dtype_and_identity(images):
  out = random_crop_flip(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  same = random_crop_flip(jax.random.key(0), images, padding=0, flip=False)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(images))
  # padding=0 with flips: each image is itself or its mirror, and both happen.
  flipped = np.asarray(random_crop_flip(jax.random.key(1), images, padding=0))
  is_same = (flipped == np.asarray(images)).all(axis=(1, 2, 3))
  is_flip = (flipped == np.asarray(images)[:, :, ::-1]).all(axis=(1, 2, 3))
  assert (is_same | is_flip).all() and is_same.any() and is_flip.any()


@pytest.mark.parametrize('padding', [1, 4])
def test_each_output_is_a_crop_or_flip_of_the_padded_input(images, padding):
  out = np.asarray(jax.jit(random_crop_flip, static_argnames=('padding',))(jax.random.key(2), images, padding))
  chosen = []
  for x, y in zip(np.asarray(images), out):
    matches = [v for v, img in all_variants(x, padding) if np.array_equal(img, y)]
    assert matches, 'output is no crop/flip of the padded input'
    chosen.append(matches[0])
  # The draws really vary: many distinct offsets, both flip states, all offsets within range.
  assert len({(dy, dx) for dy, dx, _ in chosen}) >= min(10, (2 * padding + 1) ** 2 - 1)
  assert {f for _, _, f in chosen} == {False, True}
  assert any(dy == 0 or dx == 0 for dy, dx, _ in chosen) and any(dy == 2 * padding for dy, _, _ in chosen)


def test_deterministic_per_key_and_vmappable(images):
  a = random_crop_flip(jax.random.key(3), images)
  b = random_crop_flip(jax.random.key(3), images)
  c = random_crop_flip(jax.random.key(4), images)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  keys = jax.random.split(jax.random.key(5), 2)
  stacked = jax.vmap(random_crop_flip)(keys, jnp.stack([images, images]))
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(stacked[i]), np.asarray(random_crop_flip(keys[i], images)))


def test_bad_arguments(images):
  with pytest.raises(ValueError):
    random_crop_flip(jax.random.key(0), images[0])
  with pytest.raises(ValueError):
    random_crop_flip(jax.random.key(0), images, padding=-1)
