// impl="native": the BS-T one-pass row kernels for CPU tensors, registered as PyTorch operators.
//
// Operators (namespace bs_kernels, fake implementations in bs_kernels/backends/native.py):
//   native_forward(logits[N, V], labels[N] int64, top_k) -> (row_max[N], log_sum[N], label_logits[N],
//                                                             belief_logits[N, k], belief_ids[N, k] int64)
//   native_backward(grad_rows[N], logits, labels, row_max, log_sum, belief_ids, belief_weights[N, k], label_weight)
//       -> grad[N, V]
//   native_backward_(... same, logits mutated ...) -> ()    the gradient overwrites the logits (inplace_backward)
//   native_forward_grad(logits, labels, top_k, grad_rows[N]) -> (the forward's five outputs, grad[N, V])
//   native_forward_grad_(logits mutated, labels, top_k, grad_rows) -> the forward's five outputs; grad over logits
//   native_sparse_grad_(grad mutated, grad_rows, labels, row_max, log_sum, label_logits, belief_logits, belief_ids,
//                       belief_weights, label_weight) -> ()   the k + 1 sparse terms of each row
//   native_release_gradient_pool() -> ()   frees the block the gradient pool holds (see GradientPool)
//   native_gradient_pool_bytes() -> int    the bytes it holds
// Statistics are float32 (float64 for float64 logits); the gradient has the logits' dtype.
//
// Forward, per row (forward_rows_impl), in one sweep over chunks of kChunk elements that stay in L1:
//   0. before the sweep: the row's chunk maxima, gathered during the previous row's sweep (each of its chunk steps
//      also takes the max of the same chunk of the next row, reading that row from memory while this one is
//      computed from L2; a task's first row is read once on its own for them). They give m, the row max, and a
//      floor for the top-k: the k-th largest chunk max, a lower bound of the row's k-th largest value.
//   1. top-k: a min-heap of (value, id) of size k, kept in the output row. A chunk whose max is below the floor (or,
//      once the heap is full, not above its minimum) is skipped; in one that is not, a vector is scanned element-wise
//      only if one of its elements passes (one vector compare). Only ~k elements of a random row pass the floor; rows
//      with fewer chunks than k (k > V / 1024) have no floor and offer every chunk whose max beats the minimum, where
//      ~k ln(V/k) elements enter the heap; on rows sorted in ascending order it costs ~20 ns per element.
//   2. sum += sum_i exp(x_i - m): one exp per element, all arguments <= 0, so nothing overflows.
//   3. row_max = m and log_sum = log(sum), kept apart (lse = m + log_sum would round to the ulp of m: at |z| = 1e4
//      that is 5e-4 in every log-probability), label logit = z[y] (one load).
// Backward, per row (the contract in bs_kernels/backends/contract.py):
//   grad = g * (-pi + label_weight * e_y + sum_j w_j * e_{id_j}),  pi = exp((z - m) - log_sum)
//   The -g * pi part is written chunk by chunk as (-g * exp(-log_sum)) * exp(z - m), the first factor once per row;
//   the k + 1 sparse terms are then rewritten as single values g * (coef - exp((z_p - m) - log_sum)) from the
//   logits gathered before the row was overwritten (inplace), so every element is rounded to the output dtype once.
// Forward with the gradient (native_forward_grad, for a scalar loss whose row weights grad_rows are known before
// the pass): step 2 also keeps exp(z - m) in a per-thread row of scratch, and the row's dense part -g * pi =
// (-g * exp(-log_sum)) * exp(z - m) is written from it, a multiply rather than a second exp, during the next row's
// sweep (interleaved with that row's exps, so the gradient's stores overlap computation as the logits' loads do).
// The values are backward step 1's bit for bit (same exp of the same z - m, same factor); rows with g = 0 get zeros,
// counted rows whose m or log_sum is not finite NaN (as backward_rows makes them). The logits are read from memory
// once and the gradient written once; the k + 1 sparse terms depend on the epilogue's coefficients and are rewritten
// afterwards by native_sparse_grad_ from the statistics (bs_kernels/one_pass.py), at O(N k) cost, with backward's
// own code (write_sparse_terms).
// The exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial (the Cephes expf
// coefficients, relative error ~1e-7) and 2^n assembled in the exponent bits. Arguments below -88 give exactly 0
// (so -inf logits never make a NaN). It is written with GCC vector extensions and compiled three times, at the
// native width of each target: AVX-512 (16 floats), AVX2+FMA (8) and the baseline ISA (4), chosen at run time
// from the CPU (no -march=native, so one build serves every x86-64 machine); BS_KERNELS_NATIVE_ISA=avx2|default
// caps the choice (tests, benchmarks).
// float64 runs a scalar path with std::exp (it is the precision path, not the fast one).
// Cost: forward reads the logits once, writes O(N k); backward reads them once and writes one [N, V] gradient
// (allocated with a transparent-huge-page hint, see advise_huge_pages, from a one-slot pool that keeps the last freed
// gradient's memory for the next, see GradientPool). Limits: bf16/fp16 are widened with c10's
// scalar conversions (fp16's is software, so its backward is ~4x slower than bf16's); float64 is scalar.
// Rows are split over threads with at::parallel_for (tasks of ~2^20 elements taken from a shared counter).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#define BS_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BS_X86_DISPATCH 1
#define BS_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define BS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define BS_X86_DISPATCH 0
#endif

