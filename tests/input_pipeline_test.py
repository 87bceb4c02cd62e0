"""Tests of dataset loading on small generated files and the real MNIST subset. No downloads."""

import gzip
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from dropnet_jax.input_pipeline import DATASETS, DataError, Dataset, load_dataset, stratified_split

MNIST_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'mnist_subset'
MNIST_CLASS_COUNTS = [2258, 2581, 2215, 2369, 2222, 2010, 2235, 2356, 2163, 2290]


# --- helpers ---------------------------------------------------------------

def idx_bytes(array: np.ndarray, magic: int | None = None, dims=None) -> bytes:
  """IDX encoding of a uint8 array; magic/dims override the header to make bad files."""
  magic = (0x0800 | array.ndim) if magic is None else magic
  dims = array.shape if dims is None else dims
  return struct.pack(f'>I{len(dims)}I', magic, *dims) + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
  if gz:
    path = path.with_name(path.name + '.gz')
    with gzip.open(path, 'wb') as f:
      f.write(data)
  else:
    path.write_bytes(data)
  return path


def make_mnist(root: Path, n_train=40, n_test=20, gz=True, seed=0):
  """Four IDX files with random pixels and balanced labels 0..9; returns the arrays."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    write(root / f'{prefix}-images-idx3-ubyte', idx_bytes(x), gz)
    write(root / f'{prefix}-labels-idx1-ubyte', idx_bytes(y), gz)
    arrays[prefix] = (x, y)
  return arrays


def all_train(ds: Dataset):
  return (np.concatenate([ds.train_images, ds.val_images]),
          np.concatenate([ds.train_labels, ds.val_labels]))


def sort_rows(x: np.ndarray, y: np.ndarray):
  """Rows as (label, bytes) sorted, to compare sets of examples regardless of split order."""
  return sorted((int(l), im.tobytes()) for im, l in zip(x, y))


# --- MNIST IDX -------------------------------------------------------------

@pytest.mark.parametrize('gz', [True, False])
def test_mnist_idx_round_trip(tmp_path, gz):
  arrays = make_mnist(tmp_path, gz=gz)
  ds = load_dataset('mnist', str(tmp_path), validation_fraction=0.25)
  assert ds.name == 'mnist' and ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
  for a in (ds.train_images, ds.val_images, ds.test_images):
    assert a.dtype == np.uint8 and a.shape[1:] == (28, 28, 1)
  for a in (ds.train_labels, ds.val_labels, ds.test_labels):
    assert a.dtype == np.int32
  # Test set is returned as is, in file order.
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays['t10k'][0])
  np.testing.assert_array_equal(ds.test_labels, arrays['t10k'][1])
  # Train + val together are exactly the training file, each image with its own label.
  x, y = all_train(ds)
  assert sort_rows(x, y) == sort_rows(arrays['train'][0][..., None], arrays['train'][1])
  assert len(ds.val_labels) == 10  # 4 per class * 0.25 = 1 per class
  np.testing.assert_array_equal(np.bincount(ds.val_labels, minlength=10), np.ones(10))


def test_mnist_plain_and_gz_mixed(tmp_path):
  arrays = make_mnist(tmp_path, gz=True)
  # Replace one file by its plain version: each file is looked up independently.
  (tmp_path / 't10k-labels-idx1-ubyte.gz').unlink()
  write(tmp_path / 't10k-labels-idx1-ubyte', idx_bytes(arrays['t10k'][1]), gz=False)
  ds = load_dataset('mnist', str(tmp_path))
  np.testing.assert_array_equal(ds.test_labels, arrays['t10k'][1])


def test_mnist_count_comes_from_header(tmp_path):
  # 30 training images (not 60k, not a multiple of anything special): the header decides.
  make_mnist(tmp_path, n_train=30, n_test=7)
  ds = load_dataset('mnist', str(tmp_path))
  assert len(ds.train_labels) + len(ds.val_labels) == 30
  assert len(ds.test_labels) == 7


@pytest.mark.parametrize('gz', [True, False])
def test_mnist_wrong_magic(tmp_path, gz):
  arrays = make_mnist(tmp_path, gz=gz)
  name = 'train-images-idx3-ubyte' + ('.gz' if gz else '')
  (tmp_path / name).unlink()
  write(tmp_path / 'train-images-idx3-ubyte', idx_bytes(arrays['train'][0], magic=0x0801 + 0x100), gz)
  with pytest.raises(DataError, match=r'train-images-idx3-ubyte.*magic.*0x00000803.*0x00000901'):
    load_dataset('mnist', str(tmp_path))


def test_mnist_labels_file_with_images_magic(tmp_path):
  arrays = make_mnist(tmp_path)
  write(tmp_path / 't10k-labels-idx1-ubyte', idx_bytes(arrays['t10k'][0]), gz=False)
  (tmp_path / 't10k-labels-idx1-ubyte.gz').unlink()
  with pytest.raises(DataError, match=r't10k-labels-idx1-ubyte.*expected 0x00000801, found 0x00000803'):
    load_dataset('mnist', str(tmp_path))


@pytest.mark.parametrize('gz', [True, False])
def test_mnist_truncated(tmp_path, gz):
  arrays = make_mnist(tmp_path, gz=gz)
  suffix = '.gz' if gz else ''
  (tmp_path / f'train-images-idx3-ubyte{suffix}').unlink()
  # The header says 40 images, the payload holds 39.5.
  data = idx_bytes(arrays['train'][0])[:-392]
  write(tmp_path / 'train-images-idx3-ubyte', data, gz)
  with pytest.raises(DataError, match=r'train-images-idx3-ubyte.*truncated'):
    load_dataset('mnist', str(tmp_path))


def test_mnist_truncated_header(tmp_path):
  make_mnist(tmp_path, gz=False)
  (tmp_path / 't10k-labels-idx1-ubyte').write_bytes(b'\x00\x00\x08')
  with pytest.raises(DataError, match=r't10k-labels-idx1-ubyte.*truncated'):
    load_dataset('mnist', str(tmp_path))


def test_mnist_corrupt_gzip(tmp_path):
  make_mnist(tmp_path, gz=True)
  path = tmp_path / 'train-labels-idx1-ubyte.gz'
  path.write_bytes(path.read_bytes()[:-12])  # cut inside the deflate stream / trailer
  with pytest.raises(DataError, match=r'train-labels-idx1-ubyte\.gz'):
    load_dataset('mnist', str(tmp_path))


def test_mnist_count_mismatch(tmp_path):
  make_mnist(tmp_path, gz=False)
  write(tmp_path / 'train-labels-idx1-ubyte', idx_bytes(np.zeros(39, np.uint8)), gz=False)
  with pytest.raises(DataError) as info:
    load_dataset('mnist', str(tmp_path))
  msg = str(info.value)
  assert 'train-images-idx3-ubyte' in msg and 'train-labels-idx1-ubyte' in msg
  assert '40' in msg and '39' in msg


def test_mnist_label_out_of_range(tmp_path):
  make_mnist(tmp_path, gz=False)
  write(tmp_path / 't10k-labels-idx1-ubyte', idx_bytes(np.full(20, 10, np.uint8)), gz=False)
  with pytest.raises(DataError, match=r't10k-labels-idx1-ubyte.*out of range'):
    load_dataset('mnist', str(tmp_path))


def test_mnist_wrong_image_size(tmp_path):
  make_mnist(tmp_path, gz=False)
  write(tmp_path / 't10k-images-idx3-ubyte', idx_bytes(np.zeros((20, 32, 32), np.uint8)), gz=False)
  with pytest.raises(DataError, match=r't10k-images-idx3-ubyte.*28x28'):
    load_dataset('mnist', str(tmp_path))


def test_mnist_missing_file(tmp_path):
  make_mnist(tmp_path, gz=True)
  (tmp_path / 't10k-images-idx3-ubyte.gz').unlink()
  with pytest.raises(DataError, match=r't10k-images-idx3-ubyte nor t10k-images-idx3-ubyte\.gz'):
    load_dataset('mnist', str(tmp_path))


def test_missing_dir(tmp_path):
  missing = tmp_path / 'nowhere'
  for name in ('mnist', 'cifar10', 'tiny_imagenet'):
    with pytest.raises(DataError, match=f'{name}.*nowhere.*does not exist'):
      load_dataset(name, str(missing))


def test_bad_arguments(tmp_path):
  with pytest.raises(DataError, match=r'unknown dataset.*digits, mnist, cifar10, tiny_imagenet'):
    load_dataset('imagenet')
  # The fraction is checked before touching the (here missing) data.
  for fraction in (0.0, 1.0, -0.1, 1.5):
    with pytest.raises(DataError, match='validation_fraction'):
      load_dataset('mnist', str(tmp_path / 'nowhere'), validation_fraction=fraction)
  assert issubclass(DataError, ValueError)
  assert DATASETS == ('digits', 'mnist', 'cifar10', 'tiny_imagenet')


def test_tfds_unavailable_is_data_error(monkeypatch):
  # None in sys.modules makes the import fail, so nothing is downloaded.
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  for name in ('mnist', 'cifar10'):
    with pytest.raises(DataError, match=f'{name}.*tensorflow-datasets.*--data_dir'):
      load_dataset(name)
  with pytest.raises(DataError, match='tiny_imagenet.*--data_dir'):
    load_dataset('tiny_imagenet')


# --- the real MNIST subset -------------------------------------------------

@pytest.fixture(scope='module')
def real_mnist():
  if not MNIST_DIR.is_dir():
    pytest.skip(f'real MNIST files not found at {MNIST_DIR}')
  return load_dataset('mnist', str(MNIST_DIR))


def test_real_mnist_subset(real_mnist):
  ds = real_mnist
  assert len(ds.train_labels) + len(ds.val_labels) == 22_699
  assert len(ds.test_labels) == 10_000
  assert ds.image_shape == (28, 28, 1) and ds.test_images.shape == (10_000, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.train_images.max() == 255 and ds.train_images.min() == 0
  _, y = all_train(ds)
  counts = np.bincount(y, minlength=10)
  assert counts.tolist() == MNIST_CLASS_COUNTS
  val_counts = np.bincount(ds.val_labels, minlength=10)
  for c in range(10):
    assert abs(val_counts[c] - round(0.1 * counts[c])) <= 1
  assert abs(len(ds.val_labels) - 2270) <= 10
  assert np.bincount(ds.test_labels, minlength=10).sum() == 10_000


def test_real_mnist_split_indices_disjoint():
  if not MNIST_DIR.is_dir():
    pytest.skip(f'real MNIST files not found at {MNIST_DIR}')
  from dropnet_jax.input_pipeline import _read_idx
  labels = _read_idx(str(MNIST_DIR / 'train-labels-idx1-ubyte.gz'), 0x801)
  train_idx, val_idx = stratified_split(labels, 0.1, 0)
  assert not set(train_idx.tolist()) & set(val_idx.tolist())
  assert len(train_idx) + len(val_idx) == 22_699


# --- digits ----------------------------------------------------------------

def test_digits():
  ds = load_dataset('digits')
  assert ds.num_classes == 10 and ds.image_shape == (8, 8, 1)
  for a in (ds.train_images, ds.val_images, ds.test_images):
    assert a.dtype == np.uint8 and a.shape[1:] == (8, 8, 1)
  allx = np.concatenate([ds.train_images, ds.val_images, ds.test_images])
  ally = np.concatenate([ds.train_labels, ds.val_labels, ds.test_labels])
  assert len(ally) == 1797 and allx.min() == 0 and allx.max() == 255
  # Disjoint and complete: every sklearn image appears exactly once, with its label.
  from sklearn.datasets import load_digits
  bunch = load_digits()
  expected = np.round(bunch.images * 255 / 16).astype(np.uint8)[..., None]
  assert sort_rows(allx, ally) == sort_rows(expected, bunch.target)
  assert abs(len(ds.test_labels) - 0.2 * 1797) <= 10
  assert abs(len(ds.val_labels) - 0.1 * 0.8 * 1797) <= 10


def test_digits_split_seed():
  a, b, c = load_dataset('digits'), load_dataset('digits', split_seed=0), load_dataset('digits', split_seed=1)
  np.testing.assert_array_equal(a.test_images, b.test_images)
  np.testing.assert_array_equal(a.val_labels, b.val_labels)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert not np.array_equal(a.test_images, c.test_images)
  assert not np.array_equal(a.val_images, c.val_images)


@pytest.mark.parametrize('seed', [-1, 1.5, True])
def test_a_bad_split_seed_is_named_before_any_reading(tmp_path, seed):
  # numpy's own "expected non-negative integer" named no setting; an empty data_dir shows no file was read.
  for name, data_dir in (('digits', None), ('mnist', str(tmp_path))):
    with pytest.raises(DataError, match=rf'^split_seed must be a non-negative integer, got {seed!r}$'):
      load_dataset(name, data_dir, split_seed=seed)


# --- CIFAR-10 --------------------------------------------------------------

def write_cifar(root: Path, per_batch=4, seed=0):
  """Fake batches in the real format; returns the HWC images and labels per file."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  out = {}
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    hwc = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, per_batch).tolist()
    data = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # CHW rows, as the real files
    with open(root / name, 'wb') as f:
      pickle.dump({b'batch_label': name.encode(), b'labels': labels, b'data': data,
                   b'filenames': [b'x.png'] * per_batch}, f)
    out[name] = (hwc, np.asarray(labels))
  return out


