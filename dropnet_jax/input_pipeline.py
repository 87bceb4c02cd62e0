"""Dataset loading: every split comes back as numpy arrays on the host.

Images are uint8 (N, H, W, C) with pixels 0..255 (the model scales by 1/255 on
device, so host memory and transfers stay 4x smaller); labels are int32 (N,).
The validation split is carved out of the training set per class
(`stratified_split`), as in the DropNet paper.

Sources: `digits` is scikit-learn's bundled 8x8 set (offline default); `mnist`
and `cifar10` read local files when `data_dir` is given, else
tensorflow-datasets (`dropnet_jax.tfds_source`); `tiny_imagenet` always needs
`data_dir`. tensorflow-datasets and TensorFlow are an optional extra (`pip install
-e '.[tfds]'`: ~1.6 GB for two datasets the standard files also give), imported only
on that path; without them it stops with one line naming the command, before any
download.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
import zlib

import numpy as np

DATASETS = ('digits', 'mnist', 'cifar10', 'tiny_imagenet')


class DataError(ValueError):
  """A data file or directory is missing, corrupt or inconsistent."""


# eq=False: the generated __eq__/__hash__ would compare/hash numpy arrays and fail.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  name: str
  train_images: np.ndarray  # uint8 (N, H, W, C), pixels 0..255
  train_labels: np.ndarray  # int32 (N,)
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices of `labels` into (rest, held_out), both sorted.

  Per class, round(fraction * count) examples (half rounds up; at least 1 when
  the class has more than one example, at most count - 1 so every class keeps a
  training example) are drawn at random into the held-out part.
  """
  if not 0.0 < fraction < 1.0:
    raise DataError(f'split fraction must be in (0, 1), got {fraction}')
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  held_out = []
  for c in np.unique(labels):  # sorted classes, so the draw order is deterministic
    idx = np.flatnonzero(labels == c)
    n = len(idx)
    k = 0 if n <= 1 else min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)
    held_out.append(rng.choice(idx, size=k, replace=False))
  held = np.sort(np.concatenate(held_out)).astype(np.int64) if held_out else np.zeros(0, np.int64)
  mask = np.ones(len(labels), bool)
  mask[held] = False
  return np.flatnonzero(mask), held


def load_dataset(name: str, data_dir: str | None = None, validation_fraction: float = 0.1,
                 split_seed: int = 0) -> Dataset:
  """Loads `name` (one of DATASETS) with a stratified validation split from train.

  `data_dir` is ignored for `digits` (bundled with scikit-learn).
  """
  if name not in DATASETS:
    raise DataError(f'unknown dataset {name!r}; valid: {", ".join(DATASETS)}')
  # Checked before any (possibly slow) reading.
  if not 0.0 < validation_fraction < 1.0:
    raise DataError(f'validation_fraction must be in (0, 1), got {validation_fraction}')
  if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
    # numpy's own error ("expected non-negative integer") would not say which setting it is
    raise DataError(f'split_seed must be a non-negative integer, got {split_seed!r}')
  if data_dir is not None and name != 'digits' and not os.path.isdir(data_dir):
    raise DataError(f'{name}: data_dir {data_dir} does not exist or is not a directory')

  if name == 'digits':
    (x_train, y_train), (x_test, y_test) = _load_digits(split_seed)
    num_classes = 10
  elif name == 'mnist':
    (x_train, y_train), (x_test, y_test) = _load_mnist_idx(data_dir) if data_dir else _load_tfds('mnist')
    num_classes = 10
  elif name == 'cifar10':
    (x_train, y_train), (x_test, y_test) = _load_cifar10(data_dir) if data_dir else _load_tfds('cifar10')
    num_classes = 10
  else:
    if not data_dir:
      raise DataError('tiny_imagenet: no tensorflow-datasets builder; pass --data_dir with the '
                      'extracted tiny-imagenet-200 folder (wnids.txt, train/, val/)')
    (x_train, y_train), (x_test, y_test), num_classes = _load_tiny_imagenet(data_dir)

  # File readers already checked with the file's name; this also covers tfds.
  _check_labels(y_train, num_classes, f'{name} train labels')
  _check_labels(y_test, num_classes, f'{name} test labels')
  for split, labels in (('training', y_train), ('test', y_test)):
    if not len(labels):  # caught here, before a run writes anything, not as a division by zero later
      raise DataError(f'{name}: the {split} split is empty' + (f' (read from {data_dir})' if data_dir else ''))
  train_idx, val_idx = stratified_split(y_train, validation_fraction, split_seed)
  if not len(train_idx) or not len(val_idx):
    raise DataError(f'{name}: {len(y_train)} training examples are too few for a training and a validation split')
  u8, i32 = (lambda a: np.ascontiguousarray(a, np.uint8)), (lambda a: np.asarray(a, np.int32))
  return Dataset(name, u8(x_train[train_idx]), i32(y_train[train_idx]), u8(x_train[val_idx]),
                 i32(y_train[val_idx]), u8(x_test), i32(y_test), num_classes)