namespace bs_kernels_native {
namespace {

constexpr int64_t kChunk = 1024;  // elements; 4 KiB of float, and the widened copy of a bf16 chunk, stay in L1

// Float vectors of the target's native width (16 lanes for AVX-512, 8 for AVX2, 4 for the SSE2 baseline): wider
// GCC vectors than the ISA has are "expanded piecewise", i.e. lane by lane, which would undo the vectorisation.
template <int kWidth>
struct Simd;
template <>
struct Simd<4> {
  typedef float Floats __attribute__((vector_size(16)));
  typedef int32_t Ints __attribute__((vector_size(16)));
};
template <>
struct Simd<8> {
  typedef float Floats __attribute__((vector_size(32)));
  typedef int32_t Ints __attribute__((vector_size(32)));
};
template <>
struct Simd<16> {
  typedef float Floats __attribute__((vector_size(64)));
  typedef int32_t Ints __attribute__((vector_size(64)));
};
static_assert(kChunk % 16 == 0, "chunks are whole vectors");

// The compute type: float64 logits are processed in float64, every other dtype in float32.
template <typename scalar_t>
using acc_type = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// Vectors are passed by reference: passing them by value from baseline-ISA code changes the ABI (-Wpsabi).
template <int W>
BS_ALWAYS_INLINE void load_vec(const float* source, typename Simd<W>::Floats& out) {
  std::memcpy(&out, source, sizeof(out));
}

template <int W>
BS_ALWAYS_INLINE void store_vec(const typename Simd<W>::Floats& value, float* destination) {
  std::memcpy(destination, &value, sizeof(value));
}

// A whole-vector store that bypasses the caches (destination aligned to the vector). A plain store to a line that is
// not in cache first reads the line (read for ownership): writing a gradient that way reads its bytes once more. Used
// for gradients of at least kStreamMinBytes, written once here and read by the next operator only after they have
// left the caches anyway. Written as asm: GCC has no portable non-temporal store builtin, and the intrinsics'
// target attributes do not inline into these ISA-generic templates. Streamed stores are weakly ordered: a thread
// ends its streamed writes with store_fence before anything else reads them.
template <int W>
BS_ALWAYS_INLINE void stream_vec(const typename Simd<W>::Floats& value, float* destination) {
#if BS_X86_DISPATCH
  auto* line = reinterpret_cast<typename Simd<W>::Floats*>(destination);
  if constexpr (W == 4) {
    asm volatile("movntps %1, %0" : "=m"(*line) : "x"(value));
  } else {
    asm volatile("vmovntps %1, %0" : "=m"(*line) : "v"(value));
  }
#else
  store_vec<W>(value, destination);
#endif
}

// How many elements of out, at most count, come before its first vector-aligned one: a row written with stream_vec
// takes plain stores there (its own start need not be aligned, e.g. rows of odd V).
template <int W>
BS_ALWAYS_INLINE int64_t stream_head(const float* out, int64_t count) {
  constexpr uintptr_t kVectorBytes = W * sizeof(float);
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(out) % kVectorBytes;
  return std::min<int64_t>(count, static_cast<int64_t>((kVectorBytes - misaligned) % kVectorBytes / sizeof(float)));
}

BS_ALWAYS_INLINE void store_fence() {
#if BS_X86_DISPATCH
  asm volatile("sfence" ::: "memory");
#endif
}

constexpr int64_t kStreamMinBytes = int64_t{32} << 20;

// The last, partial vector of a chunk, padded with -inf: it adds nothing to a max or to a sum of exps.
template <int W>
BS_ALWAYS_INLINE void load_tail(const float* source, int64_t count, typename Simd<W>::Floats& out) {
  out = typename Simd<W>::Floats{} - std::numeric_limits<float>::infinity();
  for (int64_t lane = 0; lane < count; ++lane) {
    out[lane] = source[lane];
  }
}

// Lane permutation with constant indices: GCC spells it __builtin_shuffle (any GCC), clang __builtin_shufflevector.
#if defined(__clang__)
#define BS_PERMUTE(value, Ints, ...) __builtin_shufflevector(value, value, __VA_ARGS__)
#else
#define BS_PERMUTE(value, Ints, ...) __builtin_shuffle(value, Ints{__VA_ARGS__})
#endif

// Max over the lanes in log2(W) permute-and-max steps (in registers; going through memory would stall on store
// forwarding). Every lane ends up holding the max.
template <int W>
BS_ALWAYS_INLINE float horizontal_max(const typename Simd<W>::Floats& value) {
  using Floats = typename Simd<W>::Floats;
  using Ints = typename Simd<W>::Ints;
  Floats result = value;
  Floats moved;
  if constexpr (W == 16) {
    moved = BS_PERMUTE(result, Ints, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    result = result > moved ? result : moved;
    moved = BS_PERMUTE(result, Ints, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    result = result > moved ? result : moved;
    moved = BS_PERMUTE(result, Ints, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    result = result > moved ? result : moved;
    moved = BS_PERMUTE(result, Ints, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  } else if constexpr (W == 8) {
    moved = BS_PERMUTE(result, Ints, 4, 5, 6, 7, 0, 1, 2, 3);
    result = result > moved ? result : moved;
    moved = BS_PERMUTE(result, Ints, 2, 3, 0, 1, 6, 7, 4, 5);
    result = result > moved ? result : moved;
    moved = BS_PERMUTE(result, Ints, 1, 0, 3, 2, 5, 4, 7, 6);
  } else {
    static_assert(W == 4, "vectors of 4, 8 or 16 floats");
    moved = BS_PERMUTE(result, Ints, 2, 3, 0, 1);
    result = result > moved ? result : moved;
    moved = BS_PERMUTE(result, Ints, 1, 0, 3, 2);
  }
  result = result > moved ? result : moved;
  return result[0];
}

template <int W>
BS_ALWAYS_INLINE float horizontal_sum(const typename Simd<W>::Floats& value) {
  float result = 0.0f;
  for (int lane = 0; lane < W; ++lane) {
    result += value[lane];
  }
  return result;
}

// exp of W floats (see the header). Valid for x <= 88; x < -88 (including -inf) gives +0. kNonPositive: the caller
// guarantees x <= 0 (z - m with m the row max, in forward), so the clamp at 88 is skipped; the values are the same.
template <int W, bool kNonPositive = false>
BS_ALWAYS_INLINE void exp_vec(const typename Simd<W>::Floats& x, typename Simd<W>::Floats& out) {
  using Floats = typename Simd<W>::Floats;
  using Ints = typename Simd<W>::Ints;
  const Floats lowest = Floats{} - 88.0f;
  const Floats highest = Floats{} + 88.0f;
  Floats clamped = x < lowest ? lowest : x;
  if constexpr (!kNonPositive) {
    clamped = clamped > highest ? highest : clamped;
  }
  // Round x / ln2 to the nearest integer n: adding 1.5 * 2^23 pushes the fraction out of the mantissa, so the low
  // mantissa bits of the sum are n (offset by the constant's bits).
  const float round_magic = 12582912.0f;  // 1.5 * 2^23, bits 0x4B400000
  const Floats shifted = clamped * 1.44269504088896341f + round_magic;
  const Floats n = shifted - round_magic;
  const Ints n_int = (Ints)shifted - 0x4B400000;
  // r = x - n ln2 in two steps (ln2 split into a part exact in float and the remainder).
  Floats r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Floats poly = r * 1.9875691500e-4f + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * (r * r) + r + 1.0f;
  // 2^n from the exponent bits; n = -127 (x near -88) gives the bit pattern of +0, so the result is exactly 0.
  const Ints scale_bits = (n_int + 127) << 23;
  out = poly * (Floats)scale_bits;
}

// ---- chunk primitives: float32 (vectorised) --------------------------------------------------------------

template <int W>
BS_ALWAYS_INLINE float chunk_max(const float* x, int64_t count) {
  using Floats = typename Simd<W>::Floats;
  Floats running = Floats{} - std::numeric_limits<float>::infinity();
  Floats value;
  int64_t i = 0;
  for (; i + W <= count; i += W) {
    load_vec<W>(x + i, value);
    running = value > running ? value : running;
  }
  if (i < count) {
    load_tail<W>(x + i, count - i, value);
    running = value > running ? value : running;
  }
  return horizontal_max<W>(running);
}

// What chunk_sum_exp does with the exps besides summing them.
enum class Exps {
  kSum,         // nothing
  kKeep,        // store them in exps_io
  kSwap,        // store them in exps_io, first writing out_i = scale * exps_io_i (the previous row's, see below)
  kSwapStream,  // kSwap with stream_vec (out aligned to the vector)
};

// One vector of chunk_sum_exp at offset i: exps = exp(value - shift), plus what kMode asks for.
template <int W, Exps kMode>
BS_ALWAYS_INLINE void exps_at(int64_t i, const typename Simd<W>::Floats& value,
                              const typename Simd<W>::Floats& shift, float* exps_io, float scale, float* out,
                              typename Simd<W>::Floats& exps) {
  if constexpr (kMode == Exps::kSwap || kMode == Exps::kSwapStream) {
    typename Simd<W>::Floats previous;
    load_vec<W>(exps_io + i, previous);
    if constexpr (kMode == Exps::kSwapStream) {
      stream_vec<W>(previous * scale, out + i);
    } else {
      store_vec<W>(previous * scale, out + i);
    }
  }
  exp_vec<W, true>(value - shift, exps);
  if constexpr (kMode != Exps::kSum) {
    store_vec<W>(exps, exps_io + i);
  }
}

// sum_i exp(x_i - shift); every x_i <= shift. Two accumulators so consecutive vectors do not wait on each other;
// the same order in every mode, so a row's log_sum does not depend on what else was done with its exps.
// kKeep also stores each exp(x_i - shift) in exps_io[i] (the values the sum adds). kSwap / kSwapStream do so over
// exps_io that still hold the previous row's, first writing each vector of those out as out_i = scale * exps_io_i
// (chunk_scale's values): the gradient's stores are then spread over the exps' computation rather than issued in
// bursts, which stall once the write-combining buffers are full.
template <int W, Exps kMode = Exps::kSum>
BS_ALWAYS_INLINE float chunk_sum_exp(const float* x, int64_t count, float shift, float* exps_io = nullptr,
                                     float scale = 0.0f, float* out = nullptr) {
  using Floats = typename Simd<W>::Floats;
  const Floats shift_vec = Floats{} + shift;
  Floats sum_even{};
  Floats sum_odd{};
  int64_t i = 0;
  // value and exps are declared per loop, not once for the function: one vector that the tail also writes lane by
  // lane was given a stack slot by GCC, stored and reloaded around every streamed store of the kSwapStream loop
  // (4 of its 60 instructions per 32 elements).
  for (; i + 2 * W <= count; i += 2 * W) {
    Floats value;
    Floats exps;
    load_vec<W>(x + i, value);
    exps_at<W, kMode>(i, value, shift_vec, exps_io, scale, out, exps);
    sum_even += exps;
    load_vec<W>(x + i + W, value);
    exps_at<W, kMode>(i + W, value, shift_vec, exps_io, scale, out, exps);
    sum_odd += exps;
  }
  for (; i + W <= count; i += W) {
    Floats value;
    Floats exps;
    load_vec<W>(x + i, value);
    exps_at<W, kMode>(i, value, shift_vec, exps_io, scale, out, exps);
    sum_even += exps;
  }
  if (i < count) {
    Floats value;
    Floats exps;
    if constexpr (kMode == Exps::kSwap || kMode == Exps::kSwapStream) {
      for (int64_t lane = i; lane < count; ++lane) {
        out[lane] = exps_io[lane] * scale;
      }
    }
    load_tail<W>(x + i, count - i, value);
    exp_vec<W, true>(value - shift_vec, exps);
    sum_odd += exps;
    if constexpr (kMode != Exps::kSum) {
      for (int64_t lane = 0; lane < count - i; ++lane) {
        exps_io[i + lane] = exps[lane];
      }
    }
  }
  return horizontal_sum<W>(sum_even + sum_odd);
}

// out_i = scale * exps_i over a chunk of stored exps (chunk_sum_exp's kKeep): the same values as chunk_scaled_exp on
// the logits they came from. kStream as for chunk_scaled_exp, except that out need not be aligned: the elements
// before its first aligned vector take plain stores.
template <int W>
BS_ALWAYS_INLINE void chunk_scale(const float* exps, int64_t count, float scale, float* out, bool stream) {
  using Floats = typename Simd<W>::Floats;
  Floats value;
  int64_t i = 0;
  if (stream) {
    for (const int64_t head = stream_head<W>(out, count); i < head; ++i) {
      out[i] = exps[i] * scale;
    }
    for (; i + W <= count; i += W) {
      load_vec<W>(exps + i, value);
      stream_vec<W>(value * scale, out + i);
    }
  }
  for (; i + W <= count; i += W) {
    load_vec<W>(exps + i, value);
    store_vec<W>(value * scale, out + i);
  }
  for (; i < count; ++i) {
    out[i] = exps[i] * scale;
  }
}

// out_i = scale * exp(x_i - shift); out may be x itself. kStream: whole vectors with stream_vec (out aligned to the
// vector).
template <int W, bool kStream = false>
BS_ALWAYS_INLINE void chunk_scaled_exp(const float* x, int64_t count, float shift, float scale, float* out) {
  using Floats = typename Simd<W>::Floats;
  const Floats shift_vec = Floats{} + shift;
  Floats value;
  Floats exps;
  int64_t i = 0;
  for (; i + W <= count; i += W) {
    load_vec<W>(x + i, value);
    exp_vec<W>(value - shift_vec, exps);
    if constexpr (kStream) {
      stream_vec<W>(exps * scale, out + i);
    } else {
      store_vec<W>(exps * scale, out + i);
    }
  }
  if (i < count) {
    load_tail<W>(x + i, count - i, value);
    exp_vec<W>(value - shift_vec, exps);
    exps *= scale;
    for (int64_t lane = 0; lane < count - i; ++lane) {
      out[i + lane] = exps[lane];
    }
  }
}

// ---- chunk primitives: float64 (scalar, exact std::exp) --------------------------------------------------

template <int W>
BS_ALWAYS_INLINE double chunk_max(const double* x, int64_t count) {
  double result = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    result = x[i] > result ? x[i] : result;
  }
  return result;
}

template <int W, Exps kMode = Exps::kSum>
BS_ALWAYS_INLINE double chunk_sum_exp(const double* x, int64_t count, double shift, double* exps_io = nullptr) {
  static_assert(kMode == Exps::kSum || kMode == Exps::kKeep, "float64 rows keep their exps, never swap them");
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const double value = std::exp(x[i] - shift);
    if constexpr (kMode == Exps::kKeep) {
      exps_io[i] = value;
    }
    sum += value;
  }
  return sum;
}

template <int W>
BS_ALWAYS_INLINE void chunk_scale(const double* exps, int64_t count, double scale, double* out, bool stream) {
  (void)stream;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = scale * exps[i];
  }
}

template <int W, bool kStream = false>
BS_ALWAYS_INLINE void chunk_scaled_exp(const double* x, int64_t count, double shift, double scale, double* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = scale * std::exp(x[i] - shift);
  }
}

// ---- dtype conversion of a chunk -------------------------------------------------------------------------

// The chunk as compute-type values: float32/float64 rows are used in place, bf16/fp16 are widened into buffer.
template <typename scalar_t>
BS_ALWAYS_INLINE const acc_type<scalar_t>* widen_chunk(const scalar_t* source, int64_t count,
                                                       acc_type<scalar_t>* buffer) {
  if constexpr (std::is_same<scalar_t, acc_type<scalar_t>>::value) {
    (void)count;
    (void)buffer;
    return source;
  } else {
    for (int64_t i = 0; i < count; ++i) {
      buffer[i] = static_cast<float>(source[i]);
    }
    return buffer;
  }
}

template <typename scalar_t>
BS_ALWAYS_INLINE void narrow_chunk(const float* source, int64_t count, scalar_t* destination) {
  for (int64_t i = 0; i < count; ++i) {
    destination[i] = static_cast<scalar_t>(source[i]);  // round to nearest even
  }
}

// ---- top-k: a min-heap of (value, id), stored in the row's output slots ------------------------------------

template <typename acc_t>
struct TopKHeap {
  acc_t* values;
  int64_t* ids;
  int64_t capacity;
  int64_t size;

