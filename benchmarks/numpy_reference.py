"""Plain NumPy/SciPy reference implementation of the ``paper-users`` protocol.

This is the "afternoon baseline": a straightforward Python loop over seeds and
rounds that a researcher would write without the ``jaxbandit`` package. It
shares no code with ``jaxbandit`` and serves two purposes:

* a statistical cross-check of the JAX simulator (same protocol, independent
  random numbers: agreement is in distribution, not bit-for-bit);
* the speed baseline in the benchmarks.

Protocol (see ``docs/conventions-draft.md``):

* Round t = 1..T deploys the estimate M_hat fitted on rounds < t (round 1 uses
  M_hat = 0) and records its temperature-zero population regret
  G(R_hat) = sum_{x,i} d0[x] rho[i] (R*[x,i,a*] - R*[x,i,a_R_hat]),
  the greedy action being the argmax over the support of pi0(.|x), ties to the
  lowest action index.
* Then: draw x ~ d0, i ~ rho; slate item 0 ~ pi(a) ∝ pi0(a|x) exp(R_hat[x,i,a]/beta),
  item 1 ~ pi0(.|x); the user picks item k with Bradley-Terry probability
  softmax(R*[x,i,slate])[k]; the datum is appended and M_hat is refit by exact
  ERM (known heads): argmin sum_n -log P(choice_n) + ridge/2 ||M_hat||_F^2.

Model: R_hat[x,i,a] = sum_j h_ij x^T M_hat_j a = <theta, phi(x,i,a)>, with
theta = vec(M_hat) in R^{J d d} and phi(x,i,a)[j,k,l] = h_ij x_k a_l. For a
Bradley-Terry comparison the log-likelihood depends only on the difference
feature z = phi(chosen) - phi(other): -log P(choice) = log(1 + exp(-theta.z)).
The ERM objective is therefore a ridge-regularised logistic regression, which is
strictly convex; it is minimised with scipy's ``trust-ncg`` (analytic gradient
and Hessian-vector products), warm-started from the previous round's solution.
The solver works on the objective divided by the number of data n (same
minimiser), and ``tol`` bounds the gradient norm of that mean objective.

Run ``python benchmarks/numpy_reference.py --help`` for the CLI.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import optimize, special, stats


# ---------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------

def make_random_instance(seed, n_contexts, n_actions, d, latent_dim, n_users, reward_scale=1.0):
    """Gaussian bilinear instance with uniform context/user weights and uniform pi0.

    contexts, actions ~ N(0, I_d); maps entries ~ N(0, 1/d^2); heads ~ N(0, 1/latent_dim).
    No minimum-gap acceptance is done here.
    """
    rng = np.random.default_rng(seed)
    return {
        "contexts": rng.normal(size=(n_contexts, d)),
        "actions": rng.normal(size=(n_contexts, n_actions, d)),
        "maps": rng.normal(scale=1.0 / d, size=(latent_dim, d, d)),
        "heads": rng.normal(scale=1.0 / np.sqrt(latent_dim), size=(n_users, latent_dim)),
        "reward_scale": np.float64(reward_scale),
        "context_weights": np.full(n_contexts, 1.0 / n_contexts),
        "user_weights": np.full(n_users, 1.0 / n_users),
        "reference_policy": np.full((n_contexts, n_actions), 1.0 / n_actions),
    }


def scores(contexts, actions, maps, heads):
    """R[x, i, a] = sum_j h_ij x^T M_j a_{x,a}, shape (C, U, A). (No reward_scale.)"""
    xM = np.einsum("ck,jkl->cjl", contexts, maps)      # (C, J, d): x^T M_j
    z = xM @ actions.transpose(0, 2, 1)                 # (C, J, A): z_j(x, a) = x^T M_j a
    return heads @ z                                    # (C, U, A), batched over contexts


def greedy_actions(R, support):
    """argmax over the support of pi0(.|x) of R[x, i, :], ties to the lowest index.

    R: (C, U, A); support: (C, A) bool. Returns (C, U) int.
    """
    masked = np.where(support[:, None, :], R, -np.inf)
    return np.argmax(masked, axis=-1)  # np.argmax returns the first maximum


def best_values(R_true, support):
    """max over the support of pi0(.|x) of R*[x, i, :], shape (C, U)."""
    return np.max(np.where(support[:, None, :], R_true, -np.inf), axis=-1)


def population_regret(R_true, best, R_hat, support, weights):
    """G(R_hat) = sum_{x,i} w[x,i] (R*[x,i,a*] - R*[x,i,a_hat]).

    R_true, R_hat: (C, U, A); best = best_values(R_true, support); weights: (C, U).
    """
    a_hat = greedy_actions(R_hat, support)  # argmax of R_hat, ties to the lowest index
    chosen = np.take_along_axis(R_true, a_hat[..., None], axis=-1)[..., 0]
    return float(np.sum(weights * (best - chosen)))


# ---------------------------------------------------------------------------
# ERM: ridge-regularised Bradley-Terry logistic regression
# ---------------------------------------------------------------------------

def difference_features(contexts, actions, heads, X, I, chosen, other):
    """Z[n] = vec(h_i ⊗ x (a_chosen - a_other)^T), shape (n, J*d*d)."""
    h = heads[I]                                       # (n, J)
    x = contexts[X]                                    # (n, d)
    da = actions[X, chosen] - actions[X, other]        # (n, d)
    Z = h[:, :, None, None] * x[:, None, :, None] * da[:, None, None, :]
    return Z.reshape(len(X), -1)


def erm_loss(theta, Z, ridge):
    """Mean ERM objective (1/n) [sum_n log(1 + exp(-theta.z_n)) + ridge/2 ||theta||^2].

    Dividing the summed objective by n does not move the minimiser; it keeps the
    objective O(1), so that the solver's acceptance tests (which compare changes
    of the objective value) stay above floating-point resolution at large n.
    log(1 + exp(-m)) is computed stably as logaddexp(0, -m).
    """
    m = Z @ theta
    return float((np.sum(np.logaddexp(0.0, -m)) + 0.5 * ridge * theta @ theta) / len(Z))


def erm_grad(theta, Z, ridge):
    m = Z @ theta
    return (-Z.T @ special.expit(-m) + ridge * theta) / len(Z)


def erm_hessp(theta, v, Z, ridge):
    """Hessian-vector product of the mean objective: (Z^T diag(s(1-s)) Z + ridge I) v / n."""
    m = Z @ theta
    s = special.expit(m)
    w = s * (1.0 - s)
    return (Z.T @ (w * (Z @ v)) + ridge * v) / len(Z)


def fit_erm(Z, ridge, theta0, tol):
    """Exact ERM by scipy's trust-ncg (Newton-CG in a trust region), warm-started at theta0.

    Converged when the Euclidean norm of the gradient of the mean objective is <= tol.
    Returns (theta, number of trust-region (outer Newton) iterations; 0 when the
    warm start already satisfies the tolerance).
    """
    res = optimize.minimize(
        erm_loss, theta0, args=(Z, ridge), method="trust-ncg",
        jac=erm_grad, hessp=erm_hessp, options={"gtol": tol},
    )
    # (trust-ncg with Hessian-vector products was measured faster than trust-exact,
    # trust-krylov and full-Hessian variants at the paper size, J d^2 = 250 parameters.)
    if not res.success:
        # The objective is strictly convex; failure here means a numerical problem.
        grad_norm = np.linalg.norm(erm_grad(res.x, Z, ridge))
        raise RuntimeError(f"ERM did not converge (n={len(Z)}, |grad|={grad_norm:.3g}): {res.message}")
    return res.x, int(res.nit)


# ---------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------

def run_reference(instance: dict, n_seeds: int, horizon: int, beta: float = 1.0, ridge: float = 1.0,
                  seed: int = 0, tol: float = 1e-6) -> dict:
    """Run the paper-users protocol with the known-heads exact-ERM learner.

    Returns per_round_regret, cumulative_regret, erm_iterations (all (n_seeds, horizon))
    and the wall-clock seconds of the whole run. Seed s uses np.random.default_rng(seed + s).
    """
    contexts = np.asarray(instance["contexts"], dtype=np.float64)
    actions = np.asarray(instance["actions"], dtype=np.float64)
    maps = np.asarray(instance["maps"], dtype=np.float64)
    heads = np.asarray(instance["heads"], dtype=np.float64)
    scale = float(instance["reward_scale"])
    d0 = np.asarray(instance["context_weights"], dtype=np.float64)
    rho = np.asarray(instance["user_weights"], dtype=np.float64)
    pi0 = np.asarray(instance["reference_policy"], dtype=np.float64)

    n_contexts, n_actions, d = actions.shape
    latent_dim = maps.shape[0]
    support = pi0 > 0
    d0 = d0 / d0.sum()
    rho = rho / rho.sum()
    pi0_rows = pi0 / pi0.sum(axis=1, keepdims=True)
    log_pi0 = np.where(support, np.log(np.where(support, pi0, 1.0)), -np.inf)

    R_true = scale * scores(contexts, actions, maps, heads)          # (C, U, A)

    # Only (context, user) pairs with positive weight count in G; zero-weight
    # (e.g. padded) users and contexts are dropped from the evaluation.
    ctx_eval = np.flatnonzero(d0 > 0)
    usr_eval = np.flatnonzero(rho > 0)
    eval_contexts, eval_actions, eval_heads = contexts[ctx_eval], actions[ctx_eval], heads[usr_eval]
    eval_weights = np.outer(d0[ctx_eval], rho[usr_eval])
    eval_support = support[ctx_eval]
    R_true_eval = R_true[np.ix_(ctx_eval, usr_eval)]
    best_eval = best_values(R_true_eval, eval_support)

    per_round = np.zeros((n_seeds, horizon))
    iterations = np.zeros((n_seeds, horizon), dtype=np.int64)

    start = time.perf_counter()
    for s in range(n_seeds):
        rng = np.random.default_rng(seed + s)
        theta = np.zeros(latent_dim * d * d)
        X = np.zeros(horizon, dtype=np.int64)
        I = np.zeros(horizon, dtype=np.int64)
        chosen = np.zeros(horizon, dtype=np.int64)
        other = np.zeros(horizon, dtype=np.int64)

        for t in range(horizon):
            # 1. Evaluate the currently deployed estimate (fitted on rounds < t).
            M_hat = theta.reshape(latent_dim, d, d)
            R_hat_eval = scores(eval_contexts, eval_actions, M_hat, eval_heads)
            per_round[s, t] = population_regret(R_true_eval, best_eval, R_hat_eval, eval_support, eval_weights)

            # 2. Draw context and user.
            x = rng.choice(n_contexts, p=d0)
            i = rng.choice(len(rho), p=rho)

            # 3. Slate: item 0 from the softened policy, item 1 from pi0.
            r_hat = scores(contexts[x:x + 1], actions[x:x + 1], M_hat, heads[i:i + 1])[0, 0]  # (A,)
            logits = log_pi0[x] + r_hat / beta
            p_soft = np.exp(logits - np.max(logits))
            p_soft /= p_soft.sum()
            a0 = rng.choice(n_actions, p=p_soft)
            a1 = rng.choice(n_actions, p=pi0_rows[x])

            # 4. Bradley-Terry choice on the true scores.
            p_first = special.expit(R_true[x, i, a0] - R_true[x, i, a1])
            if rng.random() < p_first:
                X[t], I[t], chosen[t], other[t] = x, i, a0, a1
            else:
                X[t], I[t], chosen[t], other[t] = x, i, a1, a0

            # 5. Refit the exact ERM on all data so far, warm-started.
            n = t + 1
            Z = difference_features(contexts, actions, heads, X[:n], I[:n], chosen[:n], other[:n])
            theta, iterations[s, t] = fit_erm(Z, ridge, theta, tol)

    seconds = time.perf_counter() - start
    return {
        "per_round_regret": per_round,
        "cumulative_regret": np.cumsum(per_round, axis=1),
        "erm_iterations": iterations,
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="NumPy reference run of the paper-users protocol.")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--horizon", type=int, default=300)
    p.add_argument("--n-users", type=int, default=10)
    p.add_argument("--n-contexts", type=int, default=100)
    p.add_argument("--n-actions", type=int, default=100)
    p.add_argument("--d", type=int, default=5)
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--reward-scale", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument("--instance-seed", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-6)
    args = p.parse_args(argv)

    instance = make_random_instance(args.instance_seed, args.n_contexts, args.n_actions, args.d,
                                    args.latent_dim, args.n_users, args.reward_scale)
    cpu_start = time.process_time()
    out = run_reference(instance, args.seeds, args.horizon, beta=args.beta, ridge=args.ridge,
                        seed=args.seed, tol=args.tol)
    cpu_seconds = time.process_time() - cpu_start

    final = out["cumulative_regret"][:, -1]
    mean = final.mean()
    if args.seeds > 1:
        half = stats.t.ppf(0.975, args.seeds - 1) * final.std(ddof=1) / np.sqrt(args.seeds)
        band = f"+/- {half:.4f} (95% t-interval, {args.seeds} seeds)"
    else:
        band = "(1 seed, no interval)"
    pr = out["per_round_regret"].mean(axis=0)
    print(f"cumulative regret at T={args.horizon}: {mean:.4f} {band}")
    print(f"mean per-round regret: first {pr[0]:.4f}, last {pr[-1]:.4f}")
    print(f"mean ERM iterations per round: {out['erm_iterations'].mean():.2f}")
    print(f"{args.seeds * args.horizon / out['seconds']:.1f} seed-rounds/s "
          f"({out['seconds']:.2f} s wall, {cpu_seconds:.2f} s CPU of this process)")


if __name__ == "__main__":
    main()
