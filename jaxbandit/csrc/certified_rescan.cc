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
// Scores are summed in factor order, as metrics._sum_of_products does (with
// fused multiply-adds, as XLA:CPU compiles that sum), and the radius is the one metrics._rescore gives a single candidate:
//   min over other slots b of (top - s_b - allowance) / (||k_b - k_a|| (1 + 1e-6)),
//   allowance = 1e-5 (1 + ||g|| max_a ||k_a||).
// Built on first use by jaxbandit/native.py; never compiled into the package.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// kLanes floats as one value (GCC/Clang vector extensions; AVX registers with -march=native).
constexpr int kLanes = 8;
typedef float Lanes __attribute__((vector_size(4 * kLanes)));
typedef int32_t Slots __attribute__((vector_size(4 * kLanes)));
constexpr Slots kIota = {0, 1, 2, 3, 4, 5, 6, 7};
constexpr float kInf = std::numeric_limits<float>::infinity();

// Block b of a row of floats (one unaligned vector load).
inline Lanes Load(const float* row, int64_t b) {
  Lanes out;
  std::memcpy(&out, row + b * kLanes, sizeof(Lanes));
  return out;
}

ffi::Error CertifiedRescanImpl(ffi::Buffer<ffi::F32> queries,      // (C, U, r)
                               ffi::Buffer<ffi::F32> weights,      // (C, U) cell weights
                               ffi::Buffer<ffi::F32> key_planes,   // (r, C, V) slot keys
                               ffi::Buffer<ffi::S32> labels,       // (C, V) slot actions
                               ffi::Buffer<ffi::F32> true_scores,  // (C, U, A) R*
                               ffi::Buffer<ffi::F32> key_norm,     // (C,) max_a ||k_a||
                               ffi::Buffer<ffi::F32> inverse_gap,  // (C, V, V) 1 / (||k_v - k_w|| (1 + 1e-6)), 0 if equal
                               ffi::Buffer<ffi::F32> anchor_in,    // (C, U, r)
                               ffi::Buffer<ffi::F32> radius_in,    // (C, U)
                               ffi::Buffer<ffi::F32> value_in,     // (C, U)
                               ffi::ResultBuffer<ffi::F32> anchor_out,
                               ffi::ResultBuffer<ffi::F32> radius_out,
                               ffi::ResultBuffer<ffi::F32> value_out,
                               ffi::ResultBuffer<ffi::S32> n_due_out) {
  const auto qd = queries.dimensions();
  const auto kd = key_planes.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || kd[0] != qd[2] || kd[1] != qd[0]) {
    return ffi::Error::InvalidArgument(
        "certified_rescan: queries (C, U, r) and key_planes (r, C, V) disagree");
  }
  const int64_t n_contexts = qd[0], n_users = qd[1], r = qd[2], width = kd[2];
  const int64_t n_actions = true_scores.dimensions().back();
  if (width % kLanes != 0) {
    return ffi::Error::InvalidArgument("certified_rescan: the label width must be a multiple of 8");
  }
  const int64_t cells = n_contexts * n_users;
  const float* query = queries.typed_data();
  const float* weight = weights.typed_data();
  const float* k_planes = key_planes.typed_data();
  const int32_t* label_rows = labels.typed_data();
  const float* values = true_scores.typed_data();
  const float* norms = key_norm.typed_data();
  const float* gaps = inverse_gap.typed_data();
  float* anchor = anchor_out->typed_data();
  float* radius = radius_out->typed_data();
  float* value = value_out->typed_data();
  // The outputs alias the inputs (input_output_aliases); copy if XLA did not.
  if (anchor != anchor_in.typed_data()) std::memcpy(anchor, anchor_in.typed_data(), cells * r * sizeof(float));
  if (radius != radius_in.typed_data()) std::memcpy(radius, radius_in.typed_data(), cells * sizeof(float));
  if (value != value_in.typed_data()) std::memcpy(value, value_in.typed_data(), cells * sizeof(float));

  const int64_t blocks = width / kLanes;
  std::vector<Lanes> scores(blocks);
  std::vector<int64_t> greedy(n_users);  // the context's new greedy slot per user, -1 if none
  int32_t n_due = 0;
  for (int64_t c = 0; c < n_contexts; ++c) {
    std::fill(greedy.begin(), greedy.end(), -1);
    for (int64_t u = 0; u < n_users; ++u) {
      const int64_t cell = c * n_users + u;
      if (!(weight[cell] > 0.0f)) continue;  // never drawn, counts in no average
      const float* g = query + cell * r;
      float* a = anchor + cell * r;
      float moved2 = 0.0f;
      for (int64_t j = 0; j < r; ++j) moved2 += (g[j] - a[j]) * (g[j] - a[j]);
      // Certified: the query is still inside the cell's radius (NaN: not certified).
      if (radius[cell] > 0.0f && moved2 < radius[cell] * radius[cell]) continue;
      ++n_due;
      float norm2 = 0.0f;  // only a due cell's norm is needed
      for (int64_t j = 0; j < r; ++j) norm2 += g[j] * g[j];
      for (int64_t j = 0; j < r; ++j) a[j] = g[j];
      // Scores in factor order, a block of kLanes slots at a time: s = g_0 k_0,
      // then s = fma(g_j, k_j, s), one rounding per factor, as XLA:CPU's fused
      // pass (metrics._greedy_pass) mostly contracts its products and sums: the
      // two then break near-ties alike (without the fma, 2 of 2,000 rounds of a
      // paper-size seed differed; with it, none of that seed's, and 11 of
      // 16,000 seed-rounds over eight seeds, each in one cell).
      for (int64_t b = 0; b < blocks; ++b) {
        Lanes s = g[0] * Load(k_planes + c * width, b);
        for (int64_t j = 1; j < r; ++j) {
          const Lanes k = Load(k_planes + (j * n_contexts + c) * width, b);
          for (int l = 0; l < kLanes; ++l) s[l] = std::fma(g[j], k[l], s[l]);
        }
        scores[b] = s;
      }
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
        for (int l = 0; l < kLanes; ++l) {
          if (high[l] == top && (best < 0 || slot[l] < best)) best = slot[l];
        }
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
        continue;
      }
      greedy[u] = best;
      const float allowance = 1e-5f * (1.0f + std::sqrt(norm2) * norms[c]);
      const float* gap = gaps + (c * width + best) * width;
      Lanes nearest = kInf - Lanes{};
      for (int64_t b = 0; b < blocks; ++b) {
        // Gap 0: the greedy slot itself, or a slot with its key, which never overtakes it.
        const Lanes inverse = Load(gap, b);
        const Lanes ratio = ((top - scores[b]) - allowance) * inverse;
        const Lanes candidate = inverse > 0.0f ? ratio : kInf - Lanes{};
        nearest = candidate < nearest ? candidate : nearest;
      }
      float low = kInf;
      for (int l = 0; l < kLanes; ++l) low = nearest[l] < low ? nearest[l] : low;
      radius[cell] = low;
    }
    // The true scores of the context's greedy actions, read once every slot is
    // known: independent loads, so the memory system overlaps them.
    for (int64_t u = 0; u < n_users; ++u) {
      if (greedy[u] < 0) continue;
      const int64_t cell = c * n_users + u;
      value[cell] = values[cell * n_actions + label_rows[c * width + greedy[u]]];
    }
  }
  n_due_out->typed_data()[0] = n_due;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbanditCertifiedRescan, CertifiedRescanImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // queries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_planes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // labels
                                  .Arg<ffi::Buffer<ffi::F32>>()  // true_scores
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_norm
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inverse_gap
                                  .Arg<ffi::Buffer<ffi::F32>>()  // anchor
                                  .Arg<ffi::Buffer<ffi::F32>>()  // radius
                                  .Arg<ffi::Buffer<ffi::F32>>()  // value
                                  .Ret<ffi::Buffer<ffi::F32>>()  // anchor
                                  .Ret<ffi::Buffer<ffi::F32>>()  // radius
                                  .Ret<ffi::Buffer<ffi::F32>>()  // value
                                  .Ret<ffi::Buffer<ffi::S32>>());  // cells re-scored
