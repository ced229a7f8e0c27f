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
//
// A second handler, CarriedSteps, runs the carried refit's whole quasi-Newton
// loop for classes with shared parameters (learners.native_carried_steps):
// the same row pass for each step's gradient, with the embedding's products,
// the BFGS update of the inverse Hessian and the next direction around it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

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

typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));

// The first n (<= kLanes) floats of a row as a vector, the rest zero. With AVX
// a masked load (the lanes past n are not read, so no row's end is overrun);
// otherwise lane by lane. Not a memcpy into a zeroed vector, nor lane-by-lane
// inserts where the compiler builds the vector on the stack: both store floats
// that are read back at once as one wider load, which stalls store-to-load
// forwarding (2-4x slower).
inline Lanes LoadFirst(const float* row, int64_t n) {
#if defined(__AVX__)
  static_assert(kLanes == 8, "one AVX register of floats");
  const Ints lanes = {0, 1, 2, 3, 4, 5, 6, 7};
  const Ints mask = lanes < static_cast<int32_t>(n);
  return _mm256_maskload_ps(row, (__m256i)mask);
#else
  Lanes out = {};
  for (int64_t l = 0; l < n; ++l) out[l] = row[l];
  return out;
#endif
}

// The first n (<= kLanes) lanes of v into row[0..n): one store for a whole
// vector, lane by lane otherwise (a masked store is microcoded on some CPUs).
inline void StoreFirst(float* row, int64_t n, Lanes v) {
  if (n == kLanes) {
    std::memcpy(row, &v, sizeof(v));
    return;
  }
  for (int64_t l = 0; l < n; ++l) row[l] = v[l];
}

inline float Sum(Lanes v) {
  const float a = (v[0] + v[1]) + (v[2] + v[3]);
  const float b = (v[4] + v[5]) + (v[6] + v[7]);
  return a + b;
}

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
    for (int j = 0; j < D; ++j) w[i * D + j] = LoadFirst(user_vectors + (i * D + j) * D, D);
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
      const Lanes z = LoadFirst(keys + static_cast<int64_t>(slates[2 * n]) * D, D) -
                      LoadFirst(keys + static_cast<int64_t>(slates[2 * n + 1]) * D, D);
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

// sum_k a_k b_k in kLanes partial sums (n of any length).
inline float Dot(const float* a, const float* b, int64_t n) {
  Lanes total = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    Lanes x, y;
    std::memcpy(&x, a + k, sizeof(x));
    std::memcpy(&y, b + k, sizeof(y));
    total += x * y;
  }
  float rest = 0.0f;
  for (; k < n; ++k) rest += a[k] * b[k];
  return Sum(total) + rest;
}

// The BFGS update of the inverse Hessian P that a step kept and that is still
// to be applied: P' = P - r (s (Py)^T + (Py) s^T) + c s s^T.
struct PendingUpdate {
  float r, c;
  const float* s;
  const float* py;
};

// P'_jk from P_jk (T = float), or kLanes consecutive entries of row j (T =
// Lanes), in the order that keeps P' symmetric bit for bit: the two outer
// products summed before scaling.
template <typename T>
inline T Updated(T v, const PendingUpdate& u, float sj, float pyj, T sk, T pyk) {
  return (v - u.r * (sk * pyj + pyk * sj)) + u.c * (sk * sj);
}

