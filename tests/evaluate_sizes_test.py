"""runs.evaluate's parts that need no trained run: the counts of a network (hand-worked on Model A
shapes, with unit masks and with a weight mask), the --networks syntax, the settings' refusals, the
reproduction check, and the report's columns (markdown, rich, JSON). The end-to-end checks against
real runs are tests/evaluate_test.py."""

import json

import jax
import numpy as np
import pytest
from rich.console import Console

from dropnet_jax.models import create_model, full_masks, init_params
from dropnet_jax.runs import evaluate, evaluate_report
from dropnet_jax.runs.evaluate_score import differences, sizes

IMAGE = (8, 8, 1)  # digits: 64 inputs, 10 classes


@pytest.fixture(scope='module')
def model_a():
  """Model A (8, 6) on digits shapes; biases made non-zero (Glorot starts them at 0, which would count as zeros)."""
  model = create_model('fc', (8, 6), 10)
  theta = init_params(model, jax.random.key(0), IMAGE)
  return model, {name: {**layer, 'bias': layer['bias'] + 0.5} for name, layer in theta.items()}


def test_dense_counts_are_the_arrays(model_a):
  model, theta = model_a
  s = sizes(model, theta, full_masks(model), IMAGE)
  kernels = 64 * 8 + 8 * 6 + 6 * 10
  assert s['params'] == s['counted_params'] == s['effective_params'] == s['nonzero_params'] == kernels + 8 + 6 + 10
  assert s['prunable_params'] == kernels and s['zero_prunable'] == 0
  assert s['sparsity'] == 0 and s['global_sparsity'] == 0
  assert s['macs'] == s['dense_macs'] == kernels


def test_unit_masks_count_the_units_they_leave(model_a):
  """3 of 8 first-layer units and 2 of 6 second-layer units kept: the compact network's sizes."""
  model, theta = model_a
  masks = (np.array([1, 0, 1, 0, 0, 1, 0, 0], np.float32), np.array([0, 1, 0, 0, 1, 0], np.float32))
  s = sizes(model, theta, masks, IMAGE)
  kernels = 64 * 3 + 3 * 2 + 2 * 10
  dense_kernels = 64 * 8 + 8 * 6 + 6 * 10
  assert s['params'] == dense_kernels + 24
  assert s['effective_params'] == s['nonzero_params'] == kernels + 3 + 2 + 10
  assert s['macs'] == kernels and s['dense_macs'] == dense_kernels
  assert s['zero_prunable'] == dense_kernels - kernels
  assert s['sparsity'] == pytest.approx(1 - kernels / dense_kernels, abs=1e-15)
  assert s['global_sparsity'] == pytest.approx(1 - (kernels + 15) / (dense_kernels + 24), abs=1e-15)


def test_a_weight_mask_names_the_prunable_weights_and_its_pruned_count(model_a):
  """Pruned weights saved as exact zeros (the prune.remove form) beside their mask; one kept weight
  that is 0 by chance counts as a zero but not as pruned, so the check against the mask catches it."""
  model, theta = model_a
  rng = np.random.default_rng(0)
  wmask = {name: {'kernel': (rng.random(theta[name]['kernel'].shape) > 0.7).astype(np.float32)}
           for name in ('Dense_0', 'Dense_1', 'Dense_2')}
  pruned_theta = {name: {'kernel': np.asarray(theta[name]['kernel']) * wmask[name]['kernel'],
                         'bias': np.asarray(theta[name]['bias'])} for name in theta}
  pruned = sum(int((m['kernel'] == 0).sum()) for m in wmask.values())
  s = sizes(model, pruned_theta, full_masks(model), IMAGE, weight_mask=wmask)
  assert s['pruned'] == s['zero_prunable'] == pruned
  assert s['sparsity'] == pruned / (64 * 8 + 8 * 6 + 6 * 10)
  assert s['macs'] == s['dense_macs']  # unstructured zeros are still multiplied
  row = {'source': 'record', **s}
  assert differences(row, {}) == []
  kept = np.argwhere(wmask['Dense_1']['kernel'] > 0)[0]
  pruned_theta['Dense_1']['kernel'][tuple(kept)] = 0.0
  row = {'source': 'record', **sizes(model, pruned_theta, full_masks(model), IMAGE, weight_mask=wmask)}
  assert differences(row, {}) == [f'{pruned + 1} prunable weights are 0 but the mask prunes {pruned}']


def test_magnitude_selection_without_a_mask(model_a):
  """A run saved without masks: its config's selection (output layer excluded here) says what is prunable."""
  model, theta = model_a
  s = sizes(model, theta, full_masks(model), IMAGE, selection={'biases': True, 'output_layer': False})
  assert s['prunable_params'] == 64 * 8 + 8 + 8 * 6 + 6


