// The NF4 CUDA launchers behind csrc/cuda/nf4_launch.h: one non-template entry point per
// operation that dispatches on the element type to the templates in nf4_kernels.cuh. Only
// nvcc compiles this file; it includes no torch headers and throws nothing (errors come back
// as cudaError_t and csrc/cuda/nf4_binding.cpp turns them into Python exceptions).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_kernels.cuh"
#include "nf4_launch.h"

static_assert(fastft::nf4::kMaxGemvRows == fastft::nf4::kGemvMaxM, "nf4_launch.h and nf4_kernels.cuh disagree");

namespace fastft {
namespace nf4 {

cudaError_t dequant(int dtype, const uint8_t* packed, const Scales& absmax, const float* code, int64_t blocksize,
                    int64_t numel, void* out, cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return launch_dequant(packed, absmax, code, blocksize, numel, static_cast<float*>(out), stream);
    case kBF16:
      return launch_dequant(packed, absmax, code, blocksize, numel, static_cast<__nv_bfloat16*>(out), stream);
    case kF16:
      return launch_dequant(packed, absmax, code, blocksize, numel, static_cast<__half*>(out), stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t gemv(int dtype, const void* x, const uint8_t* packed, const Scales& absmax, const float* code,
                 const float* bias, void* y, int64_t M, int64_t N, int64_t K, int64_t blocksize, cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return launch_gemv(static_cast<const float*>(x), packed, absmax, code, bias, static_cast<float*>(y), M, N, K,
                         blocksize, stream);
    case kBF16:
      return launch_gemv(static_cast<const __nv_bfloat16*>(x), packed, absmax, code, bias,
                         static_cast<__nv_bfloat16*>(y), M, N, K, blocksize, stream);
    case kF16:
      return launch_gemv(static_cast<const __half*>(x), packed, absmax, code, bias, static_cast<__half*>(y), M, N,
                         K, blocksize, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace nf4
}  // namespace fastft
