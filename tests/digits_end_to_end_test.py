"""Twins of the end-to-end tests that need the real MNIST files, on MNIST-shaped digits written here.

The tests that take the real MNIST subset (../shared, beside the checkout)
skip on a fresh clone. Their end-to-end paths run here too, on data every
clone has: the bundled scikit-learn digits, scaled to 28x28 and written as
the four MNIST IDX files (so `load_dataset('mnist', dir)` reads them through
the real IDX path). This module overrides the `mnist` / `mnist_small`
fixtures (and points a module's `MNIST_DIR` at the files where a test reads
it), then runs the original test functions: a twin is the same test with the
same assertions, on other images. The MNIST originals stay (they check
accuracy levels on real data).

This module always runs (about a minute): sequential and batched DropNet,
no recompilation, crash and resume, the oracle's exact resume, the random
re-initialisation baseline, the dataset fingerprint. The slower twins
(digits_end_to_end_more_test, digits_torch_parity_test) run only where the
real MNIST files are absent, in place of the originals that skip there.
Not twinned: input_pipeline_test's checks of the real subset's own counts.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

import batched_test
import dropnet_test
import fingerprint_test
import recompile_test
import resume_test
import studies_test
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.training.trainer import DeviceData

# Shifts of the 24x24 (3x upscaled) digit inside the 28x28 frame: 5 training copies, 3 test copies
# of disjoint digits, so the stand-in has enough images for the tests' cuts (2,000 / 500 / 1,000).
TRAIN_SHIFTS = ((2, 2), (1, 2), (3, 2), (2, 1), (2, 3))
TEST_SHIFTS = ((2, 2), (1, 1), (3, 3))
TRAIN_DIGITS = 1400  # of 1,797; the rest are test digits


def digits_as_mnist(directory: Path) -> Path:
  """Writes the four MNIST IDX files (train gzipped, test plain) of 28x28 uint8 digits into `directory`."""
  from sklearn.datasets import load_digits
  bunch = load_digits()
  order = np.random.default_rng(0).permutation(len(bunch.target))
  images = np.round(bunch.images[order] * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
  labels = bunch.target[order].astype(np.uint8)
  big = images.repeat(3, axis=1).repeat(3, axis=2)  # 24x24

  def framed(block, shifts):
    out = np.zeros((len(shifts) * len(block), 28, 28), np.uint8)
    for i, (dy, dx) in enumerate(shifts):
      out[i * len(block):(i + 1) * len(block), dy:dy + 24, dx:dx + 24] = block
    return out

  split = {'train': (framed(big[:TRAIN_DIGITS], TRAIN_SHIFTS), np.tile(labels[:TRAIN_DIGITS], len(TRAIN_SHIFTS))),
           't10k': (framed(big[TRAIN_DIGITS:], TEST_SHIFTS), np.tile(labels[TRAIN_DIGITS:], len(TEST_SHIFTS)))}
  directory.mkdir(parents=True, exist_ok=True)
  for name, (x, y) in split.items():
    mix = np.random.default_rng(1).permutation(len(y))  # shifts interleaved, not in blocks
    x, y = x[mix], y[mix]
    opener, suffix = (gzip.open, '.gz') if name == 'train' else (open, '')
    with opener(directory / f'{name}-images-idx3-ubyte{suffix}', 'wb') as f:
      f.write(struct.pack('>IIII', 0x803, len(x), 28, 28) + x.tobytes())
    with opener(directory / f'{name}-labels-idx1-ubyte{suffix}', 'wb') as f:
      f.write(struct.pack('>II', 0x801, len(y)) + y.tobytes())
  return directory


@pytest.fixture(scope='session')
def digits_mnist_dir(tmp_path_factory) -> Path:
  return digits_as_mnist(tmp_path_factory.mktemp('digits_as_mnist'))


# -- the fixtures of conftest.py, on the stand-in ------------------------------------------------

@pytest.fixture(scope='session')
def mnist(digits_mnist_dir):
  return load_dataset('mnist', str(digits_mnist_dir))


@pytest.fixture(scope='session')
def mnist_small(mnist):
  """2,000 train / 500 val / 1,000 test images, cut as conftest.mnist_small cuts the real subset."""
  return DeviceData(mnist.train_images[:2000], mnist.train_labels[:2000].astype(np.int32),
                    mnist.val_images[:500], mnist.val_labels[:500].astype(np.int32),
                    mnist.test_images[:1000], mnist.test_labels[:1000].astype(np.int32))


@pytest.fixture
def at_digits(digits_mnist_dir, monkeypatch):
  """fingerprint_test's MNIST_DIR pointed at the stand-in, for this test only."""
  monkeypatch.setattr(fingerprint_test, 'MNIST_DIR', digits_mnist_dir)
  return digits_mnist_dir


