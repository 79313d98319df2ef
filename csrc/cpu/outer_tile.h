// Shared by grouped_outer.cpp and segmented_fisher.cpp: input checks for (eta, mu, offsets) and
// the tile kernel that computes one segment's S = Σ_{t∈seg} η_t μ_tᵀ restricted to one output tile.
//
// Why tiles: the fused ops need S_g only elementwise, so each thread computes S_g for one
// kTile×kTile block of the o×i output, folds it into that block's running state (sum, max, P/N)
// and moves on to the next group.  Memory is a few kTile×kTile buffers per thread, never G (or E)
// full o×i matrices.
//
// Why 64×64 tiles and 64-token chunks: a tile is also the unit of parallel work (o=i=1024 gives
// 256 tiles, slack for 16 threads), and the two packed 64×64 chunks (2 × 16 KiB fp32) stay in L1
// next to the register micro-kernel.  Measured on this machine (Xeon SPR, AVX-512, shared, one
// thread, best of 7): pack + GEMM of one tile over T=2048 tokens from 1024-wide fp32 rows runs at
// 66 GFLOP/s for 64×64 / 64 tokens, 61 for 64×64 / 256, 55 for 128×128 / 128, 48 for
// 128×128 / 256, 46 for 256×256 / 128: larger tiles halve the packing per FLOP but spill L1.
#pragma once

#include "cpu/checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace dcedit_cpu {

constexpr int64_t kTile = 64;    // rows (o) and columns (i) of an output tile
constexpr int64_t kChunk = 64;  // tokens packed at a time (see above)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elementwise loops (the packing's converting copy, F += S², sign sums, running max) are compiled
// once per ISA and chosen at load time (GCC/Clang function multiversioning, DCEDIT_ISA_CLONES):
// the build has no -march, so a plain loop is SSE2 only, 4 floats wide.  Measured on this machine
// (Xeon with AVX-512, 1 thread, fp32, o=1024, i=512, best of 4 processes × 15 calls), before →
// after: segmented_fisher over 125 edits of ~24 tokens 54.4 → 36.7 ms (bf16 inputs 44.1 → 33.0),
// grouped_outer sss at T=1024, G=8 13.1 → 10.5 ms, its backward 35.8 → 32.5 ms; one torch matmul
// of the same FLOPs takes 21 and 7 ms.  Packing each operand once for the whole op instead of per
// tile and chunk gained another 15 % on segmented_fisher (31.1 ms) but held T × min(o, i) more
// memory: not taken.  On AVX-512 GCC contracts F += S·S into one fused multiply-add (AVX-512F has
// it; the avx2 clone does not), so F's last bit can differ between CPUs, as S already does: the
// tile GEMM uses FMA on AVX2 and AVX-512 and not on the SSE2 default.  The sign and max folds have
// no products, and a conversion rounds the same on every ISA.
#if defined(__GNUC__) || defined(__clang__)
#define DCEDIT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DCEDIT_ALWAYS_INLINE inline
#endif
// The clones are resolved through an ifunc, which only glibc's loader provides: elsewhere (macOS,
// Windows, musl, other architectures) the loops are compiled once, for the build's target.  GCC
// has target_clones since 6, Clang since 14.
#if (defined(__clang__) ? __clang_major__ >= 14 : defined(__GNUC__)) && \
    (defined(__x86_64__) || defined(_M_X64)) && defined(__GLIBC__)
#define DCEDIT_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DCEDIT_ISA_CLONES
#endif

// --- packing: rows [row0, row0+nrows) × cols [col0, col0+ncols) of a row-major (T, ld) input,
// converted to the accumulation type as they are loaded, into a kTile-wide buffer whose columns
// past ncols are zero (so the micro-kernel never needs an edge case).  Compiled per ISA
// (DCEDIT_ISA_CLONES), one copy per (accumulation, input) dtype pair.

