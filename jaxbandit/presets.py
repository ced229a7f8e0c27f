"""Named experiment presets (``jaxbandit presets`` lists them)."""

from __future__ import annotations

import dataclasses

from jaxbandit import validation as V
from jaxbandit.experiment import ExperimentConfig

PRESETS = {
    "paper-users": (
        "P1's experiment: U in {10, 50, 100} users, d=5, J=10, 100 contexts x 100 actions, "
        "problem seed 1000 with min-gap acceptance, BT feedback, current+reference slates, "
        "known-heads exact ERM every round",
        ExperimentConfig(name="paper-users", populations=(10, 50, 100), n_contexts=100,
                         n_actions=100, dim=5, latent_dim=10, reward_scale=1.0,
                         problem_seed=1000, min_gap=1e-4, horizon=1000, n_seeds=8,
                         slate_policy="current_reference", choice_model="bradley_terry",
                         model_class="known_heads", beta=1.0, ridge=1.0, chunk_size=250),
    ),
    "smoke": (
        "a seconds-long run of the paper-users protocol on a tiny instance (for trying things)",
        ExperimentConfig(name="smoke", populations=(2, 5), n_contexts=5, n_actions=6, dim=3,
                         latent_dim=4, problem_seed=0, min_gap=0.0, horizon=60, n_seeds=4),
    ),
}


def get_preset(name: str) -> ExperimentConfig:
  V.one_of("preset", name, sorted(PRESETS))
  return PRESETS[name][1]


def with_overrides(config: ExperimentConfig, **overrides) -> ExperimentConfig:
  """Returns a copy with the non-None overrides applied."""
  changes = {k: v for k, v in overrides.items() if v is not None}
  return dataclasses.replace(config, **changes)
