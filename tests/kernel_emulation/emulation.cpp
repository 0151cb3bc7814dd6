// Runs deltafix's CUDA kernels (cuda_ext/safedelta_kernels.cuh) on the CPU, so that
// their indexing, shared-memory staging and synchronisation are tested on machines without a GPU.
//
// A thread block is emulated by one std::thread per CUDA thread; __syncthreads is a std::barrier
// of the block's threads; thread blocks run one after another, so the kernels' `extern
// __shared__` arrays can be plain arrays here. The arithmetic is the host compiler's (no FMA
// contraction guarantees), so results match the GPU's to float rounding, not bit for bit.
// Built by tests/test_kernels.py with torch.utils.cpp_extension; not a performance tool.

#include <torch/extension.h>

#include <barrier>
#include <cstddef>
#include <thread>
#include <vector>

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace emulation {
thread_local dim3 thread_index;
dim3 block_index;
std::barrier<>* block_barrier = nullptr;

// Run `body` as a CUDA grid: every thread block with its own barrier, blocks in order.
template <typename Body>
void launch(dim3 grid, dim3 block, Body body) {
  const std::ptrdiff_t threads = static_cast<std::ptrdiff_t>(block.x) * block.y;
  for (unsigned int by = 0; by < grid.y; ++by) {
    for (unsigned int bx = 0; bx < grid.x; ++bx) {
      block_index = {bx, by, 0};
      std::barrier<> barrier(threads);
      block_barrier = &barrier;
      std::vector<std::thread> pool;
      for (unsigned int ty = 0; ty < block.y; ++ty) {
        for (unsigned int tx = 0; tx < block.x; ++tx) {
          pool.emplace_back([=] {
            thread_index = {tx, ty, 0};
            body();
          });
        }
      }
      for (auto& t : pool) t.join();
    }
  }
}
}  // namespace emulation

#define threadIdx (::emulation::thread_index)
#define blockIdx (::emulation::block_index)
#define __syncthreads() (::emulation::block_barrier->arrive_and_wait())
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__

namespace deltafix_kernels {
// The kernels' dynamic shared memory (block-scope `extern` declarations resolve to these).
constexpr std::size_t kSharedFloats = 1 << 20;
alignas(16) double sums[256];
alignas(16) float smem[kSharedFloats];
}  // namespace deltafix_kernels

#include "safedelta_kernels.cuh"

namespace {

using namespace deltafix_kernels;

#define EMULATION_DISPATCH(TYPE, NAME, ...)                                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// As in safedelta.cu: rows may be padded (a column block of a wider matrix); other layouts are copied.
at::Tensor row_major(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "expected a 2-D tensor");
  if ((t.stride(1) == 1 || t.size(1) <= 1) && (t.stride(0) >= t.size(1) || t.size(0) <= 1)) return t;
  return t.contiguous();
}

// column_cost of safedelta.cu with an explicit number of row chunks.
at::Tensor column_cost(const at::Tensor& wf_in, const at::Tensor& w_in, const at::Tensor& kappa, int64_t chunks) {
  const at::Tensor wf = row_major(wf_in);
  const at::Tensor w = row_major(w_in);
  TORCH_CHECK(kCostRowThreads * kCostColumns <= 256, "shared array too small");
  const int64_t rows = w.size(0);
  const int64_t cols = w.size(1);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  at::Tensor partial = at::zeros({chunks, cols}, w.options().dtype(at::kDouble));
  const at::Tensor k = kappa.contiguous();
  const dim3 grid{static_cast<unsigned int>((cols + kCostColumns - 1) / kCostColumns),
                  static_cast<unsigned int>(chunks), 1};
  const dim3 block{kCostColumns, kCostRowThreads, 1};
  EMULATION_DISPATCH(wf.scalar_type(), "column_cost", [&] {
    using TF = scalar_t;
    EMULATION_DISPATCH(w.scalar_type(), "column_cost", [&] {
      using TW = scalar_t;
      const TF* wf_ptr = wf.data_ptr<TF>();
      const TW* w_ptr = w.data_ptr<TW>();
      const float* k_ptr = k.data_ptr<float>();
      double* out = partial.data_ptr<double>();
      const int64_t ldf = wf.stride(0), ldw = w.stride(0);
      emulation::launch(grid, block, [=] {
        column_cost_kernel<TF, TW>(wf_ptr, ldf, w_ptr, ldw, k_ptr, rows, cols, rows_per_chunk, out);
      });
    });
  });
  return partial.sum(0);
}

template <typename TF, int R>
void run_compensate(const at::Tensor& w, const at::Tensor& wf, const at::Tensor& keep, const at::Tensor& hinv,
                    int sub, at::Tensor& q, at::Tensor& err) {
  const int64_t rows = w.size(0);
  const int cols = static_cast<int>(w.size(1));
  TORCH_CHECK(compensate_shared_bytes(R, cols, sub) <= sizeof(float) * kSharedFloats, "block too wide");
  const float* w_ptr = w.data_ptr<float>();
  const TF* wf_ptr = wf.data_ptr<TF>();
  const bool* keep_ptr = keep.data_ptr<bool>();
  const float* u_ptr = hinv.data_ptr<float>();
  float* q_ptr = q.data_ptr<float>();
  float* err_ptr = err.data_ptr<float>();
  const int64_t ldw = w.stride(0), ldf = wf.stride(0), ldk = keep.stride(0), ldu = hinv.stride(0);
  const dim3 grid{static_cast<unsigned int>((rows + R - 1) / R), 1, 1};
  const dim3 block{kSweepThreads, 1, 1};
  emulation::launch(grid, block, [=] {
    compensate_kernel<TF, R>(w_ptr, ldw, wf_ptr, ldf, keep_ptr, ldk, u_ptr, ldu, rows, cols, sub, q_ptr, err_ptr);
  });
}

// compensate of safedelta.cu with an explicit number of rows per thread block (8, 4, 2 or 1).
std::vector<at::Tensor> compensate(const at::Tensor& w_in, const at::Tensor& wf_in, const at::Tensor& keep_in,
                                   const at::Tensor& hinv_in, int64_t sub_block, int64_t rows_per_block) {
  const at::Tensor w = row_major(w_in);
  const at::Tensor wf = row_major(wf_in);
  const at::Tensor keep = row_major(keep_in);
  const at::Tensor hinv = row_major(hinv_in);
  at::Tensor q = at::empty({w.size(0), w.size(1)}, w.options());
  at::Tensor err = at::empty({w.size(0), w.size(1)}, w.options());
  const int sub = static_cast<int>(sub_block < kMaxSubBlock ? sub_block : kMaxSubBlock);
  EMULATION_DISPATCH(wf.scalar_type(), "compensate", [&] {
    switch (rows_per_block) {
      case 8: run_compensate<scalar_t, 8>(w, wf, keep, hinv, sub, q, err); break;
      case 4: run_compensate<scalar_t, 4>(w, wf, keep, hinv, sub, q, err); break;
      case 2: run_compensate<scalar_t, 2>(w, wf, keep, hinv, sub, q, err); break;
      case 1: run_compensate<scalar_t, 1>(w, wf, keep, hinv, sub, q, err); break;
      default: TORCH_CHECK(false, "rows_per_block must be 8, 4, 2 or 1");
    }
  });
  return {q, err};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("column_cost", &column_cost);
  m.def("compensate", &compensate);
}