// Rows j0 .. j0 + R - 1 of P brought up to date with the pending update u
// (and written back; kPending false: no update, u unread), and, with
// kProducts, their products with a and b into out_a[j], out_b[j] (without,
// a, b, out_a and out_b are unread).
// R rows at a time so that their 2R sums are independent chains: one row's two
// sums alone wait on the adder's latency (a pass at p = 250: 13 against 18 us,
// microbenchmark, one core).
// Each row's sums are taken in one order whatever R (kLanes partial sums over
// the blocks, then Sum, then the scalar rest), so the products are the same bit
// for bit.
template <int R, bool kPending, bool kProducts>
void UpdateAndMultiplyRows(float* inverse, int64_t p, int64_t j0, const PendingUpdate* u,
                           const float* a, const float* b, float* out_a, float* out_b) {
  float* row[R];
  float sj[R] = {}, pyj[R] = {};
  for (int i = 0; i < R; ++i) {
    row[i] = inverse + (j0 + i) * p;
    if (kPending) {
      sj[i] = u->s[j0 + i];
      pyj[i] = u->py[j0 + i];
    }
  }
  Lanes ta[R] = {}, tb[R] = {};
  int64_t k = 0;
  for (; k + kLanes <= p; k += kLanes) {
    Lanes x = {}, y = {}, sk = {}, pyk = {};
    if (kProducts) {
      std::memcpy(&x, a + k, sizeof(x));
      std::memcpy(&y, b + k, sizeof(y));
    }
    if (kPending) {
      std::memcpy(&sk, u->s + k, sizeof(sk));
      std::memcpy(&pyk, u->py + k, sizeof(pyk));
    }
    for (int i = 0; i < R; ++i) {
      Lanes v;
      std::memcpy(&v, row[i] + k, sizeof(v));
      if (kPending) {
        v = Updated(v, *u, sj[i], pyj[i], sk, pyk);
        std::memcpy(row[i] + k, &v, sizeof(v));
      }
      if (kProducts) {
        ta[i] += v * x;
        tb[i] += v * y;
      }
    }
  }
  float ra[R] = {}, rb[R] = {};
  for (; k < p; ++k) {
    for (int i = 0; i < R; ++i) {
      float v = row[i][k];
      if (kPending) {
        v = Updated(v, *u, sj[i], pyj[i], u->s[k], u->py[k]);
        row[i][k] = v;
      }
      if (kProducts) {
        ra[i] += v * a[k];
        rb[i] += v * b[k];
      }
    }
  }
  if (!kProducts) return;
  for (int i = 0; i < R; ++i) {
    out_a[j0 + i] = Sum(ta[i]) + ra[i];
    out_b[j0 + i] = Sum(tb[i]) + rb[i];
  }
}

// One pass over P's rows, each row first brought up to date with the pending
// update u (kPending), then (kProducts) multiplied with a and b: four rows at
// a time, then the last p % 4 one by one.
template <bool kPending, bool kProducts>
void UpdateAndMultiplyAll(float* inverse, int64_t p, const PendingUpdate* u, const float* a,
                          const float* b, float* out_a, float* out_b) {
  int64_t j = 0;
  for (; j + 4 <= p; j += 4)
    UpdateAndMultiplyRows<4, kPending, kProducts>(inverse, p, j, u, a, b, out_a, out_b);
  for (; j < p; ++j)
    UpdateAndMultiplyRows<1, kPending, kProducts>(inverse, p, j, u, a, b, out_a, out_b);
}

void UpdateAndMultiply(float* inverse, int64_t p, const PendingUpdate* u, const float* a,
                       const float* b, float* out_a, float* out_b) {
  if (u != nullptr) return UpdateAndMultiplyAll<true, true>(inverse, p, u, a, b, out_a, out_b);
  UpdateAndMultiplyAll<false, true>(inverse, p, u, a, b, out_a, out_b);
}

// P brought up to date with the pending update u, without products.
void ApplyUpdate(float* inverse, int64_t p, const PendingUpdate& u) {
  UpdateAndMultiplyAll<true, false>(inverse, p, &u, nullptr, nullptr, nullptr, nullptr);
}

// Row r of out (n_out, q) = scale base_r + sum_s coef[r * out_stride + s * in_stride] in_s
// for in (n_in, q), q = D * D (base null: no base term), with the rows of `in`
// padded to QB vectors once and each output row's QB vectors kept in registers.
// It is both of the embedding's products: see EmbedRows and GatherRows.
template <int D>
void CombineRowsFixed(const float* coef, int64_t out_stride, int64_t in_stride, const float* in,
                      int64_t n_in, const float* base, float scale, int64_t n_out, float* out) {
  constexpr int q = D * D, QB = (q + kLanes - 1) / kLanes;
  auto load = [](const float* row, int b) {
    return LoadFirst(row + b * kLanes, std::min(kLanes, q - b * kLanes));
  };
  std::vector<Lanes> padded(n_in * QB);
  for (int64_t s = 0; s < n_in; ++s)
    for (int b = 0; b < QB; ++b) padded[s * QB + b] = load(in + s * q, b);
  for (int64_t r = 0; r < n_out; ++r) {
    Lanes acc[QB] = {};
    if (base != nullptr)
      for (int b = 0; b < QB; ++b) acc[b] = scale * load(base + r * q, b);
    for (int64_t s = 0; s < n_in; ++s) {
      const float e = coef[r * out_stride + s * in_stride];
      for (int b = 0; b < QB; ++b) acc[b] += e * padded[s * QB + b];
    }
    for (int b = 0; b < QB; ++b)
      StoreFirst(out + r * q + b * kLanes, std::min(kLanes, q - b * kLanes), acc[b]);
  }
}

