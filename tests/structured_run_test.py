"""Structured pruning at init end to end, reduced: resnet18_bn without stage 4 at width x1/8 on generated
CIFAR-10-shaped files (input_pipeline_test.write_cifar), the report's rates, l1 and random importance, one
epoch; then the compact export of the pruned network (`compaction.export`) and the resume of a finished run.
"""

from __future__ import annotations

import json

import pytest

from dropnet_jax.compaction import export
from dropnet_jax.config import DataConfig, ModelConfig, TrainConfig
from dropnet_jax.loop.structured import StructuredConfig
from dropnet_jax.models.compact import model_from_spec
from dropnet_jax.pruning import structured as S
from dropnet_jax.runs import structured as runs_structured
from input_pipeline_test import write_cifar

RATES = (0.1, 0.1, 0.2, 0.2, 0.2, 0.2)  # the report's, for the 6 blocks of stages 1-3


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('structured')
  write_cifar(root / 'cifar', per_batch=12)
  config = runs_structured.StructuredRunConfig(
      model=ModelConfig(name='resnet18_bn', width_multiplier=0.125, stages=(1, 2, 3)),
      data=DataConfig(dataset='cifar10', data_dir=str(root / 'cifar')),
      structured=StructuredConfig(importances=('l1', 'random'), rates=RATES,
                                  train=TrainConfig(batch_size=16, max_epochs=1)))
  setup = runs_structured.prepare(config, str(root / 'run'))
  records, table = runs_structured.run(setup)
  return root, config, setup, records, table


def test_records_are_the_dense_then_the_pruned_network(finished_run):
  root, config, setup, records, table = finished_run
  assert [(r['metric'], r['cycle']) for r in records] == [('l1', 0), ('l1', 1), ('random', 0), ('random', 1)]
  rates = S.group_rates(setup.model, RATES)
  widths = S.group_widths(setup.model, rates)
  assert widths == (7, 7, 7, 12, 12, 12, 25, 25, 25)
  pruned = [r for r in records if r['cycle'] == 1]
  for r in pruned:
    assert r['params'] == S.pruned_params(setup.model, (32, 32, 3), rates) and r['stop_reason'] == 'trained'
    assert r['group_widths'] == list(widths)
  assert records[0]['params'] == records[2]['params'] > pruned[0]['params']
  assert '| l1 |' in table and '| random |' in table
  spec = json.loads((root / 'run' / 'params' / 'spec.json').read_text())
  assert spec['stages'] == [1, 2, 3] and model_from_spec(spec) == setup.model


def test_the_pruned_network_exports_compact_with_the_records_accuracy(finished_run, tmp_path):
  root, _, _, records, _ = finished_run
  request = export.prepare(export.CompactConfig(run=str(root / 'run'), seed=0, metric='l1', cycle=1),
                           str(tmp_path / 'export'))
  text, ok = export.report(export.run(request))
  assert ok, text
  spec = json.loads((tmp_path / 'export' / 'spec.json').read_text())
  assert spec['model'] == 'resnet18_bn_compact' and spec['stages'] == [1, 2, 3]
  evaluation = json.loads((tmp_path / 'export' / export.EVALUATION).read_text())
  record = next(r for r in records if r['metric'] == 'l1' and r['cycle'] == 1)
  assert evaluation['params'] == record['params']
  assert abs(evaluation['export_test_accuracy'] - record['test_accuracy']) < 1e-6  # the record's is float32


def test_rerun_of_a_finished_run_trains_nothing_and_returns_the_records(finished_run):
  root, config, _, records, _ = finished_run
  again, _ = runs_structured.run(runs_structured.prepare(config, str(root / 'run')))
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'seconds'} for r in rs]
  assert strip(again) == strip(records)


def test_bad_rates_fail_before_any_data(tmp_path):
  config = runs_structured.StructuredRunConfig(model=ModelConfig(name='resnet18', stages=(1, 2, 3)),
                                               structured=StructuredConfig(rates=RATES + (0.3, 0.3)))
  with pytest.raises(ValueError, match=r'one rate per basic block \(6\)'):
    runs_structured.prepare(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