Split = tuple[np.ndarray, np.ndarray]


def _load_tfds(name: str) -> tuple[Split, Split]:
  from dropnet_jax import tfds_source  # lazy: only this path needs it (it imports DataError from here)
  return tfds_source.load(name)


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f'{source}: label values out of range [0, {num_classes}): '
                    f'found {labels.min()}..{labels.max()}')


def _load_digits(split_seed: int) -> tuple[Split, Split]:
  """sklearn's 8x8 digits (values 0..16 -> uint8 0..255), with a stratified 20% test split."""
  from sklearn.datasets import load_digits  # lazy: only this dataset needs sklearn
  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  train_idx, test_idx = stratified_split(labels, 0.2, split_seed)
  return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


# --- MNIST (IDX) -----------------------------------------------------------

_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # ubyte data, 3 and 1 dims


def _read_bytes(path: str) -> bytes:
  """Whole file, gunzipped when the name ends in .gz."""
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        return f.read()
    with open(path, 'rb') as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise DataError(f'cannot read {path}: {e}') from e


def _find(data_dir: str, name: str) -> str:
  """Path of `name` or `name.gz` in data_dir (the plain file wins if both exist)."""
  for candidate in (name, name + '.gz'):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  raise DataError(f'missing file: neither {name} nor {name}.gz in {data_dir}')


def _read_idx(path: str, magic: int) -> np.ndarray:
  """Parses one IDX file of unsigned bytes; the shape comes from its header."""
  data = _read_bytes(path)
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f'{path}: truncated header ({len(data)} bytes, need {header})')
  found = struct.unpack('>I', data[:4])[0]
  if found != magic:
    raise DataError(f'{path}: wrong magic number, expected 0x{magic:08x}, found 0x{found:08x}')
  dims = struct.unpack(f'>{ndim}I', data[4:header])
  size = int(np.prod(dims, dtype=np.int64))
  if len(data) - header < size:
    raise DataError(f'{path}: truncated, header says {dims} = {size} bytes of data, '
                    f'file has {len(data) - header}')
  if len(data) - header > size:  # an exact format: extra bytes mean a wrong header
    raise DataError(f'{path}: {len(data) - header - size} bytes beyond the {dims} the header says')
  return np.frombuffer(data, np.uint8, size, header).reshape(dims)


def _load_mnist_idx(data_dir: str) -> tuple[Split, Split]:
  splits = []
  for prefix in ('train', 't10k'):
    img_path = _find(data_dir, f'{prefix}-images-idx3-ubyte')
    lbl_path = _find(data_dir, f'{prefix}-labels-idx1-ubyte')
    images, labels = _read_idx(img_path, _IDX_IMAGES), _read_idx(lbl_path, _IDX_LABELS)
    if images.shape[1:] != (28, 28):
      raise DataError(f'{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28')
    if len(images) != len(labels):
      raise DataError(f'count mismatch: {img_path} has {len(images)} images but '
                      f'{lbl_path} has {len(labels)} labels')
    _check_labels(labels, 10, lbl_path)
    splits.append((images[..., None], labels.astype(np.int32)))
  return splits[0], splits[1]


# --- CIFAR-10 (python pickles) --------------------------------------------

def _read_cifar_batch(path: str) -> Split:
  """One pickled batch: b'data' (N, 3072) in CHW order -> (N, 32, 32, 3) HWC.

  Pickles can run code when loaded: only point data_dir at trusted files.
  """
  if not os.path.isfile(path):
    raise DataError(f'missing file: {path}')
  try:
    with open(path, 'rb') as f:
      batch = pickle.load(f, encoding='bytes')
    data, labels = np.asarray(batch[b'data'], np.uint8), np.asarray(batch[b'labels'], np.int64)
  except Exception as e:  # noqa: BLE001 -- unpickling fails in many ways; all mean corrupt
    raise DataError(f'{path}: not a CIFAR-10 batch ({type(e).__name__}: {e})') from e
  if data.ndim != 2 or data.shape[1] != 3072:
    raise DataError(f'{path}: data has shape {data.shape}, expected (N, 3072)')
  if len(data) != len(labels):
    raise DataError(f'count mismatch in {path}: {len(data)} images but {len(labels)} labels')
  _check_labels(labels, 10, path)
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _load_cifar10(data_dir: str) -> tuple[Split, Split]:
  # The official archive extracts to cifar-10-batches-py/; accept that or the files directly.
  nested = os.path.join(data_dir, 'cifar-10-batches-py')
  root = nested if os.path.isdir(nested) else data_dir
  train = [_read_cifar_batch(os.path.join(root, f'data_batch_{i}')) for i in range(1, 6)]
  test = _read_cifar_batch(os.path.join(root, 'test_batch'))
  return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])), test


# --- Tiny ImageNet (JPEG folders) -----------------------------------------