// CombineRowsFixed for q = d * d: in registers for d <= kLanes (dispatched on d,
// as UserStatistics is), a float at a time otherwise.
void CombineRows(const float* coef, int64_t out_stride, int64_t in_stride, const float* in,
                 int64_t n_in, const float* base, float scale, int64_t n_out, int d, float* out) {
  switch (d) {
#define JAXBANDIT_COMBINE(D) \
  case D:                    \
    return CombineRowsFixed<D>(coef, out_stride, in_stride, in, n_in, base, scale, n_out, out);
    JAXBANDIT_COMBINE(1) JAXBANDIT_COMBINE(2) JAXBANDIT_COMBINE(3) JAXBANDIT_COMBINE(4)
    JAXBANDIT_COMBINE(5) JAXBANDIT_COMBINE(6) JAXBANDIT_COMBINE(7) JAXBANDIT_COMBINE(8)
#undef JAXBANDIT_COMBINE
  }
  const int64_t q = static_cast<int64_t>(d) * d;
  for (int64_t r = 0; r < n_out; ++r) {
    float* o = out + r * q;
    for (int64_t l = 0; l < q; ++l) o[l] = base != nullptr ? scale * base[r * q + l] : 0.0f;
    for (int64_t s = 0; s < n_in; ++s) {
      const float e = coef[r * out_stride + s * in_stride];
      for (int64_t l = 0; l < q; ++l) o[l] += e * in[s * q + l];
    }
  }
}

// out (U, q) = E theta: row i is sum_j e_ij theta_j (E (U, m), theta (m, q)).
void EmbedRows(const float* emb, const float* theta, int64_t U, int64_t m, int d, float* out) {
  CombineRows(emb, m, 1, theta, m, nullptr, 0.0f, U, d, out);
}

// out (m, q) = E^T G + ridge theta: row j is ridge theta_j + sum_i e_ij G_i (G (U, q)).
void GatherRows(const float* emb, const float* stats, const float* theta, float ridge, int64_t U,
                int64_t m, int d, float* out) {
  CombineRows(emb, 1, m, stats, U, theta, ridge, m, d, out);
}

// The statistics G (U, d * d) of user vectors `uv` over the first `rows` rows, in
// float32: the Bradley-Terry fast path where it applies, the float64 row loop otherwise.
void UserStatistics(const float* uv, const float* cx, const float* ac, const int32_t* rc,
                    const int32_t* ru, const int32_t* sl, const int32_t* oc, const float* wt,
                    int64_t rows, int64_t n_actions, int64_t U, int K, int m, int d,
                    float* out) {
  if (K == 2 && m == 1 && d <= kLanes) {
    switch (d) {
#define JAXBANDIT_PAIRS(D) \
  case D:                  \
    AccumulatePairs<D>(uv, cx, ac, rc, ru, sl, oc, wt, rows, n_actions, U, out); \
    return;
      JAXBANDIT_PAIRS(1) JAXBANDIT_PAIRS(2) JAXBANDIT_PAIRS(3) JAXBANDIT_PAIRS(4)
      JAXBANDIT_PAIRS(5) JAXBANDIT_PAIRS(6) JAXBANDIT_PAIRS(7) JAXBANDIT_PAIRS(8)
#undef JAXBANDIT_PAIRS
    }
  }
  std::vector<double> stats(static_cast<size_t>(U) * d * d, 0.0);
  Accumulate(uv, cx, ac, rc, ru, sl, oc, wt, rows, n_actions, K, m, d, stats.data());
  for (size_t k = 0; k < stats.size(); ++k) out[k] = static_cast<float>(stats[k]);
}