  acc_t minimum() const { return values[0]; }
  bool full() const { return size == capacity; }

  void push(acc_t value, int64_t id) {
    int64_t child = size++;
    while (child > 0) {
      const int64_t parent = (child - 1) / 2;
      if (!(value < values[parent])) {
        break;
      }
      values[child] = values[parent];
      ids[child] = ids[parent];
      child = parent;
    }
    values[child] = value;
    ids[child] = id;
  }

  // Replace the minimum (value must exceed it) and restore the heap order.
  void replace_minimum(acc_t value, int64_t id) {
    int64_t parent = 0;
    while (true) {
      int64_t child = 2 * parent + 1;
      if (child >= size) {
        break;
      }
      if (child + 1 < size && values[child + 1] < values[child]) {
        ++child;
      }
      if (!(values[child] < value)) {
        break;
      }
      values[parent] = values[child];
      ids[parent] = ids[child];
      parent = child;
    }
    values[parent] = value;
    ids[parent] = id;
  }

  // Offer x[i] for i in [begin, end), admitting while the heap fills only elements >= floor, a lower bound of the
  // row's k-th largest value (row_topk_floor): no element of the top k is turned away, and the heap fills with
  // elements that are likely to stay rather than with the first k of the row.
  void offer_above(const acc_t* x, int64_t begin, int64_t end, int64_t first_id, acc_t floor) {
    for (int64_t i = begin; i < end; ++i) {
      if (!full()) {
        if (x[i] >= floor) {
          push(x[i], first_id + i);
        }
      } else if (x[i] > values[0]) {
        replace_minimum(x[i], first_id + i);
      }
    }
  }

