// The vector layer of the CPU kernels. Each kernel source is compiled once per
// instruction set (LMXENT_ISA = base | avx2 | avx512, with the matching -m
// flags); this header turns that into a vector width and GCC/Clang vector
// extension types, so the kernels are written once, without intrinsics, and
// the compiler emits SSE2, AVX2+FMA or AVX-512 code from the same lines.
//
// Also here: loads/stores that convert float16/bfloat16/float32/float64 to
// the compute type, and our own vectorised exp and tanh (measured against
// std::exp in tests/test_simd.py).
#pragma once
#include <stdint.h>
#include <string.h>

#include "lmxent/contract.h"

#if defined(__AVX512F__)
#define LMXENT_VBYTES 64
#elif defined(__AVX2__)
#define LMXENT_VBYTES 32
#else
#define LMXENT_VBYTES 16
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

template <class T> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(LMXENT_VBYTES)));
  typedef int32_t itype __attribute__((vector_size(LMXENT_VBYTES)));
  typedef uint32_t utype __attribute__((vector_size(LMXENT_VBYTES)));
  typedef uint16_t htype __attribute__((vector_size(LMXENT_VBYTES / 2)));
  static constexpr int W = LMXENT_VBYTES / 4;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(LMXENT_VBYTES)));
  typedef int64_t itype __attribute__((vector_size(LMXENT_VBYTES)));
  static constexpr int W = LMXENT_VBYTES / 8;
};

// Storage type -> compute type: double for double, float for everything else.
template <class T> struct Compute { typedef float type; };
template <> struct Compute<double> { typedef double type; };

template <class C> using V = typename Vec<C>::type;
template <class C> using VI = typename Vec<C>::itype;

template <class C> inline V<C> splat(C v) { return V<C>{} + v; }
// a > b ? a : b and a < b ? a : b: x86's max and min exactly (b where either is
// NaN), one instruction; the compiler leaves the select as a compare and a blend.
#if LMXENT_VBYTES == 64
#define LMXENT_MINMAX(name, op)                                                          \
  template <class C> inline V<C> name(V<C> a, V<C> b) {                                 \
    if constexpr (sizeof(C) == 4) return (V<C>)_mm512_##op##_ps((__m512)a, (__m512)b);  \
    else return (V<C>)_mm512_##op##_pd((__m512d)a, (__m512d)b);                         \
  }
#elif LMXENT_VBYTES == 32
#define LMXENT_MINMAX(name, op)                                                          \
  template <class C> inline V<C> name(V<C> a, V<C> b) {                                 \
    if constexpr (sizeof(C) == 4) return (V<C>)_mm256_##op##_ps((__m256)a, (__m256)b);  \
    else return (V<C>)_mm256_##op##_pd((__m256d)a, (__m256d)b);                         \
  }
#endif
#ifdef LMXENT_MINMAX
LMXENT_MINMAX(vmax, max)
LMXENT_MINMAX(vmin, min)
#undef LMXENT_MINMAX
#else
template <class C> inline V<C> vmax(V<C> a, V<C> b) { return a > b ? a : b; }
template <class C> inline V<C> vmin(V<C> a, V<C> b) { return a < b ? a : b; }
#endif
template <class C> inline V<C> vselect(VI<C> m, V<C> a, V<C> b) { return m ? a : b; }

template <class C> inline C hsum(V<C> v) {
  C s = 0;
  for (int i = 0; i < Vec<C>::W; ++i) s += v[i];
  return s;
}
// Horizontal max that keeps a NaN (NaN wins).
// hmin may drop a NaN (vexp2_neg passes NaN through with or without its clamp).
template <class C> inline C hmin(V<C> v) {
  C m = v[0];
  for (int i = 1; i < Vec<C>::W; ++i) m = v[i] < m ? v[i] : m;
  return m;
}
template <class C> inline C hmax(V<C> v) {
  C m = v[0];
  for (int i = 1; i < Vec<C>::W; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}

// Whether a lane of v is > 0 (NaN is not), with one compare and a mask move:
// picks the exp of x <= 0 for a whole vector when it applies.
inline bool any_positive(V<float> v) {
#if LMXENT_VBYTES == 64
  return _mm512_cmp_ps_mask((__m512)v, _mm512_setzero_ps(), _CMP_GT_OQ) != 0;
#elif LMXENT_VBYTES == 32
  return _mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_setzero_ps(), _CMP_GT_OQ)) != 0;
