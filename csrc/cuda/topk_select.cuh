// Which Fisher entries an edit keeps, decided on the device: shared by fisher_mask.cu and
// apply_shift.cu.
//
// With `keep`, k = ceil(keep·n) and the threshold t is the k-th largest Fisher value; an entry is
// kept when fisher >= t, so every tie at t is kept (dcedit_kernels/reference/fisher_mask.py).
// With `threshold`, an entry is kept when fisher > threshold, the threshold first rounded to the
// Fisher dtype because that is how torch compares a tensor with a Python float.
//
// The k-th largest value comes from a radix select, not a sort: every value is mapped to an
// unsigned key whose integer order is the float order, and the key's digits are fixed from the
// most significant down, 8 bits per pass (2 passes for fp16/bf16, 4 for fp32, 8 for fp64).  Each
// pass reads the Fisher tensor once and histograms the current digit of the keys that match the
// digits fixed so far (shared-memory histogram per block, flushed with global atomics); a
// one-block kernel then picks the digit that holds the k-th largest key.  The chosen prefix, the
// remaining rank and finally the threshold stay in device memory: nothing here synchronises with
// the host, and the count of kept entries is produced by the masking kernel as a device tensor.
// Indices are 64-bit throughout, so n above 2^24 (where torch.quantile stops) and above 2^31
// are fine.
//
// The key helpers are __host__ __device__ so that tests/test_cuda_compile.py can run the same
// selection logic on a machine without a GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace dcedit::cuda {

// ---------------------------------------------------------------------------------------------
// Order-preserving keys
// ---------------------------------------------------------------------------------------------

template <typename To, typename From>
__host__ __device__ inline To bit_copy(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_copy needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// The raw bits of each supported float type, its sign bit and the bits of +infinity (every
// magnitude above that is a NaN).
template <typename scalar_t>
struct FloatBits;

template <>
struct FloatBits<double> {
  using Bits = uint64_t;
  static constexpr Bits kSign = 0x8000000000000000ull;
  static constexpr Bits kInfinity = 0x7ff0000000000000ull;
  __host__ __device__ static Bits of(double v) { return bit_copy<Bits>(v); }
  __host__ __device__ static double from(Bits b) { return bit_copy<double>(b); }
};

template <>
struct FloatBits<float> {
  using Bits = uint32_t;
  static constexpr Bits kSign = 0x80000000u;
  static constexpr Bits kInfinity = 0x7f800000u;
  __host__ __device__ static Bits of(float v) { return bit_copy<Bits>(v); }
  __host__ __device__ static float from(Bits b) { return bit_copy<float>(b); }
};

template <>
struct FloatBits<c10::Half> {
  using Bits = uint16_t;
  static constexpr Bits kSign = 0x8000u;
  static constexpr Bits kInfinity = 0x7c00u;
  __host__ __device__ static Bits of(c10::Half v) { return v.x; }
  __host__ __device__ static c10::Half from(Bits b) { return c10::Half(b, c10::Half::from_bits()); }
};

template <>
struct FloatBits<c10::BFloat16> {
  using Bits = uint16_t;
  static constexpr Bits kSign = 0x8000u;
  static constexpr Bits kInfinity = 0x7f80u;
  __host__ __device__ static Bits of(c10::BFloat16 v) { return v.x; }
  __host__ __device__ static c10::BFloat16 from(Bits b) {
    return c10::BFloat16(b, c10::BFloat16::from_bits());
  }
};

template <typename scalar_t>
using KeyOf = typename FloatBits<scalar_t>::Bits;

// The unsigned key whose integer order is torch's sort order of the values: negatives have their
// bits flipped (larger magnitude, smaller key), positives get the sign bit set.  Two values
// need care to agree with torch.kthvalue and with `fisher >= t`:
// - every NaN maps to the largest key, because torch sorts NaN above +inf;
// - -0.0 maps to the key of +0.0, because -0.0 >= +0.0 holds, so they must tie.
template <typename scalar_t>
__host__ __device__ inline KeyOf<scalar_t> ordered_key(scalar_t value) {
  using Traits = FloatBits<scalar_t>;
  using Bits = KeyOf<scalar_t>;
  const Bits bits = Traits::of(value);
  const Bits magnitude = static_cast<Bits>(bits & static_cast<Bits>(~Traits::kSign));
  if (magnitude > Traits::kInfinity) return static_cast<Bits>(~Bits(0));
  if (magnitude == 0) return Traits::kSign;
  return (bits & Traits::kSign) ? static_cast<Bits>(~bits) : static_cast<Bits>(bits | Traits::kSign);
}

// Exact conversion to double (fp16 and bf16 go through float, which holds them exactly).
template <typename scalar_t>
__host__ __device__ inline double widen(scalar_t value) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return value;
  } else {
    return static_cast<double>(static_cast<float>(value));
  }
}