  // Offer x[i] (vocabulary id first_id + i) for i in [begin, end).
  void offer(const acc_t* x, int64_t begin, int64_t end, int64_t first_id) {
    int64_t i = begin;
    for (; i < end && !full(); ++i) {
      push(x[i], first_id + i);
    }
    for (; i < end; ++i) {
      if (x[i] > values[0]) {
        replace_minimum(x[i], first_id + i);
      }
    }
  }
};

// Offer a whole chunk to the heap. Once the heap is full, a group of 4 vectors whose max is <= the heap minimum is
// skipped with three vector maxes and one lane reduction; on random rows only ~k ln(V / k) elements ever enter
// the heap, so almost every group is skipped.
template <int W>
BS_ALWAYS_INLINE void offer_chunk(TopKHeap<float>& heap, const float* x, int64_t count, int64_t first_id) {
  using Floats = typename Simd<W>::Floats;
  int64_t i = 0;
  if (!heap.full()) {
    i = std::min(count, (heap.capacity - heap.size + W - 1) / W * W);  // fill, then go on from a vector boundary
    heap.offer(x, 0, i, first_id);
  }
  Floats a;
  Floats b;
  Floats c;
  Floats d;
  for (; i + 4 * W <= count; i += 4 * W) {
    load_vec<W>(x + i, a);
    load_vec<W>(x + i + W, b);
    load_vec<W>(x + i + 2 * W, c);
    load_vec<W>(x + i + 3 * W, d);
    a = a > b ? a : b;
    c = c > d ? c : d;
    if (horizontal_max<W>(a > c ? a : c) > heap.minimum()) {
      for (int64_t j = i; j < i + 4 * W; j += W) {  // then per vector: a rival is usually alone in its group
        load_vec<W>(x + j, b);
        if (horizontal_max<W>(b) > heap.minimum()) {
          heap.offer(x, j, j + W, first_id);
        }
      }
    }
  }
  heap.offer(x, i, count, first_id);
}

template <int W>
BS_ALWAYS_INLINE void offer_chunk(TopKHeap<double>& heap, const double* x, int64_t count, int64_t first_id) {
  heap.offer(x, 0, count, first_id);
}

// Bit i set where x[i] >= threshold, for the vector test of offer_chunk_above: one compare and one move to a
// general register (x86; a lane loop elsewhere), where a horizontal max costs a chain of log2(W) shuffles. Written as
// asm for the reason stream_vec is. Its only use is to skip vectors, so the baseline's "not less than" (which is also
// true for NaN lanes) is as good as >=: the elements of a vector that passes are tested one by one.
template <int W>
BS_ALWAYS_INLINE uint32_t ge_mask(const typename Simd<W>::Floats& x, const typename Simd<W>::Floats& threshold) {
  uint32_t mask = 0;
#if BS_X86_DISPATCH
  if constexpr (W == 16) {
    asm("vcmpps $0x1d, %2, %1, %%k1\n\tkmovw %%k1, %0" : "=r"(mask) : "v"(x), "v"(threshold) : "k1");
  } else if constexpr (W == 8) {
    typename Simd<W>::Floats compared;
    asm("vcmpps $0x1d, %3, %2, %1\n\tvmovmskps %1, %0" : "=r"(mask), "=&x"(compared) : "x"(x), "x"(threshold));
  } else {
    typename Simd<W>::Floats compared = x;
    asm("cmpps $5, %2, %1\n\tmovmskps %1, %0" : "=r"(mask), "+x"(compared) : "x"(threshold));
  }
#else
  for (int lane = 0; lane < W; ++lane) {
    mask |= static_cast<uint32_t>(!(x[lane] < threshold[lane])) << lane;
  }
#endif
  return mask;
}

// offer_chunk with a floor (TopKHeap::offer_above), vector by vector: a vector is scanned element-wise only if one
// of its elements passes the heap's current test (>= floor while it fills, > its minimum once full, i.e. >= the next
// float up). With the floor from the chunk maxima only about k elements of a row pass, so about k vectors are
// scanned and the heap is not churned by the first elements of the row.
template <int W>
BS_ALWAYS_INLINE void offer_chunk_above(TopKHeap<float>& heap, const float* x, int64_t count, int64_t first_id,
                                        float floor) {
  using Floats = typename Simd<W>::Floats;
  const auto threshold = [&heap, floor]() {  // a float, not a vector: returning vectors changes the ABI (-Wpsabi)
    return heap.full() ? std::nextafter(heap.minimum(), std::numeric_limits<float>::infinity()) : floor;
  };
  Floats passes = Floats{} + threshold();
  Floats value;
  int64_t i = 0;
  for (; i + W <= count; i += W) {
    load_vec<W>(x + i, value);
    if (ge_mask<W>(value, passes) != 0) {
      heap.offer_above(x, i, i + W, first_id, floor);
      passes = Floats{} + threshold();
    }
  }
  heap.offer_above(x, i, count, first_id, floor);
}

template <int W>
BS_ALWAYS_INLINE void offer_chunk_above(TopKHeap<double>& heap, const double* x, int64_t count, int64_t first_id,
                                        double floor) {
  heap.offer_above(x, 0, count, first_id, floor);
}

// ---- the row kernels -------------------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* logits;
  int64_t row_stride;
  int64_t vocab_size;
  const int64_t* labels;
  int64_t top_k;
  acc_type<scalar_t>* row_max;
  acc_type<scalar_t>* log_sum;
  acc_type<scalar_t>* label_logits;
  acc_type<scalar_t>* belief_logits;  // [N, top_k]
  int64_t* belief_ids;                // [N, top_k]
  // native_forward_grad only (nullptr otherwise): the dense part of the gradient, -grad_rows[i] * pi_i, is written
  // into grad right after row i's statistics, while the row is still in L2.
  const acc_type<scalar_t>* grad_rows;
  scalar_t* grad;  // may equal logits (native_forward_grad_)
  int64_t grad_row_stride;
  bool stream_grad;  // write grad with stream_vec (see stream_grads)
};

// -g * exp(-log_sum), the factor of exp(z - m) in a row's dense gradient -g * pi, formed in double and rounded once;
// exp(-log_sum) <= 1, so it cannot overflow.
template <typename acc_t>
BS_ALWAYS_INLINE acc_t dense_grad_scale(acc_t grad_row, acc_t log_sum) {
  return static_cast<acc_t>(-static_cast<double>(grad_row) * std::exp(-static_cast<double>(log_sum)));
}

// out = -g * pi = (-g * exp(-log_sum)) * exp(z - m) over a row, chunk by chunk, the first factor formed once in
// double; exp(-log_sum) <= 1, so it cannot overflow. out may be z itself (each chunk is read before it is written).
// stream (float32, out not z): the elements before out's first vector-aligned one with plain stores, the rest with
// stream_vec; the same values either way.
template <typename scalar_t, int W>
BS_ALWAYS_INLINE void write_scaled_exp_row(const scalar_t* z, scalar_t* out, int64_t vocab_size,
                                           acc_type<scalar_t> row_max, acc_type<scalar_t> log_sum,
                                           acc_type<scalar_t> grad_row, acc_type<scalar_t>* buffer, bool stream) {
  using acc_t = acc_type<scalar_t>;
  const acc_t dense_scale = dense_grad_scale(grad_row, log_sum);
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (stream) {
      const int64_t head = stream_head<W>(out, vocab_size);
      chunk_scaled_exp<W>(z, head, row_max, dense_scale, out);
      for (int64_t start = head; start < vocab_size; start += kChunk) {
        const int64_t count = std::min(kChunk, vocab_size - start);
        chunk_scaled_exp<W, true>(z + start, count, row_max, dense_scale, out + start);
      }
      return;
    }
  }
  for (int64_t start = 0; start < vocab_size; start += kChunk) {
    const int64_t count = std::min(kChunk, vocab_size - start);
    const acc_t* x = widen_chunk<scalar_t>(z + start, count, buffer);
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      chunk_scaled_exp<W>(x, count, row_max, dense_scale, out + start);
    } else {
      chunk_scaled_exp<W>(x, count, row_max, dense_scale, buffer);
      narrow_chunk<scalar_t>(buffer, count, out + start);
    }
  }
}

// A gradient row of zeros (a row with g = 0: an ignored one). stream (float32, out not the logits): with stream_vec
// from out's first aligned vector on, as the other rows are written; memset's plain stores would first read each line.
template <typename scalar_t, int W>
BS_ALWAYS_INLINE void zero_row(scalar_t* out, int64_t vocab_size, bool stream) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (stream) {
      const typename Simd<W>::Floats zeros{};
      int64_t i = stream_head<W>(out, vocab_size);
      std::fill(out, out + i, 0.0f);
      for (; i + W <= vocab_size; i += W) {
        stream_vec<W>(zeros, out + i);
      }
      std::fill(out + i, out + vocab_size, 0.0f);
      return;
    }
  }
  std::memset(static_cast<void*>(out), 0, sizeof(scalar_t) * vocab_size);
}

// The dense part of one row's gradient once its m and log_sum are known: -g * pi, zeros where g = 0 (ignored rows),
// NaN on a counted row without a distribution (m or log_sum not finite). The same values as native_backward's step 1
// with the grad_rows and row_max that bs_kernels.epilogue.backward_rows derives from the same statistics.
template <typename scalar_t, int W>
BS_ALWAYS_INLINE void write_dense_grad_row(const scalar_t* z, scalar_t* out, int64_t vocab_size, int64_t label,
                                           acc_type<scalar_t> row_max, acc_type<scalar_t> log_sum,
                                           acc_type<scalar_t> grad_row, acc_type<scalar_t>* buffer, bool stream) {
  using acc_t = acc_type<scalar_t>;
  if (label >= 0 && !(std::isfinite(row_max) && std::isfinite(log_sum))) {
    std::fill(out, out + vocab_size, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
  } else if (grad_row == acc_t(0)) {
    zero_row<scalar_t, W>(out, vocab_size, stream);
  } else {
    write_scaled_exp_row<scalar_t, W>(z, out, vocab_size, row_max, log_sum, grad_row, buffer, stream);
  }
}

// The memory of forward_rows_impl that outlives a row, per thread and kept across tasks and calls (no allocation
// per task: the exps of a row are 192-512 KiB, which malloc would map and fault in afresh every time). It holds at
// most one row of exps and two of chunk maxima per thread, for the widest V seen, until the thread exits.
template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> exps;        // [V]: exp(z - m) of the row whose dense gradient is still to be written
  std::vector<acc_t> maxes;       // [chunks]: the chunk maxima of the current row
  std::vector<acc_t> next_maxes;  // [chunks]: those of the next row, gathered during the current row's sweep
  std::vector<acc_t> ranked;      // [chunks]: maxes reordered by row_topk_floor
};

template <typename acc_t>
ForwardScratch<acc_t>& forward_scratch() {
  thread_local ForwardScratch<acc_t> scratch;
  return scratch;
}

// maxes[c] = the max of chunk c of row z (-inf for a chunk of -inf; NaN never wins a comparison, so it is ignored).
template <typename scalar_t, int W>
BS_ALWAYS_INLINE void row_chunk_maxima(const scalar_t* z, int64_t vocab_size, acc_type<scalar_t>* maxes,
                                       acc_type<scalar_t>* buffer) {
  for (int64_t start = 0, chunk = 0; start < vocab_size; start += kChunk, ++chunk) {
    const int64_t count = std::min(kChunk, vocab_size - start);
    maxes[chunk] = chunk_max<W>(widen_chunk<scalar_t>(z + start, count, buffer), count);
  }
}

// A lower bound of a row's k-th largest value, from its chunk maxima: the k largest maxima are k distinct elements of
// the row, so the k-th largest of them is at most the row's k-th largest. -inf where it bounds nothing (fewer chunks
// than k, or fewer than k chunks with a finite max): the top-k then runs without a floor.
template <typename acc_t>
acc_t row_topk_floor(const std::vector<acc_t>& maxes, int64_t top_k, std::vector<acc_t>& ranked) {
  const int64_t num_chunks = static_cast<int64_t>(maxes.size());
  if (top_k == 0 || top_k > num_chunks) {
    return -std::numeric_limits<acc_t>::infinity();
  }
  ranked.assign(maxes.begin(), maxes.end());
  std::nth_element(ranked.begin(), ranked.begin() + (top_k - 1), ranked.end(), std::greater<acc_t>());
  return ranked[top_k - 1];
}

