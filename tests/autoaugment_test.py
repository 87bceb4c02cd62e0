"""AutoAugment (training.autoaugment): each op against Pillow (what torchvision's CIFAR recipe runs), the policy
table and magnitudes against torchvision's source, the random draw's properties, jit/vmap, and training with it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from dropnet_jax.training import autoaugment as aa
from dropnet_jax.training.augment import batch_augmenter

SHAPES = [(32, 32, 3), (8, 8, 1), (20, 28, 3)]  # CIFAR, digits, non-square (H != W)


def pil_reference(image: np.ndarray, op: str, m: float) -> np.ndarray:
  """What torchvision's `_apply_op` does to a PIL image (NEAREST, fill 0), with Pillow's own calls. The affine
  data are worked out by hand: shear about the corner (0, 0) by angle atan(m) -> input x = out x + m y (X) or
  input y = out y + m x (Y); a translation by int(m) pixels -> input = output - t; Rotate is Image.rotate."""
  im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  affine = lambda data: im.transform(im.size, Image.AFFINE, data, Image.NEAREST, fillcolor=0)
  if op == 'ShearX':
    out = affine((1, math.tan(math.atan(m)), 0, 0, 1, 0))
  elif op == 'ShearY':
    out = affine((1, 0, 0, math.tan(math.atan(m)), 1, 0))
  elif op == 'TranslateX':
    out = affine((1, 0, -int(m), 0, 1, 0))
  elif op == 'TranslateY':
    out = affine((1, 0, 0, 0, 1, -int(m)))
  elif op == 'Rotate':
    out = im.rotate(m, Image.NEAREST, fillcolor=0)
  elif op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
    out = getattr(ImageEnhance, op)(im).enhance(1.0 + m)
  elif op == 'Posterize':
    out = ImageOps.posterize(im, int(m))
  elif op == 'Solarize':
    out = ImageOps.solarize(im, m)
  else:
    out = {'AutoContrast': ImageOps.autocontrast, 'Equalize': ImageOps.equalize, 'Invert': ImageOps.invert}[op](im)
  return np.asarray(out).reshape(image.shape)


def signed_magnitudes(op, shape):
  values, signed = aa.augmentation_space(aa.NUM_BINS, shape[0], shape[1])[op]
  values = [float(v) for v in np.atleast_1d(values)]
  return values + [-v for v in values if v] if signed else values


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('op', aa.OPS)
def test_each_op_matches_pillow_at_every_magnitude(op, shape):
  """Exact, pixel for pixel, at every bin and sign, compiled as in training (apply_op runs the jitted kernel;
  AutoContrast: see the next test for its one difference)."""
  rng = np.random.default_rng(aa.OPS.index(op))
  for m in signed_magnitudes(op, shape):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    if op in ('AutoContrast', 'Equalize'):  # a narrower range, so the stretch is not the identity
      image = (image // 4 + 60).astype(np.uint8)
    ours = np.asarray(aa.apply_op(image, op, m))
    assert ours.dtype == np.uint8 and ours.shape == image.shape
    np.testing.assert_array_equal(ours, pil_reference(image, op, m), err_msg=f'{op}({m})')


def test_autocontrast_is_exact_where_pillow_rounds_down():
  """The documented difference: PIL's lut is int(v * s - lo * s) in double, one short of 255 at v = hi for
  some (lo, hi); ours is the exact floor((v - lo) * 255 / (hi - lo)). Elsewhere they agree."""
  ramp = np.linspace(0, 25, 64).astype(np.uint8).reshape(8, 8, 1)  # lo = 0, hi = 25
  ours, pil = np.asarray(aa.apply_op(ramp, 'AutoContrast', 0)), pil_reference(ramp, 'AutoContrast', 0)
  assert ours.max() == 255 and pil.max() == 254
  assert ((ours != pil) == (ramp == 25)).all()
  np.testing.assert_array_equal(ours[ramp < 25], pil[ramp < 25])
  flat = np.full((8, 8, 3), 77, np.uint8)  # one value per channel: the identity, in both
  np.testing.assert_array_equal(np.asarray(aa.apply_op(flat, 'AutoContrast', 0)), flat)


def test_equalize_clips_its_table_like_pillow():
  """step = 1 with 509 pixels below the last value: the raw table exceeds 255 and is clipped, in both."""
  values = np.concatenate([np.arange(509) % 200, np.full(67, 250)]).astype(np.uint8).reshape(24, 24, 1)
  ours = np.asarray(aa.apply_op(values, 'Equalize', 0))
  np.testing.assert_array_equal(ours, pil_reference(values, 'Equalize', 0))
  assert ours.max() == 255


def test_policy_table_and_magnitudes_are_torchvisions():
  """Entries and bins checked by reading torchvision/transforms/autoaugment.py (AutoAugmentPolicy.CIFAR10,
  _augmentation_space)."""
  policy = aa.CIFAR10_POLICY
  assert len(policy) == 25 and all(len(sub) == 2 for sub in policy)
  for sub in policy:
    for op, p, bin_ in sub:
      assert op in aa.OPS and 0.0 <= p <= 1.0
      assert (bin_ is None) == (op in ('AutoContrast', 'Equalize', 'Invert')) and (bin_ is None or 0 <= bin_ < 10)
  assert policy[0] == (('Invert', 0.1, None), ('Contrast', 0.2, 6))
  assert policy[1] == (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9))
  assert policy[14] == (('Solarize', 0.5, 2), ('Invert', 0.0, None))
  assert policy[19] == (('Brightness', 0.1, 3), ('Color', 0.7, 0))
  assert policy[24] == (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None))
  assert {op for sub in policy for op, _, _ in sub} == set(aa.OPS) - {'ShearX'}  # CIFAR-10 never shears in x
  space = aa.augmentation_space(10, 32, 24)  # H = 32, W = 24
  assert set(space) == set(aa.OPS)
  np.testing.assert_allclose(space['Rotate'][0], np.arange(10) * 30 / 9, rtol=1e-6)
  np.testing.assert_allclose(space['TranslateX'][0][-1], 150 / 331 * 24, rtol=1e-6)  # X: the width
  np.testing.assert_allclose(space['TranslateY'][0][-1], 150 / 331 * 32, rtol=1e-6)  # Y: the height
  assert list(space['Posterize'][0]) == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
  np.testing.assert_allclose(space['Solarize'][0], 255 - np.arange(10) * 255 / 9, rtol=1e-6)
  assert [op for op, (_, signed) in space.items() if signed] == list(aa.OPS[:9])


@pytest.mark.parametrize('op', aa.OPS[:9] + ('Posterize', 'Solarize'))
def test_identity_at_magnitude_zero(op):
  """Geometry and the blends at magnitude 0, Posterize at 8 bits and Solarize at 256 change nothing."""
  image = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  m = {'Posterize': 8, 'Solarize': 256}.get(op, 0.0)
  np.testing.assert_array_equal(np.asarray(aa.apply_op(image, op, m)), image)


@pytest.fixture(scope='module')
def batch():
  return jnp.asarray(np.random.default_rng(2).integers(0, 256, (64, 32, 32, 3)), jnp.uint8)


def test_deterministic_per_key_varied_and_jit_vmap(batch):
  f = aa.autoaugment  # jitted inside
  a, b, c = f(jax.random.key(0), batch), f(jax.random.key(0), batch), f(jax.random.key(1), batch)
  assert a.dtype == jnp.uint8 and a.shape == batch.shape
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  changed = (np.asarray(a) != np.asarray(batch)).any(axis=(1, 2, 3))
  assert 0.3 < changed.mean() < 0.95  # most sub-policies fire sometimes, none always on every image
  keys = jax.random.split(jax.random.key(3), 2)
  stacked = jax.jit(jax.vmap(aa.autoaugment))(keys, jnp.stack([batch[:8], batch[8:16]]))
  for i, part in enumerate((batch[:8], batch[8:16])):
    np.testing.assert_array_equal(np.asarray(stacked[i]), np.asarray(aa.autoaugment(keys[i], part)))


def test_the_draw_follows_the_policy():
  """Over many draws on one image: each output is one the policy can give, and the share left untouched is
  the policy's (sub-policy 1/25, stage fires when u <= p, sign 1/2), computed exactly by enumeration."""
  image = np.asarray(jax.random.randint(jax.random.key(4), (8, 8, 1), 0, 256), np.uint8)
  outs = np.asarray(aa.autoaugment(jax.random.key(5), np.broadcast_to(image, (4000, 8, 8, 1))))
  space = aa.augmentation_space(10, 8, 8)

  def branches(op, p, bin_):  # (probability, function) of a stage: skipped, or fired with each sign
    values, signed = space[op]
    m = float(values[bin_]) if bin_ is not None else 0.0
    signs = (1, -1) if signed else (1,)
    return [(1 - p, lambda x: x)] + [(p / len(signs), lambda x, s=s: np.asarray(aa.apply_op(x, op, s * m)))
                                     for s in signs]
  possible, p_untouched = set(), 0.0
  for first, second in aa.CIFAR10_POLICY:
    for q1, f1 in branches(*first):
      for q2, f2 in branches(*second):
        out = f2(f1(image))
        possible.add(out.tobytes())
        p_untouched += q1 * q2 / 25 * np.array_equal(out, image)
  assert all(o.tobytes() in possible for o in outs)
  untouched = (outs == image).all(axis=(1, 2, 3)).mean()
  assert abs(untouched - p_untouched) < 0.03, (untouched, p_untouched)  # ~4 standard errors at n = 4000


