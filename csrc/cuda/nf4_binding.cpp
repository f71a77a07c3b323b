// Torch binding of the NF4 CUDA kernels: fastft._C_cuda when setup.py builds it ahead of time
// (FASTFT_BUILD_EXT=1, a CUDA torch and nvcc), or the JIT module fastft_cuda_nf4 built by
// fastft/kernels/nf4_cuda.py, from this file and csrc/cuda/nf4.cu (the kernels and their
// launchers, csrc/cuda/nf4_kernels.cuh). This file is compiled by the host C++ compiler, not
// nvcc: every check that throws (TORCH_CHECK) lives here, so a bad input becomes a Python
// exception through the same toolchain as torch itself; nvcc-compiled code never throws.
//
//   nf4_dequantize(packed, absmax, code, blocksize, numel, out_dtype) -> 1-D [numel]
//   nf4_gemv(x [M, K], packed, absmax, code, blocksize, N, K, bias=None) -> [M, N]
//
// Contract: packed uint8 [ceil(numel / 2)] (first element in the HIGH nibble), absmax fp32
// [ceil(numel / blocksize)] -- or uint8 with absmax2 / code2 / offset / blocksize2, the double
// quantisation the kernels decode per block --, code fp32 [16], W[j] = code[nibble(j)] * scale(j / blocksize);
// all contiguous on one CUDA device. nf4_gemv computes y = x W.view(N, K)^T (+ bias) for
// 0 <= M <= 8 rows of x (fp32/bf16/fp16, fp32 accumulation, y in x's dtype) and needs K and
// blocksize even with K % blocksize == 0. Kernels run on the current CUDA stream of the
// tensors' device; nothing synchronises the host.
//
// This file is the only one in csrc/cuda/ with a PYBIND11_MODULE: setup.py compiles every
// csrc/cuda/*.cu and *.cpp into the one module fastft._C_cuda, so further sources must add
// their functions here (or through an init function called from here), not their own module.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one also needs the cuBLAS/cuSPARSE headers

#include "nf4_launch.h"