@pytest.mark.parametrize('nested', [False, True])
def test_cifar10(tmp_path, nested):
  root = tmp_path / 'cifar-10-batches-py' if nested else tmp_path
  batches = write_cifar(root)
  # A known pixel by hand: data row layout is R plane, G plane, B plane, each 32x32 row-major.
  with open(root / 'test_batch', 'rb') as f:
    raw = pickle.load(f, encoding='bytes')[b'data']
  r, c = 5, 17
  expected_pixel = [raw[2, ch * 1024 + r * 32 + c] for ch in range(3)]
  ds = load_dataset('cifar10', str(tmp_path), validation_fraction=0.2)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert ds.test_images[2, r, c].tolist() == expected_pixel
  np.testing.assert_array_equal(ds.test_images, batches['test_batch'][0])
  np.testing.assert_array_equal(ds.test_labels, batches['test_batch'][1])
  train_x = np.concatenate([batches[f'data_batch_{i}'][0] for i in range(1, 6)])
  train_y = np.concatenate([batches[f'data_batch_{i}'][1] for i in range(1, 6)])
  x, y = all_train(ds)
  assert len(y) == 20
  assert sort_rows(x, y) == sort_rows(train_x, train_y)


def test_cifar10_errors(tmp_path):
  write_cifar(tmp_path)
  (tmp_path / 'data_batch_3').unlink()
  with pytest.raises(DataError, match='data_batch_3'):
    load_dataset('cifar10', str(tmp_path))
  (tmp_path / 'data_batch_3').write_bytes(b'not a pickle')
  with pytest.raises(DataError, match='data_batch_3.*not a CIFAR-10 batch'):
    load_dataset('cifar10', str(tmp_path))
  with open(tmp_path / 'data_batch_3', 'wb') as f:
    pickle.dump({b'data': np.zeros((4, 3072), np.uint8), b'labels': [0, 1, 2]}, f)
  with pytest.raises(DataError, match='count mismatch.*data_batch_3.*4 images.*3 labels'):
    load_dataset('cifar10', str(tmp_path))
  with open(tmp_path / 'data_batch_3', 'wb') as f:
    pickle.dump({b'data': np.zeros((4, 3072), np.uint8), b'labels': [0, 1, 2, 12]}, f)
  with pytest.raises(DataError, match='data_batch_3.*out of range'):
    load_dataset('cifar10', str(tmp_path))


