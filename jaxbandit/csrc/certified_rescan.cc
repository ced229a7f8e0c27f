// The certified regret pass's native CPU kernel (regret_evaluation='certified').
//
// For one seed and round: which (context, user) cells of positive weight
// have a query that moved as far as their radius from where they were last
// scored (their anchor), and for those cells alone the greedy slot among the
// context's regret-pass actions (the first maximiser of <g, k>), that
// action's true score R*, a new anchor and a new radius: how far the query
// may move before another action could reach the greedy one's score. Every
// other cell keeps its value, anchor and radius. The state is updated in
// place (the outputs alias the inputs). jaxbandit/metrics.py
// (certified_cell_values) calls it; docs/architecture.md describes the pass.
//
// Most cells are not even read: a query g_cu is linear in the user's vector
// w_u with ||g_cu - g'_cu|| <= scale_c ||w_u - w'_u||, so each cell keeps an
// allowance, how far w_u may still drift (summed over calls) before the
// query could reach the radius. A call subtracts each user's drift since the
// last call from its cells' allowances and measures the distance of only the
// cells whose allowance ran out; those still inside their radius get a new
// allowance, the others are re-scored. The cells re-scored are the ones an
// exact test of every cell would find: the bound only skips cells whose
// query is certainly inside.
//
// Scores are summed in factor order, as metrics._sum_of_products does (with
// fused multiply-adds, as XLA:CPU compiles that sum), and the radius is the one metrics._rescore gives a single candidate:
//   min over other slots b of (top - s_b - rounding) / (||k_b - k_a|| (1 + 1e-6)),
//   rounding = 1e-5 (1 + ||g|| max_a ||k_a||).
// Built on first use by jaxbandit/native.py; never compiled into the package.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__FMA__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// kLanes floats as one value (GCC/Clang vector extensions; AVX registers with -march=native).
constexpr int kLanes = 8;
typedef float Lanes __attribute__((vector_size(4 * kLanes)));
typedef int32_t Slots __attribute__((vector_size(4 * kLanes)));
constexpr Slots kIota = {0, 1, 2, 3, 4, 5, 6, 7};
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kBatch = 16;  // due cells scored before their radii are taken

// Block b of a row of floats (one unaligned vector load).
inline Lanes Load(const float* row, int64_t b) {
  Lanes out;
  std::memcpy(&out, row + b * kLanes, sizeof(Lanes));
  return out;
}

// a k + s lane by lane with one rounding (std::fma's): one instruction with FMA.
inline Lanes Fma(float a, Lanes k, Lanes s) {
#if defined(__FMA__)
  static_assert(kLanes == 8, "one AVX register of floats");
  return _mm256_fmadd_ps(_mm256_set1_ps(a), k, s);
#else
  for (int l = 0; l < kLanes; ++l) s[l] = std::fma(a, k[l], s[l]);
  return s;
#endif
}

// Blocks [b0, b0 + B) of one query's scores against a context's slot keys
// (factor j's keys at plane + j * plane_stride): s = g_0 k_0, then
// s = fma(g_j, k_j, s) factor by factor. B blocks at a time, so that their B
// chains of fused multiply-adds overlap: one block's chain alone waits on the
// fma's latency at every factor. Each lane's sum is taken in the same order
// whatever B.
template <int B>
inline void ScoreBlocks(const float* g, int64_t r, const float* plane, int64_t plane_stride,
                        int64_t b0, Lanes* scores) {
  Lanes s[B];
  for (int i = 0; i < B; ++i) s[i] = g[0] * Load(plane, b0 + i);
  for (int64_t j = 1; j < r; ++j) {
    const float* keys = plane + j * plane_stride;
    for (int i = 0; i < B; ++i) {
      const Lanes k = Load(keys, b0 + i);
      s[i] = Fma(g[j], k, s[i]);
    }
  }
  for (int i = 0; i < B; ++i) scores[b0 + i] = s[i];
}