// out[0, V) = scale * exps[0, V), the dense gradient of a row whose exps were kept (chunk by chunk, as the sweep
// that writes it during the next row does).
template <typename scalar_t, int W>
BS_ALWAYS_INLINE void write_kept_chunk(const acc_type<scalar_t>* exps, int64_t count, acc_type<scalar_t> scale,
                                       scalar_t* out, acc_type<scalar_t>* buffer, bool stream) {
  if constexpr (std::is_same<scalar_t, acc_type<scalar_t>>::value) {
    (void)buffer;
    chunk_scale<W>(exps, count, scale, out, stream);
  } else {
    chunk_scale<W>(exps, count, scale, buffer, false);
    narrow_chunk<scalar_t>(buffer, count, out);
  }
}

// Per row, in one sweep over its chunks (kChunk elements, in L1): the top-k, sum exp(z - m) with m the row max, and
// (native_forward_grad) exp(z - m) kept in ForwardScratch::exps. What the sweep needs before it starts, m and the
// top-k floor, comes from the row's chunk maxima, which the previous row's sweep gathered: each of its chunk steps
// also takes the max of the same chunk of the next row, reading that row from memory while the exps of this one are
// computed from L2 (a row is 192 KiB at V = 49 152 float32, 501 KiB at 128 256; L2 holds both rows and the exps).
// Only a task's first row is read on its own, for its maxima.
// The dense gradient of a row, -g * pi = (-g * exp(-log_sum)) * exp(z - m), needs log_sum, known only at the end of
// the sweep; it is written from the kept exps (a multiply, not a second exp) during the next row's sweep, chunk by
// chunk before that chunk's exps are overwritten, so the gradient's writes also overlap computation. The values are
// those of write_dense_grad_row (and of native_backward) bit for bit: the same exp of the same z - m times the same
// factor. Rows with g = 0 or without a distribution take write_dense_grad_row itself.
template <typename scalar_t, int W>
BS_ALWAYS_INLINE void forward_rows_impl(const ForwardArgs<scalar_t>& args, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  if (row_begin >= row_end) {
    return;  // no rows (N = 0): not even a first row to read
  }
  alignas(64) acc_t buffer[kChunk];
  alignas(64) acc_t next_buffer[kChunk];
  alignas(64) acc_t out_buffer[kChunk];
  const acc_t negative_infinity = -std::numeric_limits<acc_t>::infinity();
  const int64_t vocab_size = args.vocab_size;
  ForwardScratch<acc_t>& scratch = forward_scratch<acc_t>();
  const int64_t num_chunks = (vocab_size + kChunk - 1) / kChunk;
  scratch.maxes.resize(static_cast<size_t>(num_chunks));
  scratch.next_maxes.resize(static_cast<size_t>(num_chunks));
  if (args.grad != nullptr) {
    scratch.exps.resize(static_cast<size_t>(vocab_size));
  }
  acc_t* exps = scratch.exps.data();
  scalar_t* pending_out = nullptr;  // the gradient row whose dense part waits in exps, and its factor
  acc_t pending_scale = 0;
  row_chunk_maxima<scalar_t, W>(args.logits + row_begin * args.row_stride, vocab_size, scratch.maxes.data(), buffer);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* z = args.logits + row * args.row_stride;
    const scalar_t* z_next = row + 1 < row_end ? z + args.row_stride : nullptr;
    const acc_t* maxes = scratch.maxes.data();
    acc_t* next_maxes = scratch.next_maxes.data();
    acc_t row_max = negative_infinity;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      row_max = maxes[chunk] > row_max ? maxes[chunk] : row_max;
    }
    const acc_t grad_row = args.grad != nullptr ? args.grad_rows[row] : acc_t(0);
    const bool keep_exps = args.grad != nullptr && grad_row != acc_t(0) && std::isfinite(row_max);
    TopKHeap<acc_t> heap{args.belief_logits + row * args.top_k, args.belief_ids + row * args.top_k, args.top_k, 0};
    const acc_t floor = row_topk_floor(scratch.maxes, args.top_k, scratch.ranked);
    const bool has_floor = floor > negative_infinity;
    double sum = 0.0;  // sum of exp(z - row_max), chunk by chunk
    // Streamed stores need the pending row aligned to the vector (every chunk then is: kChunk is whole vectors).
    const bool fused_aligned =
        !args.stream_grad || reinterpret_cast<uintptr_t>(pending_out) % (W * sizeof(float)) == 0;
    for (int64_t start = 0, chunk = 0; start < vocab_size; start += kChunk, ++chunk) {
      const int64_t count = std::min(kChunk, vocab_size - start);
      const acc_t* x = widen_chunk<scalar_t>(z + start, count, buffer);
      const acc_t block_max = maxes[chunk];
      // The previous row's gradient from its exps, before this row's overwrite them: inside the exp loop where it
      // can (float32, this row keeps exps too), else on its own.
      bool summed = false;
      if constexpr (std::is_same<scalar_t, float>::value) {
        if (pending_out != nullptr && keep_exps && block_max > negative_infinity && fused_aligned) {
          float* out = pending_out + start;
          sum += args.stream_grad
                     ? chunk_sum_exp<W, Exps::kSwapStream>(x, count, row_max, exps + start, pending_scale, out)
                     : chunk_sum_exp<W, Exps::kSwap>(x, count, row_max, exps + start, pending_scale, out);
          summed = true;
        }
      }
      if (!summed && pending_out != nullptr) {
        write_kept_chunk<scalar_t, W>(exps + start, count, pending_scale, pending_out + start, out_buffer,
                                      args.stream_grad);
      }
      if (args.top_k > 0) {
        if (has_floor) {
          if (block_max >= floor && (!heap.full() || block_max > heap.minimum())) {
            offer_chunk_above<W>(heap, x, count, start, floor);
          }
        } else if (!heap.full() || block_max > heap.minimum()) {
          offer_chunk<W>(heap, x, count, start);
        }
      }
      if (!summed && block_max > negative_infinity) {  // a chunk of -inf adds nothing (x - (-inf) would be NaN)
        sum += keep_exps ? chunk_sum_exp<W, Exps::kKeep>(x, count, row_max, exps + start)
                         : chunk_sum_exp<W>(x, count, row_max);
      } else if (!summed && keep_exps) {
        std::fill(exps + start, exps + start + count, acc_t(0));  // exp(-inf - m)
      }
      if (z_next != nullptr) {
        next_maxes[chunk] = chunk_max<W>(widen_chunk<scalar_t>(z_next + start, count, next_buffer), count);
      }
    }
    pending_out = nullptr;
    // All -inf: m = -inf and log(0) = -inf (the epilogue treats a non-finite m or log_sum as an empty row).
    const acc_t log_sum = static_cast<acc_t>(std::log(sum));
    args.row_max[row] = row_max;
    args.log_sum[row] = log_sum;
    const int64_t label = args.labels[row];
    args.label_logits[row] = label >= 0 ? static_cast<acc_t>(z[label]) : acc_t(0);
    if (args.grad != nullptr) {  // after every read of the row: with grad over the logits, z[label] is read first
      scalar_t* out = args.grad + row * args.grad_row_stride;
      if (keep_exps && std::isfinite(log_sum)) {
        pending_out = out;
        pending_scale = dense_grad_scale(grad_row, log_sum);
      } else {
        write_dense_grad_row<scalar_t, W>(z, out, vocab_size, label, row_max, log_sum, grad_row, buffer,
                                          args.stream_grad);
      }
    }
    std::swap(scratch.maxes, scratch.next_maxes);
  }
  if (pending_out != nullptr) {  // the task's last row
    for (int64_t start = 0; start < vocab_size; start += kChunk) {
      write_kept_chunk<scalar_t, W>(exps + start, std::min(kChunk, vocab_size - start), pending_scale,
                                    pending_out + start, out_buffer, args.stream_grad);
    }
  }
  if (args.stream_grad) {
    store_fence();  // this task's streamed rows are in memory before the launcher returns
  }
}