# --- Tiny ImageNet ---------------------------------------------------------

WNIDS = ['n02', 'n01', 'n03']  # deliberately unsorted in wnids.txt


def write_tiny_imagenet(root: Path, per_class=3):
  """Solid-colour 64x64 JPEGs (solid colours survive JPEG almost exactly)."""
  Image = pytest.importorskip('PIL.Image')
  (root / 'val' / 'images').mkdir(parents=True)
  (root / 'wnids.txt').write_text('\n'.join(WNIDS) + '\n')
  colour = {'n01': (200, 20, 20), 'n02': (20, 200, 20), 'n03': (20, 20, 200)}
  for wnid in WNIDS:
    folder = root / 'train' / wnid / 'images'
    folder.mkdir(parents=True)
    for i in range(per_class):
      Image.new('RGB', (64, 64), colour[wnid]).save(folder / f'{wnid}_{i}.JPEG')
  lines = []
  for i, wnid in enumerate(['n03', 'n01', 'n02', 'n01']):
    Image.new('RGB', (64, 64), colour[wnid]).save(root / 'val' / 'images' / f'val_{i}.JPEG')
    lines.append(f'val_{i}.JPEG\t{wnid}\t0\t0\t63\t63')
  # One grayscale image must come back as RGB.
  Image.new('L', (64, 64), 128).save(root / 'val' / 'images' / 'val_gray.JPEG')
  lines.append('val_gray.JPEG\tn02\t0\t0\t63\t63')
  (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
  return colour


def test_tiny_imagenet(tmp_path):
  colour = write_tiny_imagenet(tmp_path)
  ds = load_dataset('tiny_imagenet', str(tmp_path), validation_fraction=0.34)
  assert ds.num_classes == 3 and ds.image_shape == (64, 64, 3)
  assert ds.test_images.shape == (5, 64, 64, 3) and ds.test_images.dtype == np.uint8
  # Class index = position in sorted wnid order: n01 -> 0, n02 -> 1, n03 -> 2.
  np.testing.assert_array_equal(ds.test_labels, [2, 0, 1, 0, 1])
  for img, label in zip(ds.test_images[:4], ds.test_labels[:4]):
    wnid = sorted(WNIDS)[label]
    assert np.abs(img.astype(int) - colour[wnid]).max() <= 3
  assert np.abs(ds.test_images[4].astype(int) - 128).max() <= 3  # gray -> RGB, all channels equal
  x, y = all_train(ds)
  assert np.bincount(y).tolist() == [3, 3, 3]
  assert np.bincount(ds.val_labels).tolist() == [1, 1, 1]
  for img, label in zip(x, y):
    assert np.abs(img.astype(int) - colour[sorted(WNIDS)[label]]).max() <= 3


def test_tiny_imagenet_errors(tmp_path):
  write_tiny_imagenet(tmp_path)
  ann = tmp_path / 'val' / 'val_annotations.txt'
  good = ann.read_text()
  ann.write_text(good + 'val_x.JPEG\tn99\t0\t0\t1\t1\n')
  with pytest.raises(DataError, match='val_annotations.txt:6'):
    load_dataset('tiny_imagenet', str(tmp_path))
  ann.write_text(good + 'val_missing.JPEG\tn01\t0\t0\t1\t1\n')
  with pytest.raises(DataError, match='missing file.*val_missing.JPEG'):
    load_dataset('tiny_imagenet', str(tmp_path))
  ann.write_text(good)
  (tmp_path / 'val' / 'images' / 'val_0.JPEG').write_bytes(b'not a jpeg')
  with pytest.raises(DataError, match='val_0.JPEG.*cannot decode'):
    load_dataset('tiny_imagenet', str(tmp_path))
  os.rename(tmp_path / 'wnids.txt', tmp_path / 'wnids.bak')
  with pytest.raises(DataError, match='wnids.txt'):
    load_dataset('tiny_imagenet', str(tmp_path))


def test_tiny_imagenet_wrong_size(tmp_path):
  Image = pytest.importorskip('PIL.Image')
  write_tiny_imagenet(tmp_path)
  Image.new('RGB', (32, 64)).save(tmp_path / 'train' / 'n01' / 'images' / 'n01_0.JPEG')
  with pytest.raises(DataError, match='n01_0.JPEG.*32x64.*64x64'):
    load_dataset('tiny_imagenet', str(tmp_path))


# --- stratified_split ------------------------------------------------------

@pytest.mark.parametrize('seed', [0, 1, 7])
@pytest.mark.parametrize('fraction', [0.1, 0.25, 0.5, 0.9])
def test_stratified_split_properties(seed, fraction):
  rng = np.random.default_rng(seed + 100)
  labels = rng.integers(0, 7, 500)
  labels[:3] = 9  # a small class
  labels[3] = 11  # a singleton class stays in train
  train_idx, val_idx = stratified_split(labels, fraction, seed)
  assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(val_idx) > 0)  # sorted, no repeats
  assert not np.intersect1d(train_idx, val_idx).size
  np.testing.assert_array_equal(np.union1d(train_idx, val_idx), np.arange(len(labels)))
  for c in np.unique(labels):
    n = int((labels == c).sum())
    k = int((labels[val_idx] == c).sum())
    want = 0 if n == 1 else min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)
    assert k == want, (c, n, k, want)
    if n > 1:
      assert 1 <= k <= n - 1


