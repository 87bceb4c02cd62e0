r"""Augmented training samples for a visual check: rows are images, columns the original and N augmented draws.

  python -m experiments.augment_samples --out=runs/augment_digits                          # bundled 8x8 digits
  python -m experiments.augment_samples --pattern --out=runs/augment_pattern               # generated 32x32 colour
  python -m experiments.augment_samples --dataset=cifar10 --data_dir=... --augment=crop,flip,autoaugment \
      --out=runs/augment_cifar10

Each draw is the training pipeline itself (`augment.batch_augmenter`, the function the trainer calls) with
its own key, so what is shown is what training sees. --pattern draws on generated test cards (a colour
gradient under a checkerboard, an off-centre mark and a frame), on which every geometric op and colour op
is visible; the digits are 8x8, so the figure shows them enlarged, pixel for pixel.
Writes <out>/augment_samples.png and <out>/config.json.
"""

from __future__ import annotations

from dropnet_jax.cli import entry  # first: applies --host_devices before jax is imported

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax.config import AUGMENTATIONS, DataConfig
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.runs.reporting import atomic_write_bytes
from dropnet_jax.settings import setting
from dropnet_jax.training.augment import batch_augmenter

TITLES = {'flip': 'random horizontal flip', 'crop': 'random crop (zero padding 4)',
          'crop,flip': 'random crop (zero padding 4) and horizontal flip',
          'autoaugment': 'AutoAugment (CIFAR-10 policy)',
          'crop,flip,autoaugment': 'random crop, horizontal flip, then AutoAugment (CIFAR-10 policy)'}


@dataclasses.dataclass(frozen=True)
class AugmentSamplesConfig:
  """Which images, which augmentation, how many draws (see the module docstring)."""
  data: DataConfig = DataConfig()
  augment: str = setting('autoaugment', 'The training augmentation drawn (as --augment of a run).', flag='augment',
                         choices=AUGMENTATIONS[1:])
  images: int = setting(6, 'Rows: training images shown (the first of each class, in class order).', flag='images')
  draws: int = setting(8, 'Columns after the original: independent augmented draws of each image.', flag='draws')
  seed: int = setting(0, 'Seed of the draws.', flag='seed')
  pattern: bool = setting(False, "Draw on generated 32x32 colour test cards instead of --dataset's images.",
                          flag='pattern')

  def validate(self) -> None:
    """Raises ValueError naming the setting."""
    if self.augment not in AUGMENTATIONS[1:]:
      raise ValueError(f'augment must be one of {AUGMENTATIONS[1:]}, got {self.augment!r}')
    for name, most in (('images', 20), ('draws', 20)):
      if not 1 <= getattr(self, name) <= most:
        raise ValueError(f'{name} must be in 1..{most}, got {getattr(self, name)}')


CONFIG = entry.define(AugmentSamplesConfig(), 'augment_samples', out_help='Output directory: '
                      '<out>/augment_samples.png.')


