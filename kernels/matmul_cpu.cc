// Dense matmul on CPU: an XLA FFI custom call (see matmul_cpu.py).
//
// out [M, N] f32 = x [M, K] f32 @ w [K, N] (f32 or bf16, row-major as the model stores it).
//
// With a handful of rows (a speculative verify of k + 1 tokens, a small decode batch) the work
// is reading w once: ~2 FLOPs per weight per row. The kernel streams w in passes of
// kRowsPerPass rows, each pass a contiguous block of memory read as kRowsPerPass sequential
// runs across the columns, and folds them into up to kStreamRows output rows held in 16-lane
// vectors (one FMA per term; GCC/Clang vector extensions: AVX-512, AVX2 or NEON). While it
// computes one pass it prefetches the next, so the multiply-adds overlap the memory reads.
// The rows of w (K) are split into one part per thread: each thread streams one contiguous
// region, and the partial sums are added at the end in part order, so the result does not
// depend on M (1 to kStreamRows) or on which thread ran which part. Past kStreamRows rows the work is compute-bound:
// a packed GEMM instead (below, "Many rows").
// Work items are shared by the calling thread and XLA's intra-op thread pool through an atomic
// counter (cpu_common.h: no second thread pool).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace tpustack_cpu;

// Tuned on an Intel Xeon VM (2 cores) with a C++ harness over 185 MB of weights, 2 threads:
// 16 rows a pass, one pass prefetched into L2 streams 42 GB/s at M = 1, 38 at M = 5, 35 at
// M = 8 (8 rows a pass, L1 prefetch: 33-37 / 32 / 26; no prefetch: 44 / 26 / -).
constexpr int64_t kStreamRows = 8;            // rows of x per pass over w
constexpr int64_t kRowsPerPass = 16;          // rows of w streamed together
constexpr int64_t kMinPartRows = 64;          // rows of w worth a thread
constexpr int64_t kMinPartBytes = 256 << 10;  // bytes of w worth a thread (a hand-off costs ~10 us)


// One pass: rows k0 .. k0 + kb of w, columns [c0, c1), folded into MR rows of out (N apart;
// x's rows ldx apart). `first` starts the sums; `ahead` > 0 prefetches that many rows of the
// next pass at the same columns into L2 (prefetcht1) as it goes, spread over the pass.
template <int MR, typename T>
void fold_pass(const float* x, int64_t ldx, int64_t k0, int64_t kb, const T* w, int64_t N, int64_t c0, int64_t c1,
               float* out, bool first, int64_t ahead) {
  constexpr int64_t kStep = 2 * kLanes;
  const int64_t vec_end = c0 + (c1 - c0) / kStep * kStep;
  for (int64_t n = c0; n < vec_end; n += kStep) {
    for (int64_t kk = 0; kk < ahead; ++kk) {
      const char* p = reinterpret_cast<const char*>(w + (k0 + kb + kk) * N + n);
      __builtin_prefetch(p, 0, 2);
      if (kStep * sizeof(T) > 64) __builtin_prefetch(p + 64, 0, 2);
    }
    v16 acc[MR][2];
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = first ? v16{} : load16(out + m * N + n);
      acc[m][1] = first ? v16{} : load16(out + m * N + n + kLanes);
    }
    for (int64_t kk = 0; kk < kb; ++kk) {
      const T* row = w + (k0 + kk) * N + n;
      const v16 w0 = load16(row), w1 = load16(row + kLanes);
      for (int m = 0; m < MR; ++m) {
        const float xs = x[m * ldx + k0 + kk];
        acc[m][0] += xs * w0;  // contracted to one FMA (-ffp-contract=fast)
        acc[m][1] += xs * w1;
      }
    }
    for (int m = 0; m < MR; ++m) {
      store16(out + m * N + n, acc[m][0]);
      store16(out + m * N + n + kLanes, acc[m][1]);
    }
  }
  for (int64_t n = vec_end; n < c1; ++n)  // the chunk's last (c1 - c0) % 32 columns
    for (int m = 0; m < MR; ++m) {
      float acc = first ? 0.0f : out[m * N + n];
      for (int64_t kk = 0; kk < kb; ++kk) acc = __builtin_fmaf(x[m * ldx + k0 + kk], load1(w + (k0 + kk) * N + n), acc);
      out[m * N + n] = acc;
    }
}