// The data's shapes, checked once for both handlers.
struct RowData {
  int d, K, m;
  int64_t n_actions, capacity;
};

ffi::Error CheckRows(const ffi::Buffer<ffi::F32>& actions, const ffi::Buffer<ffi::S32>& slates,
                     const ffi::Buffer<ffi::S32>& outcomes, int64_t vector_size, const char* name,
                     RowData* out) {
  const auto ad = actions.dimensions();
  const auto sd = slates.dimensions();
  const auto od = outcomes.dimensions();
  if (ad.size() != 3 || sd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument(std::string(name) + ": unexpected ranks");
  }
  out->d = static_cast<int>(ad[2]);
  out->n_actions = ad[1];
  out->K = static_cast<int>(sd[1]);
  out->m = static_cast<int>(od[1]);
  out->capacity = sd[0];
  if (vector_size != static_cast<int64_t>(out->d) * out->d || out->K > kMaxSlate || out->K < 1 ||
      out->m > out->K || out->m < 1) {
    return ffi::Error::InvalidArgument(
        std::string(name) + ": needs user vectors of d * d, 1 <= ranked <= slate size <= 16");
  }
  return ffi::Error::Success();
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
  const auto ud = user_vectors.dimensions();
  if (ud.size() != 2) return ffi::Error::InvalidArgument("user_gradient: unexpected ranks");
  RowData shape;
  ffi::Error error = CheckRows(actions, slates, outcomes, ud[1], "user_gradient", &shape);
  if (error.failure()) return error;
  const int64_t rows = std::clamp<int64_t>(n_rows.typed_data()[0], 0, shape.capacity);
  UserStatistics(user_vectors.typed_data(), contexts.typed_data(), actions.typed_data(),
                 row_contexts.typed_data(), row_users.typed_data(), slates.typed_data(),
                 outcomes.typed_data(), weights.typed_data(), rows, shape.n_actions, ud[0],
                 shape.K, shape.m, shape.d, stats_out->typed_data());
  return ffi::Error::Success();
}

