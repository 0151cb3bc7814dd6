// Launchers of the Safe Delta kernels (safedelta_kernels.cuh) for torch tensors: argument
// checks, launch shapes, dtype dispatch. The Python side (deltafix/kernels/cuda.py) does the
// small steps around them with torch.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <climits>
#include <vector>

#include "safedelta_kernels.cuh"

namespace {

using namespace deltafix_kernels;

// The input dtypes the kernels take (the selection's arithmetic follows torch's promotion of them).
#define DELTAFIX_DISPATCH_HALF_OR_FLOAT(TYPE, NAME, ...)         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename TF, int R>
void launch_compensate(const at::Tensor& w, const at::Tensor& wf, const at::Tensor& keep, const at::Tensor& hinv,
                       int sub, at::Tensor& q, at::Tensor& err, cudaStream_t stream) {
  const int64_t rows = w.size(0);
  const int cols = static_cast<int>(w.size(1));
  const size_t shared = compensate_shared_bytes(R, cols, sub);
  C10_CUDA_CHECK(cudaFuncSetAttribute(compensate_kernel<TF, R>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared)));
  const dim3 grid(static_cast<unsigned int>((rows + R - 1) / R));
  compensate_kernel<TF, R><<<grid, kSweepThreads, shared, stream>>>(
      w.data_ptr<float>(), w.stride(0), wf.data_ptr<TF>(), wf.stride(0), keep.data_ptr<bool>(), keep.stride(0),
      hinv.data_ptr<float>(), hinv.stride(0), rows, cols, sub, q.data_ptr<float>(), err.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

bool is_half_or_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

// A 2-D CUDA matrix whose columns are unit-stride (rows may be padded); copied otherwise.
at::Tensor row_major(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), " dimensions");
  if ((t.stride(1) == 1 || t.size(1) <= 1) && (t.stride(0) >= t.size(1) || t.size(0) <= 1)) return t;
  return t.contiguous();
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), name, " is on ", b.device(), ", expected ", a.device());
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

}  // namespace

namespace deltafix {

// Per-column sums of the selection costs, (b,) float64: sum_i (W_F,im - W_im)^2 * kappa_m.
at::Tensor column_cost(const at::Tensor& w_finetuned, const at::Tensor& w, const at::Tensor& kappa) {
  const at::Tensor wf_ = row_major(w_finetuned, "w_finetuned");
  const at::Tensor w_ = row_major(w, "w");
  TORCH_CHECK(w_.sizes() == wf_.sizes(), "w ", w_.sizes(), " and w_finetuned ", wf_.sizes(), " differ in shape");
  TORCH_CHECK(is_half_or_float(wf_.scalar_type()) && is_half_or_float(w_.scalar_type()),
              "w and w_finetuned must be float32, float16 or bfloat16");
  TORCH_CHECK(kappa.dim() == 1 && kappa.size(0) == w_.size(1) && kappa.scalar_type() == at::kFloat,
              "kappa must be a float32 vector with one entry per column");
  check_same_device(w_, wf_, "w_finetuned");
  check_same_device(w_, kappa, "kappa");
  const c10::cuda::CUDAGuard guard(w_.device());
  const at::Tensor kappa_ = kappa.contiguous();

  const int64_t rows = w_.size(0);
  const int64_t cols = w_.size(1);
  const auto options = w_.options().dtype(at::kDouble);
  if (rows == 0 || cols == 0) return at::zeros({cols}, options);

  // Enough row chunks to give every SM a few thread blocks; fp64 partial sums per chunk are then
  // added by torch in a fixed order, so the result is deterministic.
  const int64_t column_tiles = (cols + kCostColumns - 1) / kCostColumns;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, w_.get_device());
  const int64_t wanted = (4 * sms + column_tiles - 1) / column_tiles;
  const int64_t most = (rows + 8 * kCostRowThreads - 1) / (8 * kCostRowThreads);
  const int64_t chunks = wanted < most ? (wanted > 0 ? wanted : 1) : most;
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  at::Tensor partial = at::empty({chunks, cols}, options);

