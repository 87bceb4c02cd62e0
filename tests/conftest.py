"""Shared fixtures: the real MNIST subset beside the checkout, cut small for speed."""

from pathlib import Path

import numpy as np
import pytest

MNIST_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'mnist_subset'


@pytest.fixture(scope='session')
def mnist():
  """The full real subset (22,699 train+val, 10k test), loaded once."""
  if not MNIST_DIR.is_dir():
    pytest.skip(f'real MNIST files not found at {MNIST_DIR}')
  from dropnet_jax.input_pipeline import load_dataset
  return load_dataset('mnist', str(MNIST_DIR))


@pytest.fixture(scope='session')
def mnist_small(mnist):
  """2,000 train / 500 val / 1,000 test real MNIST images as DeviceData."""
  from dropnet_jax.training.trainer import DeviceData
  return DeviceData(mnist.train_images[:2000], mnist.train_labels[:2000].astype(np.int32),
                    mnist.val_images[:500], mnist.val_labels[:500].astype(np.int32),
                    mnist.test_images[:1000], mnist.test_labels[:1000].astype(np.int32))


@pytest.fixture(scope='module')
def one_torch_thread():
  """Torch on one thread for a module of parity tests: their ops are tiny, and on a busy 2-core machine
  torch's OpenMP threads spin-wait for each other (100x slower). Results do not depend on it beyond
  the order of float sums."""
  torch = pytest.importorskip('torch')
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


SLOW_LIST = Path(__file__).with_name('slow_tests.txt')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: in the full suite only; `pytest -m "not slow"` is the fast tier '
                          '(tests/slow_tests.txt lists them, tests/slow_tests.py regenerates the list)')


def pytest_collection_modifyitems(config, items):
  """Marks the tests listed in slow_tests.txt (measured, not guessed) as slow; a line naming a file
  marks its whole module (for modules whose shared fixtures are the slow part)."""
  slow = {line.split('#')[0].strip() for line in SLOW_LIST.read_text().splitlines()} - {''}
  for item in items:
    if item.nodeid in slow or item.nodeid.split('::')[0] in slow:
      item.add_marker(pytest.mark.slow)
