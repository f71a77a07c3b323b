// NF4 (bitsandbytes 4-bit NormalFloat) kernels for CPU tensors.
//
// Contract (plain tensors, see fastft/kernels/nf4_cpu.py):
//   packed  uint8 [ceil(numel / 2)]: byte i holds flat element 2i in the HIGH nibble and
//           element 2i + 1 in the LOW nibble
//   absmax  float32 [ceil(numel / blocksize)], or with double quantisation uint8 indices
//           into code2 plus absmax2 fp32 [ceil(nblocks / blocksize2)], code2 fp32 [256] and
//           offset fp32 [1]: the scale of block b is decoded here, per block, as bitsandbytes
//           does it in two kernels: (code2[absmax[b]] * absmax2[b / blocksize2]) + offset, the
//           product rounded on its own (never an FMA)
//   code    float32 [16] (the NF4 table)
//   W[j] = code[nibble(j)] * scale(j / blocksize)
//
// dequantize_nf4_out(packed, absmax, code, blocksize, numel, out)  out: 1-D fp32/bf16/fp16
// nf4_matmul(x2d [M, K], packed, absmax, code, blocksize, N, K, bias?) -> [M, N] in x's dtype
//   y[m, n] = sum_k x[m, k] * W[n * K + k] (+ bias[n]), accumulated in fp32.
//
// Matmul strategy. Small M (<= kFusedMaxM): one pass over the weights, parallel over N
// (OpenMP). Each weight row is decoded 32 (AVX-512) / 16 (AVX2) nibbles at a time straight
// into registers -- the nibbles index a 16-entry table already multiplied by the block's
// absmax (permutexvar / 2x permutevar8x32 + blend) -- and FMA'd against up to 16 (8 on AVX2)
// rows of x held in accumulators; the packed row stays in L1 when M needs several row tiles.
// x is first converted to fp32 and, inside each group of 2V values (V = vector width),
// de-interleaved (even k first, then odd k) so that high and low nibbles each meet a
// contiguous vector of x with no shuffles in the inner loop.
// Large M: weights are dequantised panel by panel (kPanelRows rows of W, fp32, reused by all
// M rows) and each panel is multiplied by torch's GEMM; each weight is still decoded once.
// bf16 x above kFusedMaxM16 rows: bf16 panels (L2-sized), one per thread at a time, each
// multiplied by a single-threaded torch GEMM inside one OpenMP region.
//
// The instruction set is chosen at run time (__builtin_cpu_supports); FASTFT_NF4_ISA=
// avx512|avx2|scalar forces a path (debugging and tests), "auto" or unset picks the best.

#include <torch/extension.h>

#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

#define FASTFT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define FASTFT_AVX2 __attribute__((target("avx2,fma,f16c")))

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

constexpr int64_t kFusedMaxM = 32;     // above this, dequantise panels + GEMM
constexpr int64_t kPanelElems = 1 << 20;  // fp32 elements per dequantised panel (4 MiB)
constexpr int64_t kFusedMaxM16 = 8;       // 16-bit x above this: bf16 panels + GEMM
constexpr int64_t kPanelElems16 = 1 << 19;  // bf16 weights per panel (1 MiB, L2-resident)
constexpr int64_t kGroupRows = 16;        // weight rows that share one pass over an x chunk
constexpr int64_t kChunkBytes = 32 << 10; // x chunk (one row tile) kept in L1 while a row group goes by

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
  return Isa::Scalar;
}

// The path to run: the best this CPU has, unless FASTFT_NF4_ISA forces one (read per call).
Isa active_isa() {
  static const Isa best = best_isa();
  const char* env = std::getenv("FASTFT_NF4_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "avx512") == 0)
    want = Isa::Avx512;
  else if (std::strcmp(env, "avx2") == 0)
    want = Isa::Avx2;
  else if (std::strcmp(env, "scalar") == 0)
    want = Isa::Scalar;
  else
    TORCH_CHECK_VALUE(false, "FASTFT_NF4_ISA must be auto, avx512, avx2 or scalar, got '", env, "'");
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "FASTFT_NF4_ISA=", env,
              " but this CPU supports at most ", isa_name(best));
  return want;
}