namespace {

namespace k = fastft::nf4;

int dtype_code(at::ScalarType t) { return t == at::kFloat ? k::kF32 : t == at::kBFloat16 ? k::kBF16 : k::kF16; }

// Checks the weight tensors; returns the scales (fp32 absmax, or its double quantisation).
k::Scales check_common(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                       int64_t numel, const c10::optional<at::Tensor>& absmax2,
                       const c10::optional<at::Tensor>& code2, const c10::optional<at::Tensor>& offset,
                       int64_t blocksize2) {
  TORCH_CHECK_VALUE(blocksize > 0, "nf4: blocksize must be positive, got ", blocksize);
  TORCH_CHECK_VALUE(numel >= 0, "nf4: numel must be non-negative, got ", numel);
  for (const auto* t : {&packed, &absmax, &code}) {
    TORCH_CHECK(t->is_cuda(), "nf4 (cuda): packed, absmax and code must be CUDA tensors, got ", t->device());
    TORCH_CHECK(t->device() == packed.device(), "nf4 (cuda): all tensors must be on one device, got ",
                t->device(), " and ", packed.device());
    TORCH_CHECK(t->is_contiguous(), "nf4 (cuda): packed, absmax and code must be contiguous");
  }
  TORCH_CHECK(packed.scalar_type() == at::kByte, "nf4: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat, "nf4: code must be float32, got ", code.scalar_type());
  TORCH_CHECK(code.numel() == 16, "nf4: code must have 16 entries, got ", code.numel());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "nf4: packed has ", packed.numel(), " bytes, expected ceil(", numel,
              " / 2) = ", (numel + 1) / 2);
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, "nf4: absmax has ", absmax.numel(), " entries, expected ceil(", numel, " / ",
              blocksize, ") = ", nblocks);
  k::Scales s;
  if (!(absmax2.has_value() && absmax2->defined())) {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "nf4: absmax must be float32 (or uint8 with absmax2, code2 and ",
                "offset), got ", absmax.scalar_type());
    s.f32 = absmax.data_ptr<float>();
    return s;
  }
  TORCH_CHECK(code2.has_value() && code2->defined() && offset.has_value() && offset->defined(),
              "nf4: a double-quantised absmax needs absmax2, code2 and offset");
  TORCH_CHECK(absmax.scalar_type() == at::kByte, "nf4: a double-quantised absmax must be uint8, got ",
              absmax.scalar_type());
  TORCH_CHECK_VALUE(blocksize2 > 0 && (blocksize2 & (blocksize2 - 1)) == 0,
                    "nf4: blocksize2 must be a power of two, got ", blocksize2);
  for (const auto* t : {&*absmax2, &*code2, &*offset}) {
    TORCH_CHECK(t->is_cuda() && t->device() == packed.device(), "nf4 (cuda): absmax2, code2 and offset must be on ",
                packed.device(), ", got ", t->device());
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat,
                "nf4 (cuda): absmax2, code2 and offset must be contiguous float32");
  }
  TORCH_CHECK(code2->numel() == 256, "nf4: code2 must have 256 entries, got ", code2->numel());
  TORCH_CHECK(offset->numel() == 1, "nf4: offset must have one element, got ", offset->numel());
  const int64_t nb2 = (nblocks + blocksize2 - 1) / blocksize2;
  TORCH_CHECK(absmax2->numel() == nb2, "nf4: absmax2 has ", absmax2->numel(), " entries, expected ", nb2);
  s.q = absmax.data_ptr<uint8_t>();
  s.a2 = absmax2->data_ptr<float>();
  s.c2 = code2->data_ptr<float>();
  s.off = offset->data_ptr<float>();  // stays on the device: no host synchronisation
  int shift = 0;
  while ((int64_t(1) << shift) < blocksize2) ++shift;
  s.bs2_shift = shift;
  return s;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                          int64_t blocksize, int64_t numel, at::ScalarType out_dtype,
                          const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                          const c10::optional<at::Tensor>& offset, int64_t blocksize2) {
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
                    "nf4: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  const k::Scales am = check_common(packed, absmax, code, blocksize, numel, absmax2, code2, offset, blocksize2);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({numel}, packed.options().dtype(out_dtype));
  if (numel == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* c = code.data_ptr<float>();
  const cudaError_t err = k::dequant(dtype_code(out_dtype), p, am, c, blocksize, numel, out.data_ptr(), stream);
  check_launch(err, "nf4_dequantize");
  return out;
}

at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                    int64_t blocksize, int64_t N, int64_t K, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                    const c10::optional<at::Tensor>& offset, int64_t blocksize2) {
  TORCH_CHECK_VALUE(N > 0 && K > 0, "nf4_gemv: N and K must be positive, got N=", N, " K=", K);
  TORCH_CHECK_VALUE(K % 2 == 0, "nf4_gemv: K must be even (each weight row starts on a byte), got ", K);
  TORCH_CHECK_VALUE(blocksize > 0 && blocksize % 2 == 0, "nf4_gemv: blocksize must be positive and even, got ",
                    blocksize);
  TORCH_CHECK_VALUE(K % blocksize == 0, "nf4_gemv: K (", K, ") must be a multiple of blocksize (", blocksize, ")");
  const k::Scales am = check_common(packed, absmax, code, blocksize, N * K, absmax2, code2, offset, blocksize2);
  TORCH_CHECK(x.is_cuda() && x.device() == packed.device(), "nf4_gemv: x must be on ", packed.device(), ", got ",
              x.device());
  TORCH_CHECK(x.dim() == 2, "nf4_gemv: x must be 2-D [M, K], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) == K, "nf4_gemv: x has ", x.size(1), " columns, expected K=", K);
  TORCH_CHECK(x.size(0) <= k::kMaxGemvRows, "nf4_gemv: at most ", k::kMaxGemvRows, " rows of x, got ", x.size(0));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "nf4_gemv: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "nf4_gemv: x must be contiguous");
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == x.device(), "nf4_gemv: bias must be on ", x.device(), ", got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "nf4_gemv: bias must have shape [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "nf4_gemv: bias must be floating point, got ",
                bias->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* c = code.data_ptr<float>();
  const cudaError_t err =
      k::gemv(dtype_code(x.scalar_type()), x.data_ptr(), p, am, c, bp, y.data_ptr(), M, N, K, blocksize, stream);
  check_launch(err, "nf4_gemv");
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nf4_dequantize", &nf4_dequantize, "NF4 dequantisation (CUDA) to a new 1-D tensor of out_dtype",
        py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("numel"),
        py::arg("out_dtype"), py::arg("absmax2") = py::none(), py::arg("code2") = py::none(),
        py::arg("offset") = py::none(), py::arg("blocksize2") = 256);
  m.def("nf4_gemv", &nf4_gemv, "NF4 GEMV (CUDA): x [M <= 8, K] @ W[N, K].T (+ bias), fp32 accumulation",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("N"),
        py::arg("K"), py::arg("bias") = py::none(), py::arg("absmax2") = py::none(), py::arg("code2") = py::none(),
        py::arg("offset") = py::none(), py::arg("blocksize2") = 256);
  m.attr("GEMV_MAX_M") = py::int_(fastft::nf4::kMaxGemvRows);
}
