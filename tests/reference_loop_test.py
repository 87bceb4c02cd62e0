"""Algorithm 1 as a plain loop (`dropnet.reference_run`) against the resumable driver (`run_experiment`).

The driver adds groups, lanes, a shared dense cycle and checkpoints around the same pieces; these
tests pin that none of it changes what Algorithm 1 computes.
"""

import numpy as np
import pytest

from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.loop import dropnet
from dropnet_jax.loop.driver import RunIO
from dropnet_jax.models import create_model
from dropnet_jax.training.trainer import DeviceData

# A global and a layer-wise criterion (the latter random: it uses the per-(seed, metric, cycle) keys).
CONFIG = DropNetConfig(metrics=('min', 'random_layer'), fraction=0.3, floor=0.3,
                       train=TrainConfig(max_epochs=5, patience=1))
SEEDS = (0, 1)


@pytest.fixture(scope='module')
def digits():
  ds = load_dataset('digits', None)
  data = DeviceData.from_dataset(ds)
  model = create_model('fc', (8, 8), ds.num_classes)
  trainer = dropnet.default_trainer(model, data, CONFIG)  # one Trainer: its programs compile once
  reference = [r for seed in SEEDS for metric in CONFIG.metrics
               for r in dropnet.reference_run(model, ds.image_shape, data, seed, metric, CONFIG, trainer)]
  return ds, data, model, trainer, reference


def assert_same_records(got, want):
  """Every field but `seconds`: masks, units, cycles, epochs and stop reasons exactly, numbers to
  float32 rounding."""
  assert [(r['seed'], r['metric'], r['cycle']) for r in got] == [(r['seed'], r['metric'], r['cycle']) for r in want]
  for g, w in zip(got, want):
    assert list(g) == list(w)  # the same fields in the same order
    for k in g:
      if k == 'seconds':
        continue
      if isinstance(w[k], float):
        np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-7, err_msg=f'{k} of {w["metric"]} {w["cycle"]}')
      else:
        assert g[k] == w[k], (k, g, w)


def test_reference_run_is_nontrivial(digits):
  *_, reference = digits
  for seed in SEEDS:
    for metric in CONFIG.metrics:
      rs = [r for r in reference if r['seed'] == seed and r['metric'] == metric]
      assert [r['cycle'] for r in rs] == list(range(len(rs))) and len(rs) >= 3
      assert rs[-1]['stop_reason'] and not any(r['stop_reason'] for r in rs[:-1])
  # The two criteria drop different units.
  assert {tuple(r['mask']) for r in reference if r['metric'] == 'min' and r['cycle'] == 1} != {
      tuple(r['mask']) for r in reference if r['metric'] == 'random_layer' and r['cycle'] == 1}


@pytest.mark.parametrize('batch_trials', [False, True])
def test_driver_records_equal_the_plain_loop(digits, batch_trials):
  ds, data, model, trainer, reference = digits
  got = dropnet.run_experiment(model, ds.image_shape, data, list(SEEDS), CONFIG, trainer,
                               RunIO(log=lambda s: None), batch_trials=batch_trials)
  assert_same_records(got, reference)