int num_threads() { return omp_in_parallel() ? 1 : std::max(1, at::get_num_threads()); }

// The per-block scales: fp32 as they are, or decoded from the 8-bit double quantisation.
struct Scales {
  const float* f32 = nullptr;  // fp32 scales, or nullptr when double-quantised
  const uint8_t* q = nullptr;  // [nblocks] indices into c2
  const float* a2 = nullptr;   // [ceil(nblocks / bs2)] second-level scales
  const float* c2 = nullptr;   // [256] code of the second level
  float off = 0.f;             // the mean subtracted before the second quantisation
  int64_t bs2 = 256;

  float operator()(int64_t b) const {
    if (f32 != nullptr) return f32[b];
    // volatile: the product is rounded to fp32 before the offset is added (GCC would contract
    // the two into an FMA under -ffp-contract=fast), bit for bit as bitsandbytes' decode
    volatile float prod = c2[q[b]] * a2[b / bs2];
    return prod + off;
  }
};

inline int nibble(const uint8_t* packed, int64_t j) {
  const uint8_t b = packed[j >> 1];
  return (j & 1) ? (b & 0xF) : (b >> 4);
}

// ------------------------------------------------------------------------------------------
// dequantisation of one block: elements [e0, e0 + n) all scaled by `scale`, written to dst
// ------------------------------------------------------------------------------------------

template <typename T>
inline void dq_scalar(const uint8_t* packed, const float* code, float scale, int64_t e0, int64_t n, T* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(code[nibble(packed, e0 + j)] * scale);
}

FASTFT_AVX512 inline __m256i bf16_pack16(__m512 f) {
  // round to nearest even, as c10::BFloat16 does; NaN -> canonical quiet NaN
  __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(u);
}

FASTFT_AVX512 inline void store16(float* d, __m512 v) { _mm512_storeu_ps(d, v); }
FASTFT_AVX512 inline void store16(c10::BFloat16* d, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), bf16_pack16(v));
}
FASTFT_AVX512 inline void store16(c10::Half* d, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 16 bytes (32 nibbles) -> 32 table indices in element order, as bytes (hi0 lo0 hi1 lo1 ...)
FASTFT_AVX512 inline __m256i interleave32(const uint8_t* p) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_srli_epi16(w, 4);
  const __m256i lo = _mm256_and_si256(w, _mm256_set1_epi16(0xF));
  return _mm256_or_si256(hi, _mm256_slli_epi16(lo, 8));
}

// requires e0 even (block starts on a byte)
template <typename T>
FASTFT_AVX512 void dq_avx512(const uint8_t* packed, const float* code, float scale, int64_t e0, int64_t n, T* dst) {
  const __m512 tbl = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  const uint8_t* p = packed + (e0 >> 1);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32, p += 16) {
    const __m256i il = interleave32(p);
    store16(dst + j, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(il)), tbl));
    store16(dst + j + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(il, 1)), tbl));
  }
  if (j < n) dq_scalar(packed, code, scale, e0 + j, n - j, dst + j);
}

