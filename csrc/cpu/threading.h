// The threading policy of every CPU kernel (docs/DESIGN.md, "CPU threading").
//
// 1. Size: a call that moves fewer bytes than its family's threshold runs on the calling
//    thread, with no parallel region at all; above it, at::parallel_for /
//    parallel_reduce with a grain that gives every task at least kMinTaskBytes.
// 2. Contention: a parallel region waits for every pool thread to get a core. On a busy
//    machine (this 2-core VM with two busy background processes) a cold OpenMP pool made
//    every region cost 2-32 ms whatever its size (gae 64 x 1024: 0.11 ms idle, a 20 ms
//    median busy with 2 threads; 0.13 ms either way on one thread). So every region is
//    timed: when the calling thread waited at the end for longer than its own share of
//    the work (and > kLateMs), the machine is busy, and for a back-off window
//    (kBackoffMs, doubled per busy region in a row up to kBackoffMaxMs) each family uses
//    its busy threshold instead, the size from which 2 threads beat 1 on the busy
//    machine. A region that finishes on time ends the back-off.
//
// Results never depend on the plan: every kernel gives each output row to one task, cuts
// elementwise loops at multiples of 64 elements (parallel_for_elements), or reduces in
// fixed blocks combined in a fixed order (ordered_reduce), so serial and parallel runs
// agree bit for bit, and the load of the
// machine cannot change a result (gae's choice to cut rows into chunks depends on the
// size and the thread count only: Plan::large).
//
// Work is counted in bytes moved (the kernel's reads and writes of its tensors; for
// ranking_loss, its K^2 pair terms); the thresholds are in those bytes, measured per
// family, with the measurements next to each constant.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace rlhf_kernels {
namespace threading {

constexpr int64_t kKiB = int64_t(1) << 10;
constexpr int64_t kMiB = int64_t(1) << 20;

// Every parallel task moves at least this much.
constexpr int64_t kMinTaskBytes = 64 * kKiB;

// A family's thresholds: parallel regions from `idle` bytes on, or from `busy` bytes
// on while a back-off is on.
struct Thresholds {
  int64_t idle;
  int64_t busy;
};

// Measured on the 2-core AMD EPYC VM (AVX-512), fp32, shared with other jobs: ms of one
// call on 1 thread vs 2 (min of 4 interleaved medians of 31). idle: back to back, the
// machine as found; the threshold is the first measured size where 2 threads gained
// >= ~1.4x. busy: with two busy background processes, a 5 ms pause before each call
// (cold pool), min of 2 medians of 9-21; the threshold is the size from which 2
// threads were no slower than 1. Sizes are elements of one [B, T] input, B x 1024.
//
// gae (20 B a position with a mask): idle 16384 pos 0.035 vs 0.029 ms (1.21x), 65536
//   0.144 vs 0.102 (1.41x, 1.25 MiB); busy 1M pos (20 MiB) 1t 4.4-12 vs 2t 8-11 ms,
//   4M (80 MiB) 81 vs 72.
constexpr Thresholds kGae{1 * kMiB, 64 * kMiB};
// masked_whiten / masked_sums (whiten: 20 B an element forward, 28 backward): idle
//   16384 fwd 0.88x, bwd 0.79x; 65536 fwd 0.041 vs 0.028 ms (1.45x, 1.25 MiB), bwd
//   0.036 vs 0.025 (1.46x); busy 4M fwd (80 MiB) 1t 3.5 vs 2t 40 ms, bwd (112 MiB) 30 vs
//   52; 8M fwd (160 MiB, before the one-read forward) 158 vs 175.
constexpr Thresholds kMasked{1 * kMiB, 256 * kMiB};
// kl_penalty (16 B an element with the slope) / kl_shaped_rewards (20 B): idle 16384
//   1.03x / 0.89x, 65536 shaped 0.057 vs 0.035 ms (1.63x, 1.25 MiB); busy 4M penalty
//   (64 MiB) 1t 15.8 vs 2t 24 ms, shaped (80 MiB) 3.3 vs 32.
constexpr Thresholds kKl{1 * kMiB, 256 * kMiB};
// ppo_policy_loss (20 B a token with the gradient): idle 16384 0.031 vs 0.024 ms (1.32x,
//   320 KiB), 65536 1.58x; busy 4M (80 MiB) 1t 26 vs 2t 32 ms.
constexpr Thresholds kPpoPolicy{512 * kKiB, 256 * kMiB};
// ppo_value_loss (20 B a token): idle 16384 0.98x, 65536 0.052 vs 0.036 ms (1.44x,
//   1.25 MiB); busy 4M (80 MiB) 1t 2.8 vs 2t 19 ms.
constexpr Thresholds kPpoValue{1 * kMiB, 512 * kMiB};
// token_logprobs (V = 32000; 4 B a logit forward, 8 backward): idle 2 rows (250 KiB)
//   forward 0.089 vs 0.048 ms (1.84x), backward (500 KiB) 1.62x; busy 128 rows forward
//   (16 MiB) 24.4 vs 24.1 ms, backward (32 MiB) 25 vs 32, 512 rows forward (64 MiB) 96
//   vs 88, backward (128 MiB) 332 vs 237.
constexpr Thresholds kLogprobs{256 * kKiB, 64 * kMiB};
// dpo_loss (sigmoid, 36 B a pair with the gradient; exp / log1p a pair): idle 1024
//   pairs 0.093 vs 0.062 ms (1.51x, 36 KiB), 4096 1.85x; the floor is two 64 KiB tasks;
//   busy 65536 (2.3 MiB) 1t 3.5 vs 2t 28 ms, 262144 (9 MiB) 100 vs 90.
constexpr Thresholds kDpo{128 * kKiB, 8 * kMiB};
// bradley_terry_loss (16 B an element with the slope): idle 4096 1.07x (64 KiB), 16384
//   0.272 vs 0.161 ms (1.69x, 256 KiB); busy 262144 (4 MiB) 1t 25.6 vs 2t 28 ms, 1M
//   (16 MiB) 139 vs 116.
constexpr Thresholds kBradleyTerry{256 * kKiB, 8 * kMiB};
// ranking_loss (K = 8; 4 B counted per pair term, K^2 a prompt): idle 4096 terms
//   0.035 vs 0.024 ms (1.44x), 65536 (256 KiB) 1.86x; the floor is two 64 KiB tasks;
//   busy 262144 terms (1 MiB) 1t 16.7 vs 2t 24 ms, 1M (4 MiB) 64 vs 64.
constexpr Thresholds kRanking{128 * kKiB, 4 * kMiB};

// Contention detection and back-off (item 2 above).
constexpr double kLateMs = 1.0;
constexpr int64_t kBackoffMs = 500;
constexpr int64_t kBackoffMaxMs = 8000;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Process-wide back-off state, shared by every kernel (inline: one instance).
inline std::atomic<int64_t> busy_until_ns{0};
inline std::atomic<int> busy_strikes{0};

// Whether a busy back-off is on now.
inline bool backed_off() { return now_ns() < busy_until_ns.load(std::memory_order_relaxed); }

// Items per task so that each task moves at least kMinTaskBytes.
inline int64_t grain_for(int64_t bytes_per_item) {
  bytes_per_item = std::max<int64_t>(bytes_per_item, 1);
  return std::max<int64_t>(1, (kMinTaskBytes + bytes_per_item - 1) / bytes_per_item);
}

// RLHF_KERNELS_CPU_THREADING: unset (the measured policy), "always" (a parallel region
// for every call, one item a task: the tests reach the parallel paths at small sizes)
// or "never" (every call on the calling thread). Read on every call (a getenv, far
// below a kernel's cost), so a test can set it for one call.
enum class Override { kNone, kAlways, kNever };

inline Override read_override() {
  const char* value = std::getenv("RLHF_KERNELS_CPU_THREADING");
  if (value == nullptr || *value == '\0') return Override::kNone;
  if (std::strcmp(value, "always") == 0) return Override::kAlways;
  if (std::strcmp(value, "never") == 0) return Override::kNever;
  TORCH_CHECK(false, "RLHF_KERNELS_CPU_THREADING must be 'always', 'never' or unset, got '", value, "'");
}

// How one call runs.
struct Plan {
  bool large = false;           // at or above the idle threshold: a size-only fact, for
                                // algorithm choices that must not depend on the load
  bool parallel = false;        // parallel regions now (large, and not backed off, ...)
  bool one_item_tasks = false;  // RLHF_KERNELS_CPU_THREADING=always

