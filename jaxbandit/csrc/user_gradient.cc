// The exact ERM's gradient pass as a native CPU kernel (erm_gradient='native').
//
// For outer-product features f(x, a) = x (outer) a and the Plackett-Luce
// family (Bradley-Terry, multinomial logit, top-m and full rankings), the
// per-user gradient statistics of -log P over the first n_rows rows:
//
//   G_i = sum over rows n of user i: weight_n x_n (outer) D_n,
//   D_n = sum_k grad_k a_k,   grad = d(-log P(outcome_n)) / d(utilities),
//   utilities u_k = <g, a_k>, g = W_i^T x_n   (W_i = user_vectors[i] as d x d),
//
// which is what jaxbandit/learners.py's per-user and cell-table gradients
// compute with XLA operations (the caller adds the embedding and the ridge).
// Each row costs O(d^2 + K d) arithmetic and nothing is done per cell, so the
// pass has almost no fixed cost. Bradley-Terry slates of 2 with d <= 8 take
// a float32 vector path (AccumulatePairs); anything else a float64 row loop
// (Accumulate). jaxbandit/learners.py (native_user_gradient) calls it; built
// on first use by jaxbandit/native.py with the certified regret pass.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxSlate = 16;
constexpr int kBlock = 32;

// -log P's gradient in the utilities for one Plackett-Luce outcome: for each
// ranked stage s, softmax over the positions not yet ranked, minus the chosen one.
inline void ChoiceGradient(const double* u, const int32_t* outcome, int K, int m, double* grad) {
  bool ranked[kMaxSlate] = {};
  for (int k = 0; k < K; ++k) grad[k] = 0.0;
  for (int s = 0; s < m; ++s) {
    double top = -INFINITY;
    for (int k = 0; k < K; ++k)
      if (!ranked[k]) top = std::max(top, u[k]);
    double e[kMaxSlate];
    double total = 0.0;
    for (int k = 0; k < K; ++k) {
      e[k] = ranked[k] ? 0.0 : std::exp(u[k] - top);
      total += e[k];
    }
    const double inv = 1.0 / total;
    for (int k = 0; k < K; ++k) grad[k] += e[k] * inv;
    grad[outcome[s]] -= 1.0;
    ranked[outcome[s]] = true;
  }
}

// D (length d) for one row: the utilities from the query, then the gradient.
inline void RowDirection(const float* x, const float* w, const float* keys, const int32_t* slate,
                         const int32_t* outcome, int K, int m, int d, double* g, double* out) {
  for (int l = 0; l < d; ++l) g[l] = 0.0;
  for (int j = 0; j < d; ++j) {
    const double xj = x[j];
    for (int l = 0; l < d; ++l) g[l] += xj * w[j * d + l];
  }
  double u[kMaxSlate];
  for (int k = 0; k < K; ++k) {
    const float* a = keys + static_cast<int64_t>(slate[k]) * d;
    double s = 0.0;
    for (int l = 0; l < d; ++l) s += g[l] * a[l];
    u[k] = s;
  }
  double grad[kMaxSlate];
  ChoiceGradient(u, outcome, K, m, grad);
  for (int l = 0; l < d; ++l) out[l] = 0.0;
  for (int k = 0; k < K; ++k) {
    const float* a = keys + static_cast<int64_t>(slate[k]) * d;
    for (int l = 0; l < d; ++l) out[l] += grad[k] * a[l];
  }
}

// Any slate, ranking and factor count: one row at a time in float64.
void Accumulate(const float* user_vectors, const float* contexts, const float* actions,
                const int32_t* row_contexts, const int32_t* row_users, const int32_t* slates,
                const int32_t* outcomes, const float* weights, int64_t n_rows, int64_t n_actions,
                int K, int m, int d, double* stats) {
  const int q = d * d;
  std::vector<double> direction(static_cast<size_t>(kBlock) * d), query(d);
  double weight[kBlock];
  int64_t user[kBlock], context[kBlock];
  for (int64_t start = 0; start < n_rows; start += kBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kBlock, n_rows - start));
    int live = 0;
    for (int r = 0; r < rows; ++r) {
      const int64_t n = start + r;
      if (weights[n] == 0.0f) continue;
      const int64_t c = row_contexts[n];
      const int64_t i = row_users[n];
      RowDirection(contexts + c * d, user_vectors + i * q, actions + c * n_actions * d,
                   slates + n * K, outcomes + n * m, K, m, d, query.data(),
                   direction.data() + live * d);
      weight[live] = weights[n];
      user[live] = i;
      context[live] = c;
      ++live;
    }
    for (int r = 0; r < live; ++r) {
      const float* x = contexts + context[r] * d;
      double* g = stats + user[r] * q;
      for (int j = 0; j < d; ++j) {
        const double scale = weight[r] * x[j];
        for (int l = 0; l < d; ++l) g[j * d + l] += scale * direction[r * d + l];
      }
    }
  }
}