FASTFT_AVX2 inline __m256 lookup8(__m256i idx, __m256 tlo, __m256 thi) {
  // 16-entry table as two 8-entry halves; bit 3 of each index (moved to the sign) picks the half
  const __m256 lo = _mm256_permutevar8x32_ps(tlo, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

FASTFT_AVX2 inline void store8(float* d, __m256 v) { _mm256_storeu_ps(d, v); }
FASTFT_AVX2 inline void store8(c10::BFloat16* d, __m256 f) {
  __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  u = _mm256_blendv_epi8(u, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_castsi256_si128(p));
}
FASTFT_AVX2 inline void store8(c10::Half* d, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T>
FASTFT_AVX2 void dq_avx2(const uint8_t* packed, const float* code, float scale, int64_t e0, int64_t n, T* dst) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 tlo = _mm256_mul_ps(_mm256_loadu_ps(code), s);
  const __m256 thi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), s);
  const uint8_t* p = packed + (e0 >> 1);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16, p += 8) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i il = _mm_or_si128(_mm_srli_epi16(w, 4), _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0xF)), 8));
    store8(dst + j, lookup8(_mm256_cvtepu8_epi32(il), tlo, thi));
    store8(dst + j + 8, lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(il, 8)), tlo, thi));
  }
  if (j < n) dq_scalar(packed, code, scale, e0 + j, n - j, dst + j);
}

// Dequantise blocks [b0, b1) of the flat weight (numel elements); dst points at element b0*bs.
template <typename T>
void dequant_blocks(Isa isa, const uint8_t* packed, const Scales& absmax, const float* code, int64_t bs,
                    int64_t numel, int64_t b0, int64_t b1, T* dst, int threads) {
  if (bs % 2 != 0) isa = Isa::Scalar;  // blocks may start mid-byte
  // enough blocks per task to amortise the loop even for tiny block sizes
  const int64_t grain = std::max<int64_t>(1, 4096 / bs);
  const int64_t ntask = (b1 - b0 + grain - 1) / grain;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < ntask; ++t) {
    const int64_t bend = std::min(b1, b0 + (t + 1) * grain);
    for (int64_t b = b0 + t * grain; b < bend; ++b) {
      const int64_t e0 = b * bs;
      const int64_t n = std::min(bs, numel - e0);
      T* d = dst + (e0 - b0 * bs);
      const float s = absmax(b);
      if (isa == Isa::Avx512)
        dq_avx512(packed, code, s, e0, n, d);
      else if (isa == Isa::Avx2)
        dq_avx2(packed, code, s, e0, n, d);
      else
        dq_scalar(packed, code, s, e0, n, d);
    }
  }
}

// ------------------------------------------------------------------------------------------
// fused matmul kernels: one weight row n against a tile of MT rows of x
// ------------------------------------------------------------------------------------------

// x (fp32, [M, K]) with each group of 2V values inside a block stored as evens then odds; a
// block's last bs % (2V) values stay in natural order (handled by the scalar tail).
void permute_x(const float* x, float* xp, int64_t M, int64_t K, int64_t bs, int64_t V) {
  const int64_t G = 2 * V;
  for (int64_t m = 0; m < M; ++m) {
    const float* s = x + m * K;
    float* d = xp + m * K;
    for (int64_t b0 = 0; b0 < K; b0 += bs) {
      int64_t g = 0;
      for (; g + G <= bs; g += G)
        for (int64_t i = 0; i < V; ++i) {
          d[b0 + g + i] = s[b0 + g + 2 * i];
          d[b0 + g + V + i] = s[b0 + g + 2 * i + 1];
        }
      for (; g < bs; ++g) d[b0 + g] = s[b0 + g];
    }
  }
}

struct RowArgs {
  const uint8_t* wrow;   // packed bytes of weight row n (row starts on a byte: K even)
  const float* absrow;   // absmax of the row's first block
  const float* code;
  const float* x;        // first x row of the tile (layout for the ISA), row stride K
  int64_t K, bs;
  float* y;              // y[m0, n], row stride ldy
  int64_t ldy;
  float bias;
  int64_t blk0, blk1;    // the blocks of the row this call covers (a chunk of K)
  bool first;            // the first chunk: y = bias + sum, else y += sum
};

