// CUDA kernel for rlhf_kernels::gae: a block scans one chunk of one row as affine
// maps (csrc/gae_scan.h) in float32 (float64 for float64 inputs).
//
// A chunk is walked in tiles of kThreads x kItems positions from its end. In a tile,
// each thread composes the maps of its kItems consecutive positions, the warps scan
// those maps right to left with shuffles, warp totals are chained by one thread, and
// each thread replays its positions from its incoming state, writing A and A + V.
// The state at the tile's first position carries into the tile before it.
//
// Rows longer than one chunk (few rows: B below the blocks that fill the GPU) are
// cut into chunks: a first launch reduces each chunk to its composed map, the second
// chains the maps of the chunks after its own (at most kMaxChunks) into its incoming
// state and scans. T up to 128k at B = 1 is 64 chunks of 2048 in flight.
// Compiled in CI; not yet run on a GPU (tile sizes untuned).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../gae_checks.h"
#include "../gae_scan.h"

namespace rlhf_kernels {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;      // positions per thread: a 2048-position tile
constexpr int64_t kTile = int64_t(kThreads) * kItems;
constexpr int64_t kMaxChunks = 64;
constexpr int kNumMapFields = 5;

template <typename acc_t>
__device__ __forceinline__ GaeMap<acc_t> shuffle_down(const GaeMap<acc_t>& f, int offset) {
  constexpr unsigned kAll = 0xffffffffu;
  return {__shfl_down_sync(kAll, f.p, offset), __shfl_down_sync(kAll, f.q, offset),
          __shfl_down_sync(kAll, f.u, offset), __shfl_down_sync(kAll, f.x, offset),
          __shfl_down_sync(kAll, f.y, offset)};
}

// Right-to-left scan of one map per lane. Returns the composition of the lanes after
// this one (identity for lane 31); `total` gets the whole warp's composition in lane 0.
template <typename acc_t>
__device__ __forceinline__ GaeMap<acc_t> warp_exclusive_scan(const GaeMap<acc_t>& own, GaeMap<acc_t>& total) {
  const int lane = threadIdx.x & 31;
  GaeMap<acc_t> inclusive = own;  // lanes [lane, lane + 2 offset) after each step
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const GaeMap<acc_t> later = shuffle_down(inclusive, offset);
    if (lane + offset < 32) inclusive = gae_compose(inclusive, later);
  }
  total = inclusive;
  GaeMap<acc_t> exclusive = shuffle_down(inclusive, 1);
  return lane == 31 ? gae_identity<acc_t>() : exclusive;
}

template <typename scalar_t, typename acc_t>
struct RowView {
  const scalar_t* rewards;
  const scalar_t* values;
  const scalar_t* mask;  // null: all ones
  scalar_t* advantages;
  scalar_t* returns;
};

// Scans (kFinal) or reduces (!kFinal) positions [begin, end) of one row, walking
// tiles from the end. `state` is the incoming state (used when kFinal); returns, in
// thread 0, the chunk's composed map (used when !kFinal).
template <bool kFinal, typename scalar_t, typename acc_t>
__device__ GaeMap<acc_t> scan_chunk(const RowView<scalar_t, acc_t>& row, int64_t begin, int64_t end,
                                    GaeState<acc_t> state, acc_t gamma, acc_t lam, GaeMaskMode mode) {
  __shared__ GaeMap<acc_t> warp_totals[kWarps];
  __shared__ GaeState<acc_t> warp_states[kWarps];
  __shared__ GaeState<acc_t> carry;
  const int warp = threadIdx.x / 32;
  GaeMap<acc_t> chunk_map = gae_identity<acc_t>();
  if (threadIdx.x == 0) carry = state;
  for (int64_t tile_end = end; tile_end > begin; tile_end -= kTile) {
    const int64_t tile_begin = tile_end - kTile > begin ? tile_end - kTile : begin;
    const int64_t first = tile_begin + int64_t(threadIdx.x) * kItems;
    const int64_t last = first + kItems < tile_end ? first + kItems : tile_end;  // may be empty
    const GaeMap<acc_t> own = gae_segment_map<scalar_t, acc_t>(row.rewards, row.values, row.mask, first, last,
                                                                gamma, lam, mode);
    GaeMap<acc_t> warp_total;
    const GaeMap<acc_t> after_me = warp_exclusive_scan(own, warp_total);
    if ((threadIdx.x & 31) == 0) warp_totals[warp] = warp_total;
    __syncthreads();
    if (threadIdx.x == 0) {
      GaeState<acc_t> s = carry;
      GaeMap<acc_t> tile_map = gae_identity<acc_t>();
      for (int w = kWarps - 1; w >= 0; --w) {
        warp_states[w] = s;
        s = gae_apply(warp_totals[w], s);
        tile_map = gae_compose(warp_totals[w], tile_map);
      }
      carry = s;
      chunk_map = gae_compose(tile_map, chunk_map);
    }
    __syncthreads();
    if (kFinal) {
      gae_scan_segment<scalar_t, acc_t>(row.rewards, row.values, row.mask, row.advantages, row.returns, first,
                                        last, gae_apply(after_me, warp_states[warp]), gamma, lam, mode);
    }
    __syncthreads();  // warp_totals / warp_states are rewritten by the next tile
  }
  return chunk_map;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ RowView<scalar_t, acc_t> row_view(
    const scalar_t* rewards, const scalar_t* values, const scalar_t* mask, scalar_t* advantages, scalar_t* returns,
    int64_t row, int64_t T) {
  const int64_t offset = row * T;
  return {rewards + offset, values + offset, mask == nullptr ? nullptr : mask + offset,
          advantages == nullptr ? nullptr : advantages + offset, returns == nullptr ? nullptr : returns + offset};
}

// Block (row, chunk) writes its chunk's map to chunk_maps[row, chunk, 0:5].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) gae_chunk_maps_kernel(
    const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values, const scalar_t* __restrict__ mask,
    acc_t* __restrict__ chunk_maps, int64_t T, int64_t chunk, int64_t chunks, acc_t gamma, acc_t lam,
    GaeMaskMode mode) {
  const int64_t row = blockIdx.x / chunks;
  const int64_t c = blockIdx.x % chunks;
  const auto view = row_view<scalar_t, acc_t>(rewards, values, mask, nullptr, nullptr, row, T);
  const int64_t end = (c + 1) * chunk < T ? (c + 1) * chunk : T;
  const GaeMap<acc_t> f =
      scan_chunk<false>(view, c * chunk, end, GaeState<acc_t>{0, 0}, gamma, lam, mode);
  if (threadIdx.x == 0) {
    acc_t* out = chunk_maps + (row * chunks + c) * kNumMapFields;
    out[0] = f.p, out[1] = f.q, out[2] = f.u, out[3] = f.x, out[4] = f.y;
  }
}