  int64_t grain(int64_t bytes_per_item) const { return one_item_tasks ? 1 : grain_for(bytes_per_item); }
};

// The plan of a call that moves `bytes` in all.
inline Plan plan(int64_t bytes, const Thresholds& thresholds) {
  const Override forced = read_override();
  const bool can = at::get_num_threads() > 1 && !at::in_parallel_region();
  if (forced == Override::kAlways) return Plan{true, can, true};
  const bool large = bytes >= thresholds.idle;
  const bool parallel = can && forced == Override::kNone && large && (!backed_off() || bytes >= thresholds.busy);
  return Plan{large, parallel, false};
}

// After a parallel region that took `wall_ns`, of which the calling thread's own task
// took `own_ns`: a region whose caller waited for the others longer than its own work
// (and than kLateMs) starts or extends the back-off; one on time ends it.
inline void record_region(int64_t wall_ns, int64_t own_ns) {
  const int64_t waited = wall_ns - own_ns;
  if (waited > std::max<int64_t>(int64_t(kLateMs * 1e6), own_ns)) {
    const int strikes = std::min(busy_strikes.load(std::memory_order_relaxed) + 1, 16);
    busy_strikes.store(strikes, std::memory_order_relaxed);
    const int64_t window = std::min<int64_t>(kBackoffMaxMs, kBackoffMs << std::min(strikes - 1, 10));
    busy_until_ns.store(now_ns() + window * 1000000, std::memory_order_relaxed);
  } else {
    busy_strikes.store(0, std::memory_order_relaxed);
    busy_until_ns.store(0, std::memory_order_relaxed);
  }
}

// at::parallel_for, timing the region and the calling thread's task (thread 0 of the
// region is the calling thread).
template <typename F>
void timed_parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t start = now_ns();
  int64_t own = -1;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    if (at::get_thread_num() != 0) return f(b, e);
    const int64_t task_start = now_ns();
    f(b, e);
    own = now_ns() - task_start;
  });
  if (own >= 0 && end - begin > grain) record_region(now_ns() - start, own);
}

