// NF4 (bitsandbytes 4-bit NormalFloat) CUDA kernels on raw pointers: no torch headers here,
// so this file compiles on its own (see the self-test at the bottom). csrc/cuda/nf4.cu wraps
// the launchers below into the plain entry points of nf4_launch.h; the torch binding is
// csrc/cuda/nf4_binding.cpp.
//
// Contract (see fastft/kernels/nf4_cuda.py):
//   packed  uint8 [ceil(numel / 2)]: byte i holds flat element 2i in the HIGH nibble and
//           element 2i + 1 in the LOW nibble
//   absmax  float32 [ceil(numel / blocksize)], or double-quantised (Scales in nf4_launch.h):
//           uint8 indices + absmax2 / code2 / offset, each block's scale decoded in-kernel as
//           (code2[q[b]] * absmax2[b / blocksize2]) + offset, product and sum rounded apart
//   code    float32 [16] (the NF4 table)
//   W[j] = code[nibble(j)] * scale(j / blocksize)      (fp32 product, then rounded once)
//
// Dequantisation (memory bound). Each thread of the vector path reads 8 packed bytes with
// one 64-bit load, decodes 16 elements through the 16-entry table in shared memory (entry i
// sits in bank i, so a warp's lookups never conflict: equal indices broadcast) and writes
// them with 128-bit stores (4 x float4 for fp32, 2 x uint4 of packed bf16/fp16 pairs). The
// elements after the last full group of 16, or all of them when the vector path does not
// apply (blocksize % 16 != 0 or misaligned pointers), take one thread per element.
//
// GEMV (generation, M <= 8 rows of x): y[m, n] = sum_k x[m, k] * W[n * K + k] (+ bias[n]),
// fp32 accumulation, K % blocksize == 0 (blocks never cross rows). One warp per output row
// n (kGemvWarps rows per CTA): each lane reads 16 packed bytes (32 weights) per step with a
// 128-bit streaming load, prefetching its next chunk before it computes the current one,
// so a warp walks the row 512 bytes at a time and reads it exactly once for all M rows of
// x. With blocksize % 32 == 0 a chunk has one scale: per row m the lane forms
// sum_i code[q_i] * x[m, k0 + i] and adds scale * that to its accumulator; x (reused by
// every warp) comes through the read-only cache with 128-bit loads. A butterfly of warp
// shuffles reduces the 32 partial sums; lane 0 adds the bias and writes y in x's dtype.
// When the vector path does not apply (K % 32, blocksize % 32 or misaligned pointers) the
// lanes walk the row a byte at a time instead (same result, slower).
//
// Compile check without torch (CUDA 12/13):
//   nvcc -std=c++17 -arch=sm_90 -O3 -x cu -DFASTFT_NF4_KERNELS_SELFTEST \
//        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
//        -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
//        -c csrc/cuda/nf4_kernels.cuh -o /tmp/nf4_kernels.o
// (the -D__CUDA_NO_* flags are the ones torch.utils.cpp_extension passes to nvcc).

#ifndef FASTFT_NF4_KERNELS_CUH_
#define FASTFT_NF4_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "nf4_launch.h"