template <int MT>
FASTFT_AVX512 void row_avx512(const RowArgs& a) {
  constexpr bool kTwo = MT <= 8;  // separate even/odd accumulators: shorter FMA chains
  __m512 acc[MT], acc2[MT];
  float tail[MT];
  for (int m = 0; m < MT; ++m) {
    acc[m] = _mm512_setzero_ps();
    acc2[m] = _mm512_setzero_ps();
    tail[m] = 0.f;
  }
  const __m512 code = _mm512_loadu_ps(a.code);
  for (int64_t blk = a.blk0; blk < a.blk1; ++blk) {
    const float scale = a.absrow[blk];
    const __m512 tbl = _mm512_mul_ps(code, _mm512_set1_ps(scale));
    const uint8_t* p = a.wrow + ((blk * a.bs) >> 1);
    const float* xb = a.x + blk * a.bs;
    int64_t g = 0;
    for (; g + 32 <= a.bs; g += 32, p += 16) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tbl);  // elements 2i
      const __m512 wo = _mm512_permutexvar_ps(b, tbl);  // elements 2i+1 (low 4 bits used)
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        const float* xm = xb + m * a.K + g;
        acc[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xm), acc[m]);
        if (kTwo)
          acc2[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xm + 16), acc2[m]);
        else
          acc[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xm + 16), acc[m]);
      }
    }
    for (; g < a.bs; ++g) {
      const float w = a.code[nibble(a.wrow, blk * a.bs + g)] * scale;
      for (int m = 0; m < MT; ++m) tail[m] += w * xb[m * a.K + g];
    }
  }
  for (int m = 0; m < MT; ++m)
    a.y[m * a.ldy] = (a.first ? a.bias : a.y[m * a.ldy]) +
                     (_mm512_reduce_add_ps(kTwo ? _mm512_add_ps(acc[m], acc2[m]) : acc[m]) + tail[m]);
}

FASTFT_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MT>
FASTFT_AVX2 void row_avx2(const RowArgs& a) {
  constexpr bool kTwo = MT <= 4;
  __m256 acc[MT], acc2[MT];
  float tail[MT];
  for (int m = 0; m < MT; ++m) {
    acc[m] = _mm256_setzero_ps();
    acc2[m] = _mm256_setzero_ps();
    tail[m] = 0.f;
  }
  const __m256 clo = _mm256_loadu_ps(a.code), chi = _mm256_loadu_ps(a.code + 8);
  for (int64_t blk = a.blk0; blk < a.blk1; ++blk) {
    const float scale = a.absrow[blk];
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 tlo = _mm256_mul_ps(clo, s), thi = _mm256_mul_ps(chi, s);
    const uint8_t* p = a.wrow + ((blk * a.bs) >> 1);
    const float* xb = a.x + blk * a.bs;
    int64_t g = 0;
    for (; g + 16 <= a.bs; g += 16, p += 8) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      const __m256 we = lookup8(_mm256_srli_epi32(b, 4), tlo, thi);
      const __m256 wo = lookup8(b, tlo, thi);  // only bits 0-3 matter
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const float* xm = xb + m * a.K + g;
        acc[m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xm), acc[m]);
        if (kTwo)
          acc2[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xm + 8), acc2[m]);
        else
          acc[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xm + 8), acc[m]);
      }
    }
    for (; g < a.bs; ++g) {
      const float w = a.code[nibble(a.wrow, blk * a.bs + g)] * scale;
      for (int m = 0; m < MT; ++m) tail[m] += w * xb[m * a.K + g];
    }
  }
  for (int m = 0; m < MT; ++m)
    a.y[m * a.ldy] = (a.first ? a.bias : a.y[m * a.ldy]) + (hsum8(kTwo ? _mm256_add_ps(acc[m], acc2[m]) : acc[m]) + tail[m]);
}

