r"""Rebuilds saved networks from their files and scores them again: accuracy, loss, size, sparsity, MACs.

  python -m experiments.evaluate --networks='runs/mag:seed0/dense,runs/mag:seed0/oneshot s=0.9'
  python -m experiments.evaluate --networks='runs/a:*,exports/min8' --out=runs/a_eval
  python -m experiments.evaluate --networks=runs/tuned:seed0/dense --data_dir=/data/cifar10 --format=json

The magnitude report's `test.py`, for every method. `--networks` names records of runs that saved
their params (`--save_params`): `RUN:seed<S>/dense`, `RUN:seed<S>/<metric>/cycle<C>`,
`RUN:seed<S>/<metric>` (the trial's newest saved cycle), `RUN` alone (seed 0's dense network) or
`RUN:*` (every saved record); DropNet runs, magnitude runs and the tuner's retrained best are all
such runs. A compact export directory (`experiments.compact --out`) is named by its path.

Each network is rebuilt (its spec, θ and masks), scored on the train, validation and test splits of
the data its run used (dataset, split and training subset from the run's config.json; `--data_dir`
when the files have moved, checked against the run's data fingerprint) with the run's evaluation
batch size, and counted: params as stored, effective params and MACs (the network the unit masks
leave), non-zero params, the sparsity of the prunable weights and of all params. A record's
accuracies and losses must come out as the run recorded them (correct counts exactly, losses to 1e-5),
a weight-pruned record's zeros must be its pruned weights, an export must match its own check: the
`reproduced` column says so, and any network that does not makes the command exit 1 after the
report, with what differs.

One table for all the networks (rich on a terminal, markdown otherwise; `--format=json` prints the
JSON instead). `--json=FILE` writes the JSON; `--out` is a run directory that gets config.json,
evaluation.json and evaluation.md (rerunning the same command replaces them). Bad requests (a
missing directory, a malformed selector, a record whose params were not saved, data that are not
the run's) end with one `error: ...` line naming the setting, exit 1, and nothing written.
"""

import sys

from dropnet_jax.cli import entry
from dropnet_jax.runs import evaluate, evaluate_report

CONFIG = entry.define(evaluate.EvaluateConfig(), evaluate.KIND, out_required=False,
                      out_help='Optional run directory for the report (config.json, evaluation.json, evaluation.md).')


def main(argv):
  del argv  # stray words are refused by entry.run before main
  config = entry.config(CONFIG)
  try:
    request = evaluate.prepare(config, entry.FLAGS.out)
  except ValueError as e:  # includes input_pipeline.DataError and RunDir's refusals
    entry.fail(e)
  rows = evaluate.run(request, log=lambda line: print(line, file=sys.stderr, flush=True))
  if config.print_format == 'json':
    print(evaluate_report.to_json(rows))
  elif config.print_format == 'auto' and sys.stdout.isatty():
    evaluate_report.print_rich(rows)
  else:
    print(evaluate_report.markdown(rows))
  failed = [row['network'] for row in rows if not row['reproduced']]
  if failed:
    entry.fail(f'{len(failed)} network(s) do not reproduce their reference: {", ".join(failed)}')


def run() -> None:
  """The `dropnet-evaluate` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  run()
