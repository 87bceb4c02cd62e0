r"""Unstructured magnitude pruning: one-shot, iterative fine-tuning and lottery tickets, side by side.

  python -m experiments.magnitude --model=fc --widths=300,100 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --methods=oneshot,iterative,lottery,lottery_reinit \
      --sparsities=0.5,0.75,0.9 --seeds=3 --out=runs/magnitude

Every method runs in the one DropNet loop at weight granularity
(`dropnet_jax.loop.magnitude`), all methods x targets x seeds as lanes of one
group, resumable (rerun the same command). Writes config.json,
results.jsonl/.csv (one record per trial and cycle: sparsity of the prunable
weights and of all params, per-layer sparsity, accuracies), table.md (method
x target sparsity -> test-accuracy drop against the dense network) and
test_accuracy_vs_weights.png (test accuracy vs fraction of weights remaining,
one line per method; with --dropnet_run, DropNet's node pruning placed by the
weights of its compact networks).
"""

import dataclasses
import os
import sys

from absl import app, flags

from dropnet_jax.loop import magnitude

from dropnet_jax.runs import reporting
from dropnet_jax.config import to_dict
from dropnet_jax.training.trainer import Trainer, steps_per_epoch
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_list('methods', 'oneshot,iterative,lottery,lottery_reinit',
                  'Methods: oneshot, iterative (fine-tuning rounds), lottery (θ0 rewind), lottery_reinit (its control).')
flags.DEFINE_enum('criterion', 'global_l1', ['global_l1', 'layer_l1', 'global_random', 'layer_random'],
                  'Which weights go: smallest |w| over all layers (torch global_unstructured L1) or per layer, or random.')
flags.DEFINE_list('sparsities', '0.5,0.75,0.9', 'Target sparsities of the prunable weights.')
flags.DEFINE_float('prune_fraction', 0.2, 'lottery: fraction of the remaining weights pruned per round.')
flags.DEFINE_float('iterative_fraction', 0.11, 'iterative: fraction of the remaining weights pruned per round.')
flags.DEFINE_integer('finetune_epochs', 20, 'oneshot: epochs of fine-tuning after the prune.')
flags.DEFINE_integer('round_epochs', 5, 'iterative: epochs of fine-tuning per round.')
flags.DEFINE_integer('final_epochs', 100, 'iterative: epochs of training once the target is reached.')
flags.DEFINE_bool('prune_biases', False, 'Biases are prunable too (default: Dense and Conv kernels only).')
flags.DEFINE_string('dropnet_run', None, 'A DropNet run directory whose min/min_layer records join the figure.')
FLAGS.set_default('metrics', ['min'])  # unused here; the shared flag set validates it


def build() -> tuple[common.Setup, magnitude.MagnitudeConfig]:
  setup = common.setup_from_flags()
  config = magnitude.MagnitudeConfig(
      methods=tuple(FLAGS.methods), criterion=FLAGS.criterion,
      sparsities=tuple(float(s) for s in FLAGS.sparsities), prune_fraction=FLAGS.prune_fraction,
      iterative_fraction=FLAGS.iterative_fraction, finetune_epochs=FLAGS.finetune_epochs,
      round_epochs=FLAGS.round_epochs, final_epochs=FLAGS.final_epochs, biases=FLAGS.prune_biases,
      train=setup.config.train)
  config.validate()
  if FLAGS.dropnet_run and not os.path.isfile(os.path.join(FLAGS.dropnet_run, 'results.jsonl')):
    raise ValueError(f'--dropnet_run: no results.jsonl in {FLAGS.dropnet_run}')
  settings = {k: v for k, v in setup.settings.items()
              if k not in ('metrics', 'fraction', 'floor', 'kappa', 'score_from', 'score_params', 'batch_trials',
                           'param_budget', 'mac_budget')}
  settings['magnitude'] = {k: v for k, v in to_dict(config).items() if k != 'train'}
  return dataclasses.replace(setup, settings=settings), config


def main(argv):
  del argv
  try:
    setup, config = build()
    common.check_out_dir(FLAGS.out, setup.settings)
    trainer = Trainer(setup.model, config.train, weight_masks=True,
                      steps_per_epoch=steps_per_epoch(len(setup.dataset.train_labels), config.train.batch_size))
  except ValueError as e:
    sys.exit(f'error: {e}')
  out = FLAGS.out
  with common.open_run(out, setup.settings) as checkpointer:
    records = magnitude.run(setup.model, setup.dataset.image_shape, trainer.replicate(setup.data), setup.seeds,
                            config, trainer, checkpointer, FLAGS.checkpoint_every_epochs,
                            on_record=common.results_writer(out), log=lambda line: print(line, flush=True), stamp=common.stamp(setup.settings))
  table = magnitude.sparsity_table(records, sorted(config.sparsities), config.methods)
  reporting.atomic_write_text(os.path.join(out, 'table.md'), table + '\n')
  dropnet_records = reporting.read_jsonl(os.path.join(FLAGS.dropnet_run, 'results.jsonl')) if FLAGS.dropnet_run else []
  reporting.save_figure(magnitude.figure_records(records, dropnet_records),
                        os.path.join(out, 'test_accuracy_vs_weights.png'), ('test_accuracy',),
                        title=f'weight pruning: {common.default_title(setup)} ({config.criterion})',
                        xlabel='fraction of weights remaining')
  print(table)


def run():
  app.run(main)


if __name__ == '__main__':
  run()