// out = x[:, ka:kz] @ w[ka:kz, :] for M <= kStreamRows rows of x (K apart): passes of
// kRowsPerPass rows of w, each prefetching the next. A row's sums run over k in order whatever M is.
template <typename T>
void block(const float* x, int64_t K, int64_t M, int64_t ka, int64_t kz, const T* w, int64_t N, float* out) {
  for (int64_t k0 = ka; k0 < kz; k0 += kRowsPerPass) {
    const int64_t kb = std::min(kRowsPerPass, kz - k0);
    const int64_t ahead = std::min(kRowsPerPass, kz - k0 - kb);
    const bool first = k0 == ka;
    switch (M) {
      case 1: fold_pass<1>(x, K, k0, kb, w, N, 0, N, out, first, ahead); break;
      case 2: fold_pass<2>(x, K, k0, kb, w, N, 0, N, out, first, ahead); break;
      case 3: fold_pass<3>(x, K, k0, kb, w, N, 0, N, out, first, ahead); break;
      case 4: fold_pass<4>(x, K, k0, kb, w, N, 0, N, out, first, ahead); break;
      case 5: fold_pass<5>(x, K, k0, kb, w, N, 0, N, out, first, ahead); break;
      case 6: fold_pass<6>(x, K, k0, kb, w, N, 0, N, out, first, ahead); break;
      case 7: fold_pass<7>(x, K, k0, kb, w, N, 0, N, out, first, ahead); break;
      default: fold_pass<8>(x, K, k0, kb, w, N, 0, N, out, first, ahead); break;
    }
  }
}

// ---- Many rows (compute-bound): a packed GEMM ----
//
// Past kStreamRows rows each weight is used by many rows, so the work is FMAs, not reads. XLA
// CPU's GEMM reaches ~62% of this VM's FMA peak on a 2048-cube (211 of 341 GFLOP/s, Intel Xeon,
// 2 cores) and less on the engine's shapes; this one follows the BLIS recipe: w in contiguous
// panels of kPanelCols columns (packed once at load, or per call into a thread's buffer), blocks
// of kDepth rows of a panel held in L2 while every 8-row tile of x runs over them, 24
// accumulators (8 rows x 3 vectors) in registers, the next block prefetched while one computes.
// A row's sum runs over k in order, one FMA a term, blocks of kDepth added in order: its result
// does not depend on M.
constexpr int64_t kTileRows = 8;         // rows of x per microkernel (24 of 32 vector registers)
constexpr int64_t kPanelCols = 48;       // columns per packed panel: 3 vectors
constexpr int64_t kDepth = 1024;         // rows of w per block: 192 KB in L2 (a C++ harness at 64 rows,
                                         // hot weights: 245 GFLOP/s at 128 rows, 268 at 256, 292 at 768)
constexpr int64_t kBlockRows = 512;      // rows of x per pass over a panel
constexpr int64_t kPanelsPerItem = 8;    // most panels a thread takes at once