namespace fastft {
namespace nf4 {

constexpr int kDequantThreads = 256;
constexpr int kGemvWarps = 4;  // output rows (warps) per CTA
constexpr int kGemvMaxM = 8;   // largest M the GEMV handles

// ---------------------------------------------------------------------------------------
// dtype helpers (explicit intrinsics: torch builds with __CUDA_NO_HALF/BFLOAT16_CONVERSIONS__)
// ---------------------------------------------------------------------------------------
template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // .x = a at the lower address
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack2(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
};

template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack2(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
};

// 16 consecutive outputs (16-byte aligned destination)
__device__ __forceinline__ void store16(float* dst, const float (&v)[16]) {
  float4* d = reinterpret_cast<float4*>(dst);
#pragma unroll
  for (int i = 0; i < 4; ++i) d[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

template <typename T>
__device__ __forceinline__ void store16(T* dst, const float (&v)[16]) {
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float* s = v + 8 * i;
    d[i] = make_uint4(Cvt<T>::pack2(s[0], s[1]), Cvt<T>::pack2(s[2], s[3]), Cvt<T>::pack2(s[4], s[5]),
                      Cvt<T>::pack2(s[6], s[7]));
  }
}

// 8 consecutive x values as fp32 (16-byte aligned source, read-only cache)
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const float2 a = Cvt<T>::unpack2(u.x), b = Cvt<T>::unpack2(u.y), c = Cvt<T>::unpack2(u.z),
               d = Cvt<T>::unpack2(u.w);
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y, v[4] = c.x, v[5] = c.y, v[6] = d.x, v[7] = d.y;
}

// the 8 table values of the 4 bytes of a little-endian word, in element order
__device__ __forceinline__ void decode_word(uint32_t w, const float* s_code, float* out) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    out[2 * b] = s_code[(w >> (8 * b + 4)) & 0xF];  // first element: high nibble
    out[2 * b + 1] = s_code[(w >> (8 * b)) & 0xF];
  }
}

// j / blocksize: a shift when blocksize is a power of two (bs_shift >= 0)
__device__ __forceinline__ int64_t block_of(int64_t j, int64_t blocksize, int bs_shift) {
  return bs_shift >= 0 ? (j >> bs_shift) : (j / blocksize);
}

// the fp32 scale of quantisation block b (decoded here when double-quantised)
__device__ __forceinline__ float scale_of(const Scales& s, int64_t b) {
  if (s.f32 != nullptr) return __ldg(s.f32 + b);
  return __fadd_rn(__fmul_rn(__ldg(s.c2 + __ldg(s.q + b)), __ldg(s.a2 + (b >> s.bs2_shift))), __ldg(s.off));
}

__device__ __forceinline__ void load_code(const float* __restrict__ code, float* s_code) {
  if (threadIdx.x < 16) s_code[threadIdx.x] = __ldg(code + threadIdx.x);
  __syncthreads();
}

// ---------------------------------------------------------------------------------------
// dequantisation
// ---------------------------------------------------------------------------------------
// Threads [0, nvec) each decode the 16 elements of 8 bytes (kVec only; needs blocksize % 16
// == 0, packed 8-byte and out 16-byte aligned); the next (numel - 16 * nvec) threads one
// element each.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequant_kernel(const uint8_t* __restrict__ packed, const Scales absmax,
                       const float* __restrict__ code, int64_t blocksize, int bs_shift, int64_t numel, int64_t nvec,
                       T* __restrict__ out) {
  __shared__ float s_code[16];
  load_code(code, s_code);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kVec && t < nvec) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(packed) + t);  // read once: streaming
    const int64_t e0 = t * 16;
    const float s = scale_of(absmax, block_of(e0, blocksize, bs_shift));
    float o[16];
    decode_word(v.x, s_code, o);
    decode_word(v.y, s_code, o + 8);
#pragma unroll
    for (int i = 0; i < 16; ++i) o[i] = __fmul_rn(o[i], s);  // the exact fp32 product
    store16(out + e0, o);
    return;
  }
  const int64_t j = (kVec ? nvec * 16 : 0) + (t - (kVec ? nvec : 0));
  if (j >= numel) return;
  const uint8_t b = __ldg(packed + (j >> 1));
  const int q = (j & 1) ? (b & 0xF) : (b >> 4);
  out[j] = Cvt<T>::from_float(__fmul_rn(s_code[q], scale_of(absmax, block_of(j, blocksize, bs_shift))));
}

