"""The slower digits twins: run only where the real MNIST files are absent, in place of the originals.

Same scheme as digits_end_to_end_test (the original test functions on the
digits-as-MNIST stand-in written there), for the rest of the tests that take
the real MNIST subset: 2 forced host devices against 1, experiments.smoke_train
with --dataset=mnist --data_dir, the oracle study, every crash point of the
resume tests, the batched-lane and scoring checks. Where ../shared holds the
real files the originals run them and this module is skipped, so CI pays for
each check once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import batched_test
import dropnet_test
import parallel_test
import recompile_test
import resume_test
import smoke_train_test
import studies_test
from conftest import MNIST_DIR as REAL_MNIST_DIR
from digits_end_to_end_test import digits_mnist_dir, mnist, mnist_small  # noqa: F401  (the stand-in fixtures)

pytestmark = pytest.mark.skipif(REAL_MNIST_DIR.is_dir(), reason=f'the real-MNIST originals run ({REAL_MNIST_DIR})')


# Two (forced host) devices give the results of one: parallel_test's script on the stand-in's directory.
@pytest.fixture(scope='module')
def two_device_run(digits_mnist_dir):  # noqa: F811
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', parallel_test.SCRIPT, str(digits_mnist_dir)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


test_two_devices_match_one = parallel_test.test_two_devices_match_one
test_batched_trials_on_two_devices = parallel_test.test_batched_trials_on_two_devices
test_batched_dropnet_on_two_devices = parallel_test.test_batched_dropnet_on_two_devices
test_batch_size_not_divisible_by_devices_is_a_clear_error = \
    parallel_test.test_batch_size_not_divisible_by_devices_is_a_clear_error


# The larger models through experiments.smoke_train, reading the stand-in's IDX directory.
def test_smoke_train_writes_finite_before_and_after_figures(digits_mnist_dir, monkeypatch, tmp_path):  # noqa: F811
  monkeypatch.setattr(smoke_train_test, 'MNIST_DIR', digits_mnist_dir)
  smoke_train_test.test_smoke_train_writes_finite_before_and_after_figures(tmp_path)


# The oracle study's command and the oracle in batched lanes.
test_oracle_study_and_resume_with_oracle = studies_test.test_oracle_study_and_resume_with_oracle
test_oracle_runs_batched_with_the_sequential_records = studies_test.test_oracle_runs_batched_with_the_sequential_records

# Every crash point, sequential and batched, and batched trials resumed to the sequential records.
setup = resume_test.setup
batched_reference = resume_test.batched_reference
test_crash_and_resume_gives_identical_records = resume_test.test_crash_and_resume_gives_identical_records
test_batched_trials_crash_and_resume_give_the_sequential_records = \
    resume_test.test_batched_trials_crash_and_resume_give_the_sequential_records

# Batched lanes: frozen done lanes, batch norm, plain params trees, lane chunks.
test_done_lanes_are_frozen_and_live_lanes_match_single_runs = \
    batched_test.test_done_lanes_are_frozen_and_live_lanes_match_single_runs
test_batch_norm_training_matches_reference_and_eval_uses_running_stats = \
    batched_test.test_batch_norm_training_matches_reference_and_eval_uses_running_stats
test_models_without_batch_norm_keep_a_plain_params_tree = batched_test.test_models_without_batch_norm_keep_a_plain_params_tree
test_batched_runs_a_batch_norm_model = batched_test.test_batched_runs_a_batch_norm_model
test_lane_chunks_give_the_same_results = batched_test.test_lane_chunks_give_the_same_results

# Scores over all training samples or from the epoch's sums; compact sizes and budget stops.
test_scores_are_mean_abs_activation_over_all_training_samples = \
    dropnet_test.test_scores_are_mean_abs_activation_over_all_training_samples
test_score_from_epoch_uses_running_sums = dropnet_test.test_score_from_epoch_uses_running_sums
test_records_carry_compact_size_and_budgets_stop_at_the_first_fit = \
    dropnet_test.test_records_carry_compact_size_and_budgets_stop_at_the_first_fit

# New mask values reuse the compiled step.
test_new_mask_values_reuse_the_compiled_step = recompile_test.test_new_mask_values_reuse_the_compiled_step
