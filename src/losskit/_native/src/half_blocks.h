// Blocks of bfloat16 read as float and floats rounded back to bfloat16, in loops GCC
// vectorises at the build's flags (-O2, no -march: SSE2 on x86_64, NEON on aarch64).
// c10::BFloat16(float) takes a branch per element (NaN), so a loop that converts each
// element with it runs one element at a time, where ATen's own kernels convert whole
// vectors. These loops give c10's bits:
//
//   bfloat16 -> float   the 16 bits shifted left by 16 (exact)
//   float -> bfloat16   round to nearest, ties to even: (u + 0x7FFF + bit 16 of u) >> 16,
//                       and any NaN the quiet NaN 0x7FC0 (c10's round_to_nearest_even)
//
// float16 is not served: c10's portable conversions (fp16_ieee_to_fp32_value /
// fp16_ieee_from_fp32_value, float scalings and integer masks) written out branch-free give
// c10's bits for every float16 value and every float pattern tried, and vectorise, but cost
// three to four times bfloat16's: in the losses below they were slower than ATen's
// kernels, which convert float16 with the CPU's F16C instructions, so float16 keeps its
// former paths.
//
// GCC if-converts a float select (m < 0 ? 0 : m) in a loop, and so vectorises it, only
// where a float comparison is assumed not to trap: LOSSKIT_HALF_LOOPS_BEGIN / _END put the
// code between them under -fno-trapping-math (GCC only; clang vectorises these loops as they
// are). That option changes no result: IEEE operations round the same, only the floating
// point exception flags (which nothing here reads) may be raised differently. This header's
// conversion functions are compiled under it, and so must be the loops that inline them
// (GCC inlines only between functions of matching options); its bit helpers (to_bits,
// select, ...) are always inlined, into loops of any options.
//
// Every loop runs over exactly kBlock elements (the vectoriser at -O2's cost model takes a
// loop whose trip count is a multiple of the vector width, with no runtime alias check: the
// pointers are __restrict); a shorter tail goes through a block-sized local buffer
// (Block::load / Block::store). The float arithmetic of the float16 conversions is exact or
// rounded as the portable code's is (no FMA: the build passes -ffp-contract=off), so a
// vector lane gives the bits of the scalar code. tests/test_native_half.py checks every
// bfloat16 and float16 value and a set of float patterns (ties, overflow, denormals, NaN
// payloads, -0) against torch's conversions.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
#define LOSSKIT_HALF_LOOPS_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-trapping-math\")")
#define LOSSKIT_HALF_LOOPS_END _Pragma("GCC pop_options")
#else
#define LOSSKIT_HALF_LOOPS_BEGIN
#define LOSSKIT_HALF_LOOPS_END
#endif

// The bit helpers below are compiled with the including file's options and always inlined:
// GCC inlines a function only into callers of matching options otherwise, and these serve
// both the loops under LOSSKIT_HALF_LOOPS_BEGIN and other files' loops (soft_margin.cpp).
#if defined(__GNUC__)
#define LOSSKIT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LOSSKIT_ALWAYS_INLINE inline
#endif

namespace losskit {
namespace half_blocks {

// All ones where cond holds, else zero: a select by masks, which GCC keeps in a vector
// loop where a ?: of two computed values may become a branch.
LOSSKIT_ALWAYS_INLINE uint32_t mask_if(bool cond) { return 0u - static_cast<uint32_t>(cond); }
LOSSKIT_ALWAYS_INLINE uint32_t select(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

LOSSKIT_ALWAYS_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

LOSSKIT_ALWAYS_INLINE uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// cond ? a : b of two floats, for a mask of all ones or zero.
LOSSKIT_ALWAYS_INLINE float select(uint32_t mask, float a, float b) {
  return from_bits(select(mask, to_bits(a), to_bits(b)));
}

}  // namespace half_blocks
}  // namespace losskit

LOSSKIT_HALF_LOOPS_BEGIN

namespace losskit {
namespace half_blocks {

// Elements per block: 1 KiB of floats, a multiple of every vector width.
constexpr int64_t kBlock = 256;

// The types these blocks serve: bfloat16 (see above for float16).
template <typename T>
struct is_half : std::is_same<T, c10::BFloat16> {};

// ---- one element, branch-free (the loops below inline these) ----------------------------

inline float bf16_to_float(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = to_bits(f);
  const uint32_t rounded = (u + (UINT32_C(0x7FFF) + ((u >> 16) & 1u))) >> 16;
  // NaN: the magnitude above infinity's (a signed compare of a non-negative value, which
  // SSE2 has).
  const bool nan = static_cast<int32_t>(u & UINT32_C(0x7FFFFFFF)) > INT32_C(0x7F800000);
  return static_cast<uint16_t>(select(mask_if(nan), UINT32_C(0x7FC0), rounded));
}

// The element conversions by type (bfloat16 only, see above).
template <typename T>
inline float to_float(uint16_t h) {
  static_assert(is_half<T>::value, "bfloat16");
  return bf16_to_float(h);
}

template <typename T>
inline uint16_t from_float(float f) {
  static_assert(is_half<T>::value, "bfloat16");
  return float_to_bf16(f);
}

// ---- whole blocks ---------------------------------------------------------------------

// The 16 bits of a bfloat16 element (c10::BFloat16 holds exactly these).
template <typename T>
inline const uint16_t* bits_of(const T* p) {
  static_assert(is_half<T>::value && sizeof(T) == 2, "bfloat16");
  return reinterpret_cast<const uint16_t*>(p);
}
template <typename T>
inline uint16_t* bits_of(T* p) {
  static_assert(is_half<T>::value && sizeof(T) == 2, "bfloat16");
  return reinterpret_cast<uint16_t*>(p);
}

// dst[0, kBlock) = src[0, kBlock) as floats.
template <typename T>
inline void load_block(const uint16_t* __restrict src, float* __restrict dst) {
  for (int64_t i = 0; i < kBlock; ++i) dst[i] = to_float<T>(src[i]);
}

// dst[0, kBlock) = src[0, kBlock) rounded to T.
template <typename T>
inline void store_block(const float* __restrict src, uint16_t* __restrict dst) {
  for (int64_t i = 0; i < kBlock; ++i) dst[i] = from_float<T>(src[i]);
}

// v[0, kBlock) rounded to T, as floats (ATen's rounding of a half-type op's float result).
template <typename T>
inline void round_block(float* __restrict v) {
  for (int64_t i = 0; i < kBlock; ++i) v[i] = to_float<T>(from_float<T>(v[i]));
}

// Reads count <= kBlock elements from src into floats (a short tail zero-padded), so that
// the loops over the block always run kBlock times.
template <typename T>
inline void load(const T* src, int64_t count, float* __restrict dst) {
  if (count == kBlock) {
    load_block<T>(bits_of(src), dst);
    return;
  }
  alignas(64) uint16_t tail[kBlock] = {};
  std::memcpy(tail, src, static_cast<size_t>(count) * sizeof(uint16_t));
  load_block<T>(tail, dst);
}

// Writes the first count <= kBlock floats of src, rounded to T, into dst.
template <typename T>
inline void store(const float* __restrict src, int64_t count, T* dst) {
  if (count == kBlock) {
    store_block<T>(src, bits_of(dst));
    return;
  }
  alignas(64) uint16_t tail[kBlock];
  store_block<T>(src, tail);
  std::memcpy(static_cast<void*>(dst), tail, static_cast<size_t>(count) * sizeof(uint16_t));
}

}  // namespace half_blocks
}  // namespace losskit

LOSSKIT_HALF_LOOPS_END