template <int MT>
void row_scalar(const RowArgs& a) {
  float acc[MT] = {};
  for (int64_t blk = a.blk0; blk < a.blk1; ++blk) {
    const float scale = a.absrow[blk];
    const float* xb = a.x + blk * a.bs;
    for (int64_t g = 0; g < a.bs; ++g) {
      const float w = a.code[nibble(a.wrow, blk * a.bs + g)] * scale;
      for (int m = 0; m < MT; ++m) acc[m] += w * xb[m * a.K + g];
    }
  }
  for (int m = 0; m < MT; ++m) a.y[m * a.ldy] = (a.first ? a.bias : a.y[m * a.ldy]) + acc[m];
}

using RowFn = void (*)(const RowArgs&);
constexpr int kTileAvx512 = 16, kTileAvx2 = 8, kTileScalar = 8;

template <size_t... I>
std::array<RowFn, sizeof...(I)> table_avx512(std::index_sequence<I...>) { return {{&row_avx512<I + 1>...}}; }
template <size_t... I>
std::array<RowFn, sizeof...(I)> table_avx2(std::index_sequence<I...>) { return {{&row_avx2<I + 1>...}}; }
template <size_t... I>
std::array<RowFn, sizeof...(I)> table_scalar(std::index_sequence<I...>) { return {{&row_scalar<I + 1>...}}; }

void fused_matmul(Isa isa, const float* xp, const uint8_t* packed, const Scales& absmax, const float* code,
                  int64_t bs, int64_t M, int64_t N, int64_t K, const float* bias, float* y) {
  static const auto t512 = table_avx512(std::make_index_sequence<kTileAvx512>{});
  static const auto t2 = table_avx2(std::make_index_sequence<kTileAvx2>{});
  static const auto t1 = table_scalar(std::make_index_sequence<kTileScalar>{});
  const RowFn* fns = isa == Isa::Avx512 ? t512.data() : isa == Isa::Avx2 ? t2.data() : t1.data();
  const int64_t tile = isa == Isa::Avx512 ? kTileAvx512 : isa == Isa::Avx2 ? kTileAvx2 : kTileScalar;
  const int64_t bpr = K / bs;  // blocks per row
  // Rows of W go in groups of kGroupRows, contiguous ranges of groups per thread: each weight
  // row streams from memory once. Within a group K is cut into chunks whose x rows (up to one
  // row tile: tile * chunk fp32 values) stay in L1 (kChunkBytes) while the group's rows go by,
  // so that x is read from L2 once per group and chunk, not once per weight row (at M = 16,
  // K = 4096 that is 256 KiB of x for every one of the N rows otherwise). A double-quantised
  // group's scales are decoded once into the thread's `scales` buffer first.
  const int64_t mt_max = std::min<int64_t>(tile, M);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (mt_max * int64_t(sizeof(float)) * bs));  // blocks
  const int64_t ngroups = (N + kGroupRows - 1) / kGroupRows;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> scales(absmax.f32 == nullptr ? kGroupRows * bpr : 0);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t n0 = g * kGroupRows, n1 = std::min(N, n0 + kGroupRows);
      const float* gscale = absmax.f32 != nullptr ? absmax.f32 + n0 * bpr : scales.data();
      if (absmax.f32 == nullptr)
        for (int64_t b = 0; b < (n1 - n0) * bpr; ++b) scales[b] = absmax(n0 * bpr + b);
      for (int64_t c0 = 0; c0 < bpr; c0 += chunk) {
        const int64_t c1 = std::min(bpr, c0 + chunk);
        for (int64_t m0 = 0; m0 < M; m0 += tile) {
          const int64_t mt = std::min(tile, M - m0);
          for (int64_t n = n0; n < n1; ++n) {
            RowArgs a{packed + n * (K / 2), gscale + (n - n0) * bpr, code, xp + m0 * K, K, bs, y + m0 * N + n, N,
                      bias ? bias[n] : 0.f, c0, c1, c0 == 0};
            fns[mt - 1](a);
          }
        }
      }
    }
  }
}