// c[MR x 48] (+)= a[MR x kc] (rows lda apart) @ bp[kc x 48]; prefetches pf_rows rows (pf_stride
// bytes apart) of the next block into L2 as it goes, a line or so per k step (a burst at the
// start overflows the L2 miss queue), spread over the tiles by the caller.
template <int MR, typename T>
inline void tile(const float* a, int64_t lda, const T* bp, int64_t kc, float* c, int64_t ldc, bool first,
                 const char* pf, int64_t pf_rows, int64_t pf_stride) {
  static constexpr int64_t kLineAt[4] = {0, 64, 128, 191};  // a row of 48 floats spans 4 lines unless aligned
  const int64_t lines = pf_rows * 4, per_step = (lines + kc - 1) / kc;
  const int64_t pf_steps = per_step ? (lines + per_step - 1) / per_step : 0;  // the k steps that prefetch
  v16 acc[MR][3];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 3; ++j) acc[m][j] = first ? v16{} : load16(c + m * ldc + kLanes * j);
  auto fold = [&](int64_t k) __attribute__((always_inline)) {
    const T* b = bp + k * kPanelCols;
    const v16 b0 = load16(b), b1 = load16(b + kLanes), b2 = load16(b + 2 * kLanes);
    for (int m = 0; m < MR; ++m) {
      const float s = a[m * lda + k];
      acc[m][0] += s * b0;  // one FMA each (-ffp-contract=fast)
      acc[m][1] += s * b1;
      acc[m][2] += s * b2;
    }
  };
  int64_t k = 0;
  for (; k < pf_steps; ++k) {  // the prefetching steps, then a loop with nothing else in it
    for (int64_t i = k * per_step; i < std::min(lines, (k + 1) * per_step); ++i)
      __builtin_prefetch(pf + (i >> 2) * pf_stride + kLineAt[i & 3], 0, 2);
    fold(k);
  }
  // two k steps a loop: +10-15% at 512-1024 rows (a C++ harness, hot weights, 2 threads)
#pragma GCC unroll 2
  for (; k < kc; ++k) fold(k);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 3; ++j) store16(c + m * ldc + kLanes * j, acc[m][j]);
}

// The last panel of a width that is not a multiple of 48: through a 48-wide scratch tile.
template <int MR, typename T>
void edge_tile(const float* a, int64_t lda, const T* bp, int64_t kc, float* c, int64_t ldc, bool first,
               int64_t cols) {
  alignas(64) float scratch[MR * kPanelCols];
  if (!first)
    for (int m = 0; m < MR; ++m) std::memcpy(scratch + m * kPanelCols, c + m * ldc, cols * sizeof(float));
  tile<MR, T>(a, lda, bp, kc, scratch, kPanelCols, first, nullptr, 0, 0);
  for (int m = 0; m < MR; ++m) std::memcpy(c + m * ldc, scratch + m * kPanelCols, cols * sizeof(float));
}

template <int MR, typename T>
void any_tile(const float* a, int64_t lda, const T* bp, int64_t kc, float* c, int64_t ldc, bool first,
              int64_t cols, const char* pf, int64_t pf_rows, int64_t pf_stride) {
  if (cols == kPanelCols) tile<MR, T>(a, lda, bp, kc, c, ldc, first, pf, pf_rows, pf_stride);
  else edge_tile<MR, T>(a, lda, bp, kc, c, ldc, first, cols);
}

// Rows [0, M) of x (K apart) against one packed block; the next block's pf_rows rows are
// prefetched a share per tile.
template <typename T>
void tiles(const float* x, int64_t K, int64_t M, const T* bp, int64_t kc, float* out, int64_t N, bool first,
           int64_t cols, const char* pf, int64_t pf_rows, int64_t pf_stride) {
  const int64_t share = (pf_rows + std::max<int64_t>(M / kTileRows, 1) - 1) / std::max<int64_t>(M / kTileRows, 1);
  int64_t m = 0, done = 0;
  for (; m + kTileRows <= M; m += kTileRows, done += share) {
    const int64_t rows = std::max<int64_t>(0, std::min(share, pf_rows - done));
    any_tile<kTileRows, T>(x + m * K, K, bp, kc, out + m * N, N, first, cols, pf + done * pf_stride, rows, pf_stride);
  }
  const float* xm = x + m * K;
  float* om = out + m * N;
  switch (M - m) {
    case 1: any_tile<1, T>(xm, K, bp, kc, om, N, first, cols, nullptr, 0, 0); break;
    case 2: any_tile<2, T>(xm, K, bp, kc, om, N, first, cols, nullptr, 0, 0); break;
    case 3: any_tile<3, T>(xm, K, bp, kc, om, N, first, cols, nullptr, 0, 0); break;
    case 4: any_tile<4, T>(xm, K, bp, kc, om, N, first, cols, nullptr, 0, 0); break;
    case 5: any_tile<5, T>(xm, K, bp, kc, om, N, first, cols, nullptr, 0, 0); break;
    case 6: any_tile<6, T>(xm, K, bp, kc, om, N, first, cols, nullptr, 0, 0); break;
    case 7: any_tile<7, T>(xm, K, bp, kc, om, N, first, cols, nullptr, 0, 0); break;
    default: break;
  }
}