// The carried refit's quasi-Newton steps (learners.carried_quasi_newton) for a
// class with shared parameters Theta (m, q), q = d * d, and outer-product
// features: the loop that XLA would run as a dozen small operations a step,
// here as one call. From the iterate, its penalised gradient, its direction
// -P grad and decrement grad^T P grad / 2, while the iterate is usable, the
// decrement above the threshold and fewer than max_steps steps were taken:
//
//   trial = theta + direction;  W_i = e_i^T trial;  G = UserStatistics(W)
//   g' = E^T G + ridge trial;   s = direction, y = g' - grad
//   P' = P - r (s (Py)^T + (Py) s^T) + (r^2 y^T P y + r) s s^T     (BFGS)
//   with r = 1 / s^T y where the pair carries curvature (as _secant_update
//   decides: -s^T grad / 2 = the decrement > floor, s^T y > 0, y^T P y within 4x of s^T y), else 0;
//   direction' = -P' g' (from P g' and P y, before P is touched);
//   decrement' = g'^T P' g' / 2;
//
// and the step is kept (P updated in place) only if decrement' is finite,
// >= 0 and below the decrement; otherwise the loop stops where it was. P is
// symmetric: its products read columns as rows, and the update's two outer
// products are summed before scaling (no contraction: -ffp-contract=off), so
// P' stays symmetric bit for bit.
ffi::Error CarriedStepsImpl(ffi::Buffer<ffi::F32> embedding,      // (U, m) e_i
                            ffi::Buffer<ffi::F32> contexts,       // (C, d)
                            ffi::Buffer<ffi::F32> actions,        // (C, A, d)
                            ffi::Buffer<ffi::S32> row_contexts,   // (n,)
                            ffi::Buffer<ffi::S32> row_users,      // (n,)
                            ffi::Buffer<ffi::S32> slates,         // (n, K)
                            ffi::Buffer<ffi::S32> outcomes,       // (n, m)
                            ffi::Buffer<ffi::F32> weights,        // (n,)
                            ffi::Buffer<ffi::S32> n_rows,         // ()
                            ffi::Buffer<ffi::F32> settings,       // (3,) ridge, threshold, floor
                            ffi::Buffer<ffi::S32> limits,         // (2,) usable (0/1), max_steps
                            ffi::Buffer<ffi::F32> params_in,      // (m, q)
                            ffi::Buffer<ffi::F32> grad_in,        // (m, q)
                            ffi::Buffer<ffi::F32> direction_in,   // (m, q)
                            ffi::Buffer<ffi::F32> decrement_in,   // ()
                            ffi::Buffer<ffi::F32> inverse_in,     // (m q, m q)
                            ffi::ResultBuffer<ffi::F32> params_out,
                            ffi::ResultBuffer<ffi::F32> grad_out,
                            ffi::ResultBuffer<ffi::F32> decrement_out,
                            ffi::ResultBuffer<ffi::F32> inverse_out,
                            ffi::ResultBuffer<ffi::S32> steps_out) {
  const auto ed = embedding.dimensions();
  const auto pd = params_in.dimensions();
  if (ed.size() != 2 || pd.size() != 2 || pd[0] != ed[1]) {
    return ffi::Error::InvalidArgument("carried_steps: embedding (U, m) and params (m, q) disagree");
  }
  RowData shape;
  ffi::Error error = CheckRows(actions, slates, outcomes, pd[1], "carried_steps", &shape);
  if (error.failure()) return error;
  const int64_t U = ed[0], m = ed[1], q = pd[1], p = m * q;
  const auto id = inverse_in.dimensions();
  if (id.size() != 2 || id[0] != p || id[1] != p) {
    return ffi::Error::InvalidArgument("carried_steps: the inverse must be (m q, m q)");
  }
  const int64_t rows = std::clamp<int64_t>(n_rows.typed_data()[0], 0, shape.capacity);
  const float ridge = settings.typed_data()[0];
  const float threshold = settings.typed_data()[1];
  const float floor = settings.typed_data()[2];
  const bool usable = limits.typed_data()[0] != 0;
  const int max_steps = limits.typed_data()[1];
  const float* emb = embedding.typed_data();
  float* inverse = inverse_out->typed_data();
  if (inverse != inverse_in.typed_data()) std::memcpy(inverse, inverse_in.typed_data(), p * p * sizeof(float));

  std::vector<float> theta(params_in.typed_data(), params_in.typed_data() + p);
  std::vector<float> grad(grad_in.typed_data(), grad_in.typed_data() + p);
  std::vector<float> direction(direction_in.typed_data(), direction_in.typed_data() + p);
  float decrement = decrement_in.typed_data()[0];
  std::vector<float> trial(p), trial_grad(p), y(p), py(p), pg(p), vectors(U * q), stats(U * q);
  // The last kept step's BFGS update, applied to each row of P as the next
  // step's pass reads it (or by a last pass at the end).
  bool pending = false;
  float pending_r = 0.0f, pending_c = 0.0f;
  std::vector<float> pending_s(p), pending_py(p);
  auto pending_update = [&] {
    return PendingUpdate{pending_r, pending_c, pending_s.data(), pending_py.data()};
  };
  auto dot = [p](const float* a, const float* b) { return Dot(a, b, p); };
  int32_t steps = 0;
  bool going = usable;
  while (going && decrement > threshold && steps < max_steps) {
    for (int64_t k = 0; k < p; ++k) trial[k] = theta[k] + direction[k];
    // W = E trial, then the statistics, then g' = E^T G + ridge trial.
    EmbedRows(emb, trial.data(), U, m, shape.d, vectors.data());
    UserStatistics(vectors.data(), contexts.typed_data(), actions.typed_data(),
                   row_contexts.typed_data(), row_users.typed_data(), slates.typed_data(),
                   outcomes.typed_data(), weights.typed_data(), rows, shape.n_actions, U,
                   shape.K, shape.m, shape.d, stats.data());
    GatherRows(emb, stats.data(), trial.data(), ridge, U, m, shape.d, trial_grad.data());
    for (int64_t k = 0; k < p; ++k) y[k] = trial_grad[k] - grad[k];
    // P y and P g' in one pass over P's rows, each row first brought up to
    // date with the previous step's update.
    const PendingUpdate update = pending_update();
    UpdateAndMultiply(inverse, p, pending ? &update : nullptr, y.data(), trial_grad.data(),
                      py.data(), pg.data());
    pending = false;
    const float* s = direction.data();
    const float sy = dot(s, y.data());
    const float ypy = dot(y.data(), py.data());
    // The step's share of the decrement, -s^T grad / 2, is the decrement itself (s = -P grad).
    const bool ok = (decrement > floor) && (sy > 0.0f) && (ypy < 4.0f * sy) && (4.0f * ypy > sy);
    const float r = ok ? 1.0f / sy : 0.0f;
    const float c = r * r * ypy + r;
    const float pyg = dot(py.data(), trial_grad.data());
    const float sg = dot(s, trial_grad.data());
    for (int64_t k = 0; k < p; ++k) {
      // -P' g' = -(P g' - r (s (Py . g') + Py (s . g')) + c s (s . g'))
      pg[k] = -((pg[k] - r * (s[k] * pyg + py[k] * sg)) + c * (s[k] * sg));
    }
    const float trial_decrement = -0.5f * dot(trial_grad.data(), pg.data());
    ++steps;
    going = std::isfinite(trial_decrement) && trial_decrement >= 0.0f && trial_decrement < decrement;
    if (!going) break;
    if (ok) {
      pending = true;
      pending_r = r;
      pending_c = c;
      pending_s.swap(direction);
      pending_py.swap(py);
    }
    theta.swap(trial);
    grad.swap(trial_grad);
    direction.swap(pg);
    decrement = trial_decrement;
  }
  if (pending) ApplyUpdate(inverse, p, pending_update());
  std::memcpy(params_out->typed_data(), theta.data(), p * sizeof(float));
  std::memcpy(grad_out->typed_data(), grad.data(), p * sizeof(float));
  decrement_out->typed_data()[0] = decrement;
  steps_out->typed_data()[0] = steps;
  return ffi::Error::Success();
}

}  // namespace