// ---------------------------------------------------------------------------------------
// GEMV (M <= 8)
// ---------------------------------------------------------------------------------------
// kVec needs K % 32 == 0, blocksize % 32 == 0, packed and x 16-byte aligned.
template <typename T, int M, bool kVec>
__global__ void __launch_bounds__(kGemvWarps * 32)
    nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, const Scales absmax,
                    const float* __restrict__ code, const float* __restrict__ bias, T* __restrict__ y, int64_t N,
                    int64_t K, int64_t blocksize, int bs_shift) {
  static_assert(M >= 1 && M <= kGemvMaxM, "GEMV handles 1..8 rows of x");
  __shared__ float s_code[16];
  load_code(code, s_code);
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warps leave together (after the only __syncthreads)
  const int64_t row_bytes = K >> 1;
  const uint8_t* row = packed + n * row_bytes;
  const int64_t blk0 = block_of(n * K, blocksize, bs_shift);  // the row's first block (K % blocksize == 0)
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;

  int64_t done = 0;  // bytes of the row handled by the vector path
  if (kVec) {
    const int64_t nchunks = row_bytes >> 4;  // 16 bytes = 32 weights per lane and step
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    int64_t c = lane;
    uint4 v = c < nchunks ? __ldcs(rv + c) : make_uint4(0, 0, 0, 0);
    for (; c < nchunks; c += 32) {
      const int64_t cn = c + 32;
      const uint4 vn = cn < nchunks ? __ldcs(rv + cn) : make_uint4(0, 0, 0, 0);  // prefetch
      const int64_t k0 = c * 32;
      const float s = scale_of(absmax, blk0 + block_of(k0, blocksize, bs_shift));
      float w[32];
      decode_word(v.x, s_code, w);
      decode_word(v.y, s_code, w + 8);
      decode_word(v.z, s_code, w + 16);
      decode_word(v.w, s_code, w + 24);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const T* xr = x + m * K + k0;
        float part = 0.f;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          float xv[8];
          load8(xr + 8 * g, xv);
#pragma unroll
          for (int i = 0; i < 8; ++i) part = fmaf(w[8 * g + i], xv[i], part);
        }
        acc[m] = fmaf(part, s, acc[m]);
      }
      v = vn;
    }
    done = nchunks << 4;
  }
  for (int64_t b = done + lane; b < row_bytes; b += 32) {  // byte path: tail / unaligned
    const uint8_t byte = __ldg(row + b);
    const int64_t k = 2 * b;
    const float s = scale_of(absmax, blk0 + block_of(k, blocksize, bs_shift));  // blocksize even: k, k+1 share it
    const float w0 = __fmul_rn(s_code[byte >> 4], s), w1 = __fmul_rn(s_code[byte & 0xF], s);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const T* xr = x + m * K + k;
      acc[m] = fmaf(w1, Cvt<T>::to_float(xr[1]), fmaf(w0, Cvt<T>::to_float(xr[0]), acc[m]));
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }
  if (lane == 0) {
    const float bv = bias != nullptr ? __ldg(bias + n) : 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) y[m * N + n] = Cvt<T>::from_float(acc[m] + bv);
  }
}