template <typename acc_t, typename in_t>
DCEDIT_ALWAYS_INLINE void pack_rows_impl(const void* base, int64_t ld, int64_t row0, int64_t nrows,
                                         int64_t col0, int64_t ncols, acc_t* dst) {
  const in_t* src = static_cast<const in_t*>(base) + row0 * ld + col0;
  for (int64_t r = 0; r < nrows; ++r) {
    const in_t* __restrict s = src + r * ld;
    acc_t* __restrict d = dst + r * kTile;
    for (int64_t c = 0; c < ncols; ++c) d[c] = static_cast<acc_t>(s[c]);
    for (int64_t c = ncols; c < kTile; ++c) d[c] = acc_t(0);
  }
}

#define DCEDIT_PACK_ROWS(ACC, IN)                                                                \
  DCEDIT_ISA_CLONES static void pack_rows(const void* base, int64_t ld, int64_t row0,            \
                                          int64_t nrows, int64_t col0, int64_t ncols, ACC* dst, \
                                          const IN*) {                                           \
    pack_rows_impl<ACC, IN>(base, ld, row0, nrows, col0, ncols, dst);                            \
  }
DCEDIT_PACK_ROWS(float, float)
DCEDIT_PACK_ROWS(float, c10::BFloat16)
DCEDIT_PACK_ROWS(float, c10::Half)
DCEDIT_PACK_ROWS(float, double)
DCEDIT_PACK_ROWS(double, double)
DCEDIT_PACK_ROWS(double, float)
DCEDIT_PACK_ROWS(double, c10::BFloat16)
DCEDIT_PACK_ROWS(double, c10::Half)
#undef DCEDIT_PACK_ROWS

template <typename acc_t, typename in_t>
void pack_rows(const void* base, int64_t ld, int64_t row0, int64_t nrows, int64_t col0,
               int64_t ncols, acc_t* dst) {
  pack_rows(base, ld, row0, nrows, col0, ncols, dst, static_cast<const in_t*>(nullptr));
}

template <typename acc_t>
using PackFn = void (*)(const void*, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t*);

// One (T, n) input as the tile kernel sees it: contiguous rows of `ld` elements, any float dtype.
template <typename acc_t>
struct TokenMatrix {
  const void* data;
  int64_t ld;
  PackFn<acc_t> pack;
};

template <typename acc_t>
TokenMatrix<acc_t> token_matrix(const at::Tensor& contiguous_2d) {
  PackFn<acc_t> pack = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, contiguous_2d.scalar_type(),
                                  "dcedit_pack", [&] { pack = &pack_rows<acc_t, scalar_t>; });
  return {contiguous_2d.const_data_ptr(), contiguous_2d.size(1), pack};
}

// --- register micro-kernel: C[MR×NR] (+)= Σ_k A[k, 0:MR]ᵀ B[k, 0:NR] over packed rows of width
// kTile, with NR = NV vectors of VB bytes.  GCC/Clang vector extensions pin the accumulators to
// registers: with plain loops GCC 12 vectorised the fp64 copy across k with permutes instead
// (measured 1-2 GFLOP/s).  The ISA-specific copies below are the same source compiled for
// AVX-512 / AVX2 (the build has no -march, so the default copy is SSE2 only), each with its own
// register block (MR, NV, VB), so they are dispatched by hand (tile_gemm) rather than through
// DCEDIT_ISA_CLONES, which compiles one source unchanged per ISA.

#if defined(__GNUC__) || defined(__clang__)
template <typename T, int MR, int NV, int VB>
DCEDIT_ALWAYS_INLINE void micro_kernel(const T* __restrict A, const T* __restrict B, int64_t K,
                                       T* __restrict C, bool accumulate) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int W = VB / static_cast<int>(sizeof(T));
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      if (accumulate) {
        std::memcpy(&acc[r][v], C + r * kTile + v * W, sizeof(V));
      } else {
        acc[r][v] = V{};
      }
    }
  for (int64_t k = 0; k < K; ++k) {
    const T* a = A + k * kTile;
    const T* b = B + k * kTile;
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + v * W, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      const V ar = a[r] - V{};  // broadcast (x - 0 folds to x; 0 + x would not, for -0)
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(C + r * kTile + v * W, &acc[r][v], sizeof(V));
}

