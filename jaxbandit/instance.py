"""Personalized bilinear problem instances, minimum-gap acceptance and diversity diagnostics.

An instance is one fixed problem (contexts, candidate responses, latent reward
maps, user heads, weights and a reference policy). Monte Carlo seeds share the
instance and differ only in the learner's random draws.

Scores follow the bilinear personalized structure (PAPER.md section 2)::

    z_j(x, a) = x^T M_j a                       latent reward directions
    R*(x, a, i) = s * sum_j h_ij z_j(x, a)      user i's true score

Array layout of every score tensor: ``(n_contexts, n_users, n_actions)``.

References:
  E. H. Kang, Personalized Alignment Revisited: The Necessity and Sufficiency
  of User Diversity (arXiv 2605.09119), section 2 and Appendix E.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbandit import validation as V
from jaxbandit.precision import full_precision


class Instance(NamedTuple):
  """One personalized bilinear problem instance (a pytree of arrays).

  Attributes:
    contexts: (n_contexts, d) context features x.
    actions: (n_contexts, n_actions, d) candidate-response features a_{x,a}.
    maps: (latent_dim, d, d) latent reward maps M_j.
    heads: (n_users, latent_dim) user heads h_i.
    reward_scale: () multiplies every true score.
    context_weights: (n_contexts,) context law d0, sums to 1.
    user_weights: (n_users,) user law rho, sums to 1; padded users weigh 0.
    reference_policy: (n_contexts, n_actions) pi0(.|x), rows sum to 1; its
      support (entries > 0) is the decision set.
  """

  contexts: jax.Array
  actions: jax.Array
  maps: jax.Array
  heads: jax.Array
  reward_scale: jax.Array
  context_weights: jax.Array
  user_weights: jax.Array
  reference_policy: jax.Array

  @property
  def n_contexts(self) -> int:
    return self.contexts.shape[-2]

  @property
  def n_actions(self) -> int:
    return self.actions.shape[-2]

  @property
  def n_users(self) -> int:
    return self.heads.shape[-2]

  @property
  def latent_dim(self) -> int:
    return self.maps.shape[-3]

  @property
  def dim(self) -> int:
    return self.contexts.shape[-1]


# ---------------------------------------------------------------------------
# Head generators: (key, n_users, latent_dim) -> heads (n_users, latent_dim)
# ---------------------------------------------------------------------------

HeadGenerator = Callable[[jax.Array, int, int], jax.Array]


def gaussian_heads() -> HeadGenerator:
  """Full-rank heads, entries i.i.d. N(0, 1/latent_dim) (diverse by construction)."""

  def generate(key, n_users, latent_dim):
    return jax.random.normal(key, (n_users, latent_dim)) / np.sqrt(latent_dim)

  return generate


def low_rank_heads(rank: int) -> HeadGenerator:
  """Heads confined to a random rank-``rank`` subspace of R^latent_dim.

  ``heads = C @ B`` with ``C`` (n_users, rank) and an orthonormal basis ``B``
  (rank, latent_dim), scaled like :func:`gaussian_heads`; with rank below
  latent_dim the heads cannot span every latent direction, so diversity fails.
  """
  V.positive_int("rank", rank)

  def check(n_users, latent_dim):
    del n_users
    if rank > latent_dim:
      raise ValueError(
          f"rank={rank} is above latent_dim={latent_dim}; allowed: 1 <= rank <= latent_dim")

  def generate(key, n_users, latent_dim):
    check(n_users, latent_dim)
    key_coef, key_basis = jax.random.split(key)
    coef = jax.random.normal(key_coef, (n_users, rank)) / np.sqrt(rank)
    basis, _ = jnp.linalg.qr(jax.random.normal(key_basis, (latent_dim, rank)))
    return coef @ basis.T

  generate.check = check  # host-side size check, run by make_instance before any draw
  return generate


def supplied_heads(heads) -> HeadGenerator:
  """Heads given by the user, shape (n_users, latent_dim); checked for finiteness."""
  heads = V.finite_array("heads", heads, ndim=2)

  def check(n_users, latent_dim):
    if heads.shape != (n_users, latent_dim):
      raise ValueError(
          f"heads has shape {heads.shape}; allowed: (n_users, latent_dim) = ({n_users}, {latent_dim})")

  def generate(key, n_users, latent_dim):
    del key
    check(n_users, latent_dim)
    return jnp.asarray(heads, jnp.float32)

  generate.check = check  # host-side shape check, run by make_instance before any draw
  return generate


# ---------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------


@full_precision
def make_instance(
    key: jax.Array,
    *,
    n_contexts: int,
    n_actions: int,
    dim: int,
    latent_dim: int,
    n_users: int,
    reward_scale: float = 1.0,
    heads: Optional[HeadGenerator] = None,
    context_weights=None,
    user_weights=None,
    reference_policy=None,
) -> Instance:
  """Draws a bilinear personalized instance.

  Contexts and actions are N(0, I_d); map entries N(0, 1/d^2); heads from the
  generator (default :func:`gaussian_heads`), so true scores have standard
  deviation about ``reward_scale``.

  Args:
    key: PRNG key (the problem seed's key).
    n_contexts, n_actions, dim, latent_dim, n_users: positive sizes.
    reward_scale: positive multiplier of every true score.
    heads: head generator; see :func:`gaussian_heads`, :func:`low_rank_heads`,
      :func:`supplied_heads`.
    context_weights: optional (n_contexts,) weights d0 (default uniform).
    user_weights: optional (n_users,) weights rho (default uniform).
    reference_policy: optional (n_contexts, n_actions) or (n_actions,) pi0;
      zeros remove actions from the decision set (default uniform).

  Returns:
    The :class:`Instance`.
  """
  for name, value in (("n_contexts", n_contexts), ("n_actions", n_actions), ("dim", dim),
                      ("latent_dim", latent_dim), ("n_users", n_users)):
    V.positive_int(name, value)
  V.positive_float("reward_scale", reward_scale)
  context_weights = V.probability_vector("context_weights", context_weights, n_contexts)
  user_weights = V.probability_vector("user_weights", user_weights, n_users)
  reference_policy = V.reference_policy("reference_policy", reference_policy, n_contexts,
                                        n_actions)
  heads = heads if heads is not None else gaussian_heads()
  if hasattr(heads, "check"):  # a generator's own size checks, before anything compiles
    heads.check(n_users, latent_dim)
  key_ctx, key_act, key_map, key_head = jax.random.split(key, 4)
  contexts = jax.random.normal(key_ctx, (n_contexts, dim))
  actions = jax.random.normal(key_act, (n_contexts, n_actions, dim))
  maps = jax.random.normal(key_map, (latent_dim, dim, dim)) / dim
  head_array = heads(key_head, n_users, latent_dim)
  return Instance(
      contexts=contexts,
      actions=actions,
      maps=maps,
      heads=jnp.asarray(head_array, jnp.float32),
      reward_scale=jnp.asarray(reward_scale, jnp.float32),
      context_weights=jnp.asarray(context_weights, jnp.float32),
      user_weights=jnp.asarray(user_weights, jnp.float32),
      reference_policy=jnp.asarray(reference_policy, jnp.float32),
  )


def from_arrays(*, contexts, actions, maps, heads, reward_scale=1.0, context_weights=None,
                user_weights=None, reference_policy=None) -> Instance:
  """Builds an instance from user-supplied arrays, validating shapes and values."""
  contexts = V.finite_array("contexts", contexts, ndim=2)
  n_contexts, dim = contexts.shape
  actions = V.finite_array("actions", actions, ndim=3)
  if actions.shape[0] != n_contexts or actions.shape[2] != dim:
    raise ValueError(f"actions has shape {actions.shape}; allowed: (n_contexts, n_actions, d) "
                     f"with n_contexts={n_contexts}, d={dim}")
  n_actions = actions.shape[1]
  maps = V.finite_array("maps", maps, ndim=3)
  if maps.shape[1:] != (dim, dim):
    raise ValueError(f"maps has shape {maps.shape}; allowed: (latent_dim, {dim}, {dim})")
  latent_dim = maps.shape[0]
  heads = V.finite_array("heads", heads, ndim=2)
  if heads.shape[1] != latent_dim:
    raise ValueError(f"heads has shape {heads.shape}; allowed: (n_users, {latent_dim})")
  n_users = heads.shape[0]
  V.positive_float("reward_scale", reward_scale)
  return Instance(
      contexts=jnp.asarray(contexts, jnp.float32),
      actions=jnp.asarray(actions, jnp.float32),
      maps=jnp.asarray(maps, jnp.float32),
      heads=jnp.asarray(heads, jnp.float32),
      reward_scale=jnp.asarray(reward_scale, jnp.float32),
      context_weights=jnp.asarray(
          V.probability_vector("context_weights", context_weights, n_contexts), jnp.float32),
      user_weights=jnp.asarray(
          V.probability_vector("user_weights", user_weights, n_users), jnp.float32),
      reference_policy=jnp.asarray(
          V.reference_policy("reference_policy", reference_policy, n_contexts, n_actions),
          jnp.float32),
  )


# ---------------------------------------------------------------------------
# Scores, gaps, diversity
# ---------------------------------------------------------------------------


@full_precision
def latent_features(instance: Instance) -> jax.Array:
  """z_j(x, a) = x^T M_j a, shape (n_contexts, n_actions, latent_dim)."""
  return jnp.einsum("cp,jpq,caq->caj", instance.contexts, instance.maps, instance.actions)


@full_precision
def true_scores(instance: Instance) -> jax.Array:
  """R*(x, a, i) as an array (n_contexts, n_users, n_actions)."""
  z = latent_features(instance)
  return instance.reward_scale * jnp.einsum("uj,caj->cua", instance.heads, z)


def support_mask(instance: Instance) -> jax.Array:
  """Decision set: (n_contexts, n_actions) booleans, pi0 > 0."""
  return instance.reference_policy > 0


def first_maximiser(masked: jax.Array):
  """Largest value and its lowest index along the last axis: ((...), (...) int32).

  Two max-reductions instead of ``jnp.argmax``: the same first maximiser, but
  XLA's CPU argmax (a variadic reduce) is several times slower than max.
  """
  top = jnp.max(masked, axis=-1)
  index = jnp.arange(masked.shape[-1], dtype=jnp.float32).reshape(
      (1,) * (masked.ndim - 1) + (-1,))
  first = -jnp.max(jnp.where(masked == top[..., None], -index, -jnp.inf), axis=-1)
  return top, first.astype(jnp.int32)


def greedy_actions(scores: jax.Array, support: jax.Array) -> jax.Array:
  """Greedy selector argmax over the support; ties go to the lowest action index.

  Args:
    scores: (..., n_contexts, n_users, n_actions).
    support: (n_contexts, n_actions) booleans.

  Returns:
    (..., n_contexts, n_users) int32 action indices.
  """
  return first_maximiser(jnp.where(support[:, None, :], scores, -jnp.inf))[1]


def cell_weights(instance: Instance) -> jax.Array:
  """(n_contexts, n_users) population weights d0[x] * rho[i]."""
  return instance.context_weights[:, None] * instance.user_weights[None, :]


def gaps(instance: Instance) -> jax.Array:
  """Best minus second-best true score over the support, (n_contexts, n_users).

  A context whose support holds a single action has an infinite gap.
  """
  scores = true_scores(instance)
  masked = jnp.where(support_mask(instance)[:, None, :], scores, -jnp.inf)
  # A -inf column keeps top_k(., 2) defined when n_actions == 1 (gap = inf).
  masked = jnp.pad(masked, ((0, 0), (0, 0), (0, 1)), constant_values=-jnp.inf)
  top2 = jax.lax.top_k(masked, 2)[0]
  return top2[..., 0] - top2[..., 1]


class GapSummary(NamedTuple):
  """Minimum gap and isolation of an instance.

  Attributes:
    min_gap: Delta_min, smallest best-vs-second gap over cells of positive weight.
    min_cell_weight: delta, smallest d0[x] rho[i] over cells of positive weight;
      two different greedy selectors disagree on at least that much mass.
    eps_iso: Delta_min * delta; the temperature-zero regret of any estimate is
      either 0 or at least eps_iso.
  """

  min_gap: float
  min_cell_weight: float
  eps_iso: float


@jax.jit
@full_precision
def _gap_summary(instance):
  weights = cell_weights(instance)
  positive = weights > 0
  min_gap = jnp.min(jnp.where(positive, gaps(instance), jnp.inf))
  min_weight = jnp.min(jnp.where(positive, weights, jnp.inf))
  return min_gap, min_weight


def gap_summary(instance: Instance) -> GapSummary:
  """Computes Delta_min, delta and eps_iso (PAPER.md section 1; P1 Lemma E.1)."""
  min_gap, min_weight = (float(v) for v in _gap_summary(instance))
  return GapSummary(min_gap, min_weight, min_gap * min_weight)


class AcceptedInstance(NamedTuple):
  """Result of :func:`accept_problem_seed`.

  Attributes:
    instance: the accepted instance.
    seed: the accepted problem seed.
    tries: how many seeds were drawn (1 if the first was accepted).
    gap: its :class:`GapSummary`.
  """

  instance: Instance
  seed: int
  tries: int
  gap: GapSummary


def accept_problem_seed(problem_seed: int, *, min_gap: float, max_tries: int = 200,
                        **instance_kwargs) -> AcceptedInstance:
  """Draws instances from ``problem_seed``, ``problem_seed + 1``, ... until Delta_min >= min_gap.

  Args:
    problem_seed: first seed tried; the instance key is ``jax.random.key(seed)``.
    min_gap: required minimum gap (0 accepts the first instance).
    max_tries: bound on the number of seeds tried; an unreachable ``min_gap``
      raises ``ValueError`` after that many.
    **instance_kwargs: forwarded to :func:`make_instance`.

  Returns:
    An :class:`AcceptedInstance`.
  """
  V.non_negative_float("min_gap", min_gap)
  V.positive_int("max_tries", max_tries)
  V.seed("problem_seed", problem_seed, max_tries, "max_tries")
  best = -np.inf
  for tries in range(1, max_tries + 1):
    seed = problem_seed + tries - 1
    instance = make_instance(jax.random.key(seed), **instance_kwargs)
    summary = gap_summary(instance)
    if summary.min_gap >= min_gap:
      return AcceptedInstance(instance, seed, tries, summary)
    best = max(best, summary.min_gap)
  raise ValueError(
      f"min_gap={min_gap} was not reached in max_tries={max_tries} problem seeds starting at "
      f"{problem_seed} (largest minimum gap seen: {best:.3g}); allowed: a min_gap that some "
      f"instance reaches: lower min_gap, raise reward_scale, shrink the instance or raise "
      f"max_tries")


class DiversityDiagnostics(NamedTuple):
  """Diversity of the user heads (PAPER.md section 2).

  Attributes:
    gram_min_eigenvalue: lambda_min(H^T diag(rho) H).
    gram_condition_number: lambda_max / lambda_min of that Gram (inf if singular).
    gram_rank: numerical rank of the Gram.
    relevant_dim: dimension of the decision-relevant latent subspace, spanned
      by z(x, a*) - z(x, a) over near-optimal competitors a.
    relevant_min_eigenvalue: smallest eigenvalue of the Gram restricted to it.
    relevant_condition_number: condition number of that restriction.
  """

  gram_min_eigenvalue: float
  gram_condition_number: float
  gram_rank: int
  relevant_dim: int
  relevant_min_eigenvalue: float
  relevant_condition_number: float

  def to_dict(self):
    return {k: (v if np.isfinite(v) else str(v)) if isinstance(v, float) else v
            for k, v in self._asdict().items()}


def diversity_diagnostics(instance: Instance, *, n_competitors: int = 1,
                          rtol: float = 1e-6) -> DiversityDiagnostics:
  """Eigen-diagnostics of the rho-weighted head Gram matrix, whole and decision-relevant.

  The decision-relevant subspace is spanned by the latent differences
  ``z(x, a*(x, i)) - z(x, a)`` over every cell (x, i) of positive weight and
  its ``n_competitors`` best supported runners-up ``a`` (the responses that
  first overtake the optimum when the estimate moves). The Gram is restricted
  to that subspace by projecting onto an orthonormal basis of it.

  Args:
    instance: the instance.
    n_competitors: runners-up per cell that count as decision-relevant (>= 1).
    rtol: relative singular-value / eigenvalue threshold for ranks.

  Returns:
    :class:`DiversityDiagnostics`.
  """
  V.positive_int("n_competitors", n_competitors)
  heads = np.asarray(instance.heads, np.float64)
  rho = np.asarray(instance.user_weights, np.float64)
  gram = heads.T @ (rho[:, None] * heads)
  eig = np.linalg.eigvalsh(gram)
  top = eig[-1] if eig[-1] > 0 else 1.0
  rank = int(np.sum(eig > rtol * top))
  cond = float(eig[-1] / eig[0]) if eig[0] > rtol * top else float("inf")

  scores = np.asarray(true_scores(instance), np.float64)
  support = np.asarray(support_mask(instance))
  z = np.asarray(latent_features(instance), np.float64)  # (C, A, J)
  positive = np.asarray(cell_weights(instance)) > 0
  masked = np.where(support[:, None, :], scores, -np.inf)
  order = np.argsort(-masked, axis=-1, kind="stable")  # (C, U, A), best first
  n_take = min(n_competitors, instance.n_actions - 1)
  c_idx, u_idx = np.nonzero(positive)
  best = order[c_idx, u_idx, 0]
  diffs = []
  for k in range(1, n_take + 1):
    runner = order[c_idx, u_idx, k]
    ok = support[c_idx, runner]
    diffs.append((z[c_idx, best] - z[c_idx, runner])[ok])
  diffs = np.concatenate(diffs) if diffs else np.zeros((0, instance.latent_dim))
  diffs = diffs[np.linalg.norm(diffs, axis=1) > 0] if diffs.size else diffs
  if diffs.shape[0] == 0:
    return DiversityDiagnostics(float(eig[0]), cond, rank, 0, float("nan"), float("nan"))
  _, sv, vt = np.linalg.svd(diffs, full_matrices=False)
  dim_rel = int(np.sum(sv > rtol * sv[0]))
  basis = vt[:dim_rel]
  eig_r = np.linalg.eigvalsh(basis @ gram @ basis.T)
  top_r = eig_r[-1] if eig_r[-1] > 0 else 1.0
  cond_r = float(eig_r[-1] / eig_r[0]) if eig_r[0] > rtol * top_r else float("inf")
  return DiversityDiagnostics(float(eig[0]), cond, rank, dim_rel, float(eig_r[0]), cond_r)


# ---------------------------------------------------------------------------
# Padding and stacking populations
# ---------------------------------------------------------------------------


def pad_users(instance: Instance, n_users: int) -> Instance:
  """Pads the population to ``n_users`` with zero-weight users (zero heads).

  A padded user is never drawn (weight 0) and counts in no population average,
  so padding changes no result; it lets populations of different sizes share
  one compiled kernel.
  """
  V.positive_int("n_users", n_users)
  extra = n_users - instance.n_users
  if extra < 0:
    raise ValueError(f"n_users={n_users} is below the instance's {instance.n_users} users; "
                     f"allowed: n_users >= {instance.n_users}")
  return instance._replace(
      heads=jnp.pad(instance.heads, ((0, extra), (0, 0))),
      user_weights=jnp.pad(instance.user_weights, (0, extra)),
  )


def stack_instances(instances) -> Instance:
  """Stacks instances (padding users to the largest population) along a new leading axis."""
  instances = list(instances)
  if not instances:
    raise ValueError("instances is empty; allowed: at least one instance")
  n_users = max(inst.n_users for inst in instances)
  padded = [pad_users(inst, n_users) for inst in instances]
  shapes = {jax.tree_util.tree_map(jnp.shape, p) for p in [padded[0]]}
  for p in padded[1:]:
    if jax.tree_util.tree_map(jnp.shape, p) != next(iter(shapes)):
      raise ValueError("instances differ in n_contexts, n_actions, dim or latent_dim; allowed: "
                       "instances that differ only in their number of users")
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *padded)