// ---------------------------------------------------------------------------------------
// host launchers (raw pointers; the caller validated shapes and picked the stream)
// ---------------------------------------------------------------------------------------
inline int pow2_shift(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// out[0, numel) = dequantised W. Returns the launch error (cudaSuccess if none).
template <typename T>
cudaError_t launch_dequant(const uint8_t* packed, const Scales& absmax, const float* code, int64_t blocksize,
                           int64_t numel, T* out, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  const int bs_shift = pow2_shift(blocksize);
  const bool vec = blocksize % 16 == 0 && aligned(packed, 8) && aligned(out, 16);
  const int64_t nvec = vec ? numel / 16 : 0;
  const int64_t threads = nvec + (numel - 16 * nvec);
  const int64_t grid = (threads + kDequantThreads - 1) / kDequantThreads;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (vec)
    nf4_dequant_kernel<T, true><<<static_cast<unsigned>(grid), kDequantThreads, 0, stream>>>(
        packed, absmax, code, blocksize, bs_shift, numel, nvec, out);
  else
    nf4_dequant_kernel<T, false><<<static_cast<unsigned>(grid), kDequantThreads, 0, stream>>>(
        packed, absmax, code, blocksize, bs_shift, numel, 0, out);
  return cudaGetLastError();
}

template <typename T, int M>
void launch_gemv_m(bool vec, unsigned grid, cudaStream_t stream, const T* x, const uint8_t* packed,
                   const Scales& absmax, const float* code, const float* bias, T* y, int64_t N, int64_t K,
                   int64_t blocksize, int bs_shift) {
  if (vec)
    nf4_gemv_kernel<T, M, true><<<grid, kGemvWarps * 32, 0, stream>>>(x, packed, absmax, code, bias, y, N, K,
                                                                       blocksize, bs_shift);
  else
    nf4_gemv_kernel<T, M, false><<<grid, kGemvWarps * 32, 0, stream>>>(x, packed, absmax, code, bias, y, N, K,
                                                                        blocksize, bs_shift);
}

// y [M, N] = x [M, K] @ W[N, K]^T (+ bias, fp32 [N] or nullptr), 1 <= M <= 8, K even,
// K % blocksize == 0, blocksize even. Returns the launch error (cudaSuccess if none).
template <typename T>
cudaError_t launch_gemv(const T* x, const uint8_t* packed, const Scales& absmax, const float* code, const float* bias,
                        T* y, int64_t M, int64_t N, int64_t K, int64_t blocksize, cudaStream_t stream) {
  if (M < 1 || M > kGemvMaxM || N <= 0 || K <= 0 || K % 2 != 0 || blocksize <= 0 || blocksize % 2 != 0 ||
      K % blocksize != 0)
    return cudaErrorInvalidValue;
  const int bs_shift = pow2_shift(blocksize);
  const bool vec = K % 32 == 0 && blocksize % 32 == 0 && aligned(packed, 16) && aligned(x, 16);
  const int64_t grid = (N + kGemvWarps - 1) / kGemvWarps;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  const unsigned g = static_cast<unsigned>(grid);
  switch (M) {
#define FASTFT_NF4_GEMV_CASE(MM) \
  case MM:                       \
    launch_gemv_m<T, MM>(vec, g, stream, x, packed, absmax, code, bias, y, N, K, blocksize, bs_shift); \
    break;
    FASTFT_NF4_GEMV_CASE(1)
    FASTFT_NF4_GEMV_CASE(2)
    FASTFT_NF4_GEMV_CASE(3)
    FASTFT_NF4_GEMV_CASE(4)
    FASTFT_NF4_GEMV_CASE(5)
    FASTFT_NF4_GEMV_CASE(6)
    FASTFT_NF4_GEMV_CASE(7)
    FASTFT_NF4_GEMV_CASE(8)
#undef FASTFT_NF4_GEMV_CASE
  }
  return cudaGetLastError();
}

}  // namespace nf4
}  // namespace fastft

#ifdef FASTFT_NF4_KERNELS_SELFTEST
// Instantiate every kernel for the compile check (nothing runs).
namespace fastft {
namespace nf4 {
template cudaError_t launch_dequant<float>(const uint8_t*, const Scales&, const float*, int64_t, int64_t, float*,
                                           cudaStream_t);
template cudaError_t launch_dequant<__nv_bfloat16>(const uint8_t*, const Scales&, const float*, int64_t, int64_t,
                                                   __nv_bfloat16*, cudaStream_t);
template cudaError_t launch_dequant<__half>(const uint8_t*, const Scales&, const float*, int64_t, int64_t, __half*,
                                            cudaStream_t);
template cudaError_t launch_gemv<float>(const float*, const uint8_t*, const Scales&, const float*, const float*, float*,
                                        int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t launch_gemv<__nv_bfloat16>(const __nv_bfloat16*, const uint8_t*, const Scales&, const float*,
                                                const float*, __nv_bfloat16*, int64_t, int64_t, int64_t, int64_t,
                                                cudaStream_t);
template cudaError_t launch_gemv<__half>(const __half*, const uint8_t*, const Scales&, const float*, const float*,
                                         __half*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
}  // namespace nf4
}  // namespace fastft
#endif

#endif  // FASTFT_NF4_KERNELS_CUH_
