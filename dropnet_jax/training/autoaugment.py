"""AutoAugment's CIFAR-10 policy (Cubuk et al., 2019) on the device, with the arithmetic torchvision's recipe runs.

Why: the "ResNet18 under 5 M parameters" report trains with torchvision's
`AutoAugment(AutoAugmentPolicy.CIFAR10)`, applied after RandomCrop(32, padding=4) and RandomHorizontalFlip and
before ToTensor. The CIFAR datasets hand it PIL images, so the computation to reproduce is PIL's. This module
does it on uint8 (B, H, W, C) batches (C = 1 or 3), pure and jittable, so it runs inside the jitted epoch with a
key per (seed, cycle, epoch, batch) like `augment.random_crop_flip`.

The draw, per image, as torchvision's `AutoAugment.forward`: one of the 25 sub-policies of `CIFAR10_POLICY`
uniformly; each of its two (op, probability p, magnitude bin) applies when u <= p (u ~ U[0, 1)); the magnitude is
the bin's value in `augmentation_space(10, H, W)`, negated with probability 1/2 for the signed ops; interpolation
NEAREST, fill 0 (torchvision's defaults). The ops, as PIL computes them (checked against Pillow in
tests/autoaugment_test.py):
  * ShearX/ShearY/TranslateX/TranslateY/Rotate: `Image.transform(AFFINE)` / `Image.rotate` with NEAREST sample
    the input at floor(A (x + 1/2, y + 1/2) + t), A and t in PIL's 16.16 fixed point; outside -> 0. The inverse
    matrices are torchvision's (`_get_inverse_affine_matrix`: shear about the corner (0, 0) with angle atan(m),
    translation by int(m) pixels) and PIL's own rotation about (W/2, H/2). They depend only on (op, bin, sign,
    H, W), so they are tabulated on the host in float64, as PIL computes them, and looked up on the device.
  * Brightness/Color/Contrast/Sharpness: PIL's `Image.blend(degenerate, image, 1 + m)`: float32 d + f (v - d)
    with two roundings, clipped and truncated, tabulated on the host per factor as a (d, v) -> uint8 table (a
    compiler may fuse the multiply-add into one FMA, whose single rounding moves results by 1); degenerates:
    black; the 'L' grey (ITU-R 601 weights in PIL's 16-bit fixed point, rounded); a constant at the grey
    image's mean rounded half up; PIL's SMOOTH filter (3x3 [1 1 1; 1 5 1; 1 1 1] / 13,
    rounded, the one-pixel border left as it is). On one channel Color is the identity, as in PIL.
  * Posterize keeps the top `bits` bits; Solarize inverts pixels >= threshold; Invert is 255 - v; AutoContrast
    maps each channel's [min, max] onto [0, 255] (identity when flat); Equalize is PIL's per-channel histogram
    lookup table (step = (n - count of the last value) // 255; identity when step is 0).
Known difference: AutoContrast is exact, floor((v - lo) * 255 / (hi - lo)); PIL evaluates v * s - lo * s in double
and falls one short of an integer in 0.4 % of its (lo, hi, v) table entries (lo = 0, hi = 25 maps 25 to 254).
Magnitudes are torch.linspace's float32 values (computed as numpy's float64 linspace rounded to float32).

Why no image library: dm-pix's colour ops have TensorFlow's float semantics (additive brightness, per-channel
contrast mean, HSV saturation) and it has no posterize, equalize, autocontrast or PIL sharpness; its order-0
affine warp rounds centre-indexed coordinates (jax.scipy map_coordinates) rather than PIL's fixed-point floor.
What would remain of it is a 10-line gather, written here with PIL's exact arithmetic instead.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

OPS = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color', 'Contrast', 'Sharpness',
       'Posterize', 'Solarize', 'AutoContrast', 'Equalize', 'Invert')
NUM_BINS = 10  # torchvision's AutoAugment calls _augmentation_space(10, image size)

# torchvision's AutoAugmentPolicy.CIFAR10: 25 sub-policies of two (op, probability, magnitude bin or None).
CIFAR10_POLICY = (
    (('Invert', 0.1, None), ('Contrast', 0.2, 6)),
    (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)),
    (('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)),
    (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.5, None), ('Equalize', 0.9, None)),
    (('ShearY', 0.2, 7), ('Posterize', 0.3, 7)),
    (('Color', 0.4, 3), ('Brightness', 0.6, 7)),
    (('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)),
    (('Equalize', 0.6, None), ('Equalize', 0.5, None)),
    (('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)),
    (('Color', 0.7, 7), ('TranslateX', 0.5, 8)),
    (('Equalize', 0.3, None), ('AutoContrast', 0.4, None)),
    (('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)),
    (('Brightness', 0.9, 6), ('Color', 0.2, 8)),
    (('Solarize', 0.5, 2), ('Invert', 0.0, None)),
    (('Equalize', 0.2, None), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.2, None), ('Equalize', 0.6, None)),
    (('Color', 0.9, 9), ('Equalize', 0.6, None)),
    (('AutoContrast', 0.8, None), ('Solarize', 0.2, 8)),
    (('Brightness', 0.1, 3), ('Color', 0.7, 0)),
    (('Solarize', 0.4, 5), ('AutoContrast', 0.9, None)),
    (('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.9, None), ('Solarize', 0.8, 3)),
    (('Equalize', 0.8, None), ('Invert', 0.1, None)),
    (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None)),
)

Policy = Sequence[tuple[tuple[str, float, 'int | None'], tuple[str, float, 'int | None']]]
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # PIL's AFFINE data (a, b, c, d, e, f): input = (ax+by+c, dx+ey+f)


def augmentation_space(num_bins: int, height: int, width: int) -> dict[str, tuple[np.ndarray, bool]]:
  """op -> (magnitude per bin, signed), as torchvision's `AutoAugment._augmentation_space(num_bins, (W, H))`:
  translations reach 150/331 of the width (X) or height (Y); ops without a magnitude get 0."""
  def spaced(end: float) -> np.ndarray:
    return np.linspace(0.0, end, num_bins).astype(np.float32)
  none = np.zeros((), np.float32)
  return {
      'ShearX': (spaced(0.3), True), 'ShearY': (spaced(0.3), True),
      'TranslateX': (spaced(150.0 / 331.0 * width), True), 'TranslateY': (spaced(150.0 / 331.0 * height), True),
      'Rotate': (spaced(30.0), True),
      'Brightness': (spaced(0.9), True), 'Color': (spaced(0.9), True), 'Contrast': (spaced(0.9), True),
      'Sharpness': (spaced(0.9), True),
      'Posterize': (8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4)).astype(np.int32), False),
      'Solarize': (np.linspace(255.0, 0.0, num_bins).astype(np.float32), False),
      'AutoContrast': (none, False), 'Equalize': (none, False), 'Invert': (none, False),
  }


# -- host side: an op's magnitude as the numbers the device kernels take ------------------------------------

def _inverse_affine(center, angle, translate, shear) -> list[float]:
  """PIL AFFINE data of torchvision's affine (scale 1): the inverse of T C R(angle) ShY ShX C^-1 (degrees)."""
  rot, sx, sy = (math.radians(v) for v in (angle, *shear))
  # The forward 2x2 part, rotation after the shears; its determinant is 1, so its inverse is its adjugate.
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  m = [d, -b, 0.0, -c, a, 0.0]
  (cx, cy), (tx, ty) = center, translate
  m[2] = m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
  m[5] = m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
  return m