  const dim3 grid(static_cast<unsigned int>(column_tiles), static_cast<unsigned int>(chunks));
  const dim3 block(kCostColumns, kCostRowThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DELTAFIX_DISPATCH_HALF_OR_FLOAT(wf_.scalar_type(), "column_cost", [&] {
    using TF = scalar_t;
    DELTAFIX_DISPATCH_HALF_OR_FLOAT(w_.scalar_type(), "column_cost", [&] {
      using TW = scalar_t;
      column_cost_kernel<TF, TW><<<grid, block, column_cost_shared_bytes, stream>>>(
          wf_.data_ptr<TF>(), wf_.stride(0), w_.data_ptr<TW>(), w_.stride(0), kappa_.data_ptr<float>(), rows, cols,
          rows_per_chunk, partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return partial.sum(0);
}

// The compensation sweep of one block: (Q, Err), both (out, b) float32 and contiguous.
std::vector<at::Tensor> compensate(const at::Tensor& w, const at::Tensor& w_finetuned, const at::Tensor& keep,
                                   const at::Tensor& hinv, int64_t sub_block) {
  const at::Tensor w_ = row_major(w, "w");
  const at::Tensor wf_ = row_major(w_finetuned, "w_finetuned");
  const at::Tensor keep_ = row_major(keep, "keep");
  const at::Tensor hinv_ = row_major(hinv, "hinv");
  TORCH_CHECK(w_.scalar_type() == at::kFloat, "w must be float32");
  TORCH_CHECK(is_half_or_float(wf_.scalar_type()), "w_finetuned must be float32, float16 or bfloat16");
  TORCH_CHECK(keep_.scalar_type() == at::kBool, "keep must be bool");
  TORCH_CHECK(hinv_.scalar_type() == at::kFloat, "hinv must be float32");
  TORCH_CHECK(wf_.sizes() == w_.sizes() && keep_.sizes() == w_.sizes(), "w, w_finetuned and keep differ in shape");
  TORCH_CHECK(hinv_.size(0) == w_.size(1) && hinv_.size(1) == w_.size(1), "hinv must be (b, b) for a (out, b) block");
  TORCH_CHECK(w_.size(1) <= INT_MAX, "too many columns in one block");
  TORCH_CHECK(sub_block >= 1, "sub_block must be >= 1");
  check_same_device(w_, wf_, "w_finetuned");
  check_same_device(w_, keep_, "keep");
  check_same_device(w_, hinv_, "hinv");
  const c10::cuda::CUDAGuard guard(w_.device());

  const int64_t rows = w_.size(0);
  const int cols = static_cast<int>(w_.size(1));
  at::Tensor q = at::empty({rows, cols}, w_.options());
  at::Tensor err = at::empty({rows, cols}, w_.options());
  if (rows == 0 || cols == 0) return {q, err};

  const int sub = static_cast<int>(sub_block < kMaxSubBlock ? sub_block : kMaxSubBlock);
  const size_t limit = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, w_.get_device()));
  int rows_per_block = 8;
  while (rows_per_block > 1 && compensate_shared_bytes(rows_per_block, cols, sub) > limit) rows_per_block /= 2;
  TORCH_CHECK(compensate_shared_bytes(rows_per_block, cols, sub) <= limit, "a block of ", cols,
              " columns does not fit in shared memory");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DELTAFIX_DISPATCH_HALF_OR_FLOAT(wf_.scalar_type(), "compensate", [&] {
    switch (rows_per_block) {
      case 8: launch_compensate<scalar_t, 8>(w_, wf_, keep_, hinv_, sub, q, err, stream); break;
      case 4: launch_compensate<scalar_t, 4>(w_, wf_, keep_, hinv_, sub, q, err, stream); break;
      case 2: launch_compensate<scalar_t, 2>(w_, wf_, keep_, hinv_, sub, q, err, stream); break;
      default: launch_compensate<scalar_t, 1>(w_, wf_, keep_, hinv_, sub, q, err, stream); break;
    }
  });
  return {q, err};
}

}  // namespace deltafix