// kLanes floats as one value (GCC/Clang vector extensions; AVX registers with -march=native).
constexpr int kLanes = 8;
typedef float Lanes __attribute__((vector_size(4 * kLanes)));

// D floats into the first lanes of a vector, the rest zero.
// Lane by lane, not by memcpy into a zeroed vector: that compiles to stores
// read back as one wider load, which stalls store-to-load forwarding (2x slower).
template <int D>
inline Lanes LoadRow(const float* row) {
  Lanes out = {};
  for (int l = 0; l < D; ++l) out[l] = row[l];
  return out;
}

inline float Sum(Lanes v) {
  const float a = (v[0] + v[1]) + (v[2] + v[3]);
  const float b = (v[4] + v[5]) + (v[6] + v[7]);
  return a + b;
}

typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));

// exp(x) for kLanes floats: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6
// polynomial for exp(r) (at most 8e-8 relative error, measured), times 2^n in the
// exponent bits; x clamped to [-87, 88] (no overflow to inf, exp(-87) ~ 1.6e-38).
inline Lanes Exp(Lanes x) {
  const Lanes hi = 88.0f - Lanes{}, lo = -87.0f - Lanes{};
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const Lanes t = x * 1.44269504088896341f + 0.5f;
  Ints n = __builtin_convertvector(t, Ints);
  Lanes nf = __builtin_convertvector(n, Lanes);
  const Ints above = nf > t;  // truncation rounded a negative t up: take floor
  n = n + above;  // above is -1 where true
  nf = __builtin_convertvector(n, Lanes);
  const Lanes r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  Lanes p = 1.9875691500e-4f + Lanes{};
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const Ints bits = (n + 127) << 23;
  Lanes scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The Bradley-Terry fast path (slates of 2, one choice) for D <= 8 factors,
// in float32 vectors of kLanes. Per row: g = W_i^T x as D vector
// multiply-adds over the zero-padded rows of W_i, the utility gap
// u_0 - u_1 = <g, a_0 - a_1>; then grad_0 = -grad_1 = p_0 - [o = 0] with
// p_0 = sigmoid(u_0 - u_1), so D = grad_0 (a_0 - a_1), added as x_j D to row
// j of G_i. A block of rows goes stage by stage (gaps, then their sigmoids
// kLanes at a time, then the statistics), so the rows' chains overlap. Rows
// of weight 0 (unwritten) are computed and add nothing: their indices are 0.
template <int D>
void AccumulatePairs(const float* user_vectors, const float* contexts, const float* actions,
                     const int32_t* row_contexts, const int32_t* row_users, const int32_t* slates,
                     const int32_t* outcomes, const float* weights, int64_t n_rows,
                     int64_t n_actions, int64_t n_users, float* stats_out) {
  std::vector<Lanes> w(static_cast<size_t>(n_users) * D), g_sum(static_cast<size_t>(n_users) * D);
  for (int64_t i = 0; i < n_users; ++i)
    for (int j = 0; j < D; ++j) w[i * D + j] = LoadRow<D>(user_vectors + (i * D + j) * D);
  std::fill(g_sum.begin(), g_sum.end(), Lanes{});
  Lanes gap[kBlock];
  alignas(32) float delta[kBlock], coef[kBlock], chosen[kBlock], weight[kBlock];
  int64_t user[kBlock], context[kBlock];
  for (int64_t start = 0; start < n_rows; start += kBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kBlock, n_rows - start));
    for (int r = 0; r < rows; ++r) {
      const int64_t n = start + r;
      const int64_t c = row_contexts[n], i = row_users[n];
      const float* x = contexts + c * D;
      const Lanes* wi = w.data() + i * D;
      Lanes g = x[0] * wi[0];
      for (int j = 1; j < D; ++j) g += x[j] * wi[j];
      const float* keys = actions + c * n_actions * D;
      const Lanes z = LoadRow<D>(keys + static_cast<int64_t>(slates[2 * n]) * D) -
                      LoadRow<D>(keys + static_cast<int64_t>(slates[2 * n + 1]) * D);
      gap[r] = z;
      delta[r] = Sum(g * z);
      chosen[r] = outcomes[n] == 0 ? 1.0f : 0.0f;
      weight[r] = weights[n];
      user[r] = i;
      context[r] = c;
    }
    for (int r = rows; r < kBlock; ++r) { delta[r] = 0.0f; chosen[r] = 0.0f; weight[r] = 0.0f; }
    for (int b = 0; b < kBlock; b += kLanes) {
      Lanes v, o, wt;
      std::memcpy(&v, delta + b, sizeof(v));
      std::memcpy(&o, chosen + b, sizeof(o));
      std::memcpy(&wt, weight + b, sizeof(wt));
      const Lanes c = wt * (1.0f / (1.0f + Exp(-v)) - o);
      std::memcpy(coef + b, &c, sizeof(c));
    }
    for (int r = 0; r < rows; ++r) {
      if (coef[r] == 0.0f) continue;  // unwritten rows, and exact fits
      const float* x = contexts + context[r] * D;
      Lanes* gi = g_sum.data() + user[r] * D;
      const Lanes step = coef[r] * gap[r];
      for (int j = 0; j < D; ++j) gi[j] += x[j] * step;
    }
  }
  for (int64_t i = 0; i < n_users; ++i)
    for (int j = 0; j < D; ++j)
      for (int l = 0; l < D; ++l) stats_out[(i * D + j) * D + l] = g_sum[i * D + j][l];
}

