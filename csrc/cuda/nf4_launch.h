// Host-side entry points of the NF4 CUDA kernels (defined in csrc/cuda/nf4.cu, which nvcc
// compiles; declared here for csrc/cuda/nf4_binding.cpp, which the host compiler compiles).
// Plain types only: no torch and no CUDA device code, so the binding never includes .cuh
// files. The caller validated every shape and picked the stream; these only launch and
// return the launch error (cudaSuccess if none). Nothing here throws.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastft {
namespace nf4 {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };  // element type of x / y / out

// The per-block scales, as device pointers: fp32 (f32 set), or double-quantised (f32 null):
// scale(b) = (code2[q[b]] * absmax2[b >> bs2_shift]) + offset[0], decoded inside the kernels
// with the product rounded on its own (__fmul_rn, then __fadd_rn), bit for bit as bitsandbytes'
// two-kernel decode.
struct Scales {
  const float* f32 = nullptr;  // [nblocks] fp32 scales, or nullptr when double-quantised
  const uint8_t* q = nullptr;  // [nblocks] indices into c2
  const float* a2 = nullptr;   // [ceil(nblocks / 2^bs2_shift)] second-level scales
  const float* c2 = nullptr;   // [256] second-level code
  const float* off = nullptr;  // [1] offset
  int bs2_shift = 8;           // log2(blocksize2)
};
constexpr int kMaxGemvRows = 8;  // = kGemvMaxM of nf4_kernels.cuh (static_assert in nf4.cu)

// out[0, numel) = code[nibble(j)] * scale(j / blocksize), written as `dtype`.
cudaError_t dequant(int dtype, const uint8_t* packed, const Scales& absmax, const float* code, int64_t blocksize,
                    int64_t numel, void* out, cudaStream_t stream);

// y [M, N] = x [M, K] @ W[N, K]^T (+ bias, fp32 [N] or nullptr); x and y of `dtype`, 1 <= M <= kMaxGemvRows.
cudaError_t gemv(int dtype, const void* x, const uint8_t* packed, const Scales& absmax, const float* code,
                 const float* bias, void* y, int64_t M, int64_t N, int64_t K, int64_t blocksize, cudaStream_t stream);

}  // namespace nf4
}  // namespace fastft
