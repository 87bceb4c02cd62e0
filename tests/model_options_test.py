"""The model options every family shares: input normalisation, dropout and the initializer.

References: float64 numpy for the channel statistics, the un-normalised model on
pre-normalised input, PyTorch's own layer initialisation (a two-sample test on
its draws), and properties (dropout off in eval mode, its rate and its keys).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from dropnet_jax import models
from dropnet_jax.config import ModelConfig, TrainConfig
from dropnet_jax.input_pipeline import DataError, channel_stats, load_dataset
from dropnet_jax.models.compact import model_from_spec, spec_of
from dropnet_jax.training.trainer import DeviceData, Trainer, fit


def test_channel_stats_are_the_float64_mean_and_population_std():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5000, 3, 2, 3), dtype=np.uint8)  # > one 4096-image chunk
  mean, std = channel_stats(images)
  x = images.astype(np.float64).reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-9)
  with pytest.raises(DataError, match='constant'):
    channel_stats(np.zeros((4, 2, 2, 1), np.uint8))


@pytest.mark.parametrize('name,widths,shape', [('fc', (6, 5), (6, 6, 1)), ('conv', (3, 4), (8, 8, 3)),
                                               ('modelc', (3, 3, 4, 4), (8, 8, 3))])
def test_input_norm_equals_the_model_on_normalised_input(name, widths, shape):
  norm = ((0.2, 0.5, 0.7)[:shape[-1]], (0.3, 0.25, 0.1)[:shape[-1]])
  plain = models.create_model(name, widths, 4)
  normed = models.create_model(name, widths, 4, input_norm=norm)
  params = models.init_params(plain, jax.random.key(0), shape)
  images = jax.random.randint(jax.random.key(1), (5, *shape), 0, 256).astype(jnp.uint8)
  x = (np.asarray(images, np.float32) / 255.0 - np.array(norm[0], np.float32)) / np.array(norm[1], np.float32)
  masks = models.full_masks(plain)
  want, _ = plain.apply({'params': params}, jnp.asarray(x), masks)
  got, _ = normed.apply({'params': params}, images, masks)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  wrong = models.create_model(name, widths, 4, input_norm=((0.1, 0.1), (1.0, 1.0)))  # 2 channels, never the input's
  with pytest.raises(ValueError, match='channels'):
    wrong.apply({'params': params}, images, masks)


def test_dropout_is_off_in_eval_mode_and_keyed_in_training():
  rate = 0.4
  model = models.create_model('fc', (400, 300), 10, dropout=rate)
  params = models.init_params(model, jax.random.key(0), (8, 8, 1))
  images = jax.random.randint(jax.random.key(1), (64, 8, 8, 1), 0, 256).astype(jnp.uint8)
  masks = models.full_masks(model)
  plain = models.create_model('fc', (400, 300), 10)
  eval_logits, _ = model.apply({'params': params}, images, masks)
  np.testing.assert_array_equal(eval_logits, plain.apply({'params': params}, images, masks)[0])
  run = lambda k: model.apply({'params': params}, images, masks, train=True, rngs={'dropout': jax.random.key(k)})
  (a, stats_a), (b, _), (c, _) = run(7), run(7), run(8)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # The statistics are of the masked activations (before dropout): the same as in eval mode.
  np.testing.assert_array_equal(stats_a[0].abs_mean, plain.apply({'params': params}, images, masks)[1][0].abs_mean)
  # Inverted dropout: the first hidden layer's output, as the second layer reads it.
  h = jax.nn.relu(images.reshape(64, -1).astype(jnp.float32) / 255 @ params['Dense_0']['kernel']
                  + params['Dense_0']['bias'])
  dropped = model.apply({'params': params}, images, masks, train=True, rngs={'dropout': jax.random.key(3)},
                        capture_intermediates=lambda mdl, _: mdl.name == 'Dropout_0', mutable=['intermediates'])
  out = np.asarray(dropped[1]['intermediates']['Dropout_0']['__call__'][0])
  live = np.asarray(h) > 0
  zero_frac = (out[live] == 0).mean()
  assert abs(zero_frac - rate) < 0.01, zero_frac
  np.testing.assert_allclose(out[live & (out != 0)], np.asarray(h)[live & (out != 0)] / (1 - rate), rtol=1e-5)


def test_training_with_dropout_is_reproducible_and_differs_from_none():
  ds = load_dataset('digits')
  data = DeviceData.from_dataset(ds)
  cfg = TrainConfig(max_epochs=3, batch_size=64, patience=10)
  runs = {}
  for rate in (0.0, 0.5):
    model = models.create_model('fc', (32, 32), 10, dropout=rate)
    theta = models.init_params(model, jax.random.key(0), ds.image_shape)
    trainer = Trainer(model, cfg)
    start = trainer.init_fit(theta, models.full_masks(model), jax.random.key(1))
    whole = fit(trainer.epoch_step, start, data)
    stepwise = start
    for _ in range(3):  # epoch by epoch from the state alone: what a resumed run does
      stepwise = trainer.epoch_step(stepwise, data)
    jax.tree.map(np.testing.assert_array_equal, whole.params, stepwise.params)
    runs[rate] = whole
  assert float(runs[0.0].train_loss) != float(runs[0.5].train_loss)


def test_torch_initializer_draws_like_torch_layers():
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  model = models.create_model('conv', (64, 48), 10, initializer='torch')
  params = models.init_params(model, jax.random.key(0), (12, 12, 3))
  theirs = {'Conv_0': torch.nn.Conv2d(3, 64, 3), 'Conv_1': torch.nn.Conv2d(64, 48, 3),
            'Dense_0': torch.nn.Linear(3 * 3 * 48, 10)}
  for name, layer in theirs.items():
    for ours, torch_param in ((params[name]['kernel'], layer.weight), (params[name]['bias'], layer.bias)):
      ours, ref = np.asarray(ours).ravel(), torch_param.detach().numpy().ravel()
      bound = 1 / np.sqrt(np.prod(params[name]['kernel'].shape[:-1]))
      assert np.abs(ours).max() <= bound
      if ours.size >= 500:  # enough draws for the distribution to be compared
        assert scipy_stats.ks_2samp(ours, ref).pvalue > 1e-3, name
        assert np.abs(ours).max() > 0.98 * bound
  glorot = models.init_params(models.create_model('conv', (64, 48), 10), jax.random.key(0), (12, 12, 3))
  assert not np.allclose(glorot['Conv_0']['kernel'], params['Conv_0']['kernel'])
  assert np.all(np.asarray(glorot['Conv_0']['bias']) == 0)  # Keras': zero biases


def test_bad_options_are_refused_with_the_setting_named():
  with pytest.raises(ValueError, match='dropout'):
    models.create_model('fc', None, 10, dropout=1.0)
  with pytest.raises(ValueError, match='initializer'):
    models.create_model('fc', None, 10, initializer='he')
  with pytest.raises(ValueError, match='no classifier head'):
    models.create_model('fc', None, 10, head=(8,))
  with pytest.raises(ValueError, match='head widths'):
    models.create_model('modelc', None, 10, head=(0,))


@pytest.mark.parametrize('multiplier', [0, -1.0, float('nan'), float('inf')])
def test_a_non_positive_width_multiplier_is_refused_even_with_widths_given(multiplier):
  # With --widths the multiplier is unused; a bad one given is still a mistake, not silently ignored.
  for widths in ((8, 8), None):
    with pytest.raises(ValueError, match='^--width_multiplier must be a positive number'):
      models.create_model('fc', widths, 10, multiplier)
  with pytest.raises(ValueError, match='^model: --width_multiplier must be a positive number'):
    ModelConfig(widths=(8, 8), width_multiplier=multiplier).validate()
  assert models.create_model('fc', (8, 8), 10, 0.5).widths == (8, 8)  # a positive one leaves given widths alone


def test_specs_carry_the_options_and_old_specs_still_load():
  model = models.create_model('modelc', (4, 4, 8, 8), 7, head=(16, 8), dropout=0.25, initializer='torch',
                              input_norm=((0.5, 0.4, 0.3), (0.2, 0.2, 0.2)))
  spec = json.loads(json.dumps(spec_of(model)))
  assert model_from_spec(spec) == model
  old = {'model': 'modelc', 'widths': [4, 4, 8, 8], 'num_classes': 7, 'hidden': 32}
  assert model_from_spec(old).head == (32,)
  assert model_from_spec({'model': 'fc', 'widths': [5], 'num_classes': 3}) == models.MLP(widths=(5,), num_classes=3)
