// Safe Delta's CUDA kernels: per-column selection costs and the compensation sweep of one column
// block. The specification is deltafix/kernels/safedelta_ref.py. Launched by safedelta.cu.
//
// Layout: every (out, b) input is a row-major view whose rows may be longer than b (a column
// block sliced from an (out, in) weight), so each takes its row stride ("ld"). Shared memory is
// declared `extern` only (sized at launch), which also lets tests/kernel_emulation run these
// kernels on the CPU.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace deltafix_kernels {

// ---------------------------------------------------------------------------------------------
// Selection costs
// ---------------------------------------------------------------------------------------------

// torch's result type of `w_finetuned - w`: the inputs' type when they agree, else float32.
template <typename TF, typename TW>
using difference_t = std::conditional_t<std::is_same<TF, TW>::value, TF, float>;

// c_im = (W_F,im - W_im)^2 * kappa_m, rounded exactly as the torch reference rounds it: the
// difference and the square in the inputs' common type (so in bf16 or fp16 when both inputs are),
// the product with kappa in fp32.
template <typename TF, typename TW>
__device__ __forceinline__ float entry_cost(TF wf, TW w, float kappa) {
  using T = difference_t<TF, TW>;
  const float d = static_cast<float>(static_cast<T>(static_cast<float>(wf) - static_cast<float>(w)));
  const float square = static_cast<float>(static_cast<T>(d * d));
  return square * kappa;
}

constexpr int kCostColumns = 32;    // one warp reads 32 neighbouring entries of a row
constexpr int kCostRowThreads = 8;  // rows walked in parallel by one thread block
constexpr size_t column_cost_shared_bytes = sizeof(double) * kCostRowThreads * kCostColumns;