// The k + 1 sparse terms of a row whose dense part -g * pi is written: out_p = g * (coef_p - pi_p), with coef = w_j on
// belief j (+ label_weight on the label), from the logits at those positions and pi_p = exp((z_p - m) - log_sum).
// Each is computed in double and rounded to the output dtype once.
template <typename scalar_t>
void write_sparse_terms(scalar_t* out, const acc_type<scalar_t>* belief_logits, const int64_t* ids,
                        const acc_type<scalar_t>* weights, int64_t top_k, int64_t label,
                        acc_type<scalar_t> label_logit, acc_type<scalar_t> row_max, acc_type<scalar_t> log_sum,
                        acc_type<scalar_t> grad_row, double label_weight) {
  using acc_t = acc_type<scalar_t>;
  const double m = static_cast<double>(row_max);
  const double shifted_log_sum = static_cast<double>(log_sum);
  bool label_in_beliefs = false;  // belief ids are distinct: the label is in at most one slot
  for (int64_t j = 0; j < top_k; ++j) {
    const bool is_label = ids[j] == label;
    label_in_beliefs = label_in_beliefs || is_label;
    const double coef = static_cast<double>(weights[j]) + (is_label ? label_weight : 0.0);
    const double pi = std::exp((static_cast<double>(belief_logits[j]) - m) - shifted_log_sum);
    out[ids[j]] = static_cast<scalar_t>(static_cast<acc_t>(static_cast<double>(grad_row) * (coef - pi)));
  }
  if (label >= 0 && !label_in_beliefs) {
    const double pi = std::exp((static_cast<double>(label_logit) - m) - shifted_log_sum);
    out[label] = static_cast<scalar_t>(static_cast<acc_t>(static_cast<double>(grad_row) * (label_weight - pi)));
  }
}

template <typename scalar_t>
struct BackwardArgs {
  const acc_type<scalar_t>* grad_rows;
  const scalar_t* logits;
  int64_t logits_row_stride;
  scalar_t* grad;  // may equal logits (inplace)
  int64_t grad_row_stride;
  int64_t vocab_size;
  const int64_t* labels;
  const acc_type<scalar_t>* row_max;
  const acc_type<scalar_t>* log_sum;
  const int64_t* belief_ids;               // [N, top_k]
  const acc_type<scalar_t>* belief_weights;  // [N, top_k]
  int64_t top_k;
  double label_weight;
  bool stream_grad;  // write grad with stream_vec (see stream_grads)
};

template <typename scalar_t, int W>
BS_ALWAYS_INLINE void backward_rows_impl(const BackwardArgs<scalar_t>& args, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  alignas(64) acc_t buffer[kChunk];
  // The logits at the k sparse belief positions, read before an inplace backward overwrites them.
  std::vector<acc_t> sparse_logits(static_cast<size_t>(args.top_k));
  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* z = args.logits + row * args.logits_row_stride;
    scalar_t* out = args.grad + row * args.grad_row_stride;
    const acc_t grad_row = args.grad_rows[row];
    if (grad_row == acc_t(0)) {
      zero_row<scalar_t, W>(out, args.vocab_size, args.stream_grad);  // ignored rows
      continue;
    }
    const int64_t label = args.labels[row];
    const int64_t* ids = args.belief_ids + row * args.top_k;
    const acc_t* weights = args.belief_weights + row * args.top_k;
    const acc_t row_max = args.row_max[row];
    const acc_t log_sum = args.log_sum[row];

    for (int64_t j = 0; j < args.top_k; ++j) {
      sparse_logits[j] = static_cast<acc_t>(z[ids[j]]);
    }
    const acc_t label_logit = label >= 0 ? static_cast<acc_t>(z[label]) : acc_t(0);

    // 1. out = -g * pi everywhere.
    write_scaled_exp_row<scalar_t, W>(z, out, args.vocab_size, row_max, log_sum, grad_row, buffer, args.stream_grad);
    if (args.stream_grad) {
      store_fence();  // the streamed dense part is in memory before the sparse terms overwrite some of it
    }
    // 2. The sparse terms.
    write_sparse_terms<scalar_t>(out, sparse_logits.data(), ids, weights, args.top_k, label, label_logit, row_max,
                                 log_sum, grad_row, args.label_weight);
  }
  if (args.stream_grad) {
    store_fence();  // the streamed zeros of a last ignored row are in memory before the launcher returns
  }
}

// ---- ISA dispatch ----------------------------------------------------------------------------------------

enum class Isa { kDefault, kAvx2, kAvx512 };

// The widest ISA the CPU supports, capped by BS_KERNELS_NATIVE_ISA (read on every call; it is cheap).
Isa select_isa() {
  Isa cpu = Isa::kDefault;
#if BS_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    cpu = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f")) {
      cpu = Isa::kAvx512;
    }
  }
#endif
  const char* requested = std::getenv("BS_KERNELS_NATIVE_ISA");
  if (requested == nullptr) {
    return cpu;
  }
  const std::string name(requested);
  Isa cap = Isa::kAvx512;
  if (name == "default") {
    cap = Isa::kDefault;
  } else if (name == "avx2") {
    cap = Isa::kAvx2;
  } else {
    TORCH_CHECK(name == "avx512" || name.empty(), "BS_KERNELS_NATIVE_ISA must be avx512, avx2 or default, got '",
                name, "'");
  }
  return static_cast<int>(cap) < static_cast<int>(cpu) ? cap : cpu;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

template <typename scalar_t>
void forward_rows_default(const ForwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  forward_rows_impl<scalar_t, 4>(args, begin, end);
}

template <typename scalar_t>
void backward_rows_default(const BackwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  backward_rows_impl<scalar_t, 4>(args, begin, end);
}

#if BS_X86_DISPATCH
template <typename scalar_t>
BS_TARGET_AVX2 void forward_rows_avx2(const ForwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  forward_rows_impl<scalar_t, 8>(args, begin, end);
}

template <typename scalar_t>
BS_TARGET_AVX512 void forward_rows_avx512(const ForwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  forward_rows_impl<scalar_t, 16>(args, begin, end);
}

template <typename scalar_t>
BS_TARGET_AVX2 void backward_rows_avx2(const BackwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  backward_rows_impl<scalar_t, 8>(args, begin, end);
}

template <typename scalar_t>
BS_TARGET_AVX512 void backward_rows_avx512(const BackwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  backward_rows_impl<scalar_t, 16>(args, begin, end);
}
#endif

template <typename Args>
using RowsFunction = void (*)(const Args&, int64_t, int64_t);

template <typename scalar_t>
RowsFunction<ForwardArgs<scalar_t>> forward_rows_for(Isa isa) {
#if BS_X86_DISPATCH
  if (isa == Isa::kAvx512) {
    return &forward_rows_avx512<scalar_t>;
  }
  if (isa == Isa::kAvx2) {
    return &forward_rows_avx2<scalar_t>;
  }
#endif
  (void)isa;
  return &forward_rows_default<scalar_t>;
}

template <typename scalar_t>
RowsFunction<BackwardArgs<scalar_t>> backward_rows_for(Isa isa) {
#if BS_X86_DISPATCH
  if (isa == Isa::kAvx512) {
    return &backward_rows_avx512<scalar_t>;
  }
  if (isa == Isa::kAvx2) {
    return &backward_rows_avx2<scalar_t>;
  }
#endif
  (void)isa;
  return &backward_rows_default<scalar_t>;
}

// Runs rows(begin, end) over [0, num_rows) on at::parallel_for's threads, in tasks of about 2^20 elements handed
// out by an atomic counter rather than one static share per thread: on a machine shared with other jobs a thread
// that is descheduled for a while then costs only its current task, not half of the rows. 2^20 elements (21 rows at
// V = 49 152, 8 at 128 256): the forward reads a task's first row on its own (for its chunk maxima), the others
// while computing the row before.
template <typename RowsFn>
void parallel_over_rows(int64_t num_rows, int64_t vocab_size, const RowsFn& rows) {
  const int64_t rows_per_task = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, vocab_size));
  const int64_t num_tasks = (num_rows + rows_per_task - 1) / rows_per_task;
  const int64_t num_workers = std::min<int64_t>(num_tasks, at::get_num_threads());
  if (num_workers <= 1) {
    rows(0, num_rows);
    return;
  }
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
    for (int64_t task = next_task.fetch_add(1); task < num_tasks; task = next_task.fetch_add(1)) {
      const int64_t begin = task * rows_per_task;
      rows(begin, std::min(num_rows, begin + rows_per_task));
    }
  });
}

// ---- host functions (the launchers) ----------------------------------------------------------------------

at::ScalarType compute_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, " must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, name, " must be [N, V], got ", logits.dim(), " dimensions");
  TORCH_CHECK(logits.size(1) > 0, name, " must have a non-empty vocabulary dimension");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, name,
              " must be float32, float64, bfloat16 or float16, got ", dtype);
}

