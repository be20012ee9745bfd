// Blocks of bfloat16 / float16 read as float and floats rounded back, in loops GCC vectorises
// at the build's flags (-O2, no -march: SSE2 on x86_64, NEON on aarch64). c10's scalar
// conversions (c10::BFloat16(float) and c10::Half(float)) take a branch per element (NaN) or
// an intrinsic GCC will not put in a vector loop, so a loop that converts each element with
// them runs one element at a time; ATen's own kernels convert whole vectors. These loops
// give c10's bits:
//
//   bfloat16 -> float   the 16 bits shifted left by 16 (exact)
//   float -> bfloat16   round to nearest, ties to even: (u + 0x7FFF + bit 16 of u) >> 16,
//                       and any NaN the quiet NaN 0x7FC0 (c10's round_to_nearest_even)
//   float16 <-> float   c10's portable fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value
//                       (IEEE round to nearest even by float scalings and integer masks,
//                       without a branch), written out here so that they vectorise
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
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace losskit {
namespace half_blocks {

// Elements per block: 1 KiB of floats, a multiple of every vector width.
constexpr int64_t kBlock = 256;

template <typename T>
struct is_half : std::bool_constant<std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>> {};

// All ones where cond holds, else zero: a select by masks, which GCC keeps in a vector
// loop where a ?: of two computed values may become a branch.
inline uint32_t mask_if(bool cond) { return 0u - static_cast<uint32_t>(cond); }
inline uint32_t select(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

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

// c10::detail::fp16_ieee_to_fp32_value's portable form.
inline float fp16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const float normalized = from_bits((two_w >> 4) + (UINT32_C(0xE0) << 23)) * from_bits(UINT32_C(0x7800000));  // 2^-112
  const float denormalized = from_bits((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  // two_w < 2^27, unsigned: as signed after flipping the top bit (SSE2 compares signed).
  const bool small = static_cast<int32_t>(two_w ^ UINT32_C(0x80000000)) < static_cast<int32_t>(UINT32_C(0x88000000));
  return from_bits(sign | select(mask_if(small), to_bits(denormalized), to_bits(normalized)));
}

// c10::detail::fp16_ieee_from_fp32_value's portable form.
inline uint16_t float_to_fp16(float f) {
  const float scale_to_inf = from_bits(UINT32_C(239) << 23);  // 2^112
  const float scale_to_zero = from_bits(UINT32_C(17) << 23);  // 2^-110
  const uint32_t w = to_bits(f);
  const float magnitude = from_bits(w & UINT32_C(0x7FFFFFFF));  // fabsf
  float base = (magnitude * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  // bias < 0x71000000 and shl1_w > 0xFF000000, unsigned, as signed compares after flipping the top bit
  const int32_t flip = static_cast<int32_t>(UINT32_C(0x80000000));
  bias = select(mask_if(static_cast<int32_t>(bias ^ flip) < static_cast<int32_t>(UINT32_C(0x71000000) ^ flip)),
                UINT32_C(0x71000000), bias);
  base = from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x00007C00)) + (bits & UINT32_C(0x00000FFF));
  const bool nan = static_cast<int32_t>(shl1_w ^ flip) > static_cast<int32_t>(UINT32_C(0xFF000000) ^ flip);
  return static_cast<uint16_t>((sign >> 16) | select(mask_if(nan), UINT32_C(0x7E00), nonsign));
}

template <typename T>
inline float to_float(uint16_t h) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bf16_to_float(h);
  } else {
    return fp16_to_float(h);
  }
}

template <typename T>
inline uint16_t from_float(float f) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return float_to_bf16(f);
  } else {
    return float_to_fp16(f);
  }
}

// ---- whole blocks ---------------------------------------------------------------------

// The 16 bits of a half-type element (c10::BFloat16 and c10::Half hold exactly these).
template <typename T>
inline const uint16_t* bits_of(const T* p) {
  static_assert(is_half<T>::value && sizeof(T) == 2, "a half type");
  return reinterpret_cast<const uint16_t*>(p);
}
template <typename T>
inline uint16_t* bits_of(T* p) {
  static_assert(is_half<T>::value && sizeof(T) == 2, "a half type");
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
