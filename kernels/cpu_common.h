// What the native CPU kernels share (paged_attention_cpu.cc, matmul_cpu.cc): 16-lane f32
// vectors and their loads, and work items spread over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace tpustack_cpu {

// 16 lanes of f32: GCC/Clang vector extensions, lowered to AVX-512, or pairs of AVX2/NEON ops.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
constexpr int kLanes = 16;

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v16 load16(const uint16_t* p) {  // bfloat16: the high half of an f32
  h16v h;
  std::memcpy(&h, p, sizeof(h));
  u16v w = __builtin_convertvector(h, u16v) << 16;
  v16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {  // bfloat16
  uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
inline v16 splat(float x) { return v16{} + x; }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Work shared between the caller and pool tasks; a task that starts after the last item
// finds nothing to do, so the state lives as long as any task holds it.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::function<void(int64_t)> item;
};

inline void run_items(Work& work) {
  int64_t finished = 0;
  for (int64_t i; (i = work.next.fetch_add(1)) < work.total; ++finished) work.item(i);
  if (finished && work.done.fetch_add(finished) + finished == work.total) {
    std::lock_guard<std::mutex> lock(work.mu);
    work.cv.notify_all();
  }
}

// item(0 .. total - 1) on the calling thread and up to `helpers` of XLA's pool threads, through
// an atomic counter: the caller takes any item no helper has started, so it never waits on a
// task that has not begun, and no second thread pool competes for the cores.
inline void parallel(xla::ffi::ThreadPool& pool, int64_t total, int64_t helpers, std::function<void(int64_t)> item) {
  auto work = std::make_shared<Work>();
  work->total = total;
  work->item = std::move(item);
  // The pool has a thread per core and the caller is one more thread: helpers beyond
  // num_threads - 1 would share cores (3 workers on 2 cores ran the head's matmul at the
  // speed of ~1.2).
  helpers = std::min<int64_t>({helpers, std::max<int64_t>(pool.num_threads() - 1, 0), total - 1});
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { run_items(*work); });
  run_items(*work);
  // A helper's item takes about as long as ours: spin a little before sleeping (a sleep and
  // wake-up costs ~10 us, a tenth of a small matmul).
  for (int spin = 0; spin < 20000 && work->done.load(std::memory_order_acquire) != work->total; ++spin) cpu_relax();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->total; });
}

}  // namespace tpustack_cpu