#elif defined(__SSE2__)
  return _mm_movemask_ps(_mm_cmpgt_ps((__m128)v, _mm_setzero_ps())) != 0;
#else
  for (int i = 0; i < Vec<float>::W; ++i)
    if (v[i] > 0) return true;
  return false;
#endif
}
inline bool any_positive(V<double> v) {
#if LMXENT_VBYTES == 64
  return _mm512_cmp_pd_mask((__m512d)v, _mm512_setzero_pd(), _CMP_GT_OQ) != 0;
#elif LMXENT_VBYTES == 32
  return _mm256_movemask_pd(_mm256_cmp_pd((__m256d)v, _mm256_setzero_pd(), _CMP_GT_OQ)) != 0;
#elif defined(__SSE2__)
  return _mm_movemask_pd(_mm_cmpgt_pd((__m128d)v, _mm_setzero_pd())) != 0;
#else
  for (int i = 0; i < Vec<double>::W; ++i)
    if (v[i] > 0) return true;
  return false;
#endif
}

// Bit i set where a[i] >= b[i] (clear for NaN): finds the rare lanes above a
// threshold with one compare and a mask move.
inline uint32_t mask_ge(V<float> a, V<float> b) {
#if LMXENT_VBYTES == 64
  return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GE_OQ);
#elif LMXENT_VBYTES == 32
  return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_GE_OQ));
#elif defined(__SSE2__)
  return (uint32_t)_mm_movemask_ps(_mm_cmpge_ps((__m128)a, (__m128)b));
#else
  uint32_t m = 0;
  for (int i = 0; i < Vec<float>::W; ++i) m |= (uint32_t)(a[i] >= b[i]) << i;
  return m;
#endif
}

// ---- loads and stores with conversion -------------------------------------

inline V<float> load(const float* p) { V<float> v; memcpy(&v, p, sizeof v); return v; }
inline V<double> load(const double* p) { V<double> v; memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, V<float> v) { memcpy(p, &v, sizeof v); }
inline void store(double* p, V<double> v) { memcpy(p, &v, sizeof v); }

// bf16 is float's upper half: widen and shift (one vpmovzxwd; the generic
// conversion compiles to four shuffles with AVX-512).
inline V<float> load(const bf16_t* p) {
#if LMXENT_VBYTES == 64
  return (V<float>)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
#elif LMXENT_VBYTES == 32
  return (V<float>)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#else
  Vec<float>::htype h;
  memcpy(&h, p, sizeof h);
  Vec<float>::utype u = __builtin_convertvector(h, Vec<float>::utype) << 16;
  return (V<float>)u;
#endif
}
// Round to nearest even; NaN stays a (quiet) NaN.
inline void store(bf16_t* p, V<float> v) {
  typedef Vec<float>::utype U;
  U u = (U)v;
  U r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
  r = (VI<float>)(v != v) ? ((u >> 16) | 0x40) : r;
  // narrow (r < 2^16): one vpmovdw / a pack, not the generic conversion's permutes
#if LMXENT_VBYTES == 64
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16((__m512i)r));
#elif LMXENT_VBYTES == 32
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32((__m256i)r, (__m256i)r), 0xD8);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(w));
#else
  Vec<float>::htype h = __builtin_convertvector(r & 0xFFFF, Vec<float>::htype);
  memcpy(p, &h, sizeof h);
#endif
}

inline float f16_to_float(f16_t h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
inline f16_t float_to_f16(float v) { _Float16 f = (_Float16)v; f16_t h; memcpy(&h, &f, 2); return h; }

inline V<float> load(const f16_t* p) {
#if LMXENT_VBYTES == 64
  return (V<float>)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif LMXENT_VBYTES == 32 && defined(__F16C__)
  return (V<float>)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
  V<float> v;
  for (int i = 0; i < Vec<float>::W; ++i) v[i] = f16_to_float(p[i]);
  return v;
#endif
}
inline void store(f16_t* p, V<float> v) {
#if LMXENT_VBYTES == 64
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif LMXENT_VBYTES == 32 && defined(__F16C__)
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < Vec<float>::W; ++i) p[i] = float_to_f16(v[i]);
#endif
}