// Checks the weight tensors; returns the scales (fp32 absmax, or the double quantisation).
Scales check_common(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                    int64_t numel, const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                    const c10::optional<at::Tensor>& offset, int64_t blocksize2) {
  TORCH_CHECK_VALUE(blocksize > 0, "nf4: blocksize must be positive, got ", blocksize);
  TORCH_CHECK_VALUE(numel >= 0, "nf4: numel must be non-negative, got ", numel);
  for (const auto* t : {&packed, &absmax, &code}) {
    TORCH_CHECK(t->device().is_cpu(), "nf4 (cpp): all tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "nf4 (cpp): packed, absmax and code must be contiguous");
  }
  TORCH_CHECK(packed.scalar_type() == at::kByte, "nf4: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat, "nf4: code must be float32, got ", code.scalar_type());
  TORCH_CHECK(code.numel() == 16, "nf4: code must have 16 entries, got ", code.numel());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "nf4: packed has ", packed.numel(), " bytes, expected ceil(",
              numel, " / 2) = ", (numel + 1) / 2);
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, "nf4: absmax has ", absmax.numel(), " entries, expected ceil(", numel,
              " / ", blocksize, ") = ", nblocks);
  Scales s;
  const bool nested = absmax2.has_value() && absmax2->defined();
  if (!nested) {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "nf4: absmax must be float32 (or uint8 with absmax2, code2 and ",
                "offset), got ", absmax.scalar_type());
    s.f32 = absmax.data_ptr<float>();
    return s;
  }
  TORCH_CHECK(code2.has_value() && code2->defined() && offset.has_value() && offset->defined(),
              "nf4: a double-quantised absmax needs absmax2, code2 and offset");
  TORCH_CHECK(absmax.scalar_type() == at::kByte, "nf4: a double-quantised absmax must be uint8, got ",
              absmax.scalar_type());
  TORCH_CHECK_VALUE(blocksize2 > 0, "nf4: blocksize2 must be positive, got ", blocksize2);
  for (const auto* t : {&*absmax2, &*code2, &*offset}) {
    TORCH_CHECK(t->device().is_cpu(), "nf4 (cpp): all tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat,
                "nf4 (cpp): absmax2, code2 and offset must be contiguous float32");
  }
  TORCH_CHECK(code2->numel() == 256, "nf4: code2 must have 256 entries, got ", code2->numel());
  TORCH_CHECK(offset->numel() == 1, "nf4: offset must have one element, got ", offset->numel());
  const int64_t nb2 = (nblocks + blocksize2 - 1) / blocksize2;
  TORCH_CHECK(absmax2->numel() == nb2, "nf4: absmax2 has ", absmax2->numel(), " entries, expected ceil(", nblocks,
              " / ", blocksize2, ") = ", nb2);
  s.q = absmax.data_ptr<uint8_t>();
  s.a2 = absmax2->data_ptr<float>();
  s.c2 = code2->data_ptr<float>();
  s.off = offset->data_ptr<float>()[0];
  s.bs2 = blocksize2;
  return s;
}

}  // namespace

at::Tensor dequantize_nf4_out(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, int64_t numel, at::Tensor out,
                              const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                              const c10::optional<at::Tensor>& offset, int64_t blocksize2) {
  const Scales am = check_common(packed, absmax, code, blocksize, numel, absmax2, code2, offset, blocksize2);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.numel() == numel,
              "nf4: out must be a contiguous CPU tensor with ", numel, " elements");
  const Isa isa = active_isa();
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* c = code.data_ptr<float>();
  const int64_t nblocks = absmax.numel();
  const int th = num_threads();
  switch (out.scalar_type()) {
    case at::kFloat:
      dequant_blocks(isa, p, am, c, blocksize, numel, 0, nblocks, out.data_ptr<float>(), th);
      break;
    case at::kBFloat16:
      dequant_blocks(isa, p, am, c, blocksize, numel, 0, nblocks, out.data_ptr<c10::BFloat16>(), th);
      break;
    case at::kHalf:
      dequant_blocks(isa, p, am, c, blocksize, numel, 0, nblocks, out.data_ptr<c10::Half>(), th);
      break;
    default:
      TORCH_CHECK_VALUE(false, "nf4: out dtype must be float32, bfloat16 or float16, got ", out.scalar_type());
  }
  return out;
}

