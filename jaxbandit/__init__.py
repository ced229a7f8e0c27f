"""jaxbandit: a JAX-accelerated, vectorized bandit simulator for personalized
preference-based alignment research (greedy exact-ERM learning under user diversity)."""

__version__ = "0.1.0"

from jaxbandit import choice, experiment, instance, learners, metrics, policies, simulate  # noqa: F401
from jaxbandit.choice import bradley_terry, multinomial_logit, plackett_luce  # noqa: F401
from jaxbandit.experiment import ExperimentConfig, run_experiment  # noqa: F401
from jaxbandit.instance import (Instance, accept_problem_seed, diversity_diagnostics,  # noqa: F401
                                make_instance, stack_instances)
from jaxbandit.simulate import SimulationConfig, SimulationParams, simulate as run  # noqa: F401