def _read_jpeg(path: str, image_module) -> np.ndarray:
  try:
    with image_module.open(path) as im:
      arr = np.asarray(im.convert('RGB'), np.uint8)  # a few images are grayscale
  except Exception as e:  # noqa: BLE001 -- Pillow raises OSError, SyntaxError, ValueError...
    raise DataError(f'{path}: cannot decode image ({type(e).__name__}: {e})') from e
  if arr.shape != (64, 64, 3):
    raise DataError(f'{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected 64x64')
  return arr


def _load_tiny_imagenet(data_dir: str) -> tuple[Split, Split, int]:
  """Train from train/<wnid>/images/, test = the official val/ (test labels are not public).

  Class index = position of the wnid in sorted order (independent of the order
  of wnids.txt, and the order tfds/ImageFolder-style loaders use).
  """
  try:
    from PIL import Image  # lazy: only this dataset decodes JPEGs
  except ImportError as e:
    raise DataError('tiny_imagenet needs Pillow to decode JPEGs: pip install pillow') from e
  wnids_path = os.path.join(data_dir, 'wnids.txt')
  if not os.path.isfile(wnids_path):
    raise DataError(f'missing file: {wnids_path}')
  with open(wnids_path) as f:
    wnids = sorted({line.strip() for line in f if line.strip()})
  if not wnids:
    raise DataError(f'{wnids_path}: no class ids')
  index = {w: i for i, w in enumerate(wnids)}

  images, labels = [], []
  for wnid in wnids:
    folder = os.path.join(data_dir, 'train', wnid, 'images')
    if not os.path.isdir(folder):
      raise DataError(f'missing directory: {folder} (class {wnid} of {wnids_path})')
    for fname in sorted(os.listdir(folder)):  # sorted: the same order on every filesystem
      if fname.lower().endswith(('.jpeg', '.jpg')):
        images.append(_read_jpeg(os.path.join(folder, fname), Image))
        labels.append(index[wnid])

  ann_path = os.path.join(data_dir, 'val', 'val_annotations.txt')
  if not os.path.isfile(ann_path):
    raise DataError(f'missing file: {ann_path}')
  test_images, test_labels = [], []
  with open(ann_path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip('\n').split('\t')
      if len(fields) < 2 or fields[1] not in index:
        raise DataError(f'{ann_path}:{lineno}: expected "filename<TAB>wnid..." with a wnid '
                        f'from wnids.txt, got {line.strip()!r}')
      path = os.path.join(data_dir, 'val', 'images', fields[0])
      if not os.path.isfile(path):
        raise DataError(f'missing file: {path} (listed in {ann_path}:{lineno})')
      test_images.append(_read_jpeg(path, Image))
      test_labels.append(index[fields[1]])

  if not images or not test_images:
    raise DataError(f'{data_dir}: no train or val JPEGs found')
  return ((np.stack(images), np.asarray(labels, np.int32)),
          (np.stack(test_images), np.asarray(test_labels, np.int32)), len(wnids))


def dataset_fingerprint(ds: Dataset) -> str:
  """SHA-256 (hex) of a Dataset's contents: every split's images and labels (dtype,
  shape and bytes, in a fixed order) and num_classes.

  A resume compares it with the one recorded at the start, so data that changed
  under a run (other files, another validation split) are refused, while the same
  files read from another directory give the same value (no path or name is
  hashed). Bytes are hashed little-endian and C-ordered, so the value depends
  only on the array values. Cost: one pass over the data (about 20 ms for the
  MNIST subset).
  """
  import hashlib  # local: keeps this function self-contained

  h = hashlib.sha256(b'dropnet_jax.dataset_fingerprint.v1\0')
  h.update(f'num_classes={int(ds.num_classes)}\0'.encode())
  for field in ('train_images', 'train_labels', 'val_images', 'val_labels', 'test_images', 'test_labels'):
    a = np.asarray(getattr(ds, field))
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder('<'))  # a copy only when needed
    h.update(f'{field}:{a.dtype.str}:{",".join(map(str, a.shape))}\0'.encode())
    h.update(a.reshape(-1).view(np.uint8))  # flat bytes without a copy (also for empty arrays)
  return h.hexdigest()


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) of uint8 images scaled to [0, 1], over every pixel of every image (the
  population std, as the usual CIFAR recipes compute it). Accumulated in float64 in chunks, so a
  50,000-image split needs no float copy of itself."""
  if images.ndim != 4 or not len(images):
    raise DataError(f'channel statistics need (N, H, W, C) images with N > 0, got shape {images.shape}')
  c = images.shape[-1]
  total, squares, count = np.zeros(c), np.zeros(c), 0
  for start in range(0, len(images), 4096):
    x = images[start:start + 4096].reshape(-1, c).astype(np.float64) / 255.0
    total += x.sum(axis=0)
    squares += (x * x).sum(axis=0)
    count += x.shape[0]
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
  if np.any(std == 0):
    raise DataError(f'a channel of the training images is constant (std {std.tolist()}): cannot normalise it')
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def input_norm_for(normalize: bool, dataset: Dataset):
  """The model's `input_norm`: the training split's channel statistics with `normalize`, else None."""
  return channel_stats(dataset.train_images) if normalize else None
