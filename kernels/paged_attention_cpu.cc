// Paged decode attention on CPU: an XLA FFI custom call (see paged_attention_cpu.py).
//
// One query row per sequence s, over the keys of its first lengths[s] positions, which
// live in pages: position p of row s is slot p % L of page table[s, p / L]. XLA's gathers
// copy every page into a fresh array and then run tiny batched dots; this kernel streams
// each page once, in place, and folds it into a running softmax (flash-decoding on one
// core): a work item is one row with all its heads, which reads each of its K and V pages
// once, front to back, so the step runs near memory bandwidth.
//
// Layouts (row-major): q [S, N, H] f32, pages [P, L, K, H] (f32 or bf16), table [S, M]
// int32, lengths [S] int32, out [S, N, H] f32. Rows with length <= 0 get zeros. Items
// are shared by the calling thread and XLA's intra-op thread pool through an atomic
// counter, so the call never waits on a task that has not started.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace tpustack_cpu;

struct Shape {
  int64_t S, N, H, P, L, K, M;
  float scale, soft_cap;
};

// Max and sum of 16 lanes as a tree of 4 shuffles (a scalar loop is a 15-step dependency
// chain, ~60 cycles, paid per query per block of keys).
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
inline float hmax(v16 v) {
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}
inline float hsum(v16 v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// The lane sums of 16 vectors, as one vector: out[t] = sum(a[t]). Four levels of "add the
// two halves of two vectors into one", ~3 shuffle/add ops per sum instead of ~8 each.
inline v16 sum_lanes16(const v16* a) {
  v16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// exp for x <= 0 (scores minus their running max), on 16 lanes: Cephes' degree-5 polynomial
// on x - n ln2, scaled by 2^n; relative error ~2e-7 down to -87, 0 below (libm's expf does
// not vectorize, and was a third of the kernel's time).
inline v16 exp_nonpositive(v16 x) {
  const v16 floor_ok = x < -87.0f ? splat(0.0f) : splat(1.0f);
  x = x < -87.0f ? splat(-87.0f) : x;
  const v16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v16 n = (x * 1.44269504088896341f + magic) - magic;
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * floor_ok;
}

// One work item: row s, every head, over its pages 16 slots at a time. A slot's keys for all
// kv heads are adjacent ([L, K, H] pages), so a page is read front to back; the G query heads
// of a kv head reread its slice from L1. Needs H % 16 == 0 (the wrapper checks).
// kC = H / 16 as a constant for the common head sizes (64, 128: the compiler keeps the
// row's partial sums in registers), 0 for any other multiple of 16.
template <typename T, int kC>
void attend_item(const Shape& d, const float* q, const T* k_pages, const T* v_pages, const int32_t* table,
                 const int32_t* lengths, float* out, int64_t s, std::vector<float>& scratch) {
  const int64_t N = d.N, G = d.N / d.K, H = d.H, L = d.L, C = kC ? kC : d.H / kLanes;
  float* o = out + s * N * H;  // [N, H]; head n reads kv head n / G
  const int64_t len = std::min<int64_t>(lengths[s], d.M * L);
  if (len <= 0) {
    std::fill(o, o + N * H, 0.0f);
    return;
  }
  scratch.resize(N * H + 2 * N);
  float* qs = scratch.data();  // [N, H] scaled queries
  float* m = qs + N * H;       // [N] running max
  float* l = m + N;            // [N] running sum
  for (int64_t i = 0; i < N * H; ++i) qs[i] = q[s * N * H + i] * d.scale;
  std::fill(m, m + N, -INFINITY);
  std::fill(l, l + N, 0.0f);
  std::fill(o, o + N * H, 0.0f);
  const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t slot_stride = d.K * H;
  v16 part[kLanes];
  for (int64_t start = 0; start < len; start += kLanes) {  // 16 positions: within one page when L % 16 == 0
    const int64_t n_valid = std::min<int64_t>(kLanes, len - start);
    const T* k_slot[kLanes];
    const T* v_slot[kLanes];
    bool ok = true;
    for (int64_t t = 0; t < n_valid; ++t) {
      const int64_t pos = start + t, page = table[s * d.M + pos / L];
      ok &= page >= 0 && page < d.P;  // never reads outside the pool
      const int64_t at = (std::clamp<int64_t>(page, 0, d.P - 1) * L + pos % L) * slot_stride;
      k_slot[t] = k_pages + at;
      v_slot[t] = v_pages + at;
    }
    if (!ok) continue;
    const v16 valid = lane < static_cast<float>(n_valid) ? splat(1.0f) : splat(0.0f);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t kv = (n / G) * H;
      const float* qn = qs + n * H;
      for (int64_t t = 0; t < kLanes; ++t) {
        v16 acc = splat(0.0f);
        if (t < n_valid)
          for (int64_t c = 0; c < C; ++c) acc += load16(qn + c * kLanes) * load16(k_slot[t] + kv + c * kLanes);
        part[t] = acc;
      }
      v16 score = sum_lanes16(part);
      if (d.soft_cap > 0.0f)
        for (int i = 0; i < kLanes; ++i) score[i] = d.soft_cap * std::tanh(score[i] / d.soft_cap);
      score = valid > 0.0f ? score : splat(-INFINITY);
      const float new_m = std::max(m[n], hmax(score));
      const float rescale = std::exp(m[n] - new_m);  // exp(-inf) = 0 on the first block
      const v16 w = exp_nonpositive(score - new_m) * valid;
      l[n] = l[n] * rescale + hsum(w);
      m[n] = new_m;
      float* on = o + n * H;
      for (int64_t c = 0; c < C; ++c) {
        v16 acc = load16(on + c * kLanes) * rescale;
        for (int64_t t = 0; t < n_valid; ++t) acc += w[t] * load16(v_slot[t] + kv + c * kLanes);
        std::memcpy(on + c * kLanes, &acc, sizeof(acc));
      }
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    const float inv = l[n] > 0.0f ? 1.0f / l[n] : 0.0f;
    float* on = o + n * H;
    for (int64_t h = 0; h < H; ++h) on[h] *= inv;
  }
}

template <typename T>
void run(ffi::ThreadPool& pool, const Shape& d, const float* q, const T* k, const T* v, const int32_t* table,
         const int32_t* lengths, float* out) {
  // Items are whole rows: only worth other threads when there are several.
  parallel(pool, d.S, d.S / 2, [=, &d](int64_t s) {
    thread_local std::vector<float> scratch;
    if (d.H == 64)
      attend_item<T, 4>(d, q, k, v, table, lengths, out, s, scratch);
    else if (d.H == 128)
      attend_item<T, 8>(d, q, k, v, table, lengths, out, s, scratch);
    else
      attend_item<T, 0>(d, q, k, v, table, lengths, out, s, scratch);
  });
}

ffi::Error paged_attention_cpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                               ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths,
                               ffi::ResultBuffer<ffi::F32> out, float scale, float soft_cap) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = table.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention_cpu: want q [S, N, H], pages [P, L, K, H], table [S, M]");
  Shape d{qd[0], qd[1], qd[2], kd[0], kd[1], kd[2], td[1], scale, soft_cap};
  if (kd[3] != d.H || d.H % kLanes != 0 || d.N % d.K != 0 || td[0] != d.S || lengths.element_count() != d.S ||
      k_pages.element_type() != v_pages.element_type() || v_pages.element_count() != k_pages.element_count())
    return ffi::Error::InvalidArgument("paged_attention_cpu: inconsistent shapes");
  const float* qp = q.typed_data();
  const int32_t* tp = table.typed_data();
  const int32_t* lp = lengths.typed_data();
  float* op = out->typed_data();
  switch (k_pages.element_type()) {
    case ffi::F32:
      run(pool, d, qp, k_pages.typed_data<float>(), v_pages.typed_data<float>(), tp, lp, op);
      break;
    case ffi::BF16:
      run(pool, d, qp, reinterpret_cast<const uint16_t*>(k_pages.untyped_data()),
          reinterpret_cast<const uint16_t*>(v_pages.untyped_data()), tp, lp, op);
      break;
    default:
      return ffi::Error::InvalidArgument("paged_attention_cpu: pages must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

// ---- Query tiles: a prefill chunk's attention over its sequence's pages ----
//
// Tile x holds up to Q consecutive query tokens of one sequence: the step's tokens tok[x, :]
// (rows of q and out [T, N, H]) at positions pos[x, :] (-1: padding); each sees the keys at
// positions 0 .. its own (causal) through the row's block table table[x, :]. Rows of out no tile
// writes are zeros. A work item is (tile, kv head): its G query heads times Q tokens
// share every key block. Per block of 32 keys the keys are transposed to [H][32], so one query's
// 32 scores are H multiply-adds of a broadcast query element by two 16-key vectors (no
// horizontal sums), 8 queries at once to hide the FMA latency; then the running softmax (its
// per-block max, exp and sum paid once per 32 keys: 16-key blocks ran at 99 GFLOP/s, 32 at
// 148 on a 1024-token prefill's layer) and the V rows, each loaded once for 4 queries.
struct TileShape {
  int64_t T, X, Q, N, H, P, L, K, M;
  float scale;
};

constexpr int64_t kKeys = 2 * kLanes;  // keys per block of the tile kernel

// s[i][0..1] = sum_h q[i][h] * kt[h][:] (32 keys) for RB queries H apart.
template <int RB>
inline void block_scores(const float* q, int64_t H, const float* kt, v16 (*s)[2]) {
  v16 acc[RB][2];
  for (int i = 0; i < RB; ++i) acc[i][0] = acc[i][1] = v16{};
  for (int64_t h = 0; h < H; ++h) {
    const v16 k0 = load16(kt + h * kKeys), k1 = load16(kt + h * kKeys + kLanes);
    for (int i = 0; i < RB; ++i) {
      acc[i][0] += q[i * H + h] * k0;
      acc[i][1] += q[i * H + h] * k1;
    }
  }
  for (int i = 0; i < RB; ++i) s[i][0] = acc[i][0], s[i][1] = acc[i][1];
}

constexpr int64_t kMaxHead = 512;  // head_dim limit of the tile kernel (the call refuses larger)

// o[i] = o[i] * rescale[i] + sum_t w[i][t] v_slot[t] for QB query rows H apart; kC = H / 16 when
// the accumulators fit in registers (QB x kC <= 16), 0 for any H (one query at a time).
template <int QB, int kC, typename T>
inline void weigh_values(float* o, const float* rescale, const float* w, const T* const* v_slot, int64_t H) {
  const int64_t C = kC ? kC : H / kLanes;
  if (kC == 0) {
    for (int64_t c = 0; c < C; ++c) {
      v16 acc = load16(o + c * kLanes) * rescale[0];
      for (int64_t t = 0; t < kKeys; ++t) acc += w[t] * load16(v_slot[t] + c * kLanes);
      store16(o + c * kLanes, acc);
    }
    return;
  }
  v16 acc[QB][kC ? kC : 1];
  for (int i = 0; i < QB; ++i)
    for (int64_t c = 0; c < kC; ++c) acc[i][c] = load16(o + i * H + c * kLanes) * rescale[i];
  for (int64_t t = 0; t < kKeys; ++t) {
    v16 v[kC ? kC : 1];
    for (int64_t c = 0; c < kC; ++c) v[c] = load16(v_slot[t] + c * kLanes);
    for (int i = 0; i < QB; ++i)
      for (int64_t c = 0; c < kC; ++c) acc[i][c] += w[i * kKeys + t] * v[c];
  }
  for (int i = 0; i < QB; ++i)
    for (int64_t c = 0; c < kC; ++c) store16(o + i * H + c * kLanes, acc[i][c]);
}

template <typename T>
void tile_item(const TileShape& d, const float* q, const T* k_pages, const T* v_pages, const int32_t* table,
               const int32_t* pos, const int32_t* tok, float* out, int64_t x, int64_t kh, std::vector<float>& scratch) {
  const int64_t Q = d.Q, N = d.N, G = d.N / d.K, H = d.H, L = d.L, R = Q * G, C = H / kLanes;
  const int32_t* pos_q = pos + x * Q;
  const int32_t* tok_q = tok + x * Q;
  int64_t top = -1;
  for (int64_t i = 0; i < Q; ++i)
    if (tok_q[i] >= 0 && tok_q[i] < d.T) top = std::max<int64_t>(top, pos_q[i]);  // a token outside q: padding
  const int64_t len = std::min<int64_t>(top + 1, d.M * L);
  if (len <= 0) return;
  scratch.resize(2 * R * H + 2 * R + H * kKeys);
  float* qs = scratch.data();  // [R, H] scaled queries, row r = token r / G, head kh * G + r % G
  float* o = qs + R * H;       // [R, H] unnormalised outputs
  float* m = o + R * H;        // [R] running max
  float* l = m + R;            // [R] running sum
  float* kt = l + R;           // [H, 32] the block's keys, transposed
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = std::clamp<int64_t>(tok_q[r / G], 0, d.T - 1);
    const float* src = q + (t * N + kh * G + r % G) * H;
    for (int64_t h = 0; h < H; ++h) qs[r * H + h] = src[h] * d.scale;
  }
  std::fill(o, o + R * H, 0.0f);
  std::fill(m, m + R, -INFINITY);
  std::fill(l, l + R, 0.0f);
  const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  static const T zeros[kMaxHead] = {};  // the V row of a slot past the end or on a bad page
  const T* v_slot[kKeys];
  v16 s[8][2];
  alignas(64) float w[8 * kKeys];  // the block's softmax weights of 8 queries
  float rescale[8];
  for (int64_t start = 0; start < len; start += kKeys) {
    const int64_t n_valid = std::min<int64_t>(kKeys, len - start);
    for (int64_t t = 0; t < kKeys; ++t) {
      const int64_t p = start + t, page = t < n_valid ? table[x * d.M + p / L] : -1;
      const bool ok = page >= 0 && page < d.P;  // never reads outside the pool
      const T* k = k_pages + ((std::clamp<int64_t>(page, 0, d.P - 1) * L + p % L) * d.K + kh) * H;
      for (int64_t h = 0; h < H; ++h) kt[h * kKeys + t] = ok ? load1(k + h) : 0.0f;
      v_slot[t] = ok ? v_pages + (k - k_pages) : zeros;
    }
    for (int64_t r0 = 0; r0 < R; r0 += 8) {
      const int64_t rb = std::min<int64_t>(8, R - r0);
      if (rb == 8) block_scores<8>(qs + r0 * H, H, kt, s);
      else for (int64_t i = 0; i < rb; ++i) block_scores<1>(qs + (r0 + i) * H, H, kt, s + i);
      for (int64_t i = 0; i < rb; ++i) {  // running softmax of each query over this block
        const int64_t r = r0 + i, seen = std::min(pos_q[r / G] - start + 1, n_valid);  // keys it sees
        const v16 valid0 = lane < static_cast<float>(seen) ? splat(1.0f) : splat(0.0f);
        const v16 valid1 = lane + static_cast<float>(kLanes) < static_cast<float>(seen) ? splat(1.0f) : splat(0.0f);
        const v16 top2 = vmax(valid0 > 0.0f ? s[i][0] : splat(-INFINITY), valid1 > 0.0f ? s[i][1] : splat(-INFINITY));
        const float new_m = seen > 0 ? std::max(m[r], hmax(top2)) : m[r];
        const v16 w0 = seen > 0 ? exp_nonpositive(s[i][0] - new_m) * valid0 : v16{};
        const v16 w1 = seen > 0 ? exp_nonpositive(s[i][1] - new_m) * valid1 : v16{};
        rescale[i] = seen > 0 ? std::exp(m[r] - new_m) : 1.0f;
        l[r] = l[r] * rescale[i] + hsum(w0 + w1);
        m[r] = new_m;
        store16(w + i * kKeys, w0);
        store16(w + i * kKeys + kLanes, w1);
      }
      if (C == 4) {  // o += w V, 4 queries at once: each V row is loaded once for them
        int64_t i = 0;
        for (; i + 4 <= rb; i += 4) weigh_values<4, 4>(o + (r0 + i) * H, rescale + i, w + i * kKeys, v_slot, H);
        for (; i < rb; ++i) weigh_values<1, 4>(o + (r0 + i) * H, rescale + i, w + i * kKeys, v_slot, H);
      } else {
        for (int64_t i = 0; i < rb; ++i) weigh_values<1, 0>(o + (r0 + i) * H, rescale + i, w + i * kKeys, v_slot, H);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    if (pos_q[r / G] < 0 || tok_q[r / G] < 0 || tok_q[r / G] >= d.T) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    float* dst = out + (tok_q[r / G] * N + kh * G + r % G) * H;
    for (int64_t h = 0; h < H; ++h) dst[h] = o[r * H + h] * inv;
  }
}

ffi::Error tile_attention_cpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                              ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> pos,
                              ffi::Buffer<ffi::S32> tok, ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = table.dimensions(), pd = pos.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || pd.size() != 2)
    return ffi::Error::InvalidArgument("tile_attention_cpu: want q [T, N, H], pages [P, L, K, H], table [X, M], pos and tok [X, Q]");
  TileShape d{qd[0], pd[0], pd[1], qd[1], qd[2], kd[0], kd[1], kd[2], td[1], scale};
  if (kd[3] != d.H || d.H % kLanes != 0 || d.H > kMaxHead || d.N % d.K != 0 || td[0] != d.X ||
      tok.element_count() != d.X * d.Q || k_pages.element_type() != v_pages.element_type() ||
      v_pages.element_count() != k_pages.element_count())
    return ffi::Error::InvalidArgument("tile_attention_cpu: inconsistent shapes");
  const float* qp = q.typed_data();
  const int32_t *tp = table.typed_data(), *pp = pos.typed_data(), *kp = tok.typed_data();
  float* op = out->typed_data();
  std::fill(op, op + d.T * d.N * d.H, 0.0f);  // rows no tile writes
  auto run = [&](auto* k, auto* v) {
    // later tiles see more keys: hand them out first so the last items are short ones
    parallel(pool, d.X * d.K, d.X * d.K, [=, &d](int64_t i) {
      thread_local std::vector<float> scratch;
      const int64_t item = d.X * d.K - 1 - i;
      tile_item(d, qp, k, v, tp, pp, kp, op, item / d.K, item % d.K, scratch);
    });
  };
  switch (k_pages.element_type()) {
    case ffi::F32:
      run(k_pages.typed_data<float>(), v_pages.typed_data<float>());
      break;
    case ffi::BF16:
      run(reinterpret_cast<const uint16_t*>(k_pages.untyped_data()), reinterpret_cast<const uint16_t*>(v_pages.untyped_data()));
      break;
    default:
      return ffi::Error::InvalidArgument("tile_attention_cpu: pages must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

// f32 -> bf16, rounding to nearest even, NaN kept quiet: what XLA's convert does.
inline uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// pool[page[t], slot[t], :, :] = rows[t] for each of the step's T tokens, in place (the pool is
// aliased to the output). XLA CPU widens a bf16 scatter to f32: a copy of both pools there and
// back in every layer, 2.4x the f32 step at 64 rows; this writes the T rows and nothing else.
ffi::Error write_slots_cpu(ffi::AnyBuffer pool, ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::S32> page,
                           ffi::Buffer<ffi::S32> slot, ffi::Result<ffi::AnyBuffer> out) {
  auto pd = pool.dimensions(), rd = rows.dimensions();
  if (pd.size() != 4 || rd.size() != 3 || rd[1] != pd[2] || rd[2] != pd[3] || page.element_count() != rd[0] ||
      slot.element_count() != rd[0])
    return ffi::Error::InvalidArgument("write_slots_cpu: want pool [P, L, K, H], rows [T, K, H], page and slot [T]");
  const int64_t P = pd[0], L = pd[1], row = pd[2] * pd[3], T = rd[0];
  const size_t item = ffi::ByteWidth(pool.element_type());
  if (out->untyped_data() != pool.untyped_data())  // not aliased after all: start from the input
    std::memcpy(out->untyped_data(), pool.untyped_data(), pool.size_bytes());
  const float* src = rows.typed_data();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pg = page.typed_data()[t], sl = slot.typed_data()[t];
    if (pg < 0 || pg >= P || sl < 0 || sl >= L) continue;  // dropped, as XLA's scatter drops them
    char* dst = static_cast<char*>(out->untyped_data()) + ((pg * L + sl) * row) * item;
    if (pool.element_type() == ffi::BF16) {
      uint16_t* d = reinterpret_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < row; ++i) d[i] = to_bf16(src[t * row + i]);
    } else if (pool.element_type() == ffi::F32) {
      std::memcpy(dst, src + t * row, row * sizeof(float));
    } else {
      return ffi::Error::InvalidArgument("write_slots_cpu: pages must be float32 or bfloat16");
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpustackWriteSlotsCpu, write_slots_cpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpustackPagedAttentionCpu, paged_attention_cpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [S, N, H]
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // table [S, M]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths [S]
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpustackTileAttentionCpu, tile_attention_cpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [T, N, H]
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // table [X, M]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos [X, Q]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tok [X, Q]
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