def test_differences_compare_counts_exactly_and_losses_to_tolerance():
  row = {'source': 'record', 'test_examples': 359, 'test_correct': 182, 'test_loss': 1.5, 'zero_prunable': 0,
         'prunable_params': 10}
  same = {'test_accuracy': np.float32(182 / 359).item(), 'test_loss': 1.5 * (1 + 5e-6)}
  assert differences(row, same) == []
  assert differences(row, {**same, 'test_accuracy': np.float32(183 / 359).item()}) == [
      'test: 182/359 correct, the reference 183/359']
  assert differences(row, {**same, 'test_loss': 1.5 * (1 + 5e-5)})[0].startswith('test loss 1.5')
  # A weight-pruned record saved before masks were: its recorded sparsity says how many are pruned.
  assert differences(row, {**same, 'target_sparsity': 0.5, 'sparsity': 0.5}) == [
      '0 prunable weights are 0 but the record prunes 5']


@pytest.mark.parametrize('text, expected', [
    ('runs/a', ('runs/a', None)),
    ('runs/a:seed0/min/cycle3', ('runs/a', 'seed0/min/cycle3')),
    ('runs/a:seed1/dense', ('runs/a', 'seed1/dense')),
    ('runs/mag:seed0/oneshot s=0.9', ('runs/mag', 'seed0/oneshot s=0.9')),
    ('runs/a:*', ('runs/a', '*')),
])
def test_network_entries(text, expected):
  assert evaluate.split_network(text) == expected


def test_a_directory_with_a_colon_is_taken_whole(tmp_path):
  odd = tmp_path / 'run:2'
  odd.mkdir()
  assert evaluate.split_network(str(odd)) == (str(odd), None)


@pytest.mark.parametrize('changes, message', [
    ({'networks': ()}, 'networks: give at least one'),
    ({'networks': ('runs/a:min/3',)}, "networks: 'runs/a:min/3': record selector"),
    ({'networks': ('runs/a:seed0/min/3',)}, 'record selector'),
    ({'data_dir': '/no/such/dir'}, 'data_dir'),
    ({'json_path': '/no/such/dir/e.json'}, 'json'),
    ({'print_format': 'html'}, 'format must be one of'),
])
def test_bad_settings_are_named(changes, message):
  config = evaluate.EvaluateConfig(**{'networks': ('runs/a',), **changes})
  with pytest.raises(ValueError, match=message.replace('*', r'\*')):
    config.validate()


def _row(name, reproduced=True):
  return {'network': name, 'train_accuracy': 0.5, 'train_loss': 1.0, 'val_accuracy': 0.25, 'val_loss': 2.0,
          'test_accuracy': 0.125, 'test_loss': 3.0, 'reference_test_accuracy': 0.125, 'reproduced': reproduced,
          'differences': [] if reproduced else ['test: 1/8 correct, the reference 2/8'], 'params': 1234,
          'effective_params': 1000, 'nonzero_params': 900, 'sparsity': 0.1, 'global_sparsity': 0.0625,
          'macs': 5678}


def test_every_column_is_in_the_markdown_the_rich_table_and_the_json():
  rows = [_row('runs/a:seed0/min/cycle2'), _row('exports/[x]|y', reproduced=False)]  # markup and pipes kept
  headers = [h for h, _ in evaluate_report.COLUMNS]
  text = evaluate_report.markdown(rows)
  lines = text.splitlines()
  assert lines[0] == '| ' + ' | '.join(headers) + ' |'
  assert lines[2] == ('| runs/a:seed0/min/cycle2 | 50.00 | 1.0000 | 25.00 | 2.0000 | 12.50 | 3.0000 | 12.50 | yes | '
                      '1,234 | 1,000 | 900 | 10.00 | 6.25 | 5,678 |')
  assert lines[3].startswith('| exports/[x]\\|y |') and '| NO |' in lines[3]
  assert lines[-1] == 'exports/[x]|y does not reproduce its reference: test: 1/8 correct, the reference 2/8'
  console = Console(width=400, record=True, color_system=None)
  evaluate_report.print_rich(rows, console)
  drawn = console.export_text()
  assert all(w in drawn for h in headers for w in h.split()) and '1,234' in drawn and 'exports/[x]|y' in drawn
  assert not drawn.lstrip().startswith('|')
  narrow = Console(width=80, record=True, color_system=None)  # too narrow for fifteen columns: the markdown
  evaluate_report.print_rich(rows, narrow)
  assert narrow.export_text().strip() == text.strip()
  data = json.loads(evaluate_report.to_json(rows))
  assert data['columns'] == headers and data['networks'] == rows
