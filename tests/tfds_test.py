"""tensorflow-datasets, the optional extra (`pip install -e '.[tfds]'`): MNIST/CIFAR-10 without --data_dir.

Without it (or without the TensorFlow it reads with) a run that needs it stops with one line naming the
install command, before anything is written; with it, our loader reads tfds' splits (here the fake
data of `tfds.testing.mock_data`: no download) into the same Dataset as the file readers, in batches.
The tests that need the extra skip without it; CI installs it (.ci/run).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dropnet_jax import input_pipeline, tfds_source
from dropnet_jax.input_pipeline import load_dataset

REPO = Path(__file__).resolve().parents[1]
HAVE_TFDS = all(importlib.util.find_spec(m) is not None for m in ('tensorflow_datasets', 'tensorflow'))
needs_tfds = pytest.mark.skipif(not HAVE_TFDS, reason="tensorflow-datasets/tensorflow not installed "
                                "(pip install -e '.[tfds]')")


def run_entry_point(tmp_path, prelude: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m experiments.dropnet *args` after `prelude` (Python run first, in the same process)."""
  code = prelude + textwrap.dedent(f'''
      import runpy, sys
      sys.argv = ['experiments.dropnet', *{list(args)!r}]
      runpy.run_module('experiments.dropnet', run_name='__main__', alter_sys=True)
  ''')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'TFDS_DATA_DIR': str(tmp_path / 'tfds')})


@pytest.mark.parametrize('missing,dataset', [('tensorflow_datasets', 'mnist'), ('tensorflow', 'cifar10')])
def test_without_the_extra_one_line_names_the_install_command(tmp_path, missing, dataset):
  # None in sys.modules makes `import <missing>` fail as if it were not installed.
  out = tmp_path / 'run'
  proc = run_entry_point(tmp_path, f'import sys; sys.modules[{missing!r}] = None\n',
                         f'--dataset={dataset}', f'--out={out}')
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(f'error: {dataset} without --data_dir')
  assert missing in lines[0].split(' not installed')[0]  # named, whatever else is missing here
  assert "pip install -e '.[tfds]'" in lines[0] and '--data_dir' in lines[0]
  assert not out.exists()  # before any work


def test_a_module_missing_inside_tfds_is_the_same_line(monkeypatch):
  """tfds 4.9.10 imports importlib_resources only while preparing, without declaring it."""
  class FakeTfds:
    @staticmethod
    def load(*args, **kwargs):
      raise ModuleNotFoundError("No module named 'importlib_resources'", name='importlib_resources')
  monkeypatch.setattr(tfds_source, '_import_tfds', lambda name: FakeTfds)
  line = r"mnist without --data_dir.*importlib_resources is not installed: pip install -e '\.\[tfds\]'"
  with pytest.raises(input_pipeline.DataError, match=line):
    load_dataset('mnist')


@needs_tfds
@pytest.mark.parametrize('name,shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))])
def test_the_loader_reads_tfds_splits_in_batches(monkeypatch, name, shape):
  import tensorflow_datasets as tfds
  examples = 50
  monkeypatch.setattr(tfds_source, '_TFDS_BATCH', 7)  # several batches and a remainder
  with tfds.testing.mock_data(num_examples=examples):
    ds = load_dataset(name)
    reference = {split: next(iter(tfds.as_numpy(tfds.load(name, split=split, batch_size=examples,
                                                            as_supervised=True))))
                 for split in ('train', 'test')}
  assert ds.image_shape == shape and ds.num_classes == 10
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.test_images, reference['test'][0])
  np.testing.assert_array_equal(ds.test_labels, reference['test'][1])
  # train + val are tfds' train split, cut per class (every example in exactly one of them)
  assert len(ds.train_labels) + len(ds.val_labels) == examples and len(ds.val_labels) > 0
  together = np.concatenate([ds.train_images, ds.val_images]).reshape(examples, -1)
  original = reference['train'][0].reshape(examples, -1)
  assert sorted(map(bytes, together)) == sorted(map(bytes, original))
  np.testing.assert_array_equal(np.sort(np.concatenate([ds.train_labels, ds.val_labels])),
                                np.sort(reference['train'][1]))


@needs_tfds
def test_a_run_on_tfds_mnist_through_the_entry_point(tmp_path):
  out = tmp_path / 'run'
  prelude = textwrap.dedent('''
      import tensorflow_datasets as tfds
      mock = tfds.testing.mock_data(num_examples=60)  # held: a collected context manager undoes the mock
      mock.__enter__()
  ''')
  proc = run_entry_point(tmp_path, prelude, '--dataset=mnist', '--model=fc', '--widths=4,4', '--metrics=min',
                         '--max_epochs=1', '--fraction=0.5', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((out / 'config.json').read_text())
  assert config['config']['data']['dataset'] == 'mnist' and config['config']['data']['data_dir'] is None
  records = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
  assert records and records[0]['units'] == [4, 4]


OFFLINE = textwrap.dedent('''
    import os, socket
    for var in ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
      os.environ.pop(var, None)
    def offline(address, *args, **kwargs):
      raise socket.gaierror(-2, 'Name or service not known')
    socket.create_connection = offline
    from tensorflow_datasets.core import dataset_builder
    def download_and_prepare(self, *args, **kwargs):  # offline, tfds would retry for ~3.5 minutes here
      raise RuntimeError('a download was started')
    dataset_builder.DatasetBuilder.download_and_prepare = download_and_prepare
''')


@needs_tfds
def test_offline_without_data_dir_is_one_line_at_once_naming_data_dir(tmp_path):
  out = tmp_path / 'run'
  proc = run_entry_point(tmp_path, OFFLINE, '--dataset=mnist', f'--out={out}')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      'error: mnist is not downloaded yet and storage.googleapis.com cannot be reached (Name or service not '
      'known); offline, pass --data_dir with the four MNIST IDX files'], proc.stderr[-3000:]
  assert not out.exists()


@pytest.mark.parametrize('name,host', sorted(tfds_source.TFDS_HOSTS.items()))
def test_the_download_host_is_tried_briefly_and_not_behind_a_proxy(monkeypatch, name, host):
  tried = []
  def refused(address, timeout):
    tried.append((address, timeout))
    raise ConnectionRefusedError(111, 'Connection refused')
  monkeypatch.setattr('socket.create_connection', refused)
  for var in ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(input_pipeline.DataError, match=rf'^{name} is not downloaded yet and {host} cannot be reached '
                     r'\(Connection refused\); offline, pass --data_dir with '):
    tfds_source.check_download_host(name)
  assert tried == [((host, 443), tfds_source.CONNECT_TIMEOUT_S)] and tfds_source.CONNECT_TIMEOUT_S <= 10
  monkeypatch.setenv('HTTPS_PROXY', 'http://proxy.example:3128')  # the proxy reaches the host, not this machine
  tfds_source.check_download_host(name)
  assert len(tried) == 1


def test_ctrl_c_while_loading_is_one_line_exit_130(tmp_path):
  out = tmp_path / 'run'
  prelude = textwrap.dedent('''
      from dropnet_jax import tfds_source
      def interrupted(name):  # as Ctrl-C while tfds reads or downloads
        raise KeyboardInterrupt
      tfds_source.load = interrupted
  ''')
  proc = run_entry_point(tmp_path, prelude, '--dataset=mnist', f'--out={out}')
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == ['interrupted (Ctrl-C)'], proc.stderr[-3000:]
  assert not out.exists()
