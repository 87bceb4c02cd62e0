"""Trained params saved per cycle, loaded back by (seed, metric, cycle), reproduce the records."""

import json
import os
import shutil

import numpy as np
import pytest

from dropnet_jax.loop import dropnet
from dropnet_jax.loop.driver import RunIO

from dropnet_jax.runs import reporting

from dropnet_jax.runs import saved_params
from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.models import create_model
from dropnet_jax.training.trainer import DeviceData, Trainer

CONFIG = DropNetConfig(metrics=('min', 'max_layer'), fraction=0.4, floor=0.3,
                       train=TrainConfig(max_epochs=3, patience=1))


@pytest.fixture(scope='module')
def digits():
  ds = load_dataset('digits')
  return ds, DeviceData.from_dataset(ds)


def run(tmp_path, digits, mode, batch_trials=False):
  ds, data = digits
  model = create_model('fc', (12, 10), ds.num_classes)
  spec = {'model': 'fc', 'widths': [12, 10], 'num_classes': ds.num_classes, 'image_shape': list(ds.image_shape)}
  store = saved_params.ParamsStore(str(tmp_path / 'params'), mode, spec)
  records = dropnet.run_experiment(model, ds.image_shape, data, [0, 1], CONFIG,
                                   io=RunIO(log=lambda s: None, params_store=store), batch_trials=batch_trials)
  reporting.write_jsonl(tmp_path / 'results.jsonl', records)
  return model, data, records


@pytest.mark.parametrize('batch_trials', [False, True])
def test_every_saved_cycle_reproduces_its_record(tmp_path, digits, batch_trials):
  model, data, records = run(tmp_path, digits, 'all', batch_trials)
  assert len(records) >= 8
  trainer = Trainer(model, CONFIG.train)
  for r in records:
    loaded_model, theta, masks, record = saved_params.load_network(str(tmp_path), r['seed'], r['metric'], r['cycle'])
    assert loaded_model.widths == model.widths and record == r
    result = trainer.evaluate(theta, masks, data.test_images, data.test_labels)
    assert float(result.accuracy) == r['test_accuracy']
    np.testing.assert_allclose(float(result.loss), r['test_loss'], rtol=1e-6)
  # Cycle 0 is stored once per seed and shared by the metrics.
  assert sorted(os.listdir(tmp_path / 'params' / 'seed0')) == ['dense', 'dense.files.json', 'max_layer', 'min']


def test_last_keeps_only_each_trials_final_cycle(tmp_path, digits):
  _, _, records = run(tmp_path, digits, 'last')
  final = {(r['seed'], r['metric']): r['cycle'] for r in records}
  for (seed, metric), cycle in final.items():
    kept = os.listdir(tmp_path / 'params' / f'seed{seed}' / metric)
    assert sorted(kept) == [f'cycle{cycle}', f'cycle{cycle}{saved_params.MANIFEST_SUFFIX}']
  with pytest.raises(FileNotFoundError, match='save_params=all'):
    saved_params.load_params(str(tmp_path), 0, 'min', 1)
  assert json.loads((tmp_path / 'params' / 'spec.json').read_text())['widths'] == [12, 10]


def test_none_writes_nothing(tmp_path, digits):
  run(tmp_path, digits, 'none')
  assert not (tmp_path / 'params').exists()


def _data_files(path):
  return sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                if os.sep + 'd' + os.sep in os.path.join(root, n))


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory, digits):
  path = tmp_path_factory.mktemp('saved')
  run(path, digits, 'all')
  return path


@pytest.mark.parametrize('damage', ['truncate', 'delete', 'flip'])
def test_damaged_saved_params_are_named_in_one_line(tmp_path, saved_run, damage):
  shutil.copytree(saved_run, tmp_path, dirs_exist_ok=True)
  path = os.path.join(tmp_path, 'params', 'seed0', 'min', 'cycle1')
  victim = _data_files(path)[0]
  size = os.path.getsize(victim)
  if damage == 'truncate':
    os.truncate(victim, size // 2)
  elif damage == 'delete':
    os.remove(victim)
  else:  # same size, one byte changed: only the checksum sees it
    with open(victim, 'r+b') as f:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(saved_params.SavedParamsError) as info:
    saved_params.load_network(str(tmp_path), 0, 'min', 1)
  message = str(info.value)
  assert '\n' not in message and victim in message
  assert {'truncate': 'truncated', 'delete': 'missing', 'flip': 'corrupt'}[damage] in message
  saved_params.load_params(str(tmp_path), 0, 'min', 2)  # the other checkpoints still load