void check_rows(const at::Tensor& tensor, const char* name, int64_t num_rows, at::ScalarType dtype) {
  TORCH_CHECK(tensor.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(tensor.scalar_type() == dtype, name, " must be ", dtype, ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.dim() >= 1 && tensor.size(0) == num_rows, name, " must have ", num_rows, " rows, got shape ",
              tensor.sizes());
}

// A view whose rows have unit stride along V (the kernels read rows with a row stride only).
at::Tensor unit_stride_rows(const at::Tensor& logits) {
  return logits.size(1) == 1 || logits.stride(1) == 1 ? logits : logits.contiguous();
}

// The gradient is a fresh [N, V] buffer that the kernel then writes once. Backed by 4 KiB pages, first touching it
// costs one page fault per 4 KiB, which on this class of machine takes longer than computing the gradient (0.35 s
// for 400 MB, against 0.05 s with 2 MiB pages). So ask for transparent huge pages on its aligned interior before
// the first write; it is only a hint (ignored where THP is off or the memory was already touched).
constexpr size_t kHugePage = size_t{2} << 20;

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
  if (end > begin) {
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

// The [N, V] gradients. A training loop asks for one every step and frees it before the next; memory of that size
// comes from mmap, so every step faults its pages in and the kernel zeroes them, which costs about two copies of the
// buffer's bytes on top of the kernel's own write, whatever the page size (benchmarks/RESULTS.md, "On a quiet
// machine"). So the memory of a freed gradient is kept and the next gradient that fits is placed in it, its pages
// already resident: a one-slot pool. It holds at most one block (when a second is freed, the larger is kept), so a
// process holds at most one gradient's memory more than before between steps; nothing changes while a gradient is
// alive (a block is reused only once every tensor on it is gone: the storage's deleter returns it). Gradients under
// 32 MiB are left to malloc.
// BS_KERNELS_NATIVE_GRAD_POOL=0 turns the pool off (read on every call); native_release_gradient_pool() frees the
// block it holds.
class GradientPool {
 public:
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    const char* setting = std::getenv("BS_KERNELS_NATIVE_GRAD_POOL");
    if (bytes < kPoolMinBytes || (setting != nullptr && std::string(setting) == "0")) {
      at::Tensor plain = at::empty(sizes, options);
      advise_huge_pages(plain.data_ptr(), plain.nbytes());
      return plain;
    }
    void* block = nullptr;
    size_t capacity = 0;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (block_ != nullptr && capacity_ >= bytes) {
        block = block_;
        capacity = capacity_;
      } else {
        std::free(block_);  // too small for this request: a larger block replaces it
      }
      block_ = nullptr;
      capacity_ = 0;
    }
    if (block == nullptr) {
      capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
      block = std::aligned_alloc(kHugePage, capacity);
      TORCH_CHECK(block != nullptr, "bs_kernels native: could not allocate a ", bytes, "-byte gradient");
      advise_huge_pages(block, capacity);
    }
    return at::from_blob(
        block, sizes, [this, capacity](void* data) { give_back(data, capacity); }, options);
  }

  void release() {
    std::lock_guard<std::mutex> guard(mutex_);
    std::free(block_);
    block_ = nullptr;
    capacity_ = 0;
  }

  size_t held_bytes() {
    std::lock_guard<std::mutex> guard(mutex_);
    return capacity_;
  }

 private:
  // Smaller blocks come from malloc's heap, which reuses freed memory itself (glibc maps a block of its own only
  // from its largest mmap threshold, 32 MiB, up).
  static constexpr size_t kPoolMinBytes = size_t{32} << 20;

  void give_back(void* block, size_t capacity) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (capacity >= capacity_) {
      std::swap(block, block_);
      capacity_ = capacity;
    }
    std::free(block);  // the smaller of the two (or nothing)
  }

  std::mutex mutex_;
  void* block_ = nullptr;
  size_t capacity_ = 0;
};

// Never destroyed: a gradient freed while the process exits still returns its block to a live pool.
GradientPool& gradient_pool() {
  static GradientPool* pool = new GradientPool();
  return *pool;
}

void native_release_gradient_pool() { gradient_pool().release(); }

int64_t native_gradient_pool_bytes() { return static_cast<int64_t>(gradient_pool().held_bytes()); }

// Whether a gradient is written with stream_vec: float32, into its own memory (not over the logits, whose lines the
// kernel has just read), and at least kStreamMinBytes (smaller ones may still be in cache when they are read next).
bool stream_grads(const at::Tensor& grad, const at::Tensor& logits) {
  return grad.scalar_type() == at::kFloat && !grad.is_same(logits) && grad.nbytes() >= kStreamMinBytes;
}

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The forward over unit-stride rows; with grad defined, also the dense part of the gradient scaled by grad_rows
// (see write_dense_grad_row), written into grad (which may be logits itself).
ForwardOutputs forward_into(const at::Tensor& logits, const at::Tensor& labels_in, int64_t top_k,
                            const at::Tensor& grad_rows_in, const at::Tensor& grad) {
  const int64_t num_rows = logits.size(0);
  const int64_t vocab_size = logits.size(1);
  check_rows(labels_in, "labels", num_rows, at::kLong);
  TORCH_CHECK(labels_in.dim() == 1, "labels must be [N]");
  TORCH_CHECK(top_k >= 0 && top_k <= vocab_size, "top_k must be in [0, V = ", vocab_size, "], got ", top_k);
  const at::Tensor labels = labels_in.contiguous();
  const auto stats_dtype = compute_dtype(logits.scalar_type());
  at::Tensor grad_rows;
  if (grad.defined()) {
    check_rows(grad_rows_in, "grad_rows", num_rows, stats_dtype);
    TORCH_CHECK(grad_rows_in.dim() == 1, "grad_rows must be [N]");
    grad_rows = grad_rows_in.contiguous();
  }

  const auto stats_options = logits.options().dtype(stats_dtype);
  at::Tensor row_max = at::empty({num_rows}, stats_options);
  at::Tensor log_sum = at::empty({num_rows}, stats_options);
  at::Tensor label_logits = at::empty({num_rows}, stats_options);
  at::Tensor belief_logits = at::empty({num_rows, top_k}, stats_options);
  at::Tensor belief_ids = at::empty({num_rows, top_k}, logits.options().dtype(at::kLong));
  const Isa isa = select_isa();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "bs_kernels::native_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const ForwardArgs<scalar_t> args{logits.const_data_ptr<scalar_t>(),
                                     logits.stride(0),
                                     vocab_size,
                                     labels.const_data_ptr<int64_t>(),
                                     top_k,
                                     row_max.mutable_data_ptr<acc_t>(),
                                     log_sum.mutable_data_ptr<acc_t>(),
                                     label_logits.mutable_data_ptr<acc_t>(),
                                     belief_logits.mutable_data_ptr<acc_t>(),
                                     belief_ids.mutable_data_ptr<int64_t>(),
                                     grad.defined() ? grad_rows.const_data_ptr<acc_t>() : nullptr,
                                     grad.defined() ? grad.data_ptr<scalar_t>() : nullptr,
                                     grad.defined() ? grad.stride(0) : 0,
                                     grad.defined() && stream_grads(grad, logits)};
    const auto rows = forward_rows_for<scalar_t>(isa);
    parallel_over_rows(num_rows, vocab_size, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
  return {row_max, log_sum, label_logits, belief_logits, belief_ids};
}