def test_stand_in_is_mnist_shaped(mnist, digits_mnist_dir):
  assert sorted(os.listdir(digits_mnist_dir)) == ['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte',
                                                  'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz']
  assert mnist.image_shape == (28, 28, 1) and mnist.num_classes == 10
  assert len(mnist.train_labels) >= 2000 and len(mnist.val_labels) >= 500 and len(mnist.test_labels) >= 1000
  assert len(mnist.train_labels) + len(mnist.val_labels) == TRAIN_DIGITS * len(TRAIN_SHIFTS)
  for labels in (mnist.train_labels, mnist.val_labels, mnist.test_labels):
    assert set(np.unique(labels)) == set(range(10))
  # Every image holds a whole digit: ink inside the frame, none on its 1-pixel border.
  ink = mnist.train_images[..., 0].astype(int)
  assert ink.sum(axis=(1, 2)).min() > 0 and ink[:, 0].max() == ink[:, -1].max() == 0


# -- twins ----------------------------------------------------------------------------------------

# run_seed end to end (dropnet_test's `run` fixture: one seed, three metrics).
run = dropnet_test.run
test_every_cycle_restarts_from_theta0_bit_for_bit = dropnet_test.test_every_cycle_restarts_from_theta0_bit_for_bit
test_records_masks_and_stopping = dropnet_test.test_records_masks_and_stopping

# --batch_trials gives the sequential records.
test_batched_records_equal_one_trial_at_a_time = batched_test.test_batched_records_equal_one_trial_at_a_time

# Nothing recompiles after the first pruned cycle, sequential and batched. These count compilations,
# so they start from empty caches (an earlier test may have compiled the same shapes) and leave them
# empty (recompile_test's originals, later in the session, must see their own first compilations).
@pytest.fixture
def fresh_compilation_caches():
  jax.clear_caches()
  yield
  jax.clear_caches()


def test_run_seed_compiles_nothing_after_the_first_pruned_cycle(fresh_compilation_caches, mnist_small):
  recompile_test.test_run_seed_compiles_nothing_after_the_first_pruned_cycle(mnist_small)


def test_batched_trials_compile_nothing_after_the_first_pruned_cycle(fresh_compilation_caches, mnist_small):
  recompile_test.test_batched_trials_compile_nothing_after_the_first_pruned_cycle(mnist_small)

# Crash and resume: the same records as an uninterrupted run.
setup = resume_test.setup
batched_reference = resume_test.batched_reference
test_reference_run_is_nontrivial = resume_test.test_reference_run_is_nontrivial
test_mid_cycle_checkpoint_holds_the_training_state = resume_test.test_mid_cycle_checkpoint_holds_the_training_state


@pytest.mark.parametrize('crash_at, batch_trials', [(('record', 2), False), (('epoch', 9), True)])
def test_crash_and_resume_gives_identical_records(setup, batched_reference, tmp_path, crash_at, batch_trials):
  resume_test.test_crash_and_resume_gives_identical_records(setup, batched_reference, tmp_path, crash_at,
                                                            batch_trials)


# The studies: random re-initialisation and the oracle's exact resume.
test_random_init_is_fresh_and_keeps_mask_and_order = studies_test.test_random_init_is_fresh_and_keeps_mask_and_order
test_oracle_metric_resumes_exactly = studies_test.test_oracle_metric_resumes_exactly


# The dataset fingerprint follows the contents, not the directory.
def test_moved_data_keeps_its_fingerprint_and_a_resplit_changes_it(at_digits, mnist, tmp_path):
  fingerprint_test.test_real_mnist_moved_to_another_directory_keeps_it_and_a_resplit_changes_it(mnist, tmp_path)