// One packed panel (K rows of 48, contiguous) times rows [0, M) of x (K apart) into out's
// columns n0 .. n0 + cols: blocks of kDepth rows in k order. `more` says the next panel follows
// in memory: its first block is prefetched while the last one runs.
template <typename T>
void panel_times_rows(const float* x, int64_t K, int64_t M, const T* panel, bool more, float* out, int64_t N,
                      int64_t n0, int64_t cols) {
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t kc = std::min(kDepth, K - k0);
    const int64_t next_rows = k0 + kc < K ? std::min(kDepth, K - k0 - kc) : more ? std::min(kDepth, K) : 0;
    tiles(x + k0, K, M, panel + k0 * kPanelCols, kc, out + n0, N, k0 == 0, cols,
          reinterpret_cast<const char*>(panel + (k0 + kc) * kPanelCols), next_rows,
          kPanelCols * static_cast<int64_t>(sizeof(T)));
  }
}

// Packed once (weights at load, `pack_weight`): panels [p0, p1) for rows [rows0, rows1), each
// block of kBlockRows rows over every panel.
template <typename T>
void packed_panels(const float* x, int64_t M, int64_t K, const T* wp, int64_t N, float* out, int64_t p0, int64_t p1,
                   int64_t rows0, int64_t rows1) {
  for (int64_t m0 = rows0; m0 < rows1; m0 += kBlockRows)
    for (int64_t p = p0; p < p1; ++p)
      panel_times_rows(x + m0 * K, K, std::min(kBlockRows, rows1 - m0), wp + p * K * kPanelCols, p + 1 < p1,
                       out + m0 * N, N, p * kPanelCols, std::min(kPanelCols, N - p * kPanelCols));
}

// Packed per call (`matmul(impl="cpu")` past kStreamRows rows): each of panels [p0, p1) of w is
// copied as f32 into the thread's [K, 48] buffer (zeros past N), then every row block runs over it.
template <typename T>
void gemm_panels(const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* out, int64_t p0, int64_t p1) {
  thread_local std::vector<float> buffer;
  buffer.resize(K * kPanelCols);
  float* bp = buffer.data();
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kPanelCols, cols = std::min(kPanelCols, N - n0);
    for (int64_t k = 0; k < K; ++k) {
      const T* src = w + k * N + n0;
      float* dst = bp + k * kPanelCols;
      if (cols == kPanelCols) {
        for (int j = 0; j < 3; ++j) store16(dst + kLanes * j, load16(src + kLanes * j));
      } else {
        for (int64_t j = 0; j < cols; ++j) dst[j] = load1(src + j);
        std::fill(dst + cols, dst + kPanelCols, 0.0f);
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows)
      panel_times_rows(x + m0 * K, K, std::min(kBlockRows, M - m0), bp, false, out + m0 * N, N, n0, cols);
  }
}