// S[0:rows, 0:cols] (+)= Aᵀ B for packed A (K × kTile), B (K × kTile); S is kTile × kTile.  Rows
// and columns are rounded up to MR / NR: the packed padding is zero, the extra S entries unused.
template <typename T, int MR, int NV, int VB>
DCEDIT_ALWAYS_INLINE void tile_gemm_impl(const T* A, const T* B, int64_t K, int64_t rows,
                                         int64_t cols, T* S, bool accumulate) {
  constexpr int64_t NR = NV * VB / static_cast<int64_t>(sizeof(T));
  static_assert(kTile % MR == 0 && kTile % NR == 0, "micro-kernel must tile kTile");
  for (int64_t r0 = 0; r0 < rows; r0 += MR)
    for (int64_t c0 = 0; c0 < cols; c0 += NR)
      micro_kernel<T, MR, NV, VB>(A + r0, B + c0, K, S + r0 * kTile + c0, accumulate);
}

#else  // other compilers: plain loops, left to the auto-vectoriser

template <typename T, int MR, int NV, int VB>
inline void tile_gemm_impl(const T* A, const T* B, int64_t K, int64_t rows, int64_t cols, T* S,
                           bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      T sum = accumulate ? S[r * kTile + c] : T(0);
      for (int64_t k = 0; k < K; ++k) sum += A[k * kTile + r] * B[k * kTile + c];
      S[r * kTile + c] = sum;
    }
}
#endif

template <typename T>
using TileGemmFn = void (*)(const T*, const T*, int64_t, int64_t, int64_t, T*, bool);

// Register blocks (MR rows × NV vectors): MR·NV accumulators + NV vectors of B + a broadcast must
// fit the register file (16 vector registers for SSE2/AVX2, 32 for AVX-512).
inline void tile_gemm_f32_default(const float* A, const float* B, int64_t K, int64_t rows,
                                  int64_t cols, float* S, bool acc) {
  tile_gemm_impl<float, 4, 2, 16>(A, B, K, rows, cols, S, acc);
}
inline void tile_gemm_f64_default(const double* A, const double* B, int64_t K, int64_t rows,
                                  int64_t cols, double* S, bool acc) {
  tile_gemm_impl<double, 4, 2, 16>(A, B, K, rows, cols, S, acc);
}

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64))
#define DCEDIT_X86_DISPATCH 1
__attribute__((target("avx2,fma"))) inline void tile_gemm_f32_avx2(
    const float* A, const float* B, int64_t K, int64_t rows, int64_t cols, float* S, bool acc) {
  tile_gemm_impl<float, 4, 2, 32>(A, B, K, rows, cols, S, acc);  // 8 ymm accumulators
}
__attribute__((target("avx2,fma"))) inline void tile_gemm_f64_avx2(
    const double* A, const double* B, int64_t K, int64_t rows, int64_t cols, double* S, bool acc) {
  tile_gemm_impl<double, 4, 2, 32>(A, B, K, rows, cols, S, acc);
}
__attribute__((target("avx512f,fma"))) inline void tile_gemm_f32_avx512(
    const float* A, const float* B, int64_t K, int64_t rows, int64_t cols, float* S, bool acc) {
  tile_gemm_impl<float, 8, 2, 64>(A, B, K, rows, cols, S, acc);  // 16 zmm accumulators
}
__attribute__((target("avx512f,fma"))) inline void tile_gemm_f64_avx512(
    const double* A, const double* B, int64_t K, int64_t rows, int64_t cols, double* S, bool acc) {
  tile_gemm_impl<double, 8, 2, 64>(A, B, K, rows, cols, S, acc);
}
#endif

// The best copy for this CPU, chosen once.
template <typename T>
TileGemmFn<T> tile_gemm();

template <>
inline TileGemmFn<float> tile_gemm<float>() {
#ifdef DCEDIT_X86_DISPATCH
  static const TileGemmFn<float> fn = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
      return &tile_gemm_f32_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &tile_gemm_f32_avx2;
    return &tile_gemm_f32_default;
  }();
  return fn;
#else
  return &tile_gemm_f32_default;
#endif
}