// Scalar conversions, for single elements (the target logit).
inline float to_compute(float v) { return v; }
inline double to_compute(double v) { return v; }
inline float to_compute(bf16_t v) { uint32_t u = (uint32_t)v.bits << 16; float f; memcpy(&f, &u, 4); return f; }
inline float to_compute(f16_t v) { return f16_to_float(v); }
inline void from_compute(float* p, float v) { *p = v; }
inline void from_compute(double* p, double v) { *p = v; }
inline void from_compute(f16_t* p, float v) { *p = float_to_f16(v); }
inline void from_compute(bf16_t* p, float v) {
  V<float> t = splat<float>(v);
  bf16_t tmp[Vec<float>::W];
  store(tmp, t);
  *p = tmp[0];
}

// Partial vectors for row tails: n < W valid lanes, the rest `fill`.
template <class T, class C = typename Compute<T>::type>
inline V<C> load_partial(const T* p, int64_t n, C fill) {
  T tmp[Vec<C>::W];
  memset(tmp, 0, sizeof tmp);
  memcpy(tmp, p, n * sizeof(T));
  V<C> v = load(tmp);
  for (int64_t i = n; i < Vec<C>::W; ++i) v[i] = fill;
  return v;
}
// A non-temporal store of a whole vector. Full: to a vector-aligned address
// (one instruction); else to a 16-byte aligned one, in 16-byte pieces (NumPy's
// own allocations are only 16-byte aligned, and the streaming instructions
// need their width's alignment).
template <bool Full, class C>
inline void store_stream(C* p, V<C> v) {
#if defined(__SSE2__)
  if constexpr (!Full && sizeof(V<C>) > 16) {
    for (size_t o = 0; o < sizeof(V<C>); o += 16) {
      __m128 h;
      memcpy(&h, (const char*)&v + o, 16);
      _mm_stream_ps((float*)((char*)p + o), h);
    }
  } else if constexpr (sizeof(C) == 4) {
#if LMXENT_VBYTES == 64
    _mm512_stream_ps(p, (__m512)v);
#elif LMXENT_VBYTES == 32
    _mm256_stream_ps(p, (__m256)v);
#else
    _mm_stream_ps(p, (__m128)v);
#endif
  } else {
#if LMXENT_VBYTES == 64
    _mm512_stream_pd(p, (__m512d)v);
#elif LMXENT_VBYTES == 32
    _mm256_stream_pd(p, (__m256d)v);
#else
    _mm_stream_pd(p, (__m128d)v);
#endif
  }
#else
  store(p, v);
#endif
}

// A non-temporal store of a vector converted to a 16-bit type, in 16-byte
// pieces (p 16-byte aligned; the vector's W x 2 bytes a multiple of 16).
template <class T>
inline void store_stream_narrow(T* p, V<float> v) {
  constexpr size_t bytes = sizeof(T) * Vec<float>::W;
  static_assert(bytes % 16 == 0, "whole 16-byte pieces");
#if defined(__SSE2__)
  alignas(16) T tmp[Vec<float>::W];
  store(tmp, v);
  for (size_t o = 0; o < bytes; o += 16) {
    __m128i h;
    memcpy(&h, (const char*)tmp + o, 16);
    _mm_stream_si128((__m128i*)((char*)p + o), h);
  }
#else
  store(p, v);
#endif
}

template <class T, class C = typename Compute<T>::type>
inline void store_partial(T* p, V<C> v, int64_t n) {
  T tmp[Vec<C>::W];
  store(tmp, v);
  memcpy(p, tmp, n * sizeof(T));
}

// ---- exp and tanh ------------------------------------------------------------
// The kernels only need exp(x) for x <= 0 (of z - max): 2^y with y = x log2(e)
// (in the kernels y = (u - max) k directly). -inf gives exactly 0 and NaN
// stays NaN. y = n + f, |f| <= 1/2; 2^f by a polynomial (float: degree 6,
// relative error 1.9e-9 before rounding, fitted for this file; degree 5 in
// pass 1 of 16-bit inputs; double:
// Cephes' Pade form of e^r); 2^n by vscalef on AVX-512 (exact gradual
// underflow), by the exponent bits elsewhere (zero below the smallest
// normal). Forming y in working precision costs up to |x| ulps of relative
// error, only where the term is tiny beside the row's max term.
template <int S = 1>
LMXENT_HOT V<double> exp_poly(V<double> r);

