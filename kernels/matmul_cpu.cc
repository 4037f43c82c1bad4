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
// depend on M or on which thread ran which part. Parts are shared by the calling thread
// and XLA's intra-op thread pool through an atomic counter (no second thread pool).

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
constexpr int64_t kAhead = 1;                 // passes prefetched ahead
constexpr int64_t kMinPartRows = 64;          // rows of w worth a thread
constexpr int64_t kMinPartBytes = 256 << 10;  // bytes of w worth a thread (a hand-off costs ~10 us)

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// out[0:MR, :] = x[0:MR, 0:K] @ w[0:K, :] for w with N columns; x rows are ldx apart.
template <int MR, typename T>
void stream_rows(const float* x, int64_t ldx, int64_t K, const T* w, int64_t N, float* out) {
  constexpr int64_t kStep = 2 * kLanes;
  const int64_t vec_end = N / kStep * kStep;
  for (int64_t k0 = 0; k0 < K; k0 += kRowsPerPass) {
    const int64_t kb = std::min(kRowsPerPass, K - k0);
    const int64_t ahead = std::min(kRowsPerPass, std::max<int64_t>(0, K - k0 - kAhead * kRowsPerPass));
    for (int64_t n = 0; n < vec_end; n += kStep) {
      for (int64_t kk = 0; kk < ahead; ++kk) {  // a later pass's rows at these columns
        const char* p = reinterpret_cast<const char*>(w + (k0 + kAhead * kRowsPerPass + kk) * N + n);
        __builtin_prefetch(p, 0, 2);  // into L2 (prefetcht1): the pass after this one reads it
        if (kStep * sizeof(T) > 64) __builtin_prefetch(p + 64, 0, 2);
      }
      v16 acc[MR][2];
      for (int m = 0; m < MR; ++m) {
        acc[m][0] = k0 ? load16(out + m * N + n) : v16{};
        acc[m][1] = k0 ? load16(out + m * N + n + kLanes) : v16{};
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
    for (int64_t n = vec_end; n < N; ++n)  // the last N % 32 columns
      for (int m = 0; m < MR; ++m) {
        float acc = k0 ? out[m * N + n] : 0.0f;
        for (int64_t kk = 0; kk < kb; ++kk) acc = __builtin_fmaf(x[m * ldx + k0 + kk], load1(w + (k0 + kk) * N + n), acc);
        out[m * N + n] = acc;
      }
  }
}

// out [M, N] = x[:, 0:K] @ w[0:K, :], x's rows ldx apart, kStreamRows rows of x per pass over w.
template <typename T>
void stream(const float* x, int64_t ldx, int64_t M, int64_t K, const T* w, int64_t N, float* out) {
  for (int64_t m0 = 0; m0 < M; m0 += kStreamRows) {
    const float* xm = x + m0 * ldx;
    float* om = out + m0 * N;
    switch (std::min(kStreamRows, M - m0)) {
      case 1: stream_rows<1>(xm, ldx, K, w, N, om); break;
      case 2: stream_rows<2>(xm, ldx, K, w, N, om); break;
      case 3: stream_rows<3>(xm, ldx, K, w, N, om); break;
      case 4: stream_rows<4>(xm, ldx, K, w, N, om); break;
      case 5: stream_rows<5>(xm, ldx, K, w, N, om); break;
      case 6: stream_rows<6>(xm, ldx, K, w, N, om); break;
      case 7: stream_rows<7>(xm, ldx, K, w, N, om); break;
      default: stream_rows<8>(xm, ldx, K, w, N, om); break;
    }
  }
}

template <typename T>
void matmul(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* out) {
  const int64_t bytes = K * N * static_cast<int64_t>(sizeof(T));
  const int64_t parts = std::max<int64_t>(
      1, std::min({pool.num_threads() + 1, K / kMinPartRows, bytes / kMinPartBytes}));
  const int64_t rows = (K + parts - 1) / parts;
  std::vector<float> partial((parts - 1) * M * N);  // parts 1.. (part 0 writes out)
  float* pp = partial.data();
  parallel(pool, parts, parts - 1, [=](int64_t i) {
    const int64_t k0 = i * rows;
    stream(x + k0, K, M, std::min(rows, K - k0), w + k0 * N, N, i == 0 ? out : pp + (i - 1) * M * N);
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