def test_grayscale_and_bad_input():
  digits = np.random.default_rng(6).integers(0, 17, (16, 8, 8, 1)).astype(np.uint8) * 15
  out = aa.autoaugment(jax.random.key(0), digits)
  assert out.shape == digits.shape and out.dtype == jnp.uint8
  with pytest.raises(ValueError, match='uint8'):
    aa.autoaugment(jax.random.key(0), digits.astype(np.float32))
  with pytest.raises(ValueError, match='channels'):
    aa.autoaugment(jax.random.key(0), np.zeros((2, 8, 8, 2), np.uint8))
  with pytest.raises(ValueError, match='unknown AutoAugment op'):
    aa.apply_op(digits[0], 'Shear', 0.1)


def test_batch_augmenter_keeps_crop_flip_draws_and_adds_autoaugment(batch):
  """crop,flip draws are unchanged by AutoAugment's arrival (old runs resume the same); autoaugment runs after
  them with its own key."""
  from dropnet_jax.training.augment import AUTOAUGMENT_SALT, random_crop_flip
  key, i = jax.random.key(7), jnp.asarray(3)
  crop_flip = batch_augmenter('crop,flip', key)(batch, i)
  np.testing.assert_array_equal(np.asarray(crop_flip),
                                np.asarray(random_crop_flip(jax.random.fold_in(key, i), batch)))
  full = batch_augmenter('crop,flip,autoaugment', key)(batch, i)
  k = jax.random.fold_in(jax.random.fold_in(key, i), AUTOAUGMENT_SALT)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(aa.autoaugment(k, crop_flip)))
  only = batch_augmenter('autoaugment', key)(batch, i)
  np.testing.assert_array_equal(np.asarray(only), np.asarray(aa.autoaugment(k, batch)))