template <class C> struct Exp2Neg;
template <> struct Exp2Neg<float> {
  static constexpr float lo = LMXENT_VBYTES == 64 ? -150.0f : -126.0f;
  // 1.5 * 2^23 + 127: adding it rounds to an integer and leaves n + 127, the
  // biased exponent of 2^n, in the low mantissa bits
  static constexpr float magic = 12583039.0f;
  // S 2^f, S a power of two (exact: every coefficient scaled by S)
  template <int S = 1>
  static LMXENT_HOT V<float> frac(V<float> f) {
    V<float> p = splat(S * 1.5345806605182588e-4f);
    p = p * f + S * 1.3399930903688073e-3f;
    p = p * f + S * 9.618489071726799e-3f;
    p = p * f + S * 5.550328642129898e-2f;
    p = p * f + S * 2.4022646248340607e-1f;
    p = p * f + S * 6.931471824645996e-1f;
    return p * f + (float)S;
  }
  // Degree 5 (relative error 9.2e-8 before rounding, 1.9e-7 evaluated in
  // float; fitted like frac, 2^0 still exactly 1): one FMA fewer, for 16-bit
  // inputs, whose own rounding (2^-9) dwarfs it.
  static LMXENT_HOT V<float> frac5(V<float> f) {
    V<float> p = splat(1.3264705e-3f);
    p = p * f + 9.6714897e-3f;
    p = p * f + 5.5507340e-2f;
    p = p * f + 2.4022242e-1f;
    p = p * f + 6.9314698e-1f;
    return p * f + 1.0f;
  }
};
template <> struct Exp2Neg<double> {
  static constexpr double lo = LMXENT_VBYTES == 64 ? -1075.0 : -1022.0;
  static constexpr double magic = 6755399441056767.0;  // 1.5 * 2^52 + 1023
  template <int S = 1>
  static LMXENT_HOT V<double> frac(V<double> f) { return exp_poly<S>(f * 0.6931471805599453094172); }
};

// Clamp = false when the caller knows lo < y (no -inf, no underflow): the
// range handling is skipped. Short: the degree-5 polynomial (float only).
template <class C, bool Clamp = true, bool Short = false>
LMXENT_HOT V<C> vexp2_neg(V<C> y) {
  typedef Exp2Neg<C> K;
  V<C> yc = Clamp ? vmax<C>(splat<C>(K::lo), y) : y;  // a NaN y is kept
#if LMXENT_VBYTES == 64
  // f = y - round(y) in one vreduce (round to nearest even, as the magic
  // number below), n = y - f exactly; 2^n by vscalef
  V<C> f, n;
  if constexpr (sizeof(C) == 4)
    f = (V<C>)_mm512_reduce_ps((__m512)yc, 0);
  else
    f = (V<C>)_mm512_reduce_pd((__m512d)yc, 0);
  n = yc - f;
  V<C> p;
  if constexpr (Short)
    p = K::frac5(f);
  else
    p = K::frac(f);
  if constexpr (sizeof(C) == 4)
    return (V<C>)_mm512_scalef_ps((__m512)p, (__m512)n);
  else
    return (V<C>)_mm512_scalef_pd((__m512d)p, (__m512d)n);
#else
  V<C> t = yc + K::magic;
  V<C> n = t - K::magic;
  V<C> p;
  if constexpr (Short)
    p = K::frac5(yc - n);
  else
    p = K::frac(yc - n);
  V<C> r = p * (V<C>)((VI<C>)t << (sizeof(C) == 4 ? 23 : 52));
  return Clamp ? (y < K::lo ? V<C>{} : r) : r;
#endif
}
template <class C> constexpr C kLog2e = (C)1.4426950408889634073599;
LMXENT_HOT V<float> vexp_neg(V<float> x) { return vexp2_neg<float>(x * kLog2e<float>); }
LMXENT_HOT V<double> vexp_neg(V<double> x) { return vexp2_neg<double>(x * kLog2e<double>); }