ffi::Error CertifiedRescanImpl(ffi::Buffer<ffi::F32> queries,      // (C, U, r)
                               ffi::Buffer<ffi::F32> user_vectors, // (U, q) w_u, the queries' parameters
                               ffi::Buffer<ffi::F32> query_scale,  // (C,) ||dq_cu|| <= scale_c ||dw_u||
                               ffi::Buffer<ffi::F32> weights,      // (C, U) cell weights
                               ffi::Buffer<ffi::F32> key_planes,   // (r, C, V) slot keys
                               ffi::Buffer<ffi::S32> labels,       // (C, V) slot actions
                               ffi::Buffer<ffi::F32> true_scores,  // (C, U, A) R*
                               ffi::Buffer<ffi::F32> key_norm,     // (C,) max_a ||k_a||
                               ffi::Buffer<ffi::F32> inverse_gap,  // (C, V, V) 1 / (||k_v - k_w|| (1 + 1e-6)), 0 if equal
                               ffi::Buffer<ffi::F32> anchor_in,    // (C, U, r)
                               ffi::Buffer<ffi::F32> radius_in,    // (C, U)
                               ffi::Buffer<ffi::F32> value_in,     // (C, U)
                               ffi::Buffer<ffi::F32> allowance_in, // (C, U)
                               ffi::Buffer<ffi::F32> previous_in,  // (U, q) w_u at the last call
                               ffi::ResultBuffer<ffi::F32> anchor_out,
                               ffi::ResultBuffer<ffi::F32> radius_out,
                               ffi::ResultBuffer<ffi::F32> value_out,
                               ffi::ResultBuffer<ffi::F32> allowance_out,
                               ffi::ResultBuffer<ffi::F32> previous_out,
                               ffi::ResultBuffer<ffi::S32> counts_out) {
  const auto qd = queries.dimensions();
  const auto kd = key_planes.dimensions();
  const auto wd = user_vectors.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || kd[0] != qd[2] || kd[1] != qd[0]) {
    return ffi::Error::InvalidArgument(
        "certified_rescan: queries (C, U, r) and key_planes (r, C, V) disagree");
  }
  if (wd.size() != 2 || wd[0] != qd[1] || query_scale.dimensions().size() != 1 ||
      query_scale.dimensions()[0] != qd[0]) {
    return ffi::Error::InvalidArgument(
        "certified_rescan: user_vectors (U, q) or query_scale (C,) disagree with queries (C, U, r)");
  }
  const int64_t n_contexts = qd[0], n_users = qd[1], r = qd[2], width = kd[2];
  const int64_t q = wd[1];
  const int64_t n_actions = true_scores.dimensions().back();
  if (width % kLanes != 0) {
    return ffi::Error::InvalidArgument("certified_rescan: the label width must be a multiple of 8");
  }
  const int64_t cells = n_contexts * n_users;
  const float* query = queries.typed_data();
  const float* vectors = user_vectors.typed_data();
  const float* scale = query_scale.typed_data();
  const float* weight = weights.typed_data();
  const float* k_planes = key_planes.typed_data();
  const int32_t* label_rows = labels.typed_data();
  const float* values = true_scores.typed_data();
  const float* norms = key_norm.typed_data();
  const float* gaps = inverse_gap.typed_data();
  float* anchor = anchor_out->typed_data();
  float* radius = radius_out->typed_data();
  float* value = value_out->typed_data();
  float* allowance = allowance_out->typed_data();
  float* previous = previous_out->typed_data();
  // The outputs alias the inputs (input_output_aliases); copy if XLA did not.
  if (anchor != anchor_in.typed_data()) std::memcpy(anchor, anchor_in.typed_data(), cells * r * sizeof(float));
  if (radius != radius_in.typed_data()) std::memcpy(radius, radius_in.typed_data(), cells * sizeof(float));
  if (value != value_in.typed_data()) std::memcpy(value, value_in.typed_data(), cells * sizeof(float));
  if (allowance != allowance_in.typed_data()) std::memcpy(allowance, allowance_in.typed_data(), cells * sizeof(float));
  if (previous != previous_in.typed_data()) std::memcpy(previous, previous_in.typed_data(), n_users * q * sizeof(float));

  // Each user's drift since the last call, ||w_u - w_u'|| (an upper bound: the
  // relative margin covers its float32 rounding), and ||w_u||. The rounding of
  // a query, <= (q + 4) 2^-22 ||w_u|| scale_c counted at both ends, is kept
  // out of every allowance (kRounding) and grows the drift (kDriftMargin).
  const float kRounding = float(q + 4) * 0x1p-22f;
  const float kDriftMargin = 1.0f + 1e-5f + 4.0f * kRounding;
  std::vector<float> drift(n_users), user_norm(n_users);
  for (int64_t u = 0; u < n_users; ++u) {
    const float* w = vectors + u * q;
    float* before = previous + u * q;
    float moved2 = 0.0f, norm2 = 0.0f;
    for (int64_t j = 0; j < q; ++j) {
      moved2 += (w[j] - before[j]) * (w[j] - before[j]);
      norm2 += w[j] * w[j];
      before[j] = w[j];
    }
    const float moved = std::sqrt(moved2) * kDriftMargin;
    drift[u] = std::isfinite(moved) ? moved : kInf;  // NaN: every cell of the user is checked
    user_norm[u] = std::sqrt(norm2);
  }
  // The allowance a cell keeps after an exact check at distance `dist` from its
  // anchor: how far w_u may still move, less rounding (<= 0: checked next call).
  // The relative margins (1e-5) cover the rounding of the distance, of `room`
  // and of the division, so a query inside the allowance passes the exact test.
  auto allowance_after = [&](int64_t c, int64_t u, float rad, float dist) {
    if (!(rad > 0.0f)) return -kInf;
    const float room = rad * (1.0f - 1e-5f) - dist * (1.0f + 1e-5f);
    if (!(room > 0.0f)) return -kInf;
    return room / scale[c] - 2.0f * kRounding * user_norm[u];  // scale 0: the query never moves
  };

  const int64_t blocks = width / kLanes;
  const int64_t plane_stride = n_contexts * width;  // factor j's slot keys: plane + j * stride
  std::vector<int64_t> check(n_users);  // the context's cells whose allowance ran out
  int32_t n_due = 0, n_checked = 0;
  // Due cells scored and waiting for their radius and value (at most kBatch, from
  // any contexts: late in a run a context has one or two).
  struct Pending {
    int64_t context, user;
    const float* gap;  // the gap table's row of the greedy slot
    int32_t action;    // the greedy action
    float top, rounding;
  };
  std::vector<Pending> pending(kBatch);
  std::vector<Lanes> pending_scores(kBatch * blocks);
  int64_t n_pending = 0;
  // The radius of each pending cell (min over other slots of (top - s_b -
  // rounding) / gap), its new allowance and its value.
  auto finish_batch = [&]() {
    for (int64_t i = 0; i < n_pending; ++i) {
      const Pending& cell = pending[i];
      const Lanes* cell_scores = pending_scores.data() + i * blocks;
      Lanes nearest = kInf - Lanes{};
      for (int64_t b = 0; b < blocks; ++b) {
        // Gap 0: the greedy slot itself, or a slot with its key, which never overtakes it.
        const Lanes inverse = Load(cell.gap, b);
        const Lanes ratio = ((cell.top - cell_scores[b]) - cell.rounding) * inverse;
        const Lanes candidate = inverse > 0.0f ? ratio : kInf - Lanes{};
        nearest = candidate < nearest ? candidate : nearest;
      }
      float low = kInf;
      for (int l = 0; l < kLanes; ++l) low = nearest[l] < low ? nearest[l] : low;
      const int64_t index = cell.context * n_users + cell.user;
      radius[index] = low;
      allowance[index] = allowance_after(cell.context, cell.user, low, 0.0f);
      value[index] = values[index * n_actions + cell.action];
    }
    n_pending = 0;
  };
  for (int64_t c = 0; c < n_contexts; ++c) {
    // The drift bound first: every query of user u moved at most scale_c times
    // the drift of w_u, so a cell whose allowance covers the drift is still
    // certified without reading its query. Allowances shrink by the drift
    // rounded up (a - d - a 2^-22 <= a - d in float32); the others are checked.
    int64_t n_check = 0;
    const float* plane = k_planes + c * width;  // the context's slot keys, factor 0
    float* row_allowance = allowance + c * n_users;
    const float* row_weight = weight + c * n_users;
    const float* row_radius = radius + c * n_users;
    int64_t u0 = 0;
    for (; u0 + kLanes <= n_users; u0 += kLanes) {
      Lanes left, d, w, rad;
      std::memcpy(&left, row_allowance + u0, sizeof(Lanes));
      std::memcpy(&d, drift.data() + u0, sizeof(Lanes));
      std::memcpy(&w, row_weight + u0, sizeof(Lanes));
      std::memcpy(&rad, row_radius + u0, sizeof(Lanes));
      left = (left - d) - left * 0x1p-22f;
      std::memcpy(row_allowance + u0, &left, sizeof(Lanes));
      const Slots quiet = (rad > 0.0f) & (left > 0.0f);
      const Slots due = (w > 0.0f) & ~quiet;
      for (int l = 0; l < kLanes; ++l) {
        check[n_check] = u0 + l;  // kept only where due: no branch per cell
        n_check += due[l] != 0;
      }
    }
    for (; u0 < n_users; ++u0) {
      const float left = (row_allowance[u0] - drift[u0]) - row_allowance[u0] * 0x1p-22f;
      row_allowance[u0] = left;
      if (row_weight[u0] > 0.0f && !(row_radius[u0] > 0.0f && left > 0.0f)) check[n_check++] = u0;
    }
    n_checked += int32_t(n_check);
    for (int64_t i = 0; i < n_check; ++i) {
      const int64_t u = check[i];
      const int64_t cell = c * n_users + u;
      const float* g = query + cell * r;
      float* a = anchor + cell * r;
      float moved2 = 0.0f;
      for (int64_t j = 0; j < r; ++j) moved2 += (g[j] - a[j]) * (g[j] - a[j]);
      // Certified: the query is still inside the cell's radius (NaN: not certified).
      if (radius[cell] > 0.0f && moved2 < radius[cell] * radius[cell]) {
        row_allowance[u] = allowance_after(c, u, radius[cell], std::sqrt(moved2));
        continue;
      }
      ++n_due;
      float norm2 = 0.0f;  // only a due cell's norm is needed
      for (int64_t j = 0; j < r; ++j) norm2 += g[j] * g[j];
      for (int64_t j = 0; j < r; ++j) a[j] = g[j];
      // Scored straight into the batch's next slot (kept only if the cell is queued).
      Lanes* scores = pending_scores.data() + n_pending * blocks;
      // Scores in factor order, a block of kLanes slots at a time: s = g_0 k_0,
      // then s = fma(g_j, k_j, s), one rounding per factor, as XLA:CPU's fused
      // pass (metrics._greedy_pass) mostly contracts its products and sums: the
      // two then break near-ties alike (without the fma, 2 of 2,000 rounds of a
      // paper-size seed differed; with it, none of that seed's, and 11 of
      // 16,000 seed-rounds over eight seeds, each in one cell).
      int64_t b = 0;
      for (; b + 8 <= blocks; b += 8) ScoreBlocks<8>(g, r, plane, plane_stride, b, scores);
      for (; b + 4 <= blocks; b += 4) ScoreBlocks<4>(g, r, plane, plane_stride, b, scores);
      for (; b < blocks; ++b) ScoreBlocks<1>(g, r, plane, plane_stride, b, scores);
      // The first maximiser: per lane the highest score and its first slot (a
      // strict > keeps the earlier), then the lowest slot among the lanes' best.
      // A label row's repeated last action scores as its first copy, after it.
      int64_t best = -1;
      float top = -kInf;
      if (std::isfinite(norm2)) {
        Lanes high = scores[0];
        Slots slot = kIota;
        for (int64_t b = 1; b < blocks; ++b) {
          const Slots ahead = scores[b] > high;
          high = ahead ? scores[b] : high;
          slot = ahead ? kIota + int32_t(b * kLanes) : slot;
        }
        for (int l = 0; l < kLanes; ++l) top = high[l] > top ? high[l] : top;
        // The lanes at top keep their slot, the others none (one vector compare
        // and select: per lane, the compiler made it a branch on the scores).
        const Slots none = std::numeric_limits<int32_t>::max() - Slots{};
        const Slots candidate = high == top - Lanes{} ? slot : none;
        int32_t first = candidate[0];
        for (int l = 1; l < kLanes; ++l) first = std::min(first, int32_t(candidate[l]));
        best = first == std::numeric_limits<int32_t>::max() ? -1 : first;  // no lane reached top (NaN)
      } else {  // a non-finite query: the full pass's rule, the first score above the best so far
        for (int64_t v = 0; v < width; ++v) {
          const float s = scores[v / kLanes][v % kLanes];
          if (s > top) { top = s; best = v; }
        }
      }
      if (best < 0 || !std::isfinite(top)) {  // no finite maximum: due again next round
        // No score above -inf: action 0's R*, as the fused pass keeps.
        value[cell] = values[cell * n_actions + (best < 0 ? 0 : label_rows[c * width + best])];
        radius[cell] = -kInf;
        row_allowance[u] = -kInf;
        continue;
      }
      // The radius needs the row (c, best) of the gap table and the value R*: both
      // miss the cache when due cells are scattered (late in a run), so they are
      // prefetched now and used once a batch of due cells has been scored.
      const float* gap = gaps + (c * width + best) * width;
      for (int64_t f = 0; f < width; f += 64 / int64_t(sizeof(float))) __builtin_prefetch(gap + f);
      const int32_t action = label_rows[c * width + best];
      __builtin_prefetch(values + cell * n_actions + action);
      Pending& next = pending[n_pending];
      next = {c, u, gap, action, top, 1e-5f * (1.0f + std::sqrt(norm2) * norms[c])};
      if (++n_pending == kBatch) finish_batch();
    }
  }
  finish_batch();
  counts_out->typed_data()[0] = n_due;
  counts_out->typed_data()[1] = n_checked;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbanditCertifiedRescan, CertifiedRescanImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // queries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // user_vectors
                                  .Arg<ffi::Buffer<ffi::F32>>()  // query_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_planes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // labels
                                  .Arg<ffi::Buffer<ffi::F32>>()  // true_scores
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_norm
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inverse_gap
                                  .Arg<ffi::Buffer<ffi::F32>>()  // anchor
                                  .Arg<ffi::Buffer<ffi::F32>>()  // radius
                                  .Arg<ffi::Buffer<ffi::F32>>()  // value
                                  .Arg<ffi::Buffer<ffi::F32>>()  // allowance
                                  .Arg<ffi::Buffer<ffi::F32>>()  // previous
                                  .Ret<ffi::Buffer<ffi::F32>>()  // anchor
                                  .Ret<ffi::Buffer<ffi::F32>>()  // radius
                                  .Ret<ffi::Buffer<ffi::F32>>()  // value
                                  .Ret<ffi::Buffer<ffi::F32>>()  // allowance
                                  .Ret<ffi::Buffer<ffi::F32>>()  // previous
                                  .Ret<ffi::Buffer<ffi::S32>>());  // (cells re-scored, cells checked)