// The row inputs both handlers take after their first argument, in the order
// CheckRows and UserStatistics read them (learners._native_row_inputs builds them).
template <typename Binding>
auto RowArgs(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::F32>>()   // contexts (C, d)
      .template Arg<ffi::Buffer<ffi::F32>>()   // actions (C, A, d)
      .template Arg<ffi::Buffer<ffi::S32>>()   // row contexts (n,)
      .template Arg<ffi::Buffer<ffi::S32>>()   // row users (n,)
      .template Arg<ffi::Buffer<ffi::S32>>()   // slates (n, K)
      .template Arg<ffi::Buffer<ffi::S32>>()   // outcomes (n, m)
      .template Arg<ffi::Buffer<ffi::F32>>()   // weights (n,)
      .template Arg<ffi::Buffer<ffi::S32>>();  // n_rows ()
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbanditUserGradient, UserGradientImpl,
                              RowArgs(ffi::Ffi::Bind()
                                          .Arg<ffi::Buffer<ffi::F32>>())  // user_vectors
                                  .Ret<ffi::Buffer<ffi::F32>>());  // statistics

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbanditCarriedSteps, CarriedStepsImpl,
                              RowArgs(ffi::Ffi::Bind()
                                          .Arg<ffi::Buffer<ffi::F32>>())  // embedding
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ridge, threshold, floor
                                  .Arg<ffi::Buffer<ffi::S32>>()  // usable, max_steps
                                  .Arg<ffi::Buffer<ffi::F32>>()  // params
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad
                                  .Arg<ffi::Buffer<ffi::F32>>()  // direction
                                  .Arg<ffi::Buffer<ffi::F32>>()  // decrement
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inverse
                                  .Ret<ffi::Buffer<ffi::F32>>()  // params
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad
                                  .Ret<ffi::Buffer<ffi::F32>>()  // decrement
                                  .Ret<ffi::Buffer<ffi::F32>>()  // inverse
                                  .Ret<ffi::Buffer<ffi::S32>>());  // steps
