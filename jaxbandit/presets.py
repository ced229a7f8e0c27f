"""Named experiment presets (``jaxbandit presets`` lists them)."""

from __future__ import annotations

import dataclasses

from jaxbandit import validation as V
from jaxbandit.experiment import ExperimentConfig

# The small instance three science experiments share (docs/experiments.md): with the
# same problem seed and sizes they accept the same instance.
_SMALL_INSTANCE = dict(populations=(5,), n_contexts=4, n_actions=8, dim=2, latent_dim=4,
                       reward_scale=3.0, problem_seed=1000, min_gap=0.2,
                       choice_model="bradley_terry", model_class="known_heads", beta=1.0,
                       ridge=1.0)

PRESETS = {
    "paper-users": (
        "P1's experiment: U in {10, 50, 100} users, d=5, J=10, 100 contexts x 100 actions, "
        "problem seed 1000 with min-gap acceptance, BT feedback, current+reference slates, "
        "known-heads exact ERM every round; reward scale 30 (beta 30), 2000 rounds",
        # Reward scale 30 (true scores of standard deviation ~30, so Bradley-Terry
        # comparisons are informative about near-ties) with beta scaled alike is
        # what makes P1's plateau visible within a CPU horizon: at scale 1 the
        # per-round regret still falls like t^-0.55 after 3,000 rounds
        # (docs/experiments.md, section 1, has the sensitivity to the scale).
        ExperimentConfig(name="paper-users", populations=(10, 50, 100), n_contexts=100,
                         n_actions=100, dim=5, latent_dim=10, reward_scale=30.0,
                         problem_seed=1000, min_gap=1e-4, horizon=2000, n_seeds=8,
                         slate_policy="current_reference", choice_model="bradley_terry",
                         model_class="known_heads", beta=30.0, ridge=1.0, chunk_size=250),
    ),
    "smoke": (
        "a seconds-long run of the paper-users protocol on a tiny instance (for trying things)",
        ExperimentConfig(name="smoke", populations=(2, 5), n_contexts=5, n_actions=6, dim=3,
                         latent_dim=4, problem_seed=0, min_gap=0.0, horizon=60, n_seeds=4),
    ),
    # The science issue's experiments (docs/experiments.md). Each needs several runs, so
    # `jaxbandit run --preset NAME` hands them to jaxbandit.science.run_named; the config
    # here is the shared base (instance, feedback, horizon, seeds) of those runs. The
    # instances are smaller than paper size so that each finishes in minutes on 2 CPU
    # cores with a horizon long enough for the growth statistics (docs/experiments.md).
    "diversity-rank": (
        "science: heads of rank r in {1,2,5,8,10} (J=10), current+reference and on-policy "
        "top-2 slates, known-heads ERM; growth verdicts and diversity diagnostics per rank",
        ExperimentConfig(name="diversity-rank", populations=(10,), n_contexts=5, n_actions=10,
                         dim=3, latent_dim=10, reward_scale=3.0, problem_seed=1000,
                         min_gap=0.05, horizon=600, n_seeds=12,
                         slate_policy="current_reference", choice_model="bradley_terry",
                         model_class="known_heads", beta=1.0, ridge=1.0),
    ),
    "offline-sample-complexity": (
        "science: P(G(R_hat_n) > 0) and E G(R_hat_n) after n i.i.d. reference slates, "
        "diverse vs rank-deficient heads, exponential decay rate with a bootstrap interval",
        ExperimentConfig(name="offline-sample-complexity", **_SMALL_INSTANCE, horizon=2500,
                         n_seeds=32, slate_policy="reference"),
    ),
    "temperature-zero-vs-kl": (
        "science: cumulative temperature-zero regret vs KL-regularised regret of the "
        "training policy on the same runs, beta in {0.1, 1} (one compile)",
        ExperimentConfig(name="temperature-zero-vs-kl", **_SMALL_INSTANCE, horizon=1500,
                         n_seeds=16, slate_policy="current_reference", record_kl=True),
    ),
    "personalized-vs-pooled": (
        "science: known-heads, per-user bilinear and pooled exact ERM on one instance "
        "(current+reference slates), curves and growth verdicts side by side",
        ExperimentConfig(name="personalized-vs-pooled", **_SMALL_INSTANCE, horizon=1500,
                         n_seeds=16, slate_policy="current_reference"),
    ),
}


def get_preset(name: str) -> ExperimentConfig:
  V.one_of("preset", name, sorted(PRESETS))
  return PRESETS[name][1]


def with_overrides(config: ExperimentConfig, **overrides) -> ExperimentConfig:
  """Returns a copy with the non-None overrides applied."""
  changes = {k: v for k, v in overrides.items() if v is not None}
  return dataclasses.replace(config, **changes)