// f(begin, end) over [begin, end): one call on this thread when serial, else
// at::parallel_for with tasks of at least kMinTaskBytes.
template <typename F>
void parallel_for(const Plan& plan, int64_t begin, int64_t end, int64_t bytes_per_item, const F& f) {
  if (begin >= end) return;
  if (!plan.parallel) {
    f(begin, end);
    return;
  }
  timed_parallel_for(begin, end, plan.grain(bytes_per_item), f);
}

// Elementwise loops over [0, n): task boundaries at multiples of kAlignItems, so every
// element sits in the same part of a vectorised loop (the vector body or the scalar
// tail) as in one serial call over [0, n). The two may round differently (GCC contracts
// a * b + c into an FMA in one and not the other): with task boundaries anywhere, a
// parallel and a serial call differed in the last bit of 2 of 2.1M masked_whiten
// gradients.
constexpr int64_t kAlignItems = 64;

template <typename F>
void parallel_for_elements(const Plan& plan, int64_t n, int64_t bytes_per_item, const F& f) {
  if (n <= 0) return;
  if (!plan.parallel) {
    f(int64_t(0), n);
    return;
  }
  const int64_t units = (n + kAlignItems - 1) / kAlignItems;
  parallel_for(plan, 0, units, bytes_per_item * kAlignItems,
               [&](int64_t first, int64_t last) { f(first * kAlignItems, std::min(n, last * kAlignItems)); });
}

// A reduction over [0, n) in fixed blocks of `block` items, f(begin, end) -> T per block,
// combined left to right: the same bits on one thread or many, at any thread count.
// Blocks run in parallel under `plan` (tasks of whole blocks, >= kMinTaskBytes).
template <typename T, typename F, typename R>
T ordered_reduce(const Plan& plan, int64_t n, int64_t block, int64_t bytes_per_item, const T& identity, const F& f,
                 const R& combine) {
  if (n <= 0) return identity;
  const int64_t blocks = (n + block - 1) / block;
  std::vector<T> partial(blocks, identity);
  parallel_for(plan, 0, blocks, block * bytes_per_item, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) partial[i] = f(i * block, std::min(n, (i + 1) * block));
  });
  T total = identity;
  for (const T& p : partial) total = combine(total, p);
  return total;
}

}  // namespace threading
}  // namespace rlhf_kernels