// Block (row, chunk) chains the maps of the row's later chunks into its incoming
// state, then scans its chunk.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) gae_scan_kernel(
    const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values, const scalar_t* __restrict__ mask,
    scalar_t* __restrict__ advantages, scalar_t* __restrict__ returns, const acc_t* __restrict__ chunk_maps,
    int64_t T, int64_t chunk, int64_t chunks, acc_t gamma, acc_t lam, GaeMaskMode mode) {
  const int64_t row = blockIdx.x / chunks;
  const int64_t c = blockIdx.x % chunks;
  GaeState<acc_t> state{0, 0};
  if (threadIdx.x == 0) {  // only thread 0's state is read (scan_chunk's carry)
    for (int64_t later = chunks - 1; later > c; --later) {
      const acc_t* f = chunk_maps + (row * chunks + later) * kNumMapFields;
      state = gae_apply(GaeMap<acc_t>{f[0], f[1], f[2], f[3], f[4]}, state);
    }
  }
  const auto view = row_view<scalar_t, acc_t>(rewards, values, mask, advantages, returns, row, T);
  const int64_t end = (c + 1) * chunk < T ? (c + 1) * chunk : T;
  scan_chunk<true>(view, c * chunk, end, state, gamma, lam, mode);
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(
    const at::Tensor& rewards, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    double gamma, double lam, c10::string_view mask_mode) {
  check_gae_inputs(rewards, values, mask, at::kCUDA);
  const GaeMaskMode mode = parse_gae_mask_mode(std::string_view(mask_mode.data(), mask_mode.size()));
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const int64_t B = rewards.size(0);
  const int64_t T = rewards.size(1);
  at::Tensor advantages = at::empty_like(rewards);
  at::Tensor returns = at::empty_like(rewards);
  if (rewards.numel() == 0) return {advantages, returns};

  // Enough blocks for 4 per SM; a row gets more than one chunk only when B is below that.
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, rewards.get_device()));
  const int64_t wanted_blocks = 4 * int64_t(sm_count);
  const int64_t tiles = (T + kTile - 1) / kTile;
  const int64_t chunks_wanted = std::min<int64_t>({(wanted_blocks + B - 1) / B, tiles, kMaxChunks});
  const int64_t chunk = ((tiles + chunks_wanted - 1) / chunks_wanted) * kTile;
  const int64_t chunks = (T + chunk - 1) / chunk;
  TORCH_CHECK(B * chunks <= int64_t(INT32_MAX), "gae: B = ", B, " rows is too many for one launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "rlhf_kernels::gae (CUDA)", [&] {
    using acc_t = scalar_t;  // float32 or float64, as the inputs
    const scalar_t* r = rewards.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* m = mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr;
    at::Tensor chunk_maps = at::empty({chunks > 1 ? B * chunks * kNumMapFields : 0}, rewards.options());
    acc_t* maps = chunks > 1 ? chunk_maps.mutable_data_ptr<acc_t>() : nullptr;
    const unsigned blocks = static_cast<unsigned>(B * chunks);
    if (chunks > 1) {
      gae_chunk_maps_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          r, v, m, maps, T, chunk, chunks, acc_t(gamma), acc_t(lam), mode);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    gae_scan_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        r, v, m, advantages.mutable_data_ptr<scalar_t>(), returns.mutable_data_ptr<scalar_t>(), maps, T, chunk,
        chunks, acc_t(gamma), acc_t(lam), mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("gae", &gae_cuda);
}

}  // namespace rlhf_kernels