ffi::Error UserGradientImpl(ffi::Buffer<ffi::F32> user_vectors,  // (U, d * d)
                            ffi::Buffer<ffi::F32> contexts,      // (C, d)
                            ffi::Buffer<ffi::F32> actions,       // (C, A, d)
                            ffi::Buffer<ffi::S32> row_contexts,  // (n,)
                            ffi::Buffer<ffi::S32> row_users,     // (n,)
                            ffi::Buffer<ffi::S32> slates,        // (n, K)
                            ffi::Buffer<ffi::S32> outcomes,      // (n, m)
                            ffi::Buffer<ffi::F32> weights,       // (n,) 0 for unused rows
                            ffi::Buffer<ffi::S32> n_rows,        // () rows to visit
                            ffi::ResultBuffer<ffi::F32> stats_out) {  // (U, d * d)
  const auto ad = actions.dimensions();
  const auto sd = slates.dimensions();
  const auto od = outcomes.dimensions();
  const auto ud = user_vectors.dimensions();
  if (ad.size() != 3 || sd.size() != 2 || od.size() != 2 || ud.size() != 2) {
    return ffi::Error::InvalidArgument("user_gradient: unexpected ranks");
  }
  const int d = static_cast<int>(ad[2]);
  const int64_t n_actions = ad[1];
  const int K = static_cast<int>(sd[1]);
  const int m = static_cast<int>(od[1]);
  const int64_t capacity = sd[0];
  const int64_t U = ud[0];
  if (ud[1] != static_cast<int64_t>(d) * d || K > kMaxSlate || K < 1 || m > K || m < 1) {
    return ffi::Error::InvalidArgument(
        "user_gradient: needs user vectors of d * d, 1 <= ranked <= slate size <= 16");
  }
  const int64_t rows = std::clamp<int64_t>(n_rows.typed_data()[0], 0, capacity);
  const float* uv = user_vectors.typed_data();
  const float* cx = contexts.typed_data();
  const float* ac = actions.typed_data();
  const int32_t* rc = row_contexts.typed_data();
  const int32_t* ru = row_users.typed_data();
  const int32_t* sl = slates.typed_data();
  const int32_t* oc = outcomes.typed_data();
  const float* wt = weights.typed_data();
  float* out = stats_out->typed_data();
  if (K == 2 && m == 1 && d <= kLanes) {
    switch (d) {
#define JAXBANDIT_PAIRS(D) \
  case D:                  \
    AccumulatePairs<D>(uv, cx, ac, rc, ru, sl, oc, wt, rows, n_actions, U, out); \
    return ffi::Error::Success();
      JAXBANDIT_PAIRS(1) JAXBANDIT_PAIRS(2) JAXBANDIT_PAIRS(3) JAXBANDIT_PAIRS(4)
      JAXBANDIT_PAIRS(5) JAXBANDIT_PAIRS(6) JAXBANDIT_PAIRS(7) JAXBANDIT_PAIRS(8)
#undef JAXBANDIT_PAIRS
    }
  }
  std::vector<double> stats(static_cast<size_t>(U) * d * d, 0.0);
  Accumulate(uv, cx, ac, rc, ru, sl, oc, wt, rows, n_actions, K, m, d, stats.data());
  for (size_t k = 0; k < stats.size(); ++k) out[k] = static_cast<float>(stats[k]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbanditUserGradient, UserGradientImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // user_vectors
                                  .Arg<ffi::Buffer<ffi::F32>>()  // contexts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // actions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row contexts
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row users
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slates
                                  .Arg<ffi::Buffer<ffi::S32>>()  // outcomes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::S32>>()  // n_rows
                                  .Ret<ffi::Buffer<ffi::F32>>());  // statistics