def test_cards(count: int, size: int = 32) -> np.ndarray:
  """(count, size, size, 3) uint8: a colour gradient (hue varying per card) under a 4-pixel checkerboard, a
  white frame and a solid square off the centre, top left: flips, shears, rotations, translations and every
  colour op change it visibly."""
  y, x = np.mgrid[0:size, 0:size] / (size - 1)
  cards = []
  for i in range(count):
    phase = 2 * np.pi * i / max(count, 1)
    rgb = np.stack([0.5 + 0.5 * np.cos(phase + 2.5 * x), 0.5 + 0.5 * np.cos(phase + 2.1 + 2.5 * y),
                    0.5 + 0.5 * np.cos(phase + 4.2 + 1.5 * (x + y))], axis=-1)
    checker = ((np.arange(size)[:, None] // 4 + np.arange(size)[None, :] // 4) % 2)[..., None]
    card = 40 + 170 * rgb * (0.6 + 0.4 * checker)
    card[:2], card[-2:], card[:, :2], card[:, -2:] = 255, 255, 255, 255
    card[6:13, 6:13] = (30, 30, 30)
    cards.append(card)
  return np.clip(np.stack(cards), 0, 255).astype(np.uint8)


def first_per_class(labels: np.ndarray, count: int) -> np.ndarray:
  """Indices of the first image of each class, in class order, then further images, `count` in all."""
  firsts = [int(np.argmax(labels == c)) for c in np.unique(labels)]
  rest = [i for i in range(len(labels)) if i not in set(firsts)]
  return np.asarray((firsts + rest)[:count])


def draw(images: np.ndarray, augment: str, draws: int, seed: int) -> np.ndarray:
  """(draws, N, H, W, C): draw j is the trainer's augmentation of the whole set with batch index j."""
  fn = jax.jit(batch_augmenter(augment, jax.random.key(seed)))
  return np.stack([np.asarray(fn(jnp.asarray(images), jnp.asarray(j))) for j in range(draws)])


def figure(images: np.ndarray, augmented: np.ndarray, row_labels: list[str], title: str) -> bytes:
  """PNG bytes: one row per image, the original then a gap then the draws, pixels shown as squares."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  n, draws = images.shape[0], augmented.shape[0]
  cell = 0.9
  fig = Figure(figsize=(cell * (draws + 1.25) + 0.9, cell * n + 0.75))
  FigureCanvasAgg(fig)
  grid = fig.add_gridspec(n, draws + 2, width_ratios=[1, 0.25] + [1] * draws, wspace=0.06, hspace=0.06,
                          left=0.9 / (cell * (draws + 1.25) + 0.9), right=0.995, top=1 - 0.6 / (cell * n + 0.75),
                          bottom=0.01)
  grey = images.shape[-1] == 1
  for r in range(n):
    for c in range(draws + 1):
      ax = fig.add_subplot(grid[r, 0 if c == 0 else c + 1])
      picture = images[r] if c == 0 else augmented[c - 1, r]
      ax.imshow(picture[..., 0] if grey else picture, cmap='gray' if grey else None, vmin=0, vmax=255,
                interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title('original' if c == 0 else f'draw {c}', fontsize=9)
      if c == 0:
        ax.set_ylabel(row_labels[r], fontsize=9)
  fig.suptitle(title, fontsize=10, y=1 - 0.12 / (cell * n + 0.75), va='top')
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=150)
  return buf.getvalue()


def samples(config: AugmentSamplesConfig) -> tuple[np.ndarray, list[str], str]:
  """The images, their row labels and the data's name in the title."""
  if config.pattern:
    return test_cards(config.images), [f'card {i + 1}' for i in range(config.images)], '32x32 colour test cards'
  ds = load_dataset(config.data.dataset, config.data.data_dir, split_seed=config.data.split_seed)
  idx = first_per_class(ds.train_labels, config.images)
  h, w, _ = ds.train_images.shape[1:]
  return (ds.train_images[idx], [f'class {int(ds.train_labels[i])}' for i in idx],
          f'{config.data.dataset} training images ({h}x{w})')


def main(argv):
  from dropnet_jax.runs.run_dir import RunDir  # here: --help does not need it
  del argv
  try:
    config = entry.config(CONFIG)
    run_dir = RunDir(entry.FLAGS.out, 'augment_samples', config)
    run_dir.check()
    images, row_labels, what = samples(config)
  except ValueError as e:  # includes input_pipeline.DataError
    entry.fail(e)
  with run_dir.open(resume_hint='augment_samples.png was not written; rerun the command'):
    augmented = draw(images, config.augment, config.draws, config.seed)
    png = figure(images, augmented, row_labels, f'{TITLES[config.augment]} on {what}: {config.draws} draws each')
    path = run_dir.file('augment_samples.png')
    atomic_write_bytes(path, png)
    print(f'wrote {path}')


if __name__ == '__main__':
  entry.run(main)