// Inverse of ordered_key (up to the NaN payload and the sign of zero, which it canonicalises).
template <typename scalar_t>
__host__ __device__ inline scalar_t value_of_ordered_key(KeyOf<scalar_t> key) {
  using Traits = FloatBits<scalar_t>;
  using Bits = KeyOf<scalar_t>;
  const Bits bits = (key & Traits::kSign) ? static_cast<Bits>(key ^ Traits::kSign)
                                          : static_cast<Bits>(~key);
  return Traits::from(bits);
}

// ---------------------------------------------------------------------------------------------
// Radix select state and the per-pass logic (host and device)
// ---------------------------------------------------------------------------------------------

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

template <typename Bits>
__host__ __device__ inline unsigned digit_of(Bits key, int shift) {
  return static_cast<unsigned>((key >> shift) & static_cast<Bits>(kRadixBins - 1));
}

// The digits of the target key fixed so far, and the target's rank among the keys that share
// them.  Stored as 64-bit words for every key width.
struct RadixPrefix {
  unsigned long long bits;  // fixed digits, in place
  unsigned long long mask;  // the key bits those digits cover
  unsigned long long rank;  // the target is the rank-th largest (1-based) key matching bits/mask

  template <typename Bits>
  __host__ __device__ bool matches(Bits key) const {
    return static_cast<Bits>(key & static_cast<Bits>(mask)) == static_cast<Bits>(bits);
  }

  // Fix the digit at `shift`; `above` keys matched the old prefix with a larger digit.
  __host__ __device__ void fix_digit(unsigned digit, int shift, unsigned long long above) {
    bits |= static_cast<unsigned long long>(digit) << shift;
    mask |= static_cast<unsigned long long>(kRadixBins - 1) << shift;
    rank -= above;
  }
};

// True for the one digit whose bin holds the rank-th largest key, given the number of matching
// keys whose digit is >= this one (`at_or_above`) and the count in this digit's bin.  Exactly one
// digit satisfies it whenever 1 <= rank <= the number of matching keys, which every pass keeps
// true: pass 0 starts from k in [1, n] over all n keys, and each later pass runs over the keys of
// the chosen bin with the rank inside that bin.
__host__ __device__ inline bool holds_rank(unsigned long long at_or_above,
                                           unsigned long long in_bin,
                                           unsigned long long rank) {
  return at_or_above >= rank && at_or_above - in_bin < rank;
}

struct RadixSelectState {
  RadixPrefix prefix;
  double threshold;  // after the last pass: the k-th largest value (exact in double for all dtypes)
  unsigned long long histogram[kRadixBins];
};

// k = ceil(keep·n) clamped to [1, n], computed in double exactly as the Python reference does
// (reference/fisher_mask.py keep_count: math.ceil(keep * n * KEEP_ROUNDING), the product shrunk
// by a relative 1e-15 so that 0.07·100 = 7.000000000000001 keeps 7).  Needs n >= 1.
inline int64_t keep_count(double keep, int64_t n) {
  const double k = std::ceil(keep * static_cast<double>(n) * (1.0 - 1e-15));
  if (!(k >= 1.0)) return 1;
  if (k >= static_cast<double>(n)) return n;
  return static_cast<int64_t>(k);
}

// The threshold as torch compares it with a `scalar_t` tensor: rounded to scalar_t first (fp16
// and bf16 through float, as c10's conversions go), then widened exactly to double.
template <typename scalar_t>
inline double threshold_in_dtype(double threshold) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return threshold;
  } else {
    return widen(static_cast<scalar_t>(static_cast<float>(threshold)));
  }
}

// The kept test, in double: every input dtype converts to double exactly, so this equals the
// comparison torch makes in the Fisher dtype.  NaN Fisher values (and a NaN threshold) keep
// nothing, as in torch.
struct KeptRule {
  const RadixSelectState* selected;  // keep mode: threshold computed on device, kept = f >= t
  double threshold;                  // threshold mode (selected == nullptr): kept = f > t

  __device__ double threshold_value() const {
    return selected != nullptr ? selected->threshold : threshold;
  }
  __host__ __device__ static bool keeps(bool inclusive, double fisher, double t) {
    return inclusive ? fisher >= t : fisher > t;
  }
  __host__ __device__ bool inclusive() const { return selected != nullptr; }
};

}  // namespace dcedit::cuda

// Everything above is plain logic on host and device.  The host test of the selection
// (tests/test_cuda_compile.py) defines DCEDIT_TOPK_SELECT_LOGIC_ONLY and stops here, so it needs
// neither ATen nor a GPU; the ops need the rest.
#ifndef DCEDIT_TOPK_SELECT_LOGIC_ONLY

#include <optional>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

