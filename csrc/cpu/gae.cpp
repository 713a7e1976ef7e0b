// CPU kernel for rlhf_kernels::gae in double (float64 accumulation keeps T = 32k rows
// within fp32 rounding of the exact recursion). Below threading.h's threshold: every
// row scanned on the calling thread. Above it, with enough rows: one sequential
// reverse scan per row, rows in parallel. Fewer rows than threads: each row is cut into
// chunks whose composed maps (csrc/gae_scan.h) are reduced in parallel, chained per
// row, then scanned in parallel from their incoming states, the CUDA kernel's scheme.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "../gae_checks.h"
#include "../gae_scan.h"
#include "threading.h"

namespace rlhf_kernels {
namespace {

// A chunk below 4096 positions (80 KiB of fp32 traffic, above the policy's 64 KiB
// task) costs more in the extra reduction pass and task hand-off than its
// parallelism saves.
constexpr int64_t kMinChunk = 4096;

using Map = GaeMap<double>;
using State = GaeState<double>;

std::tuple<at::Tensor, at::Tensor> gae_cpu(
    const at::Tensor& rewards, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    double gamma, double lam, c10::string_view mask_mode) {
  check_gae_inputs(rewards, values, mask, at::kCPU);
  const GaeMaskMode mode = parse_gae_mask_mode(std::string_view(mask_mode.data(), mask_mode.size()));
  const int64_t B = rewards.size(0);
  const int64_t T = rewards.size(1);
  at::Tensor advantages = at::empty_like(rewards);
  at::Tensor returns = at::empty_like(rewards);
  if (rewards.numel() == 0) return {advantages, returns};

  // Bytes moved per position: rewards, values (and mask) read, advantages and returns written.
  const int64_t position_bytes = (mask.has_value() ? 5 : 4) * int64_t(rewards.element_size());
  const threading::Plan plan = threading::plan(B * T * position_bytes, threading::kGae);
  // Whether rows are chunked depends on the size and thread count only, never on
  // whether this call runs parallel (a back-off): the same inputs give the same bits.
  const int64_t threads = plan.large ? at::get_num_threads() : 1;
  const int64_t chunks_per_row =
      B >= threads ? 1 : std::max<int64_t>(1, std::min((threads + B - 1) / B, T / kMinChunk));
  const int64_t chunk = (T + chunks_per_row - 1) / chunks_per_row;
  const int64_t chunk_bytes = chunk * position_bytes;

  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "rlhf_kernels::gae (CPU)", [&] {
    const scalar_t* r = rewards.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* m = mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* adv = advantages.mutable_data_ptr<scalar_t>();
    scalar_t* ret = returns.mutable_data_ptr<scalar_t>();
    auto row = [&](auto* base, int64_t b) { return base == nullptr ? base : base + b * T; };
    auto chunk_end = [&](int64_t c) { return std::min(T, (c + 1) * chunk); };

    // Incoming state of every (row, chunk): all zeros for one chunk per row.
    std::vector<State> incoming(B * chunks_per_row, State{0.0, 0.0});
    if (chunks_per_row > 1) {
      std::vector<Map> maps(B * chunks_per_row);
      threading::parallel_for(plan, 0, B * chunks_per_row, chunk_bytes, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / chunks_per_row, c = i % chunks_per_row;
          maps[i] = gae_segment_map<scalar_t, double>(row(r, b), row(v, b), row(m, b), c * chunk, chunk_end(c),
                                                      gamma, lam, mode);
        }
      });
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = chunks_per_row - 2; c >= 0; --c) {
          const int64_t i = b * chunks_per_row + c;
          incoming[i] = gae_apply(maps[i + 1], incoming[i + 1]);
        }
      }
    }
    threading::parallel_for(plan, 0, B * chunks_per_row, chunk_bytes, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / chunks_per_row, c = i % chunks_per_row;
        gae_scan_segment<scalar_t, double>(row(r, b), row(v, b), row(m, b), row(adv, b), row(ret, b), c * chunk,
                                           chunk_end(c), incoming[i], gamma, lam, mode);
      }
    });
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("gae", &gae_cpu);
}

}  // namespace rlhf_kernels