ForwardOutputs native_forward(const at::Tensor& logits_in, const at::Tensor& labels, int64_t top_k) {
  check_logits(logits_in, "logits");
  return forward_into(unit_stride_rows(logits_in), labels, top_k, at::Tensor(), at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> native_forward_grad(
    const at::Tensor& logits_in, const at::Tensor& labels, int64_t top_k, const at::Tensor& grad_rows) {
  check_logits(logits_in, "logits");
  const at::Tensor logits = unit_stride_rows(logits_in);
  at::Tensor grad = gradient_pool().empty(logits.sizes(), logits.options());  // contiguous
  auto [row_max, log_sum, label_logits, belief_logits, belief_ids] =
      forward_into(logits, labels, top_k, grad_rows, grad);
  return {row_max, log_sum, label_logits, belief_logits, belief_ids, grad};
}

ForwardOutputs native_forward_grad_inplace(const at::Tensor& logits, const at::Tensor& labels, int64_t top_k,
                                           const at::Tensor& grad_rows) {
  check_logits(logits, "logits");
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1,
              "native_forward_grad_ writes into logits, whose rows must have unit stride along V; got strides ",
              logits.strides());
  return forward_into(logits, labels, top_k, grad_rows, logits);
}

void backward_into(const at::Tensor& grad_rows_in, const at::Tensor& logits, const at::Tensor& labels_in,
                   const at::Tensor& row_max_in, const at::Tensor& log_sum_in, const at::Tensor& belief_ids_in,
                   const at::Tensor& belief_weights_in, double label_weight, const at::Tensor& grad) {
  const int64_t num_rows = logits.size(0);
  const int64_t vocab_size = logits.size(1);
  const auto stats_dtype = compute_dtype(logits.scalar_type());
  check_rows(grad_rows_in, "grad_rows", num_rows, stats_dtype);
  check_rows(labels_in, "labels", num_rows, at::kLong);
  check_rows(row_max_in, "row_max", num_rows, stats_dtype);
  check_rows(log_sum_in, "log_sum", num_rows, stats_dtype);
  check_rows(belief_ids_in, "belief_ids", num_rows, at::kLong);
  check_rows(belief_weights_in, "belief_weights", num_rows, stats_dtype);
  TORCH_CHECK(grad_rows_in.dim() == 1 && labels_in.dim() == 1 && row_max_in.dim() == 1 && log_sum_in.dim() == 1,
              "grad_rows, labels, row_max and log_sum must be [N]");
  TORCH_CHECK(belief_ids_in.dim() == 2 && belief_weights_in.sizes() == belief_ids_in.sizes(),
              "belief_ids and belief_weights must both be [N, k], got ", belief_ids_in.sizes(), " and ",
              belief_weights_in.sizes());
  const int64_t top_k = belief_ids_in.size(1);
  TORCH_CHECK(top_k <= vocab_size, "belief_ids has k = ", top_k, " > V = ", vocab_size);
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor row_max = row_max_in.contiguous();
  const at::Tensor log_sum = log_sum_in.contiguous();
  const at::Tensor belief_ids = belief_ids_in.contiguous();
  const at::Tensor belief_weights = belief_weights_in.contiguous();
  const Isa isa = select_isa();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "bs_kernels::native_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const BackwardArgs<scalar_t> args{grad_rows.const_data_ptr<acc_t>(),
                                      logits.const_data_ptr<scalar_t>(),
                                      logits.stride(0),
                                      grad.mutable_data_ptr<scalar_t>(),
                                      grad.stride(0),
                                      vocab_size,
                                      labels.const_data_ptr<int64_t>(),
                                      row_max.const_data_ptr<acc_t>(),
                                      log_sum.const_data_ptr<acc_t>(),
                                      belief_ids.const_data_ptr<int64_t>(),
                                      belief_weights.const_data_ptr<acc_t>(),
                                      top_k,
                                      label_weight,
                                      stream_grads(grad, logits)};
    const auto rows = backward_rows_for<scalar_t>(isa);
    parallel_over_rows(num_rows, vocab_size, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
}

at::Tensor native_backward(const at::Tensor& grad_rows, const at::Tensor& logits_in, const at::Tensor& labels,
                           const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& belief_ids,
                           const at::Tensor& belief_weights, double label_weight) {
  check_logits(logits_in, "logits");
  const at::Tensor logits = unit_stride_rows(logits_in);
  at::Tensor grad = gradient_pool().empty(logits.sizes(), logits.options());  // contiguous
  backward_into(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, grad);
  return grad;
}

void native_backward_inplace(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& belief_ids,
                             const at::Tensor& belief_weights, double label_weight) {
  check_logits(logits, "logits");
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1,
              "native_backward_ writes into logits, whose rows must have unit stride along V; got strides ",
              logits.strides());
  backward_into(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, logits);
}

// The sparse terms of rows whose dense part native_forward_grad wrote (see write_sparse_terms), from the forward's
// statistics and the epilogue's coefficients; rows with grad_rows 0 are left as they are (zeros).
void native_sparse_grad_inplace(const at::Tensor& grad, const at::Tensor& grad_rows_in, const at::Tensor& labels_in,
                                const at::Tensor& row_max_in, const at::Tensor& log_sum_in,
                                const at::Tensor& label_logits_in, const at::Tensor& belief_logits_in,
                                const at::Tensor& belief_ids_in, const at::Tensor& belief_weights_in,
                                double label_weight) {
  check_logits(grad, "grad");
  TORCH_CHECK(grad.size(1) == 1 || grad.stride(1) == 1,
              "native_sparse_grad_ writes into grad, whose rows must have unit stride along V; got strides ",
              grad.strides());
  const int64_t num_rows = grad.size(0);
  const int64_t vocab_size = grad.size(1);
  const auto stats_dtype = compute_dtype(grad.scalar_type());
  check_rows(grad_rows_in, "grad_rows", num_rows, stats_dtype);
  check_rows(labels_in, "labels", num_rows, at::kLong);
  check_rows(row_max_in, "row_max", num_rows, stats_dtype);
  check_rows(log_sum_in, "log_sum", num_rows, stats_dtype);
  check_rows(label_logits_in, "label_logits", num_rows, stats_dtype);
  check_rows(belief_logits_in, "belief_logits", num_rows, stats_dtype);
  check_rows(belief_ids_in, "belief_ids", num_rows, at::kLong);
  check_rows(belief_weights_in, "belief_weights", num_rows, stats_dtype);
  TORCH_CHECK(grad_rows_in.dim() == 1 && labels_in.dim() == 1 && row_max_in.dim() == 1 && log_sum_in.dim() == 1 &&
                  label_logits_in.dim() == 1,
              "grad_rows, labels, row_max, log_sum and label_logits must be [N]");
  TORCH_CHECK(belief_ids_in.dim() == 2 && belief_weights_in.sizes() == belief_ids_in.sizes() &&
                  belief_logits_in.sizes() == belief_ids_in.sizes(),
              "belief_logits, belief_ids and belief_weights must all be [N, k], got ", belief_logits_in.sizes(), ", ",
              belief_ids_in.sizes(), " and ", belief_weights_in.sizes());
  const int64_t top_k = belief_ids_in.size(1);
  TORCH_CHECK(top_k <= vocab_size, "belief_ids has k = ", top_k, " > V = ", vocab_size);
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor row_max = row_max_in.contiguous();
  const at::Tensor log_sum = log_sum_in.contiguous();
  const at::Tensor label_logits = label_logits_in.contiguous();
  const at::Tensor belief_logits = belief_logits_in.contiguous();
  const at::Tensor belief_ids = belief_ids_in.contiguous();
  const at::Tensor belief_weights = belief_weights_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "bs_kernels::native_sparse_grad_", [&] {
    using acc_t = acc_type<scalar_t>;
    scalar_t* out = grad.data_ptr<scalar_t>();
    const int64_t row_stride = grad.stride(0);
    const acc_t* g = grad_rows.const_data_ptr<acc_t>();
    const int64_t* label = labels.const_data_ptr<int64_t>();
    const acc_t* maxes = row_max.const_data_ptr<acc_t>();
    const acc_t* log_sums = log_sum.const_data_ptr<acc_t>();
    const acc_t* label_logit = label_logits.const_data_ptr<acc_t>();
    const acc_t* values = belief_logits.const_data_ptr<acc_t>();
    const int64_t* ids = belief_ids.const_data_ptr<int64_t>();
    const acc_t* weights = belief_weights.const_data_ptr<acc_t>();
    // Each row's k + 1 writes miss the cache (~100 ns each), so the rows are spread over the threads in the dense
    // pass's tasks rather than by the k + 1 elements they write.
    parallel_over_rows(num_rows, vocab_size, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        if (g[row] == acc_t(0)) {
          continue;
        }
        const int64_t offset = row * top_k;
        write_sparse_terms<scalar_t>(out + row * row_stride, values + offset, ids + offset, weights + offset, top_k,
                                     label[row], label_logit[row], maxes[row], log_sums[row], g[row], label_weight);
      }
    });
  });
}

std::string native_isa() { return isa_name(select_isa()); }

}  // namespace
}  // namespace bs_kernels_native

// FRAGMENT: other backends (Triton) may define operators in the same namespace from Python.
TORCH_LIBRARY_FRAGMENT(bs_kernels, m) {
  m.def("native_forward(Tensor logits, Tensor labels, int top_k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "native_backward(Tensor grad_rows, Tensor logits, Tensor labels, Tensor row_max, Tensor log_sum, "
      "Tensor belief_ids, Tensor belief_weights, float label_weight) -> Tensor");
  m.def(
      "native_backward_(Tensor grad_rows, Tensor(a!) logits, Tensor labels, Tensor row_max, Tensor log_sum, "
      "Tensor belief_ids, Tensor belief_weights, float label_weight) -> ()");
  m.def(
      "native_forward_grad(Tensor logits, Tensor labels, int top_k, Tensor grad_rows) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "native_forward_grad_(Tensor(a!) logits, Tensor labels, int top_k, Tensor grad_rows) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "native_sparse_grad_(Tensor(a!) grad, Tensor grad_rows, Tensor labels, Tensor row_max, Tensor log_sum, "
      "Tensor label_logits, Tensor belief_logits, Tensor belief_ids, Tensor belief_weights, float label_weight) -> ()");
  m.def("native_isa() -> str", &bs_kernels_native::native_isa);
  m.def("native_release_gradient_pool() -> ()", &bs_kernels_native::native_release_gradient_pool);
  m.def("native_gradient_pool_bytes() -> int", &bs_kernels_native::native_gradient_pool_bytes);
}

TORCH_LIBRARY_IMPL(bs_kernels, CPU, m) {
  m.impl("native_forward", &bs_kernels_native::native_forward);
  m.impl("native_backward", &bs_kernels_native::native_backward);
  m.impl("native_backward_", &bs_kernels_native::native_backward_inplace);
  m.impl("native_forward_grad", &bs_kernels_native::native_forward_grad);
  m.impl("native_forward_grad_", &bs_kernels_native::native_forward_grad_inplace);
  m.impl("native_sparse_grad_", &bs_kernels_native::native_sparse_grad_inplace);
}