template <typename T>
void packed_matmul(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* wp, int64_t N, float* out) {
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
  // about 8 runs of panels a thread (9 items on 2 threads left one idle for a ninth of the
  // time); with few rows a run is also >= 256 KB of weights (a hand-off costs ~10 us); past
  // kBlockRows rows, each block of rows is items of its own
  int64_t per = std::clamp<int64_t>(panels / (8 * threads), 1, kPanelsPerItem);
  if (M <= kStreamRows) per = std::max(per, std::min(panels, (kMinPartBytes / static_cast<int64_t>(sizeof(T))) / (K * kPanelCols) + 1));
  const int64_t runs = (panels + per - 1) / per, row_blocks = (M + kBlockRows - 1) / kBlockRows;
  parallel(pool, runs * row_blocks, threads - 1, [=](int64_t i) {
    const int64_t run = i % runs, rows0 = i / runs * kBlockRows;
    packed_panels(x, M, K, wp, N, out, run * per, std::min(panels, (run + 1) * per), rows0, std::min(M, rows0 + kBlockRows));
  });
}

template <typename T>
void matmul(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* out) {
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);  // the caller and num_threads - 1 helpers
  if (M > kStreamRows) {  // compute-bound: runs of panels, any thread any run (about 8 runs a thread)
    const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
    const int64_t per = std::clamp<int64_t>(panels / (8 * threads), 1, kPanelsPerItem);
    parallel(pool, (panels + per - 1) / per, threads - 1, [=](int64_t i) {
      gemm_panels(x, M, K, w, N, out, i * per, std::min(panels, (i + 1) * per));
    });
    return;
  }
  // bandwidth-bound: one contiguous part of w's rows per thread, partial sums added in part order
  const int64_t bytes = K * N * static_cast<int64_t>(sizeof(T));
  const int64_t parts = std::max<int64_t>(1, std::min({threads, K / kMinPartRows, bytes / kMinPartBytes}));
  const int64_t rows = (K + parts - 1) / parts;
  std::vector<float> partial((parts - 1) * M * N);  // parts 1.. (part 0 writes out)
  float* pp = partial.data();
  parallel(pool, parts, parts - 1, [=](int64_t i) {
    block(x, K, M, i * rows, std::min(K, (i + 1) * rows), w, N, i == 0 ? out : pp + (i - 1) * M * N);
  });
  for (int64_t i = 1; i < parts; ++i)
    for (int64_t j = 0; j < M * N; ++j) out[j] += pp[(i - 1) * M * N + j];
}

// out = x @ w with run(x, M, K, typed w, N, out) for f32 or bf16 w; empty shapes need no call.
template <typename Run>
ffi::Error run_typed(const char* name, ffi::Buffer<ffi::F32>& x, ffi::AnyBuffer& w, int64_t N, float* op, Run run) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  if (K == 0) std::fill(op, op + M * N, 0.0f);
  if (M == 0 || N == 0 || K == 0) return ffi::Error::Success();
  switch (w.element_type()) {
    case ffi::F32:
      run(x.typed_data(), M, K, w.typed_data<float>(), N, op);
      return ffi::Error::Success();
    case ffi::BF16:
      run(x.typed_data(), M, K, reinterpret_cast<const uint16_t*>(w.untyped_data()), N, op);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(std::string(name) + ": w must be float32 or bfloat16");
  }
}

ffi::Error matmul_cpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || wd[0] != xd[1] || od[0] != xd[0] || od[1] != wd[1])
    return ffi::Error::InvalidArgument("matmul_cpu: want x [M, K], w [K, N], out [M, N]");
  return run_typed("matmul_cpu", x, w, wd[1], out->typed_data(),
                   [&](auto... a) { matmul(pool, a...); });
}

ffi::Error matmul_packed_cpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                             ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2 || wd[1] != xd[1] || wd[2] != kPanelCols ||
      od[0] != xd[0] || wd[0] != (od[1] + kPanelCols - 1) / kPanelCols)
    return ffi::Error::InvalidArgument("matmul_packed_cpu: want x [M, K], w [ceil(N / 48), K, 48], out [M, N]");
  return run_typed("matmul_packed_cpu", x, w, od[1], out->typed_data(),
                   [&](auto... a) { packed_matmul(pool, a...); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpustackMatmulPackedCpu, matmul_packed_cpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpustackMatmulCpu, matmul_cpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