namespace dcedit::cuda {

// ---------------------------------------------------------------------------------------------
// Dtype-tagged reads: one kernel per output dtype instead of one per (weight, delta, fisher)
// dtype triple (64 instantiations); the switch is warp-uniform and the kernels are memory bound.
// ---------------------------------------------------------------------------------------------

enum class FloatKind : int { kFloat64, kFloat32, kFloat16, kBFloat16 };

struct FloatElements {
  const void* data;
  FloatKind kind;

  // Element i converted to T (float or double) with one rounding, as tensor.to(T) does.
  template <typename T>
  __device__ T load(int64_t i) const {
    switch (kind) {
      case FloatKind::kFloat64:
        return static_cast<T>(static_cast<const double*>(data)[i]);
      case FloatKind::kFloat32:
        return static_cast<T>(static_cast<const float*>(data)[i]);
      case FloatKind::kFloat16:
        return static_cast<T>(static_cast<float>(static_cast<const c10::Half*>(data)[i]));
      default:
        return static_cast<T>(static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]));
    }
  }
};

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), name,
                    " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_keep_or_threshold(const std::optional<double>& keep,
                                    const std::optional<double>& threshold) {
  TORCH_CHECK_VALUE(keep.has_value() != threshold.has_value(),
                    "give exactly one of keep or threshold");
  if (keep.has_value()) {
    TORCH_CHECK_VALUE(*keep > 0.0 && *keep <= 1.0, "keep must be in (0, 1], got ", *keep);
  }
  // As the CPU kernels and the Python checks: a NaN threshold would silently keep nothing.
  if (threshold.has_value()) {
    TORCH_CHECK_VALUE(!std::isnan(*threshold), "threshold must not be NaN");
  }
}

// `contiguous` must be a contiguous tensor of a supported float dtype.
inline FloatElements float_elements(const at::Tensor& contiguous) {
  FloatKind kind = FloatKind::kBFloat16;
  switch (contiguous.scalar_type()) {
    case at::kDouble: kind = FloatKind::kFloat64; break;
    case at::kFloat: kind = FloatKind::kFloat32; break;
    case at::kHalf: kind = FloatKind::kFloat16; break;
    default: break;
  }
  return FloatElements{contiguous.const_data_ptr(), kind};
}

// Blocks of `threads` that fit on the device at once: grid-stride kernels launch no more, so the
// per-block histograms flush at most this many times per pass and no block loops over more than
// n / (that many blocks) elements (below 2^32 for any tensor that fits in GPU memory, so the
// shared 32-bit bins cannot overflow).
inline int resident_blocks(int device, int threads) {
  int sms = 0;
  int threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return sms * (threads_per_sm / threads);
}

inline int grid_for(int64_t work_items, int64_t per_block, int max_blocks) {
  const int64_t wanted = (work_items + per_block - 1) / per_block;
  return static_cast<int>(wanted < max_blocks ? (wanted > 0 ? wanted : 1) : max_blocks);
}

// ---------------------------------------------------------------------------------------------
// Kernels and their launchers.  Internal linkage: this header is compiled into both .cu files,
// and each must launch the kernels of its own fatbinary.
// ---------------------------------------------------------------------------------------------

constexpr int kHistogramThreads = 256;
constexpr int kHistogramItems = 4;  // loads in flight per thread before the histogram updates
constexpr int kWarp = 32;

namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kRadixBins)
    radix_select_init_kernel(RadixSelectState* state, unsigned long long k) {
  state->histogram[threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    state->prefix = RadixPrefix{0ull, 0ull, k};
    state->threshold = 0.0;
  }
}

// Histogram of the digit at `shift` over the keys that match the prefix fixed so far.  Lanes of
// a warp that hit the same bin are merged with __match_any_sync first: Fisher tensors are
// dominated by a few exponents (often exact zeros), so without it most shared atomics would
// collide on one address.  The loop bound is per warp, so every lane takes part in the sync.
template <typename scalar_t>
__global__ void __launch_bounds__(kHistogramThreads)
    radix_histogram_kernel(const scalar_t* __restrict__ values, int64_t n,
                           RadixSelectState* __restrict__ state, int shift) {
  using Bits = KeyOf<scalar_t>;
  constexpr int kNoBin = kRadixBins;
  constexpr int64_t kWarpTile = int64_t(kWarp) * kHistogramItems;
  constexpr int kWarpsPerBlock = kHistogramThreads / kWarp;

  __shared__ unsigned int block_histogram[kRadixBins];
  for (int b = threadIdx.x; b < kRadixBins; b += kHistogramThreads) block_histogram[b] = 0;
  __syncthreads();

  const RadixPrefix prefix = state->prefix;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_in_grid = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t tile = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       tile * kWarpTile < n; tile += warps_in_grid) {
    const int64_t first = tile * kWarpTile + lane;
    Bits keys[kHistogramItems];
#pragma unroll
    for (int j = 0; j < kHistogramItems; ++j) {
      const int64_t i = first + int64_t(j) * kWarp;
      keys[j] = i < n ? ordered_key(values[i]) : Bits(0);
    }
#pragma unroll
    for (int j = 0; j < kHistogramItems; ++j) {
      const bool present = first + int64_t(j) * kWarp < n;
      const int bin = present && prefix.matches(keys[j]) ? int(digit_of(keys[j], shift)) : kNoBin;
      const unsigned same_bin = __match_any_sync(0xffffffffu, bin);
      if (bin != kNoBin && lane == __ffs(same_bin) - 1) {
        atomicAdd(&block_histogram[bin], static_cast<unsigned int>(__popc(same_bin)));
      }
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixBins; b += kHistogramThreads) {
    if (block_histogram[b] != 0) {
      atomicAdd(&state->histogram[b], static_cast<unsigned long long>(block_histogram[b]));
    }
  }
}

