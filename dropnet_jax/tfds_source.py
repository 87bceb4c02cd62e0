"""MNIST and CIFAR-10 without --data_dir: read through tensorflow-datasets, an optional extra.

Split from `input_pipeline` by concern (and size). Every way this path fails is one DataError line
naming --data_dir as the alternative, before any run writes: the extra missing (`_import_tfds` looks
it up before importing, TensorFlow's import is slow and noisy), a module tfds itself lacks, and no
network. tfds is first asked for what it already has (`download=False`; a `tfds.testing.mock_data`
mock answers there too); a download starts only once a short connection to its host succeeds, since
offline tfds retries every file with backoff for ~3.5 minutes, printing dozens of log lines.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np

from dropnet_jax.input_pipeline import DataError, Split

TFDS_INSTALL = "pip install -e '.[tfds]'"
_TFDS_HINT = {'mnist': 'the four MNIST IDX files', 'cifar10': 'the CIFAR-10 python batches'}
# Examples per batch read out of tfds. Not batch_size=-1 (one batch of the whole split): tfds sizes
# that batch from the builder's metadata and falls back to sys.maxsize when it has no counts, which
# aborts the process (tfds.testing.mock_data's builders have none).
_TFDS_BATCH = 10_000


def _import_tfds(name: str):
  """tensorflow_datasets with the TensorFlow it reads with, or one DataError naming the install
  command and the --data_dir alternative, before any download or preparation. Both are looked up
  before either is imported: importing one of them prints log lines of its own when the other is
  missing, and TensorFlow takes seconds to import."""
  import importlib.util
  missing = [module for module in ('tensorflow_datasets', 'tensorflow') if importlib.util.find_spec(module) is None]
  if missing:
    raise _missing_tfds(name, ' and '.join(missing))
  try:
    import tensorflow_datasets as tfds  # lazy: heavy, an extra, and only needed without data_dir
  except ImportError as e:  # installed but broken (a dependency of its own missing)
    raise _missing_tfds(name, getattr(e, 'name', None) or str(e)) from e
  return tfds


def _missing_tfds(name: str, missing: str) -> DataError:
  verb = 'are' if ' and ' in missing else 'is'
  return DataError(f'{name} without --data_dir loads through tensorflow-datasets, and {missing} {verb} not '
                   f'installed: {TFDS_INSTALL} (or pass --data_dir with {_TFDS_HINT[name]})')


# Where tfds downloads each dataset from (its builders' URLs); see the module docstring.
TFDS_HOSTS = {'mnist': 'storage.googleapis.com', 'cifar10': 'www.cs.toronto.edu'}
_PROXY_VARS = ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY')
CONNECT_TIMEOUT_S = 5.0


def check_download_host(name: str) -> None:
  """DataError (one line naming --data_dir) when the host tfds downloads `name` from cannot be reached
  within CONNECT_TIMEOUT_S. Skipped behind a proxy (the proxy, not this machine, reaches the host)."""
  import socket
  if any(os.environ.get(var) for var in _PROXY_VARS):
    return
  host = TFDS_HOSTS[name]
  try:
    socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
  except OSError as e:
    reason = e.strerror or str(e) or type(e).__name__
    raise DataError(f'{name} is not downloaded yet and {host} cannot be reached ({reason}); offline, pass '
                    f'--data_dir with {_TFDS_HINT[name]}') from None


@contextlib.contextmanager
def _absl_warnings_off():
  from absl import logging
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def load(name: str) -> tuple[Split, Split]:
  """(train, test) through tensorflow-datasets; any failure becomes a DataError. What tfds already
  has (or a mock of it) is read without the network; a download starts only once its host answers."""
  tfds = _import_tfds(name)
  load = functools.partial(tfds.load, name, split=['train', 'test'], batch_size=_TFDS_BATCH, as_supervised=True)
  try:
    try:
      with _absl_warnings_off():  # tfds warns of the folder a failed download left, then raises below
        splits = load(download=False)
    except AssertionError:  # tfds: "could not find data in <dir>": not downloaded yet
      check_download_host(name)
      splits = load()
    train, test = (_concatenate(tfds.as_numpy(split)) for split in splits)
  except DataError:
    raise
  except ImportError as e:  # a module tfds imports only while preparing (e.g. importlib_resources)
    raise _missing_tfds(name, getattr(e, 'name', None) or str(e)) from e
  except Exception as e:  # noqa: BLE001 -- download and prepare errors all mean "no data"
    msg = str(e).splitlines()[0] if str(e) else ''
    raise DataError(f'{name}: could not load through tensorflow-datasets ({type(e).__name__}: '
                    f'{msg}); pass --data_dir with {_TFDS_HINT[name]}') from e
  return train, test


def _concatenate(batches) -> Split:
  """(images, labels) batches as one (images, labels) pair."""
  images, labels = [], []
  for batch_images, batch_labels in batches:
    images.append(batch_images)
    labels.append(batch_labels)
  if not images:
    raise DataError('tensorflow-datasets returned an empty split')
  return np.concatenate(images), np.concatenate(labels)