at::Tensor nf4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                      int64_t blocksize, int64_t N, int64_t K, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                      const c10::optional<at::Tensor>& offset, int64_t blocksize2) {
  TORCH_CHECK_VALUE(N > 0 && K > 0, "nf4_matmul: N and K must be positive, got N=", N, " K=", K);
  TORCH_CHECK_VALUE(K % 2 == 0, "nf4_matmul: K must be even (each weight row starts on a byte), got ", K);
  TORCH_CHECK_VALUE(blocksize > 0 && K % blocksize == 0, "nf4_matmul: K (", K,
                    ") must be a multiple of blocksize (", blocksize, ")");
  TORCH_CHECK_VALUE(blocksize % 2 == 0, "nf4_matmul: blocksize must be even, got ", blocksize);
  const Scales am = check_common(packed, absmax, code, blocksize, N * K, absmax2, code2, offset, blocksize2);
  TORCH_CHECK(x.device().is_cpu(), "nf4_matmul (cpp): x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "nf4_matmul: x must be 2-D [M, K], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) == K, "nf4_matmul: x has ", x.size(1), " columns, expected K=", K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "nf4_matmul: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "nf4_matmul: x must be contiguous");
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu(), "nf4_matmul (cpp): bias must be on the CPU, got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "nf4_matmul: bias must have shape [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "nf4_matmul: bias must be floating point, got ",
                bias->scalar_type());
    bf = bias->to(at::kFloat).contiguous();
  }
  const Isa isa = active_isa();
  const int64_t M = x.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  if (M == 0) return at::empty({0, N}, x.options());
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* c = code.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16 && M > kFusedMaxM16) {
    // 16-bit x beyond a few rows: the fused kernel's fp32 FMAs lose to a bf16 GEMM, so each
    // thread dequantises bf16 panels of kPanelElems16 weights (they stay in its L2: no
    // full-size 16-bit copy of W is written to memory and read back) and multiplies each with
    // torch's GEMM, which runs single-threaded inside this one parallel region (alternating
    // OpenMP regions with torch's threaded GEMM per panel was 10-100x slower on a loaded CPU).
    at::Tensor y = at::empty({M, N}, x.options());
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(N, kPanelElems16 / K));
    const int64_t npanels = (N + rows - 1) / rows;
    const int64_t bpr = K / blocksize;
    at::Tensor b16 = bf.defined() ? bf.to(at::kBFloat16) : at::Tensor();
