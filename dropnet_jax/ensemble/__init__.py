"""Ensembles of pruned networks chosen by focal diversity and HQ hierarchical pruning.

A DropNet run leaves many trained networks (DropNet metrics x cycles x seeds). This
package picks a small sub-ensemble of them with the focal-diversity ensemble
pruning of Wu & Liu ("Boosting Deep Ensemble Performance with Hierarchical
Pruning", ICDM 2021; reference code git-disl/EnsembleBench and
git-disl/HQ-Ensemble), working on the members' predictions:

  * `diversity`: Cohen's kappa (CK), binary disagreement (BD), Kohavi-Wolpert
    variance (KW) and generalized diversity (GD), in EnsembleBench's
    orientation (lower = more diverse), from pairwise count statistics;
  * `focal`: every team of sizes 2..S enumerated as index arrays and scored by
    one jitted, vmapped program (focal diversity on each member's validation
    errors, min-max normalised, accuracy-rank weighted);
  * `hq`: hierarchical pruning with beta, the chosen team per size and overall;
  * `voting`: members' probabilities in one batched pass (`predict_proba`),
    plurality and soft voting of every team;
  * `report`: a pool's evaluation, teams.jsonl, the table, the figures;
  * `reference`: a float64 NumPy/itertools implementation of the same
    definitions (tests, benchmark);
  * `pools` and `pipeline`: the pools of a DropNet run's saved networks, and
    the whole evaluation of a run as one library call (`experiments.ensemble`);
  * `levels`: the deck's table of every DropNet metric x pruning level
    (`--levels`), laid out from the same pools and HQ runs.

Naming: a DropNet pruning criterion is a *metric* (the records' 'metric'); CK,
BD, KW and GD are *diversity* measures (`DIVERSITIES`); the pools of one run
are formed by a *group* (`PoolConfig.group`: none, metric or seed).

Deliberate differences from the reference code (documented in each module):
true 1-based rank weights instead of `np.argsort` values; every selection
decision (focal negatives, rank weights, HQ ties, per-size and overall picks,
best single member) uses validation predictions only, test accuracy is
reported after selection; all negatives by default (or a seeded subsample)
instead of 3 x 100 draws with replacement; defined values for degenerate
cases (kappa with p_e = 1, empty sample sets, zero min-max range, N <= L).
"""

from dropnet_jax.ensemble.diversity import DIVERSITIES, PairStats, diversity, pair_stats, team_diversity
from dropnet_jax.ensemble.focal import (TeamScores, enumerate_teams, focal_diversity, negative_weights,
                                        rank_weights, score_teams)
from dropnet_jax.ensemble.hq import HQResult, hq_prune, prune_count
from dropnet_jax.ensemble.report import (VOTES, PoolResult, ensemble_table, evaluate_pool, plot_accuracy_vs_cost,
                                         plot_focal_vs_accuracy, pool_records, write_report)
from dropnet_jax.ensemble.voting import (accuracies_by_size, flax_apply_fn, plurality_vote, predict_proba,
                                         soft_vote, team_accuracies)

__all__ = [
    'DIVERSITIES', 'VOTES', 'PairStats', 'diversity', 'pair_stats', 'team_diversity', 'TeamScores',
    'enumerate_teams', 'focal_diversity', 'negative_weights', 'rank_weights', 'score_teams', 'HQResult',
    'hq_prune', 'prune_count', 'PoolResult', 'ensemble_table', 'evaluate_pool',
    'plot_accuracy_vs_cost', 'plot_focal_vs_accuracy', 'pool_records', 'write_report',
    'accuracies_by_size', 'flax_apply_fn', 'plurality_vote', 'predict_proba', 'soft_vote',
    'team_accuracies',
]