def test_stratified_split_seeding():
  labels = np.repeat(np.arange(5), 40)
  a = stratified_split(labels, 0.2, 3)
  b = stratified_split(labels, 0.2, 3)
  c = stratified_split(labels, 0.2, 4)
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  np.testing.assert_array_equal(np.bincount(labels[a[1]]), [8] * 5)
  with pytest.raises(DataError, match='fraction'):
    stratified_split(labels, 1.0, 0)


@pytest.mark.parametrize('n_train,n_test,match', [(40, 0, 'the test split is empty'),
                                                  (0, 20, 'the training split is empty')])
def test_empty_splits_are_refused_before_any_run_writes(tmp_path, n_train, n_test, match):
  (tmp_path / 'data').mkdir()
  make_mnist(tmp_path / 'data', n_train=n_train, n_test=n_test, gz=False)
  with pytest.raises(DataError, match=match):
    load_dataset('mnist', str(tmp_path / 'data'))
  # Through an entry point's preparation: refused, and nothing written into --out.
  from dropnet_jax.config import DataConfig, ExperimentConfig
  from dropnet_jax.runs import experiment
  config = ExperimentConfig(data=DataConfig(dataset='mnist', data_dir=str(tmp_path / 'data')))
  with pytest.raises(DataError, match=match):
    experiment.prepare(config, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