#pragma omp parallel num_threads(std::min<int64_t>(num_threads(), npanels))
    {
      at::Tensor panel = at::empty({rows, K}, x.options());
      at::Tensor part = at::empty({M, rows}, x.options());
#pragma omp for schedule(static)
      for (int64_t i = 0; i < npanels; ++i) {
        const int64_t n0 = i * rows, r = std::min(rows, N - n0);
        at::Tensor w = panel.narrow(0, 0, r);
        dequant_blocks(isa, p, am, c, blocksize, N * K, n0 * bpr, (n0 + r) * bpr,
                       reinterpret_cast<c10::BFloat16*>(w.data_ptr()), 1);
        at::Tensor out = part.narrow(1, 0, r);
        if (b16.defined())
          at::addmm_out(out, b16.narrow(0, n0, r), x, w.t());
        else
          at::mm_out(out, x, w.t());
        y.narrow(1, n0, r).copy_(out);
      }
    }
    return y;
  }
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y;
  if (M <= kFusedMaxM) {
    y = at::empty({M, N}, f32);
    at::Tensor xp = xf;
    if (isa != Isa::Scalar) {
      xp = at::empty({M, K}, f32);
      permute_x(xf.data_ptr<float>(), xp.data_ptr<float>(), M, K, blocksize, isa == Isa::Avx512 ? 16 : 8);
    }
    fused_matmul(isa, xp.data_ptr<float>(), p, am, c, blocksize, M, N, K, bf.defined() ? bf.data_ptr<float>() : nullptr,
                 y.data_ptr<float>());
  } else {
    // large M: dequantise panels of weight rows once, multiply each with torch's GEMM
    y = bf.defined() ? bf.unsqueeze(0).expand({M, N}).contiguous() : at::zeros({M, N}, f32);
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(N, kPanelElems / K));
    at::Tensor panel = at::empty({rows, K}, f32);
    const int64_t bpr = K / blocksize;
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t r = std::min(rows, N - n0);
      at::Tensor w = panel.narrow(0, 0, r);
      dequant_blocks(isa, p, am, c, blocksize, N * K, n0 * bpr, (n0 + r) * bpr, w.data_ptr<float>(), num_threads());
      at::Tensor yn = y.narrow(1, n0, r);
      yn.addmm_(xf, w.t());
    }
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// A fresh 1-D CPU tensor. Large ones get 2 MiB-aligned memory with MADV_HUGEPAGE: the
// dequantised weight is written once, and on 4 KiB pages the first-touch page faults cost
// several times the kernel itself (the memory is freed normally when the tensor dies).
at::Tensor empty_1d(int64_t numel, at::ScalarType dt) {
  const auto opts = at::TensorOptions().dtype(dt).device(at::kCPU);
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t nbytes = size_t(numel) * c10::elementSize(dt);
  if (nbytes < 2 * kHuge) return at::empty({numel}, opts);
  const size_t cap = (nbytes + kHuge - 1) / kHuge * kHuge;
  void* mem = nullptr;
  if (posix_memalign(&mem, kHuge, cap) != 0 || mem == nullptr) return at::empty({numel}, opts);
  madvise(mem, cap, MADV_HUGEPAGE);  // a hint; harmless where THP is off
  return at::from_blob(mem, {numel}, [](void* q) { std::free(q); }, opts);
}

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                          int64_t blocksize, int64_t numel, at::ScalarType out_dtype,
                          const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                          const c10::optional<at::Tensor>& offset, int64_t blocksize2) {
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
                    "nf4: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  check_common(packed, absmax, code, blocksize, numel, absmax2, code2, offset, blocksize2);
  return dequantize_nf4_out(packed, absmax, code, blocksize, numel, empty_1d(numel, out_dtype), absmax2, code2,
                            offset, blocksize2);
}

std::string nf4_isa() { return isa_name(active_isa()); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // absmax2 / code2 / offset / blocksize2: the double quantisation of a uint8 absmax, decoded in-kernel
  m.def("dequantize_nf4_out", &dequantize_nf4_out, "NF4 dequantisation into a preallocated 1-D out tensor",
        py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("numel"), py::arg("out"),
        py::arg("absmax2") = py::none(), py::arg("code2") = py::none(), py::arg("offset") = py::none(),
        py::arg("blocksize2") = 256);
  m.def("dequantize_nf4", &dequantize_nf4, "NF4 dequantisation to a new 1-D tensor of out_dtype", py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("numel"), py::arg("out_dtype"),
        py::arg("absmax2") = py::none(), py::arg("code2") = py::none(), py::arg("offset") = py::none(),
        py::arg("blocksize2") = 256);
  m.def("nf4_matmul", &nf4_matmul, "fused NF4 matmul: x [M, K] @ W[N, K].T (+ bias)", py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("N"), py::arg("K"),
        py::arg("bias") = py::none(), py::arg("absmax2") = py::none(), py::arg("code2") = py::none(),
        py::arg("offset") = py::none(), py::arg("blocksize2") = 256);
  m.def("nf4_isa", &nf4_isa, "instruction set the NF4 kernels use now (honours FASTFT_NF4_ISA)");
}