// 2^y for any y: overflow gives +inf on every instruction set (vexp2_neg
// builds 2^n from exponent bits with no upper bound). y is clamped to
// [lo, hi] (beyond them the result is 0 or +inf anyway); without AVX-512 2^n
// is built as 2^(n - 1) * 2, so that n at the overflow threshold still has a
// finite exponent field (results below 2^-125 are 0, as vexp2_neg's below
// 2^-126). Only where an argument may be positive (a caller's saved LSE).
template <class C>
LMXENT_HOT V<C> vexp2(V<C> y) {
  typedef Exp2Neg<C> K;
  constexpr C hi = sizeof(C) == 4 ? (C)128.5 : (C)1024.5;
  constexpr C lo = LMXENT_VBYTES == 64 ? K::lo : sizeof(C) == 4 ? (C)-125 : (C)-1021;
  V<C> yc = y > hi ? splat<C>(hi) : y;  // NaN compares false: kept
  yc = yc < lo ? splat<C>(lo) : yc;
#if LMXENT_VBYTES == 64
  V<C> n = (yc + K::magic) - K::magic;
  V<C> p = K::frac(yc - n);
  if constexpr (sizeof(C) == 4)
    return (V<C>)_mm512_scalef_ps((__m512)p, (__m512)n);
  else
    return (V<C>)_mm512_scalef_pd((__m512d)p, (__m512d)n);
#else
  const C magic = K::magic - (C)1;  // leaves n - 1 + bias in the low bits
  V<C> t = yc + magic;
  V<C> n = t - magic;
  V<C> p2 = K::template frac<2>(yc - n);  // 2 * 2^(y - n), exactly
  V<C> r = p2 * (V<C>)((VI<C>)t << (sizeof(C) == 4 ? 23 : 52));
  return y < lo ? V<C>{} : r;
#endif
}
template <class C>
LMXENT_HOT V<C> vexp(V<C> x) { return vexp2<C>(x * kLog2e<C>); }

// log(1 + y) for y in [0, 1] (the softplus tail log1p(exp(-|d|))): with
// s = y / (2 + y) in [0, 1/3], log(1 + y) = 2 atanh(s) = 2 s sum_k s^2k / (2k + 1),
// K terms so that the first one left out, (1/9)^K / (2K + 1), is below half an ulp.
template <class C>
LMXENT_HOT V<C> vlog1p_unit(V<C> y) {
  constexpr int K = sizeof(C) == 4 ? 7 : 16;
  const V<C> s = y / (y + (C)2), s2 = s * s;
  V<C> p = splat<C>((C)1 / (C)(2 * K - 1));
  for (int k = K - 2; k >= 0; --k) p = p * s2 + (C)1 / (C)(2 * k + 1);
  return (s + s) * p;
}

template <int S>
LMXENT_HOT V<double> exp_poly(V<double> r) {
  V<double> rr = r * r;
  V<double> px = ((1.26177193074810590878E-4 * rr + 3.02994407707441961300E-2) * rr +
                  9.99999999999999999910E-1) * r;
  V<double> qx = ((3.00198505138664455042E-6 * rr + 2.52448340349684104192E-3) * rr +
                  2.27265548208155028766E-1) * rr + 2.00000000000000000009E0;
  return (double)S + (2.0 * S) * px / (qx - px);
}

// tanh: near 0 a rational form without cancellation (float: the [7/6] Pade
// approximant; double: Cephes' x + x^3 P(x^2)/Q(x^2)), elsewhere
// (1 - e) / (1 + e) with e = exp(-2|u|).
template <class C>
LMXENT_HOT V<C> vtanh(V<C> u) {
  V<C> a = u < 0 ? -u : u;
  V<C> u2 = u * u, small;
  if constexpr (sizeof(C) == 4) {
    V<C> num = ((u2 + (C)378) * u2 + (C)17325) * u2 + (C)135135;
    V<C> den = (((C)28 * u2 + (C)3150) * u2 + (C)62370) * u2 + (C)135135;
    small = u * num / den;
  } else {
    V<C> P = (-9.64399179425052238628E-1 * u2 - 9.92877231001918586564E1) * u2 - 1.61468768441708447952E3;
    V<C> Q = ((u2 + 1.12811678491632931402E2) * u2 + 2.23548839060100448583E3) * u2 + 4.84406305325125486048E3;
    small = u * ((C)1 + u2 * P / Q);  // keeps the sign of -0
  }
  V<C> e = vexp_neg(-(a + a));
  V<C> big = ((C)1 - e) / ((C)1 + e);
  big = u < 0 ? -big : big;
  return a < (C)0.625 ? small : big;
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