def test_training_on_digits_with_autoaugment_runs_and_repeats(tmp_path):
  """Two epochs of the production trainer on the bundled 8x8x1 digits with crop+flip+AutoAugment: finite,
  different from no augmentation, and the same again from the same seed (the resume key scheme)."""
  from dropnet_jax import models
  from dropnet_jax.config import TrainConfig
  from dropnet_jax.input_pipeline import load_dataset
  from dropnet_jax.training.trainer import Trainer
  ds = load_dataset('digits')
  images, labels = jnp.asarray(ds.train_images[:256]), jnp.asarray(ds.train_labels[:256].astype(np.int32))
  model = models.create_model('fc', (16,), ds.num_classes)
  theta0 = models.init_params(model, jax.random.key(0), images.shape[1:])
  masks = models.full_masks(model)
  results = {}
  trainers = {augment: Trainer(model, TrainConfig(batch_size=32, augment=augment))
              for augment in ('none', 'crop,flip,autoaugment')}
  for augment in ('none', 'crop,flip,autoaugment', 'crop,flip,autoaugment'):
    trainer = trainers[augment]
    theta, opt_state, losses = theta0, trainer.tx.init(theta0), []
    for epoch in range(2):
      theta, opt_state, loss, _, _ = trainer.train_epoch(theta, opt_state, masks, images, labels,
                                                         jax.random.key(epoch))
      losses.append(float(loss))
    assert all(np.isfinite(losses))
    results.setdefault(augment, []).append(jax.tree.leaves(theta))
  again = results['crop,flip,autoaugment']
  for a, b in zip(*again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(results['none'][0], again[0]))


def test_augment_samples_writes_the_figure(tmp_path):
  """experiments.augment_samples: a PNG of rows x (original + draws) panels and config.json; a bad setting is
  one line naming it, before anything is written."""
  import json
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  out = tmp_path / 'samples'
  proc = subprocess.run([sys.executable, '-m', 'experiments.augment_samples', '--images=2', '--draws=3',
                         '--augment=crop,flip,autoaugment', f'--out={out}'], cwd=repo, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with Image.open(out / 'augment_samples.png') as png:
    assert png.format == 'PNG' and png.width > png.height > 100
  assert json.loads((out / 'config.json').read_text())['kind'] == 'augment_samples'
  bad = subprocess.run([sys.executable, '-m', 'experiments.augment_samples', '--draws=0', f'--out={tmp_path / "x"}'],
                       cwd=repo, capture_output=True, text=True)
  assert bad.returncode != 0 and 'draws' in bad.stderr and 'Traceback' not in bad.stderr
  assert not (tmp_path / 'x').exists()


def test_test_cards_show_geometry():
  from experiments.augment_samples import first_per_class, test_cards
  cards = test_cards(3)
  assert cards.shape == (3, 32, 32, 3) and cards.dtype == np.uint8
  assert not np.array_equal(cards[0], cards[0][:, ::-1]) and not np.array_equal(cards[0], cards[0][::-1])
  assert not np.array_equal(cards[0], cards[1])
  assert list(first_per_class(np.array([2, 0, 2, 1, 0]), 4)) == [1, 3, 0, 2]