template <>
inline TileGemmFn<double> tile_gemm<double>() {
#ifdef DCEDIT_X86_DISPATCH
  static const TileGemmFn<double> fn = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
      return &tile_gemm_f64_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &tile_gemm_f64_avx2;
    return &tile_gemm_f64_default;
  }();
  return fn;
#else
  return &tile_gemm_f64_default;
#endif
}

// Per-thread scratch: packed operands, up to three kTile×kTile state tiles (S, P, N) and integer
// state that only grouped_outer's backward sizes (a winner index, selection bits).
template <typename acc_t>
struct TileWorkspace {
  std::vector<acc_t> a = std::vector<acc_t>(kChunk * kTile);
  std::vector<acc_t> b = std::vector<acc_t>(kChunk * kTile);
  std::vector<acc_t> s = std::vector<acc_t>(kTile * kTile);
  std::vector<acc_t> p = std::vector<acc_t>(kTile * kTile);
  std::vector<acc_t> n = std::vector<acc_t>(kTile * kTile);
  std::vector<int32_t> index;
  std::vector<uint32_t> bits;
};

// One block of an o×i output: rows [o0, o0 + no), columns [i0, i0 + ni), no and ni ≤ kTile.
struct OutputTile {
  int64_t o0, no, i0, ni;
};

// body(tile, ws) for every kTile×kTile tile of an o×i output, tiles spread over the threads, one
// workspace per thread.  One tile per task: a tile is ≥ 64·64·T FMAs, far above the parallel
// overhead.
template <typename acc_t, typename Body>
void for_each_output_tile(int64_t o, int64_t i, const Body& body) {
  const int64_t tiles_i = ceil_div(i, kTile);
  const int64_t n_tiles = ceil_div(o, kTile) * tiles_i;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    TileWorkspace<acc_t> ws;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = (t / tiles_i) * kTile, i0 = (t % tiles_i) * kTile;
      body(OutputTile{o0, std::min(kTile, o - o0), i0, std::min(kTile, i - i0)}, ws);
    }
  });
}

// ws.s[0:no, 0:ni] = Σ_{t∈[t0,t1)} eta[t, o0:o0+no]ᵀ ⊗ mu[t, i0:i0+ni] (row stride kTile).
// An empty segment gives zeros.
template <typename acc_t>
void segment_tile(const TokenMatrix<acc_t>& eta, const TokenMatrix<acc_t>& mu, int64_t t0,
                  int64_t t1, int64_t o0, int64_t no, int64_t i0, int64_t ni,
                  TileWorkspace<acc_t>& ws) {
  if (t1 <= t0) {
    std::fill(ws.s.begin(), ws.s.end(), acc_t(0));
    return;
  }
  const TileGemmFn<acc_t> gemm = tile_gemm<acc_t>();
  for (int64_t k0 = t0; k0 < t1; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, t1 - k0);
    eta.pack(eta.data, eta.ld, k0, kc, o0, no, ws.a.data());
    mu.pack(mu.data, mu.ld, k0, kc, i0, ni, ws.b.data());
    gemm(ws.a.data(), ws.b.data(), kc, no, ni, ws.s.data(), /*accumulate=*/k0 != t0);
  }
}

template <typename acc_t>
void segment_tile(const TokenMatrix<acc_t>& eta, const TokenMatrix<acc_t>& mu, int64_t t0,
                  int64_t t1, const OutputTile& tile, TileWorkspace<acc_t>& ws) {
  segment_tile(eta, mu, t0, t1, tile.o0, tile.no, tile.i0, tile.ni, ws);
}

// out[o0 + r, i0 + c] = value(r·kTile + c) over the tile, for a row-major (·, ld) output.
template <typename out_t, typename F>
inline void write_tile(out_t* out, int64_t ld, const OutputTile& tile, F value) {
  for (int64_t r = 0; r < tile.no; ++r) {
    out_t* row = out + (tile.o0 + r) * ld + tile.i0;
    for (int64_t c = 0; c < tile.ni; ++c) row[c] = value(r * kTile + c);
  }
}

}  // namespace dcedit_cpu