def _pil_rotation(angle: float, height: int, width: int) -> list[float]:
  """PIL's `Image.rotate(angle)` (counter-clockwise degrees, about (W/2, H/2), no expand) as AFFINE data."""
  r = -math.radians(angle % 360.0)
  m = [round(math.cos(r), 15), round(math.sin(r), 15), 0.0, round(-math.sin(r), 15), round(math.cos(r), 15), 0.0]
  cx, cy = width / 2.0, height / 2.0
  m[2] = m[0] * -cx + m[1] * -cy + cx
  m[5] = m[3] * -cx + m[4] * -cy + cy
  return m


def _fixed_point(m: Sequence[float]) -> np.ndarray:
  """PIL's nearest-neighbour affine in 16.16 fixed point: (a, b, d, e, x0, y0) with the source pixel of output
  (x, y) at ((x0 + x a + y b) >> 16, (y0 + x d + y e) >> 16)."""
  fix = lambda v: math.floor(v * 65536.0 + 0.5)
  a, b, c, d, e, f = m
  return np.array([fix(a), fix(b), fix(d), fix(e), fix(c + b * 0.5 + a * 0.5), fix(f + e * 0.5 + d * 0.5)], np.int32)


def op_arguments(op: str, magnitude: float, height: int, width: int) -> tuple[np.float32, np.ndarray]:
  """(level, fixed-point affine) the device kernel of `op` takes for a signed `magnitude` on HxW images: the
  blend factor 1 + m, the posterize bits int(m), the solarize threshold m; the affine is the identity for
  non-geometric ops."""
  if op not in OPS:
    raise ValueError(f'unknown AutoAugment op {op!r}; known: {OPS}')
  m = float(magnitude)
  affine = _IDENTITY
  if op in ('ShearX', 'ShearY'):
    shear = math.degrees(math.atan(m))
    affine = _inverse_affine((0.0, 0.0), 0.0, (0.0, 0.0), (shear, 0.0) if op == 'ShearX' else (0.0, shear))
  elif op in ('TranslateX', 'TranslateY'):
    shift = (int(m), 0) if op == 'TranslateX' else (0, int(m))
    affine = _inverse_affine((width * 0.5, height * 0.5), 0.0, shift, (0.0, 0.0))
  elif op == 'Rotate':
    affine = _pil_rotation(m, height, width)
  level = {'Brightness': 1.0 + m, 'Color': 1.0 + m, 'Contrast': 1.0 + m, 'Sharpness': 1.0 + m,
           'Posterize': int(m), 'Solarize': m}.get(op, 0.0)
  return np.float32(level), _fixed_point(affine)


