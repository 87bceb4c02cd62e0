"""Twins of torch_parity_test's data-driven checks on MNIST-shaped digits, for clones without ../shared.

torch_parity_test reads 3,000 real MNIST training images (`mnist_head`) and
skips without them. Here `mnist_head` is 3,000 training images of the digits
stand-in (digits_end_to_end_test: 28x28 digits written as IDX files), and
the original test functions run unchanged, JAX against the PyTorch reference:
loss trajectories, early stopping, the divergence stop, criterion scores and
next masks, and DropNet end to end. Like digits_end_to_end_more_test it runs
only where the real files are absent (the originals run them otherwise), and,
like the originals, only where torch is installed.
"""

from __future__ import annotations

import numpy as np
import pytest

import torch_parity_test  # skips this module without torch, as it does itself
from conftest import MNIST_DIR as REAL_MNIST_DIR
from digits_end_to_end_test import digits_as_mnist
from dropnet_jax.input_pipeline import load_dataset

pytestmark = [pytest.mark.skipif(REAL_MNIST_DIR.is_dir(), reason=f'the real-MNIST originals run ({REAL_MNIST_DIR})'),
              pytest.mark.usefixtures('one_torch_thread')]  # torch on one thread here too (conftest)



@pytest.fixture(scope='module')
def mnist_head(tmp_path_factory):
  ds = load_dataset('mnist', str(digits_as_mnist(tmp_path_factory.mktemp('digits_as_mnist'))))
  images = np.concatenate([ds.train_images, ds.val_images])[:3000]
  labels = np.concatenate([ds.train_labels, ds.val_labels])[:3000].astype(np.int32)
  return images, labels


test_training_same_loss_trajectory = torch_parity_test.test_training_same_loss_trajectory
test_early_stopping_same_epochs_and_best_params = torch_parity_test.test_early_stopping_same_epochs_and_best_params
test_divergence_stops_on_last_finite_params = torch_parity_test.test_divergence_stops_on_last_finite_params
trained_twins = torch_parity_test.trained_twins
test_same_scores_and_next_mask = torch_parity_test.test_same_scores_and_next_mask
test_run_seed_same_records = torch_parity_test.test_run_seed_same_records