// partial[chunk, m] = sum of c_im over the rows of `chunk`, accumulated in fp64.
// Grid: (ceil(b / 32), chunks); block: (32, 8); shared memory: column_cost_shared_bytes.
template <typename TF, typename TW>
__global__ void column_cost_kernel(const TF* __restrict__ wf, int64_t ldf, const TW* __restrict__ w,
                                   int64_t ldw, const float* __restrict__ kappa, int64_t rows,
                                   int64_t cols, int64_t rows_per_chunk, double* __restrict__ partial) {
  extern __shared__ double sums[];  // [kCostRowThreads][kCostColumns]
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCostColumns + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
  double acc = 0.0;
  if (col < cols) {
    const float k = kappa[col];
    for (int64_t r = first + threadIdx.y; r < last; r += kCostRowThreads) {
      acc += static_cast<double>(entry_cost(wf[r * ldf + col], w[r * ldw + col], k));
    }
  }
  sums[threadIdx.y * kCostColumns + threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    double total = 0.0;
#pragma unroll
    for (int y = 0; y < kCostRowThreads; ++y) total += sums[y * kCostColumns + threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * cols + col] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// Compensation sweep
// ---------------------------------------------------------------------------------------------

constexpr int kSweepThreads = 256;
constexpr int kMaxSubBlock = 32;

// Copy sub-block [s, s + n) into shared memory: W_F and keep of the thread block's rows,
// and U's n x n diagonal tile, so that the serial part of the sweep reads shared memory only.
template <typename TF>
__device__ __forceinline__ void stage_sub_block(int s, int n, int nrows, int64_t row0, const TF* __restrict__ wf,
                                                int64_t ldf, const bool* __restrict__ keep, int64_t ldk,
                                                const float* __restrict__ u, int64_t ldu, int sub, float* fs,
                                                float* ks, float* us) {
  for (int i = threadIdx.x; i < nrows * n; i += kSweepThreads) {
    const int r = i / n;
    const int t = i % n;
    const int64_t row = row0 + r;
    fs[r * sub + t] = static_cast<float>(wf[row * ldf + s + t]);
    ks[r * sub + t] = keep[row * ldk + s + t] ? 1.0f : 0.0f;
  }
  for (int i = threadIdx.x; i < n * n; i += kSweepThreads) {
    const int t = i / n;
    const int v = i % n;
    us[t * sub + v] = u[static_cast<int64_t>(s + t) * ldu + s + v];
  }
}

// One thread block owns R rows of the (out, b) block and walks its b columns; the rows live in
// shared memory for the whole sweep. Per sub-block of `sub` columns:
//   A. thread r fixes the sub-block's columns of row r one by one (q = W_F where kept, else the
//      current value; err = (w - q) / U_jj; later columns of the sub-block -= U_jk * err);
//   B. all threads write the errors out, subtract U[sub-block, k]^T err from every later column
//      k of the block (one rank-`sub` update), and stage the next sub-block.
// This is compensate_block's loop with the same update order; rows are independent, so nothing
// is shared between thread blocks. The caller's block-to-rest update stays a cuBLAS GEMM.
template <typename TF, int R>
__global__ void __launch_bounds__(kSweepThreads)
    compensate_kernel(const float* __restrict__ w, int64_t ldw, const TF* __restrict__ wf, int64_t ldf,
                      const bool* __restrict__ keep, int64_t ldk, const float* __restrict__ u, int64_t ldu,
                      int64_t rows, int cols, int sub, float* __restrict__ q_out, float* __restrict__ err_out) {
  extern __shared__ float smem[];
  const int lds = cols + 1;        // padded: the R rows of one column fall in different banks
  float* ws = smem;                // [R][lds] working rows; a column holds q once it is fixed
  float* fs = ws + R * lds;        // [R][sub] W_F of the staged sub-block
  float* ks = fs + R * sub;        // [R][sub] keep (1 or 0) of the staged sub-block
  float* es = ks + R * sub;        // [R][sub] errors of the current sub-block
  float* us = es + R * sub;        // [sub][sub] U's diagonal tile of the staged sub-block

  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int nrows = rows - row0 < R ? static_cast<int>(rows - row0) : R;

  for (int r = 0; r < nrows; ++r) {
    for (int c = tid; c < cols; c += kSweepThreads) ws[r * lds + c] = w[(row0 + r) * ldw + c];
  }
  stage_sub_block<TF>(0, sub < cols ? sub : cols, nrows, row0, wf, ldf, keep, ldk, u, ldu, sub, fs, ks, us);
  __syncthreads();

  for (int s0 = 0; s0 < cols; s0 += sub) {
    const int n = sub < cols - s0 ? sub : cols - s0;
    const int s1 = s0 + n;

    if (tid < nrows) {
      float* wr = ws + tid * lds;
      for (int t = 0; t < n; ++t) {
        const float wj = wr[s0 + t];
        const float q = ks[tid * sub + t] != 0.0f ? fs[tid * sub + t] : wj;
        const float e = (wj - q) / us[t * sub + t];
        for (int v = t + 1; v < n; ++v) wr[s0 + v] -= us[t * sub + v] * e;
        wr[s0 + t] = q;
        es[tid * sub + t] = e;
      }
    }
    __syncthreads();

    for (int i = tid; i < nrows * n; i += kSweepThreads) {
      const int r = i / n;
      const int t = i % n;
      err_out[(row0 + r) * cols + s0 + t] = es[r * sub + t];
    }
    for (int k = s1 + tid; k < cols; k += kSweepThreads) {
      float acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0.0f;
      for (int t = 0; t < n; ++t) {
        const float ut = u[static_cast<int64_t>(s0 + t) * ldu + k];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r < nrows) acc[r] += ut * es[r * sub + t];
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) ws[r * lds + k] -= acc[r];
      }
    }
    if (s1 < cols) {
      const int next = sub < cols - s1 ? sub : cols - s1;
      stage_sub_block<TF>(s1, next, nrows, row0, wf, ldf, keep, ldk, u, ldu, sub, fs, ks, us);
    }
    __syncthreads();
  }

  for (int r = 0; r < nrows; ++r) {
    for (int c = tid; c < cols; c += kSweepThreads) q_out[(row0 + r) * cols + c] = ws[r * lds + c];
  }
}

// Dynamic shared memory of compensate_kernel for R rows per thread block.
inline size_t compensate_shared_bytes(int rows_per_block, int cols, int sub) {
  return sizeof(float) *
         (static_cast<size_t>(rows_per_block) * (cols + 1) + 3 * static_cast<size_t>(rows_per_block) * sub + sub * sub);
}

}  // namespace deltafix_kernels