def _blend_table(factor: np.float32) -> np.ndarray:
  """(256, 256) uint8: [d, v] -> PIL's blend of degenerate d and pixel v, float32 with two roundings (numpy's
  separate multiply and add), clipped and truncated."""
  d, v = np.meshgrid(np.arange(256, dtype=np.float32), np.arange(256, dtype=np.float32), indexing='ij')
  return np.floor(np.clip(d + np.float32(factor) * (v - d), 0, 255)).astype(np.uint8)


_BLENDS = ('Brightness', 'Color', 'Contrast', 'Sharpness')


@functools.lru_cache(maxsize=32)
def _policy_tables(policy: tuple, height: int, width: int) -> tuple[np.ndarray, ...]:
  """Per (sub-policy, stage): op index and probability; per (sub-policy, stage, sign): level (for the blends:
  the index of their factor's table) and affine; the blend tables (factor 1 first)."""
  space = augmentation_space(NUM_BINS, height, width)
  n = len(policy)
  ops, probs = np.zeros((n, 2), np.int32), np.zeros((n, 2), np.float32)
  levels, affines = np.zeros((n, 2, 2), np.float32), np.zeros((n, 2, 2, 6), np.int32)
  factors = [np.float32(1.0)]
  for i, sub in enumerate(policy):
    for stage, (op, p, bin_) in enumerate(sub):
      values, signed = space[op]
      magnitude = float(values[bin_]) if bin_ is not None else 0.0
      ops[i, stage], probs[i, stage] = OPS.index(op), p
      for sign, factor in enumerate((-1.0 if signed else 1.0, 1.0)):  # sign 0: negated, as torchvision's
        level, affines[i, stage, sign] = op_arguments(op, factor * magnitude, height, width)
        if op in _BLENDS:
          factors += [] if level in factors else [level]
          level = factors.index(level)
        levels[i, stage, sign] = level
  return ops, probs, levels, affines, np.stack([_blend_table(f) for f in factors])


# -- device side: the ops on one (H, W, C) uint8 image ------------------------------------------------------

def _warp(image, level, affine, blends):
  del level, blends
  h, w, _ = image.shape
  y, x = jnp.arange(h, dtype=jnp.int32)[:, None], jnp.arange(w, dtype=jnp.int32)[None, :]
  xi = jnp.right_shift(affine[4] + x * affine[0] + y * affine[1], 16)  # arithmetic shift: floor
  yi = jnp.right_shift(affine[5] + x * affine[2] + y * affine[3], 16)
  inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
  out = image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
  return jnp.where(inside[..., None], out, jnp.zeros_like(out))


def _blend(degenerate, image, level, blends):
  """PIL's Image.blend(degenerate, image, factor) on uint8, through the factor's table blends[level]."""
  table = blends[level.astype(jnp.int32)].reshape(-1)
  return table[degenerate.astype(jnp.int32) * 256 + image.astype(jnp.int32)]


def _grey(image):
  """(H, W) int32: PIL's convert('L') (16-bit fixed-point ITU-R 601, rounded); one channel as it is."""
  v = image.astype(jnp.int32)
  if image.shape[-1] == 1:
    return v[..., 0]
  return jnp.right_shift(v[..., 0] * 19595 + v[..., 1] * 38470 + v[..., 2] * 7471 + 0x8000, 16)


def _brightness(image, level, affine, blends):
  return _blend(jnp.zeros_like(image), image, level, blends)


def _color(image, level, affine, blends):
  return _blend(jnp.broadcast_to(_grey(image)[..., None], image.shape), image, level, blends)


def _contrast(image, level, affine, blends):
  g = _grey(image)
  mean = (2 * g.sum() + g.size) // (2 * g.size)  # int(mean + 0.5), exactly
  return _blend(jnp.full(image.shape, mean, jnp.int32), image, level, blends)


