// Dense matmul with few rows on CPU: an XLA FFI custom call (see matmul_cpu.py).
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
// depend on M or on which thread ran which part. Past kStreamRows rows the work is compute-bound:
// column chunks instead, each pass of w folded into every group of rows while it is cached.
// Work items are shared by the calling thread and XLA's intra-op thread pool through an atomic
// counter (cpu_common.h: no second thread pool).

#include <algorithm>
#include <cstdint>
#include <cstring>
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
constexpr int64_t kChunkCols = 256;           // columns per work item past kStreamRows rows of x
constexpr int64_t kChunkPass = 32;            // rows of w a pass there (re-read from L1 by each row group)

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

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

// out[:, c0:c1] = x[:, ka:kz] @ w[ka:kz, c0:c1] for all M rows of x (K apart): passes of
// kRowsPerPass rows of w, each folded into every group of kStreamRows rows of x while it is
// in cache, so w is read from memory once. A row's sums run over k in order whatever M is.
template <int64_t kPass, typename T>
void block(const float* x, int64_t K, int64_t M, int64_t ka, int64_t kz, const T* w, int64_t N, int64_t c0,
           int64_t c1, float* out) {
  for (int64_t k0 = ka; k0 < kz; k0 += kPass) {
    const int64_t kb = std::min(kPass, kz - k0);
    const int64_t ahead = std::min(kPass, kz - k0 - kb);
    for (int64_t m0 = 0; m0 < M; m0 += kStreamRows) {
      const float* xm = x + m0 * K;
      float* om = out + m0 * N;
      const bool first = k0 == ka;
      const int64_t pf = m0 == 0 ? ahead : 0;  // the first group prefetches; the rest find it cached
      switch (std::min(kStreamRows, M - m0)) {
        case 1: fold_pass<1>(xm, K, k0, kb, w, N, c0, c1, om, first, pf); break;
        case 2: fold_pass<2>(xm, K, k0, kb, w, N, c0, c1, om, first, pf); break;
        case 3: fold_pass<3>(xm, K, k0, kb, w, N, c0, c1, om, first, pf); break;
        case 4: fold_pass<4>(xm, K, k0, kb, w, N, c0, c1, om, first, pf); break;
        case 5: fold_pass<5>(xm, K, k0, kb, w, N, c0, c1, om, first, pf); break;
        case 6: fold_pass<6>(xm, K, k0, kb, w, N, c0, c1, om, first, pf); break;
        case 7: fold_pass<7>(xm, K, k0, kb, w, N, c0, c1, om, first, pf); break;
        default: fold_pass<8>(xm, K, k0, kb, w, N, c0, c1, om, first, pf); break;
      }
    }
  }
}

template <typename T>
void matmul(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* out) {
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);  // the caller and num_threads - 1 helpers
  if (M > kStreamRows) {  // compute-bound: column chunks (w still read once in all), any thread any chunk
    const int64_t chunks = (N + kChunkCols - 1) / kChunkCols;
    parallel(pool, chunks, threads - 1, [=](int64_t i) {
      block<kChunkPass>(x, K, M, 0, K, w, N, i * kChunkCols, std::min(N, (i + 1) * kChunkCols), out);
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
    block<kRowsPerPass>(x, K, M, i * rows, std::min(K, (i + 1) * rows), w, N, 0, N, i == 0 ? out : pp + (i - 1) * M * N);
  });
  for (int64_t i = 1; i < parts; ++i)
    for (int64_t j = 0; j < M * N; ++j) out[j] += pp[(i - 1) * M * N + j];
}

ffi::Error matmul_cpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || wd[0] != xd[1] || od[0] != xd[0] || od[1] != wd[1])
    return ffi::Error::InvalidArgument("matmul_cpu: want x [M, K], w [K, N], out [M, N]");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  float* op = out->typed_data();
  if (K == 0) std::fill(op, op + M * N, 0.0f);
  if (M == 0 || N == 0 || K == 0) return ffi::Error::Success();
  switch (w.element_type()) {
    case ffi::F32:
      matmul(pool, x.typed_data(), M, K, w.typed_data<float>(), N, op);
      return ffi::Error::Success();
    case ffi::BF16:
      matmul(pool, x.typed_data(), M, K, reinterpret_cast<const uint16_t*>(w.untyped_data()), N, op);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("matmul_cpu: w must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpustackMatmulCpu, matmul_cpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
