"""dataset_fingerprint: same data, same value (wherever the files are); any change, another value."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from dropnet_jax.input_pipeline import Dataset, dataset_fingerprint, load_dataset

MNIST_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'mnist_subset'  # as in conftest.py


def tiny() -> Dataset:
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
  labels = lambda n: rng.integers(0, 3, (n,)).astype(np.int32)
  return Dataset('tiny', images(12), labels(12), images(4), labels(4), images(5), labels(5), 3)


def test_is_a_sha256_hex_digest_that_ignores_name_and_memory_layout():
  ds = tiny()
  fp = dataset_fingerprint(ds)
  assert len(fp) == 64 and int(fp, 16) >= 0
  assert fp == dataset_fingerprint(tiny())
  # Another name, a Fortran-ordered copy, big-endian labels: the same values, the same fingerprint.
  same = dataclasses.replace(ds, name='other', train_images=np.asfortranarray(ds.train_images),
                             train_labels=ds.train_labels.astype('>i4'))
  assert dataset_fingerprint(same) == fp


def test_any_change_of_content_split_shape_dtype_or_classes_changes_it():
  ds = tiny()
  fp = dataset_fingerprint(ds)
  flipped = ds.train_images.copy()
  flipped[3, 1, 2, 0] ^= 1  # one bit of one pixel
  changes = {
      'pixel': dataclasses.replace(ds, train_images=flipped),
      'shuffled labels': dataclasses.replace(ds, train_labels=np.roll(ds.train_labels, 1)),
      'another split': dataclasses.replace(ds, train_images=ds.val_images, val_images=ds.train_images,
                                           train_labels=ds.val_labels, val_labels=ds.train_labels),
      'shape': dataclasses.replace(ds, test_images=ds.test_images.reshape(5, 2, 8, 1)),
      'dtype': dataclasses.replace(ds, test_labels=ds.test_labels.astype(np.int64)),
      'classes': dataclasses.replace(ds, num_classes=4),
      # The same bytes moved from the end of train to the start of val must not collide either.
      'boundary': dataclasses.replace(ds, train_labels=ds.train_labels[:-1],
                                      val_labels=np.concatenate([ds.train_labels[-1:], ds.val_labels])),
  }
  values = {name: dataset_fingerprint(d) for name, d in changes.items()}
  assert fp not in values.values() and len(set(values.values())) == len(values)


def test_matches_an_independent_sha256_of_the_documented_fields():
  ds = tiny()
  h = hashlib.sha256(b'dropnet_jax.dataset_fingerprint.v1\0')
  h.update(b'num_classes=3\0')
  for field in ('train_images', 'train_labels', 'val_images', 'val_labels', 'test_images', 'test_labels'):
    a = getattr(ds, field)
    h.update(f'{field}:{a.dtype.str}:{",".join(str(n) for n in a.shape)}\0'.encode() + a.tobytes())
  assert dataset_fingerprint(ds) == h.hexdigest()


def test_real_mnist_moved_to_another_directory_keeps_it_and_a_resplit_changes_it(mnist, tmp_path):
  moved = tmp_path / 'elsewhere'
  shutil.copytree(MNIST_DIR, moved)
  start = time.perf_counter()
  fp = dataset_fingerprint(mnist)
  seconds = time.perf_counter() - start
  assert dataset_fingerprint(load_dataset('mnist', str(moved))) == fp
  assert dataset_fingerprint(load_dataset('mnist', str(moved), split_seed=1)) != fp  # another validation split
  print(f'fingerprint of the MNIST subset ({sum(a.nbytes for a in vars(mnist).values() if hasattr(a, "nbytes"))} '
        f'bytes): {seconds * 1e3:.1f} ms')
  assert seconds < 1.0


def test_digits_is_stable_across_loads():
  assert dataset_fingerprint(load_dataset('digits')) == dataset_fingerprint(load_dataset('digits'))
  assert dataset_fingerprint(load_dataset('digits')) != dataset_fingerprint(load_dataset('digits', split_seed=1))


@pytest.mark.parametrize('n', [0, 1])
def test_empty_and_single_example_splits(n):
  ds = tiny()
  small = dataclasses.replace(ds, test_images=ds.test_images[:n], test_labels=ds.test_labels[:n])
  assert dataset_fingerprint(small) not in (dataset_fingerprint(ds), '')