def _sharpness(image, level, affine, blends):
  v = image.astype(jnp.int32)
  h, w, _ = image.shape
  window = sum(v[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  smooth = v.at[1:-1, 1:-1].set((2 * (window + 4 * v[1:-1, 1:-1]) + 13) // 26)  # /13 rounded; border kept
  return _blend(smooth, image, level, blends)


def _posterize(image, level, affine, blends):
  shift = 8 - level.astype(jnp.int32)
  return (image.astype(jnp.int32) & jnp.left_shift(jnp.right_shift(255, shift), shift)).astype(jnp.uint8)


def _solarize(image, level, affine, blends):
  return jnp.where(image.astype(jnp.float32) >= level, 255 - image, image)


def _autocontrast(image, level, affine, blends):
  v = image.astype(jnp.int32)
  lo, hi = v.min(axis=(0, 1)), v.max(axis=(0, 1))
  stretched = (v - lo) * 255 // jnp.maximum(hi - lo, 1)
  return jnp.where(hi > lo, stretched, v).astype(jnp.uint8)


def _equalize_channel(v):
  hist = jnp.zeros(256, jnp.int32).at[v.ravel()].add(1)
  step = (v.size - hist[v.max()]) // 255
  lut = jnp.clip((step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1), 0, 255)
  return jnp.where(step > 0, lut[v], v)


def _equalize(image, level, affine, blends):
  v = image.astype(jnp.int32)
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(v).astype(jnp.uint8)


def _invert(image, level, affine, blends):
  return 255 - image


_KERNELS = {'ShearX': _warp, 'ShearY': _warp, 'TranslateX': _warp, 'TranslateY': _warp, 'Rotate': _warp,
            'Brightness': _brightness, 'Color': _color, 'Contrast': _contrast, 'Sharpness': _sharpness,
            'Posterize': _posterize, 'Solarize': _solarize, 'AutoContrast': _autocontrast, 'Equalize': _equalize,
            'Invert': _invert}
_BRANCHES = tuple(_KERNELS[op] for op in OPS)
_JITTED = {op: jax.jit(kernel) for op, kernel in _KERNELS.items()}  # compiled once per image shape


def _check(images, ndim: int) -> None:
  if images.ndim != ndim or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be {"(batch, height, width, " if ndim == 4 else "(height, width, "}'
                     f'1 or 3 channels), got shape {images.shape}')
  if images.dtype != jnp.uint8:
    raise ValueError(f'AutoAugment works on uint8 images, got {images.dtype}')


def apply_op(image: jax.Array, op: str, magnitude: float) -> jax.Array:
  """One op with a given signed magnitude on one (H, W, C) uint8 image (what a policy stage does when it fires)."""
  image = jnp.asarray(image)
  _check(image, 3)
  level, affine = op_arguments(op, magnitude, image.shape[0], image.shape[1])
  blends = _blend_table(level)[None] if op in _BLENDS else np.zeros((1, 256, 256), np.uint8)
  level = np.float32(0) if op in _BLENDS else level
  return _JITTED[op](image, level, affine, blends)


def _augment_one(key, image, tables):
  ops, probs, levels, affines, blends = tables
  k_policy, k_prob, k_sign = jax.random.split(key, 3)
  i = jax.random.randint(k_policy, (), 0, ops.shape[0])
  u = jax.random.uniform(k_prob, (2,))
  sign = jax.random.bernoulli(k_sign, 0.5, (2,)).astype(jnp.int32)
  for stage in range(2):
    out = jax.lax.switch(ops[i, stage], _BRANCHES, image, levels[i, stage, sign[stage]],
                         affines[i, stage, sign[stage]], blends)
    image = jnp.where(u[stage] <= probs[i, stage], out, image)
  return image


def autoaugment(key: jax.Array, images: jax.Array, policy: Policy = CIFAR10_POLICY) -> jax.Array:
  """AutoAugment on a uint8 (B, H, W, C) batch (C = 1 or 3): each image draws its own sub-policy, stage
  probabilities and signs from `split(key, B)`; the same key gives the same output. Jittable and vmappable."""
  images = jnp.asarray(images)
  _check(images, 4)
  policy = tuple(tuple(tuple(stage) for stage in sub) for sub in policy)
  tables = tuple(jnp.asarray(t) for t in _policy_tables(policy, images.shape[1], images.shape[2]))
  return _augment_batch(jax.random.split(key, images.shape[0]), images, tables)


@jax.jit  # also when called eagerly: op-by-op dispatch of the vmapped switch is orders of magnitude slower
def _augment_batch(keys, images, tables):
  return jax.vmap(lambda k, x: _augment_one(k, x, tables))(keys, images)