// One block, one thread per digit: a scan from the highest digit down gives each digit the
// number of matching keys at or above it; the digit that holds the rank is fixed into the
// prefix and the histogram is cleared for the next pass.  After the last pass (shift 0) the
// prefix is the whole key of the k-th largest value.
template <typename scalar_t>
__global__ void __launch_bounds__(kRadixBins)
    radix_pick_digit_kernel(RadixSelectState* state, int shift) {
  using Scan = cub::BlockScan<unsigned long long, kRadixBins>;
  __shared__ typename Scan::TempStorage scan_storage;

  const unsigned digit = kRadixBins - 1 - threadIdx.x;
  const unsigned long long in_bin = state->histogram[digit];
  const unsigned long long rank = state->prefix.rank;
  unsigned long long at_or_above = 0;
  Scan(scan_storage).InclusiveSum(in_bin, at_or_above);
  state->histogram[digit] = 0;
  __syncthreads();  // every thread has read prefix.rank before the chosen one rewrites it
  if (holds_rank(at_or_above, in_bin, rank)) {
    RadixPrefix next = state->prefix;
    next.fix_digit(digit, shift, at_or_above - in_bin);
    state->prefix = next;
    if (shift == 0) {
      state->threshold =
          widen(value_of_ordered_key<scalar_t>(static_cast<KeyOf<scalar_t>>(next.bits)));
    }
  }
}

// Enqueue the selection of the k-th largest of values[0:n] (1 <= k <= n) on `stream`; its value
// lands in state->threshold.  2·passes + 1 small launches, no host synchronisation.
template <typename scalar_t>
void enqueue_kth_largest(const scalar_t* values, int64_t n, int64_t k, RadixSelectState* state,
                         cudaStream_t stream, int device) {
  radix_select_init_kernel<scalar_t><<<1, kRadixBins, 0, stream>>>(
      state, static_cast<unsigned long long>(k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int blocks = grid_for(n, int64_t(kHistogramThreads) * kHistogramItems,
                              resident_blocks(device, kHistogramThreads));
  constexpr int kKeyBits = 8 * sizeof(KeyOf<scalar_t>);
  for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    radix_histogram_kernel<scalar_t><<<blocks, kHistogramThreads, 0, stream>>>(values, n, state,
                                                                                shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    radix_pick_digit_kernel<scalar_t><<<1, kRadixBins, 0, stream>>>(state, shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The kept rule for `fisher` (contiguous, non-empty, on the current device), given exactly one of
// keep/threshold.  In keep mode the selection is enqueued on `stream` and `workspace` owns the
// device state the rule points to; it may be released once the kernels that read the rule are
// enqueued on the same stream (the caching allocator reuses memory in stream order).
struct KeptSelection {
  KeptRule rule{nullptr, 0.0};
  at::Tensor workspace;
};

inline KeptSelection select_kept(const at::Tensor& fisher, const std::optional<double>& keep,
                                 const std::optional<double>& threshold, cudaStream_t stream) {
  KeptSelection selection;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fisher.scalar_type(),
                                  "dcedit_select_kept", [&] {
    if (keep.has_value()) {
      const int64_t n = fisher.numel();
      selection.workspace = at::empty({static_cast<int64_t>(sizeof(RadixSelectState))},
                                      fisher.options().dtype(at::kByte));
      auto* state = static_cast<RadixSelectState*>(selection.workspace.data_ptr());
      enqueue_kth_largest<scalar_t>(fisher.const_data_ptr<scalar_t>(), n, keep_count(*keep, n),
                                    state, stream, fisher.get_device());
      selection.rule.selected = state;
    } else {
      selection.rule.threshold = threshold_in_dtype<scalar_t>(*threshold);
    }
  });
  return selection;
}

}  // namespace
}  // namespace dcedit::cuda

#endif  // DCEDIT_TOPK_SELECT_LOGIC_ONLY
