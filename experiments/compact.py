r"""Exports one record of a DropNet run as its compact network, and checks the export against the record.

  python -m experiments.compact --run=runs/compact_src --seed=0 --metric=min --cycle=8 --out=exports/min8
  python -m experiments.compact --run=runs/compact_src --best_under_params=8000 --out=exports/p8k --torch

A DropNet record is a masked network: full-size arrays and a 0/1 mask per
layer. Its trained θ is kept beside the run when the run was made with
`--save_params=all` (or, with `last`, only each trial's final cycle). This
entry point picks a record, either by (seed, metric, cycle) or as the record
with the best *validation* accuracy whose compact network fits a parameter or
MAC budget (the test split never selects anything), turns it into the smaller
dense network with the same logits (`dropnet_jax.compaction.compact.compact`) and
writes it with `compact.save`: `spec.json` (architecture, shapes, and the
record's seed/metric/cycle/fraction, accuracies, params and MACs under
`meta`) and an orbax checkpoint. `--torch` also writes the PyTorch twin
(`tests.torch_reference.compact.export`; it needs PyTorch and a source checkout).

The export is then checked from the files alone: `compact.load` rebuilds the
model, and its accuracy on the run's validation and test splits (reloaded
with the run's config.json: dataset, data_dir, split_seed) must equal the
record's, compared as counts of correct predictions
(`dropnet_jax.compaction.export`). The export is written into a temporary
directory and moved into `--out` only when the check passes; the figures go
to `<out>/evaluation.json`. A mismatch prints both figures, leaves no export
in `--out` (only `<out>/mismatch.json`) and exits non-zero.

`--out` is the export's run directory (config.json, the export, evaluation.json);
a rerun with the same settings replaces the export, other settings are refused.
Bad requests (missing run, no such record, params not saved, nothing under
the budget, no torch twin for the model, missing data, an --out that is a file
or another run's directory) end with one `error: ...` line and exit status 1
before anything is loaded or written.
"""

from dropnet_jax.cli import entry
from dropnet_jax.compaction import export

CONFIG = entry.define(export.CompactConfig(), export.KIND,
                      out_help='Directory of the export (config.json, spec.json, the arrays, evaluation.json); a '
                      'rerun with the same settings replaces the export.')


def main(argv):
  del argv  # stray words are refused by entry.run before main
  try:
    request = export.prepare(entry.config(CONFIG), entry.FLAGS.out)
  except ValueError as e:  # includes ExportError, input_pipeline.DataError and RunDir's refusals
    entry.fail(e)
  config = request.config
  print(f'{config.run}: candidates (seed {config.seed}' + (f', metric {config.metric}' if config.metric else '')
        + ')')
  print(export.candidates_table(request.selection))
  text, ok = export.report(export.run(request))
  print(text)
  if not ok:
    entry.fail(f'the export does not reproduce the record (see above); nothing was exported, the figures are in '
               f'{request.run_dir.file(export.MISMATCH)}')


def run() -> None:
  """The `dropnet-compact` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  run()
