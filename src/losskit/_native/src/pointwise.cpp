// The compiled form of the fused pointwise regression losses (mse, l1, smooth_l1, huber):
// losskit/kernels/pointwise.py's pointwise_forward, op for op, so that the bits are the
// same (tests/test_native.py, tests/test_native_pointwise.py). See that file for the math:
// with e = input - target, the terms and the gradient carry the element weights and one
// factor k (1 / beta for smooth_l1, times 1 / the 'mean' divisor), so that the sum of the
// terms is the loss and backward only multiplies the gradient by grad_output.
//
// Where the Python form writes `torch.mul(e, k)` with a Python float k, the float is a
// wrapped number (at::native::wrapped_scalar_tensor), as here: the product is formed in
// e's dtype whatever k's, exactly as the Python form does.
#include "losskit_native.h"

#include <ATen/Parallel.h>
#include <ATen/NumericUtils.h>
#include <ATen/ScalarOps.h>
#include <c10/util/BFloat16-math.h>

#include "half_blocks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>

namespace py = pybind11;

namespace {

// (compute, result) dtypes: losskit/_core/dtypes.py's result_dtypes, with huber's result
// the input's dtype promoted with the weight's (pointwise_dtypes).
std::pair<at::ScalarType, at::ScalarType> pointwise_dtypes(const std::string& kind, const at::Tensor& input,
                                                           const at::Tensor& target,
                                                           const std::optional<at::Tensor>& weight) {
  at::ScalarType compute = at::promote_types(input.scalar_type(), target.scalar_type());
  at::ScalarType out = input.scalar_type();
  if (weight.has_value()) {
    compute = at::promote_types(compute, weight->scalar_type());
    out = at::promote_types(out, weight->scalar_type());
  }
  if (kind != "huber" || !at::isFloatingType(out)) out = compute;
  if (compute == at::kHalf || compute == at::kBFloat16) compute = at::kFloat;
  return {compute, out};
}

at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// The factor k: a double (Python float) or a 0-d tensor (1 / the summed weight).
struct Factor {
  double value = 1.0;
  at::Tensor tensor;  // defined: k is this tensor
  bool unit() const { return !tensor.defined() && value == 1.0; }
  at::Tensor as_other(const at::Tensor& like) const {
    return tensor.defined() ? tensor : at::native::wrapped_scalar_tensor(value, like.device());
  }
};

// _terms: (loss terms times w k, formed in place of the errors e; their gradient times w k,
// written into g when it is defined).
std::pair<at::Tensor, at::Tensor> terms(at::Tensor e, const at::Tensor& w, const std::string& kind, double param,
                                        const Factor& k, at::Tensor g) {
  if (kind == "mse") {
    at::Tensor other = k.as_other(e);
    g = g.defined() ? at::mul_out(g, e, other) : at::mul(e, other);
    if (w.defined()) g.mul_(w);
    at::Tensor loss = e.mul_(g);
    g.mul_(2.0);
    return {loss, g};
  }
  if (kind == "l1" || param == 0.0) {
    g = g.defined() ? at::sign_out(g, e) : at::sign(e);
  } else {
    g = g.defined() ? at::clamp_out(g, e, -param, param) : at::clamp(e, -param, param);
    e.sub_(g, 0.5);
  }
  if (w.defined()) g.mul_(w);
  if (!k.unit()) g.mul_(k.as_other(g));
  return {e.mul_(g), g};
}

// ---- bfloat16 in one pass --------------------------------------------------------------
// A bfloat16 input and target (and weight, bfloat16 or float32) are computed in float32 by
// the Python form: each chunk cast to float32, _terms' ops, the float32
// gradient cast to the input's dtype at the end. Here one pass over blocks of
// half_blocks::kBlock elements reads the 16-bit values as floats, forms each element's error,
// term and gradient by the same float32 operations in the same order (+, -, *, clamp and
// sign are exactly rounded per operation, in a vector lane as in ATen's), and writes the
// gradients rounded to the half type directly (the target's is its negation: exact). The
// terms are written as float32 and summed by ATen's sum over the same chunks as the Python
// form, so the loss has its bits too. float16 keeps the ATen ops below (half_blocks.h says
// why).
//
// One operation needs care: smooth_l1 / huber's e.sub_(c, alpha=0.5) is ATen's
// fmadd(c, -0.5, e) in its vector kernels where the CPU capability has an FMA (AVX2, AVX512,
// NEON): one rounding of e - c / 2, which differs from e - round(c / 2) only where c / 2 is
// inexact (c a denormal with its last bit set). Which form ATen takes is found once, by
// running it (aten_sub_alpha); the fused form is computed here in double, where e - c / 2
// of two floats is exact or rounded with 53 bits, so that rounding to float rounds once (53
// >= 2 * 24 + 2: double rounding of a sum is innocuous). Should ATen mix the forms across
// one tensor, the half path declines these two losses.
enum class SubAlpha { kFused, kSeparate, kMixed };

SubAlpha aten_sub_alpha() {
  static const SubAlpha found = [] {
    // e = c = 3 * 2^-149: fused, round(1.5 * 2^-149) = 2 * 2^-149 (ties to even); separate,
    // 3 * 2^-149 - round(1.5 * 2^-149) = 2^-149. 71 elements: a vector body and a tail.
    at::NoGradGuard no_grad;
    at::Tensor e = at::full({71}, losskit::half_blocks::from_bits(3), at::TensorOptions().dtype(at::kFloat));
    at::Tensor r = at::sub(e, e, 0.5).view(at::kInt);
    const int64_t fused = r.eq(2).sum().item<int64_t>(), separate = r.eq(1).sum().item<int64_t>();
    if (fused == e.numel()) return SubAlpha::kFused;
    if (separate == e.numel()) return SubAlpha::kSeparate;
    return SubAlpha::kMixed;
  }();
  return found;
}

enum class HalfKind { kSquare, kSign, kClamp };

// The weight as stored: none, the half type's bits, or float32.
enum class HalfWeight { kNone, kSame, kFloat };

struct HalfArgs {
  float lo = 0.0f, hi = 0.0f;  // -param and param, as ATen's float32 clamp reads them
  // The factor, as ATen's float32 mul reads it. Where the Python form skips the product
  // (k == 1, Factor::unit) this multiplies by 1: exact, the same bits.
  float k = 1.0f;
};

LOSSKIT_HALF_LOOPS_BEGIN
// One block: float32 terms; the gradients' bits (the target's the negated input's).
template <typename T, HalfKind kind, HalfWeight wk, bool fused>
__attribute__((noinline)) void regression_half_block(const uint16_t* __restrict x, const uint16_t* __restrict y,
                                  const void* __restrict weight, float* __restrict terms_out,
                                  uint16_t* __restrict gi, uint16_t* __restrict gt, const HalfArgs& a) {
  using namespace losskit::half_blocks;
  const uint16_t* __restrict wh = static_cast<const uint16_t*>(weight);
  const float* __restrict wf = static_cast<const float*>(weight);
  const float k = a.k, lo = a.lo, hi = a.hi;
  for (int64_t i = 0; i < kBlock; ++i) {
    const float e = to_float<T>(x[i]) - to_float<T>(y[i]);
    float w = 1.0f;
    if constexpr (wk == HalfWeight::kSame) w = to_float<T>(wh[i]);
    if constexpr (wk == HalfWeight::kFloat) w = wf[i];
    float g, term;
    if constexpr (kind == HalfKind::kSquare) {
      g = e * k;  // torch.mul(e, k)
      if constexpr (wk != HalfWeight::kNone) g = g * w;
      term = e * g;
      g = g * 2.0f;
    } else {
      float h = e;
      if constexpr (kind == HalfKind::kSign) {
        g = static_cast<float>(e > 0.0f) - static_cast<float>(e < 0.0f);  // ATen's sign: 0 at 0 and NaN
      } else {
        const float above = e < lo ? lo : e;  // ATen's clamp: min(max(e, lo), hi), NaN kept
        g = above > hi ? hi : above;
        if constexpr (fused) {
          h = static_cast<float>(static_cast<double>(e) - 0.5 * static_cast<double>(g));
        } else {
          h = e + -0.5f * g;
        }
      }
      if constexpr (wk != HalfWeight::kNone) g = g * w;
      g = g * k;
      term = h * g;
    }
    terms_out[i] = term;
    const uint16_t bits = from_float<T>(g);
    gi[i] = bits;
    gt[i] = static_cast<uint16_t>(bits ^ 0x8000u);
  }
}

// Elements [begin, end) of the call, in blocks over threads: the terms into terms (float32,
// indexed from begin) or, where out_terms is set, rounded to the half type into it (indexed
// from 0, as the result of reduction='none'); the gradients where wanted.
template <typename T, HalfKind kind, HalfWeight wk, bool fused>
void regression_half_pass(const T* x, const T* y, const void* w, int64_t begin, int64_t end, float* terms,
                          T* out_terms, T* gi, T* gt, const HalfArgs& a) {
  using namespace losskit::half_blocks;
  const int64_t blocks = (end - begin + kBlock - 1) / kBlock;
  const size_t wsize = wk == HalfWeight::kFloat ? sizeof(float) : sizeof(uint16_t);
  at::parallel_for(0, blocks, 64, [&](int64_t first, int64_t last) {
    alignas(64) uint16_t spare_i[kBlock], spare_t[kBlock], xs[kBlock], ys[kBlock];
    alignas(64) float local[kBlock], ws[kBlock];
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = begin + b * kBlock, size = std::min(kBlock, end - start);
      float* tp = out_terms != nullptr ? local : terms + (start - begin);
      uint16_t* gip = gi != nullptr ? bits_of(gi + start) : spare_i;
      uint16_t* gtp = gt != nullptr ? bits_of(gt + start) : spare_t;
      const void* wp = wk == HalfWeight::kNone ? nullptr : static_cast<const char*>(w) + start * wsize;
      if (size == kBlock && out_terms == nullptr) {
        regression_half_block<T, kind, wk, fused>(bits_of(x + start), bits_of(y + start), wp, tp, gip, gtp, a);
        continue;
      }
      if (size == kBlock) {
        regression_half_block<T, kind, wk, fused>(bits_of(x + start), bits_of(y + start), wp, local, gip, gtp, a);
      } else {  // the last, short block, through zero-padded copies
        std::memset(xs, 0, sizeof xs);
        std::memset(ys, 0, sizeof ys);
        std::memset(ws, 0, sizeof ws);
        std::memcpy(xs, x + start, size * sizeof(uint16_t));
        std::memcpy(ys, y + start, size * sizeof(uint16_t));
        if (wp != nullptr) std::memcpy(ws, wp, size * wsize);
        regression_half_block<T, kind, wk, fused>(xs, ys, ws, local, spare_i, spare_t, a);
        if (gi != nullptr) std::memcpy(static_cast<void*>(gi + start), spare_i, size * sizeof(uint16_t));
        if (gt != nullptr) std::memcpy(static_cast<void*>(gt + start), spare_t, size * sizeof(uint16_t));
        if (out_terms == nullptr) std::memcpy(tp, local, size * sizeof(float));
      }
      if (out_terms != nullptr) store<T>(local, size, out_terms + start);
    }
  });
}

LOSSKIT_HALF_LOOPS_END

template <typename T, HalfKind kind, HalfWeight wk>
void regression_half_pass(bool fused, const T* x, const T* y, const void* w, int64_t begin, int64_t end, float* terms,
                          T* out_terms, T* gi, T* gt, const HalfArgs& a) {
  if (fused) {
    regression_half_pass<T, kind, wk, true>(x, y, w, begin, end, terms, out_terms, gi, gt, a);
  } else {
    regression_half_pass<T, kind, wk, false>(x, y, w, begin, end, terms, out_terms, gi, gt, a);
  }
}

template <typename T, HalfKind kind>
void regression_half_pass(HalfWeight wk, bool fused, const T* x, const T* y, const void* w, int64_t begin,
                          int64_t end, float* terms, T* out_terms, T* gi, T* gt, const HalfArgs& a) {
  switch (wk) {
    case HalfWeight::kNone:
      regression_half_pass<T, kind, HalfWeight::kNone>(fused, x, y, w, begin, end, terms, out_terms, gi, gt, a);
      break;
    case HalfWeight::kSame:
      regression_half_pass<T, kind, HalfWeight::kSame>(fused, x, y, w, begin, end, terms, out_terms, gi, gt, a);
      break;
    case HalfWeight::kFloat:
      regression_half_pass<T, kind, HalfWeight::kFloat>(fused, x, y, w, begin, end, terms, out_terms, gi, gt, a);
      break;
  }
}

// Whether the half path serves the call: input and target bfloat16, of one shape,
// contiguous (the Python form's sums then add the same terms in the same order), the weight
// absent or contiguous of that shape in the half type or float32; smooth_l1 / huber where
// ATen's sub with alpha takes one form throughout.
bool half_applies(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                  HalfKind kind) {
  const at::ScalarType dtype = input.scalar_type();
  if (dtype != at::kBFloat16) return false;
  if (target.scalar_type() != dtype || !input.sizes().equals(target.sizes())) return false;
  if (!input.is_contiguous() || !target.is_contiguous()) return false;
  if (weight.has_value()) {
    const at::ScalarType wt = weight->scalar_type();
    if ((wt != dtype && wt != at::kFloat) || !weight->sizes().equals(input.sizes()) || !weight->is_contiguous()) {
      return false;
    }
  }
  return kind != HalfKind::kClamp || aten_sub_alpha() != SubAlpha::kMixed;
}

HalfKind half_kind(const std::string& kind, double param) {
  if (kind == "mse") return HalfKind::kSquare;
  if (kind == "l1" || param == 0.0) return HalfKind::kSign;
  return HalfKind::kClamp;
}

// pointwise_regression's half-type calls (half_applies): (loss, grad_input, grad_target).
std::tuple<at::Tensor, at::Tensor, at::Tensor> regression_half(const at::Tensor& input, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                HalfKind kind, double param, const Factor& k,
                                                                const std::string& reduction, int64_t chunk,
                                                                at::ScalarType out, bool want_input,
                                                                bool want_target) {
  const int64_t n = input.numel();
  HalfArgs a;
  // Python: clamp(e, -param, param) and mul by a Python float, on float32: each read as float.
  a.lo = static_cast<float>(-param);
  a.hi = static_cast<float>(param);
  a.k = k.tensor.defined() ? k.tensor.item<float>() : static_cast<float>(k.value);
  const HalfWeight wk = !weight.has_value()               ? HalfWeight::kNone
                        : weight->scalar_type() == at::kFloat ? HalfWeight::kFloat
                                                              : HalfWeight::kSame;
  const bool fused = kind == HalfKind::kClamp && aten_sub_alpha() == SubAlpha::kFused;
  at::Tensor gi = want_input ? at::empty(input.sizes(), input.options()) : at::Tensor();
  at::Tensor gt = want_target ? at::empty(target.sizes(), target.options()) : at::Tensor();
  at::Tensor loss;
  [&] {  // returns where the loss is made
    using scalar_t = c10::BFloat16;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* y = target.const_data_ptr<scalar_t>();
    const void* w = weight.has_value() ? weight->const_data_ptr() : nullptr;
    scalar_t* gip = gi.defined() ? gi.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = gt.defined() ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    auto pass = [&](int64_t begin, int64_t end, float* terms, scalar_t* out_terms) {
      switch (kind) {
        case HalfKind::kSquare:
          regression_half_pass<scalar_t, HalfKind::kSquare>(wk, fused, x, y, w, begin, end, terms, out_terms, gip, gtp, a);
          break;
        case HalfKind::kSign:
          regression_half_pass<scalar_t, HalfKind::kSign>(wk, fused, x, y, w, begin, end, terms, out_terms, gip, gtp, a);
          break;
        case HalfKind::kClamp:
          regression_half_pass<scalar_t, HalfKind::kClamp>(wk, fused, x, y, w, begin, end, terms, out_terms, gip, gtp, a);
          break;
      }
    };
    if (reduction == "none") {
      // Python: the float32 terms, then .to(out): rounded to the half type here at once (an
      // out of float32, from a float32 weight, keeps them as they are).
      loss = at::empty(input.sizes(), input.options().dtype(out));
      if (out == input.scalar_type()) {
        pass(0, n, nullptr, loss.mutable_data_ptr<scalar_t>());
      } else {
        pass(0, n, loss.mutable_data_ptr<float>(), nullptr);
      }
      return;
    }
    // The float32 terms of one chunk at a time, summed by ATen as the Python form's chunks.
    at::Tensor terms = at::empty({std::min(n, chunk)}, input.options().dtype(at::kFloat));
    if (n <= chunk) {
      pass(0, n, terms.mutable_data_ptr<float>(), nullptr);
      loss = terms.view(input.sizes()).sum();
      return;
    }
    std::vector<at::Tensor> partials;
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t end = std::min(start + chunk, n);
      pass(start, end, terms.mutable_data_ptr<float>(), nullptr);
      partials.push_back(terms.slice(0, 0, end - start).sum());
    }
    loss = at::stack(partials).sum();
  }();
  return {cast(loss, out), gi, gt};
}

// A test hook for half_blocks.h (tests/test_native_half.py): the float32 values of ``f``
// rounded to bfloat16 by half_blocks' store and by c10::BFloat16(float), and those read back
// as floats by half_blocks' load and by c10's conversion: (mine, c10's, mine back, c10's back).
py::tuple bf16_blocks_check(const at::Tensor& f) {
  using namespace losskit::half_blocks;
  TORCH_CHECK(f.scalar_type() == at::kFloat && f.dim() == 1 && f.is_contiguous() && f.is_cpu(),
              "a contiguous 1-d float32 CPU tensor");
  const int64_t n = f.numel();
  at::Tensor mine = at::empty({n}, f.options().dtype(at::kBFloat16)), theirs = at::empty_like(mine);
  at::Tensor back = at::empty({n}, f.options()), their_back = at::empty_like(back);
  const float* src = f.const_data_ptr<float>();
  c10::BFloat16* m = mine.mutable_data_ptr<c10::BFloat16>();
  c10::BFloat16* t = theirs.mutable_data_ptr<c10::BFloat16>();
  for (int64_t start = 0; start < n; start += kBlock) {  // blocks and a short tail, as the losses
    const int64_t size = std::min(kBlock, n - start);
    alignas(64) float block[kBlock] = {};
    std::memcpy(block, src + start, size * sizeof(float));
    store<c10::BFloat16>(block, size, m + start);
    load<c10::BFloat16>(m + start, size, block);
    std::memcpy(back.mutable_data_ptr<float>() + start, block, size * sizeof(float));
  }
  for (int64_t i = 0; i < n; ++i) {
    t[i] = c10::BFloat16(src[i]);
    their_back.mutable_data_ptr<float>()[i] = static_cast<float>(t[i]);
  }
  return py::make_tuple(mine, theirs, back, their_back);
}

// pointwise_forward(input, target, weight, options=PointwiseOptions(kind, param, reduction,
// weighted_mean), needs, chunk) -> (loss, grad_input, grad_target), or None for the calls
// left to the Python form (not on the CPU, or no elements).
py::object pointwise_regression(const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const std::string& kind, double param,
                                const std::string& reduction, bool weighted_mean, int64_t chunk,
                                const std::vector<bool>& needs) {
  if (!input.is_cpu() || !target.is_cpu() || (weight.has_value() && !weight->is_cpu())) return py::none();
  const int64_t n = input.numel();
  if (n == 0 || chunk <= 0) return py::none();
  at::Tensor loss, grad, gi, gt;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    auto [compute, out] = pointwise_dtypes(kind, input, target, weight);
    Factor k;
    k.value = kind == "smooth_l1" && param > 0 ? 1.0 / param : 1.0;
    if (reduction == "mean") {
      if (weight.has_value() && weighted_mean) {
        // Python: k / weight.sum() = weight.sum().reciprocal() * k (Tensor.__rtruediv__).
        k.tensor = at::mul(cast(*weight, compute).sum().reciprocal(), at::native::wrapped_scalar_tensor(k.value));
      } else {
        k.value = k.value / static_cast<double>(n);
      }
    }
    const HalfKind hk = half_kind(kind, param);
    if (half_applies(input, target, weight, hk)) {
      const bool want_target = needs.size() > 1 && needs[1];
      std::tie(loss, gi, gt) = regression_half(input, target, weight, hk, param, k, reduction, chunk, out,
                                               !needs.empty() && needs[0], want_target);
    } else if (n <= chunk) {  // one chunk: no slicing, no gathering of partial sums
      at::Tensor e = at::sub(cast(input, compute), cast(target, compute));
      at::Tensor w = weight.has_value() ? cast(*weight, compute) : at::Tensor();
      std::tie(loss, grad) = terms(e, w, kind, param, k, at::Tensor());
      if (reduction != "none") loss = loss.sum();
    } else {
      at::Tensor x = input.reshape(-1), y = target.reshape(-1);
      at::Tensor w = weight.has_value() ? weight->reshape(-1) : at::Tensor();
      grad = at::empty(input.sizes(), input.options().dtype(compute));
      at::Tensor flat_grad = grad.view(-1);
      // Python: elementwise = empty(n), returned as elementwise.view(input.shape); here the
      // other way round, so that the loss is no view (autograd's attach takes no view).
      at::Tensor unreduced =
          reduction == "none" ? at::empty(input.sizes(), input.options().dtype(compute)) : at::Tensor();
      at::Tensor elementwise = unreduced.defined() ? unreduced.view(-1) : at::Tensor();
      std::vector<at::Tensor> partials;
      for (int64_t start = 0; start < n; start += chunk) {
        int64_t end = std::min(start + chunk, n);
        // reduction='none': the errors, and the terms formed in place of them, are written
        // straight into the result.
        at::Tensor xc = cast(x.slice(0, start, end), compute), yc = cast(y.slice(0, start, end), compute);
        at::Tensor e;
        if (elementwise.defined()) {
          e = elementwise.slice(0, start, end);
          at::sub_out(e, xc, yc);
        } else {
          e = at::sub(xc, yc);
        }
        at::Tensor wc = w.defined() ? cast(w.slice(0, start, end), compute) : at::Tensor();
        at::Tensor part = terms(e, wc, kind, param, k, flat_grad.slice(0, start, end)).first;
        if (!elementwise.defined()) partials.push_back(part.sum());
      }
      loss = unreduced.defined() ? unreduced : at::stack(partials).sum();
    }
    if (grad.defined()) {  // not the half path, which made its own
      loss = cast(loss, out);
      if (needs.size() > 1 && needs[1] && at::isFloatingType(target.scalar_type())) gt = cast(grad, target.scalar_type()).neg();
      if (!needs.empty() && needs[0]) gi = cast(grad, input.scalar_type());
    }
  }
  py::object grad_input = py::none(), grad_target = py::none();
  if (gi.defined()) grad_input = py::cast(gi);
  if (gt.defined()) grad_target = py::cast(gt);
  return py::make_tuple(loss, grad_input, grad_target);
}

// ---- the value checks of losskit.info (info/measures.py's _log_probs) ----------------------
// The Python checks cost a dozen torch calls a tensor, several times a small measure's math.
// These answer, in one call, whether the Python checks would pass, by the same ATen ops
// (comparisons in the tensor's dtype, the row sums as x.sum(dim)): true means they pass;
// false sends the call to the Python checks, which raise with the message naming the bad
// value. Checks mode 'full' on the CPU only (the caller sees to that).

// Rows along the last dimension of a contiguous x, in one pass: every element in [0, 1]
// (the comparisons are exact, NaN fails them) and every row sum, in double, so far within
// tol of 1 that the Python check's sum (x.sum(dim) in x's dtype: float32 accumulation for
// the half types, then rounded to the dtype; |sum - 1| rounded again; tol rounded to the
// dtype) is within it too, whatever its rounding errors: those are bounded by `slack`. A
// row closer to the edge than that answers false, and the Python check decides.
// Whether a row's sum (in double, of n values) is so far within tol of 1 that the Python
// check's own sum, whatever its rounding (bounded by eps per element and rel for the
// results' roundings), is within it too.
inline bool sum_within(double sum, int64_t n, double tol, double eps, double rel) {
  double slack = (static_cast<double>(n) * eps + 2.0 * rel) * std::max(sum, 1.0);
  return std::abs(sum - 1.0) * (1.0 + 2.0 * rel) + slack <= tol * (1.0 - 2.0 * rel);
}

template <typename scalar_t>
bool rows_ok(const scalar_t* data, int64_t rows, int64_t n, double tol, double eps, double rel) {
  std::atomic<bool> ok{true};
  // Rows are independent: split them over torch's threads (a large batch is megabytes).
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end && ok.load(std::memory_order_relaxed); ++r) {
      const scalar_t* row = data + r * n;
      // Four partial sums (in any order: the slack below covers every order's error) and
      // no early exit inside a row, so that the compiler keeps the loop tight.
      double sums[4] = {0.0, 0.0, 0.0, 0.0};
      bool inside = true;
      int64_t c = 0;
      for (; c + 4 <= n; c += 4) {
        for (int k = 0; k < 4; ++k) {
          double v = static_cast<double>(row[c + k]);
          inside &= (v >= 0.0) & (v <= 1.0);
          sums[k] += v;
        }
      }
      for (; c < n; ++c) {
        double v = static_cast<double>(row[c]);
        inside &= (v >= 0.0) & (v <= 1.0);
        sums[0] += v;
      }
      double sum = (sums[0] + sums[1]) + (sums[2] + sums[3]);
      if (!inside || !sum_within(sum, n, tol, eps, rel)) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

// Every element in [0, 1] (NaN counts as outside), and every sum along dim within tol of 1.
bool distribution_ok(const at::Tensor& x, int64_t dim, double tol) {
  if (!x.is_cpu() || x.numel() == 0) return false;
  py::gil_scoped_release release;
  at::NoGradGuard no_grad;
  const int64_t last = x.dim() - 1;
  if (x.numel() > (1 << 16)) {
    // Large: ATen's vectorised reductions beat the one-pass loop (min / max propagate NaN,
    // so one aminmax is the range check), then the Python check's own ops on the sums.
    auto [low, high] = at::aminmax(x);
    if (!(low.item<double>() >= 0.0 && high.item<double>() <= 1.0)) return false;
    return !x.sum(dim).sub(1).abs().gt(tol).any().item<bool>();
  }
  if ((dim == -1 || dim == last) && x.is_contiguous()) {
    const int64_t n = x.size(last), rows = x.numel() / n;
    switch (x.scalar_type()) {
      case at::kFloat: return rows_ok(x.const_data_ptr<float>(), rows, n, tol, 0x1p-24, 0x1p-24);
      case at::kDouble: return rows_ok(x.const_data_ptr<double>(), rows, n, tol, 0x1p-53, 0x1p-53);
      case at::kBFloat16: return rows_ok(x.const_data_ptr<at::BFloat16>(), rows, n, tol, 0x1p-24, 0x1p-8);
      case at::kHalf: return rows_ok(x.const_data_ptr<at::Half>(), rows, n, tol, 0x1p-24, 0x1p-11);
      default: break;
    }
  }
  // The Python check's own ops.
  if (at::logical_not(at::logical_and(x.ge(0), x.le(1))).any().item<bool>()) return false;
  return !x.sum(dim).sub(1).abs().gt(tol).any().item<bool>();
}

// Every logit finite or -inf (neither NaN nor +inf).
bool logits_ok(const at::Tensor& x) {
  if (!x.is_cpu()) return false;
  py::gil_scoped_release release;
  at::NoGradGuard no_grad;
  return !at::logical_or(x.isnan(), x.eq(std::numeric_limits<double>::infinity())).any().item<bool>();
}

}  // namespace

// ---- the element-wise likelihood losses (kernels/likelihood.py's elementwise_forward) ------
// poisson_nll, gaussian_nll, kl_div and sigmoid_focal: the loss by the composed form's own
// ops and the gradient written out beside it, op for op as the Python form (see the comment
// above ElementwiseOptions there for the math). A Python float operand is a wrapped number
// here as there (Tensor.mul(Scalar) and friends wrap it), so every product has the same bits.

namespace {

at::Tensor scale(at::Tensor g, double k) { return k == 1.0 ? g : g.mul_(k); }

// Python's _scaled: g times k (in place), in dtype.
at::Tensor scaled(at::Tensor g, double k, at::ScalarType dtype) {
  if (k != 1.0) g.mul_(k);
  return cast(g, dtype);
}

// elementwise_forward(input, target, extra, options=ElementwiseOptions(kind, reduction, a, b,
// flag, extra), needs) -> (loss, grad_input, grad_target, grad_extra), or None for the calls
// left to the Python form (not on the CPU, or no elements).
py::object elementwise_loss(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& extra,
                            const std::string& kind, const std::string& reduction, double a, double b, bool flag,
                            bool extra_flag, const std::vector<bool>& needs) {
  if (!input.is_cpu() || !target.is_cpu() || (extra.has_value() && !extra->is_cpu())) return py::none();
  if (input.numel() == 0 || needs.size() != 3) return py::none();
  at::Tensor loss, gx, gy, ge;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    at::ScalarType compute = at::promote_types(input.scalar_type(), target.scalar_type());
    if (kind == "gaussian" && extra.has_value()) compute = at::promote_types(compute, extra->scalar_type());
    const at::ScalarType out = compute;
    if (compute == at::kHalf || compute == at::kBFloat16) compute = at::kFloat;
    // Poisson's counts (log-rate, no Stirling term), gaussian's target and kl_div's input
    // (log target) enter binary ops only: they stay as given, as in the Python form.
    at::Tensor x = kind == "kl_div" && flag ? input : cast(input, compute);
    at::Tensor y = (kind == "poisson" && flag && !extra_flag) || kind == "gaussian" ? target : cast(target, compute);
    const int64_t n = x.numel();
    double k = 1.0;
    if (reduction == "mean") k = 1.0 / static_cast<double>(std::max<int64_t>(n, 1));
    if (reduction == "batchmean" && x.dim() > 0) k = 1.0 / static_cast<double>(std::max<int64_t>(x.size(0), 1));
    at::Tensor terms;
    if (kind == "poisson") {
      if (flag && !extra_flag) {  // log-rate
        at::Tensor e = at::exp(x);
        at::Tensor product = at::mul(y, x);
        terms = at::sub_out(product, e, product);
        if (needs[1]) gy = x.mul(-k);
        if (needs[0]) gx = scaled(at::sub_out(e, e, y), k, input.scalar_type());
      } else if (flag) {
        at::Tensor e = at::exp(x);
        terms = at::sub(e, at::mul(y, x));
        if (needs[1]) gy = x.mul(-k);
        if (needs[0]) gx = scale(at::sub_out(e, e, y), k);
      } else {
        at::Tensor shifted = x.add(a);
        at::Tensor log_rate = at::log(shifted);
        terms = at::sub(x, at::mul(y, log_rate));
        if (needs[1]) gy = log_rate.mul(-k);
        if (needs[0]) gx = scale(at::rsub(at::div(y, shifted), 1), k);
      }
      if (extra_flag) {  // Stirling's term
        at::Tensor stirling = at::add(at::sub(at::mul(y, at::log(y)), y), at::log(y.mul(2 * M_PI)).mul(0.5));
        terms = at::add(terms, stirling.masked_fill(y.le(1), 0));
      }
    } else if (kind == "gaussian") {
      at::Tensor v = cast(*extra, compute);
      at::Tensor d = at::sub(x, y);
      v = at::add(v, at::sub(at::clamp(v, at::Scalar(a), std::nullopt), v));
      at::Tensor q = at::div(d.square(), v);
      terms = at::add(at::log(v), q).mul(0.5);
      if (flag) terms = terms.add(0.5 * std::log(2 * M_PI));
      if (needs[1]) {
        at::Tensor g = scale(d.div_(v), k);
        if (needs[0]) gx = g;
        gy = g.neg();
      } else if (needs[0]) {
        gx = scaled(d.div_(v), k, input.scalar_type());
      }
      if (needs[2]) ge = scaled(at::rsub(q, 1).div_(v), 0.5 * k, extra->scalar_type());
    } else if (kind == "kl_div") {
      if (flag) {  // log target
        at::Tensor ey = at::exp(y);
        at::Tensor gap = at::sub(y, x);
        terms = at::mul_out(gap, ey, gap);
        if (needs[1]) gy = scale(at::add(terms, ey), k);
        if (needs[0]) gx = scaled(ey, -k, input.scalar_type());
      } else {
        terms = at::sub(at::xlogy(y, y), at::mul(y, x));
        if (needs[0]) gx = y.mul(-k);
      }
    } else if (kind == "sigmoid_focal") {
      const double alpha = a, gamma = b;
      at::Tensor p = at::sigmoid(x);
      at::Tensor bce = at::sub(at::mul(at::rsub(y, 1), x), at::log_sigmoid(x));
      at::Tensor p_t = at::add(at::mul(p, y), at::mul(at::rsub(p, 1), at::rsub(y, 1)));
      at::Tensor q = at::rsub(p_t, 1);
      at::Tensor focus = gamma == 0 ? at::Tensor() : at::pow(q, gamma);
      terms = focus.defined() ? at::mul(bce, focus) : bce;
      at::Tensor a_t;
      if (alpha >= 0) {
        a_t = at::add(y.mul(alpha), at::rsub(y, 1).mul(1 - alpha));
        terms = at::mul(a_t, terms);
      }
      if (needs[0]) {
        at::Tensor g = at::sub(p, y);
        if (gamma != 0) {
          g.mul_(focus);
          at::Tensor slope = at::rsub(p, 1).mul_(p).mul_(at::sub(y, at::rsub(y, 1)));
          if (gamma != 1) slope.mul_(q.pow_(gamma - 1));
          g.sub_(slope.mul_(bce), gamma);
        }
        if (a_t.defined()) g.mul_(a_t);
        gx = scale(g, k);
      }
    } else {
      throw std::invalid_argument("losskit elementwise_loss: unknown kind " + kind);
    }
    if (reduction == "none") {
      loss = terms;
    } else if (reduction == "mean") {
      loss = terms.mean();
    } else {
      loss = terms.sum();
      if (reduction == "batchmean" && x.dim() > 0) loss = loss.div(x.size(0));
    }
    loss = cast(loss, out);
    if (gx.defined()) gx = cast(gx, input.scalar_type());
    if (gy.defined()) gy = cast(gy, target.scalar_type());
    if (ge.defined()) ge = cast(ge, extra->scalar_type());
  }
  auto maybe = [](const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); };
  return py::make_tuple(loss, maybe(gx), maybe(gy), maybe(ge));
}

}  // namespace

// ---- the target-probability losses on logits (kernels/target_probability.py's target_prob_forward)
// softmax_focal_loss and poly1_cross_entropy of [N, C] logits: the log-softmax read at the
// target and the gradient c (onehot(y) - softmax), op for op as the Python form.

namespace {

// target_prob_forward(input, target, valid, alpha, options=TargetProbOptions(kind,
// reduction, param, alpha), needs) -> (loss, grad_input), or None (not on the CPU, not
// [N, C], no rows).
py::object target_prob_loss(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& valid,
                            const std::optional<at::Tensor>& alpha, const std::string& kind,
                            const std::string& reduction, double param, double alpha_scalar,
                            const std::vector<bool>& needs) {
  if (!input.is_cpu() || !target.is_cpu() || input.dim() != 2 || input.size(0) == 0 || input.size(1) == 0) {
    return py::none();
  }
  if ((valid.has_value() && !valid->is_cpu()) || (alpha.has_value() && !alpha->is_cpu())) return py::none();
  at::Tensor loss, grad;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    at::ScalarType compute = input.scalar_type();
    if (compute == at::kHalf || compute == at::kBFloat16) compute = at::kFloat;
    at::Tensor x = cast(input, compute);
    at::Tensor shifted = at::sub(x, x.amax({1}, true));
    at::Tensor index = target.unsqueeze(1);
    at::Tensor shifted_y = shifted.gather(1, index);
    at::Tensor e = shifted.exp_();
    at::Tensor sums = e.sum({1}, true);
    at::Tensor log_p = at::sub(shifted_y, sums.log()).squeeze(1);
    at::Tensor coef;
    if (kind == "focal") {
      const double gamma = param;
      at::Tensor q = at::expm1(log_p).neg();
      if (gamma == 0) {
        loss = log_p.neg();
        coef = at::full_like(log_p, -1.0);
      } else {
        at::Tensor focus = at::pow(q, gamma);
        loss = at::mul(focus.neg(), log_p);
        at::Tensor slope = log_p.exp().mul_(log_p);
        if (gamma != 1) slope.mul_(q.pow_(gamma - 1));
        coef = slope.mul_(gamma).sub_(focus);
      }
      if (alpha.has_value()) {
        at::Tensor weight = cast(*alpha, loss.scalar_type()).index({target});
        loss = at::mul(weight, loss);
        coef.mul_(weight);
      } else if (alpha_scalar != 1.0) {
        loss = loss.mul(alpha_scalar);
        coef.mul_(alpha_scalar);
      }
    } else if (kind == "poly1") {
      loss = at::sub(log_p.neg(), at::expm1(log_p).mul(param));
      coef = log_p.exp().mul_(-param).sub_(1);
    } else {
      throw std::invalid_argument("losskit target_prob_loss: unknown kind " + kind);
    }
    if (!valid.has_value()) {
      loss = losskit::reduce_loss(loss, reduction);
      if (reduction == "mean") coef.mul_(1.0 / static_cast<double>(std::max<int64_t>(x.size(0), 1)));
    } else {
      at::Tensor count = valid->sum();
      loss = losskit::reduce_loss(at::where(*valid, loss, at::Scalar(0.0)), reduction, count);
      if (reduction == "mean") coef.div_(count);
      coef = at::where(*valid, coef, at::Scalar(0.0));
    }
    if (!needs.empty() && needs[0]) {
      coef = coef.unsqueeze(1);
      grad = cast(e.mul_(at::div(coef.neg(), sums)).scatter_add_(1, index, coef), input.scalar_type());
    }
    loss = cast(loss, input.scalar_type());
  }
  return py::make_tuple(loss, grad.defined() ? py::cast(grad) : py::none());
}

}  // namespace

// ---- losskit.info's measures of probabilities, fused (kernels/row_divergence.py's info kinds) ----
// One pass over the rows of p (and q) makes losskit.info's value checks (distribution_ok's,
// in double), each element's term and the gradient, element by element with the roundings
// of the Python form's ATen ops, whose CPU kernels compute them the same way (xlogy is
// ATen's scalar loop, x * std::log(y), in the dtype's own arithmetic; division, sums and
// products of the half types are float operations rounded to the dtype, as c10's operators
// here). The cross-entropy reads log q made by ATen's vectorised log beforehand (a third of
// xlogy's scalar log's time), and writes its terms in its place; KL reads log p and log q
// so made, and writes its terms in log p's place:
//
//   info_ce       term = p where(p > 0, log q, 0)           grad q = -(p / q)
//   info_entropy  term = xlogy(p, p)                        grad p = -(xlogy(p != 0, p) + p / p)
//   info_kl       term = p where(p > 0, log p - log q, 0)   grad q = -where(p > 0, p, 0) / q
//
// The rows are then the terms' sum along the last dimension by ATen (negated for the
// entropies), as in the Python form.

namespace {

enum class InfoKind { kCrossEntropy, kEntropy, kKl };

// ATen's xlogy_kernel, element by element.
template <typename scalar_t>
inline scalar_t xlogy_of(scalar_t x, scalar_t y) {
  if (at::_isnan(y)) return NAN;
  if (x == 0) return 0;
  return x * std::log(y);
}

// The check's (eps, rel) for each dtype: see rows_ok.
template <typename scalar_t> struct CheckSlack { static constexpr double eps = 0x1p-24, rel = 0x1p-24; };
template <> struct CheckSlack<double> { static constexpr double eps = 0x1p-53, rel = 0x1p-53; };
template <> struct CheckSlack<at::BFloat16> { static constexpr double eps = 0x1p-24, rel = 0x1p-8; };
template <> struct CheckSlack<at::Half> { static constexpr double eps = 0x1p-24, rel = 0x1p-11; };

// One element of the pass: its term and gradient (see the comment above InfoKind).
template <InfoKind kind, typename scalar_t>
inline void info_element(scalar_t pv, scalar_t qv, scalar_t log_q, scalar_t& term, scalar_t& g) {
  if constexpr (kind == InfoKind::kEntropy) {
    term = xlogy_of(pv, pv);
    g = -(xlogy_of(pv != 0 ? static_cast<scalar_t>(1) : static_cast<scalar_t>(0), pv) + pv / pv);
  } else if constexpr (kind == InfoKind::kCrossEntropy) {  // term holds log q
    term = pv * (pv > 0 ? term : static_cast<scalar_t>(0));
    g = -(pv / qv);
  } else {  // term holds log p
    const bool positive = pv > 0;
    term = pv * (positive ? static_cast<scalar_t>(term - log_q) : static_cast<scalar_t>(0));
    g = static_cast<scalar_t>(-(positive ? pv : static_cast<scalar_t>(0))) / qv;
  }
}

// The pass over rows x n elements of contiguous p (and q: null for the entropy). With
// `check`, false where a value check would fail (then the outputs are not to be used).
// The kind is a template argument and each row sum has four partial sums (any order: the
// check's slack covers it), so that the loop stays tight.
template <InfoKind kind, typename scalar_t>
bool info_pass(const scalar_t* p, const scalar_t* q, const scalar_t* log_q, scalar_t* terms, scalar_t* grad,
               int64_t rows, int64_t n, bool check, double tol) {
  using Slack = CheckSlack<scalar_t>;
  constexpr bool two = kind != InfoKind::kEntropy;
  std::atomic<bool> ok{true};
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end && ok.load(std::memory_order_relaxed); ++r) {
      const int64_t base = r * n;
      const scalar_t* pr = p + base;
      const scalar_t* qr = two ? q + base : pr;
      const scalar_t* lr = kind == InfoKind::kKl ? log_q + base : pr;
      scalar_t* tr = terms + base;
      scalar_t* gr = grad != nullptr ? grad + base : nullptr;
      double sp[4] = {0.0, 0.0, 0.0, 0.0}, sq[4] = {0.0, 0.0, 0.0, 0.0};
      bool inside = true;
      for (int64_t c = 0; c < n; ++c) {
        const scalar_t pv = pr[c], qv = qr[c];
        const double pd = static_cast<double>(pv), qd = static_cast<double>(qv);
        inside &= (pd >= 0.0) & (pd <= 1.0) & (qd >= 0.0) & (qd <= 1.0);
        sp[c & 3] += pd;
        sq[c & 3] += qd;
        scalar_t term = tr[c], g;
        info_element<kind>(pv, qv, lr[c], term, g);
        tr[c] = term;
        if (gr != nullptr) gr[c] = g;
      }
      const double sum_p = (sp[0] + sp[1]) + (sp[2] + sp[3]), sum_q = (sq[0] + sq[1]) + (sq[2] + sq[3]);
      if (check && !(inside && sum_within(sum_p, n, tol, Slack::eps, Slack::rel) &&
                     sum_within(sum_q, n, tol, Slack::eps, Slack::rel))) {
        ok.store(false, std::memory_order_relaxed);
      }
    }
  });
  return ok.load();
}

// The rows and the gradient (undefined unless `want`) of losskit.info's `kind` ("info_ce",
// "info_entropy", "info_kl") of probabilities p (fixed) and q (the input; p itself for the
// entropy), rows along the last dimension; with `check`, first losskit.info's value checks
// of both (tolerance `tol`): false where they would fail. Undefined rows: not served here
// (not on the CPU, other shapes or dtypes).
std::pair<at::Tensor, at::Tensor> info_rows(const std::string& kind_name, const at::Tensor& p, const at::Tensor& q,
                                            bool want, bool check, double tol, bool* failed) {
  *failed = false;
  InfoKind kind;
  if (kind_name == "info_ce") {
    kind = InfoKind::kCrossEntropy;
  } else if (kind_name == "info_entropy") {
    kind = InfoKind::kEntropy;
  } else if (kind_name == "info_kl") {
    kind = InfoKind::kKl;
  } else {
    throw std::invalid_argument("losskit info_rows: unknown kind " + kind_name);
  }
  if (!p.is_cpu() || !q.is_cpu() || p.dim() == 0 || p.numel() == 0) return {};
  if (!p.sizes().equals(q.sizes()) || p.scalar_type() != q.scalar_type()) return {};
  // Strided inputs: the Python form's row sums would add each row in another order.
  if (!p.is_contiguous() || !q.is_contiguous()) return {};
  const at::ScalarType dtype = p.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 && dtype != at::kHalf) return {};
  // A half type's every op rounded to it element by element (the Python form's bits) takes
  // scalar conversions here: past a small batch the Python form's ATen ops are faster, and
  // serve it.
  if ((dtype == at::kBFloat16 || dtype == at::kHalf) && p.numel() > (1 << 16)) return {};
  at::Tensor pc = p.contiguous(), qc = q.contiguous();
  const int64_t n = pc.size(-1), rows = pc.numel() / n;
  at::Tensor terms = kind == InfoKind::kCrossEntropy ? at::log(qc)
                     : kind == InfoKind::kKl          ? at::log(pc)
                                                      : at::empty(pc.sizes(), pc.options());
  at::Tensor log_q = kind == InfoKind::kKl ? at::log(qc) : at::Tensor(), grad;
  if (want) grad = at::empty(pc.sizes(), pc.options());
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "losskit_info", [&] {
    const scalar_t* pp = pc.const_data_ptr<scalar_t>();
    const scalar_t* qp = qc.const_data_ptr<scalar_t>();  // p itself for the entropy
    const scalar_t* lq = log_q.defined() ? log_q.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* tp = terms.mutable_data_ptr<scalar_t>();
    scalar_t* gp = want ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    if (kind == InfoKind::kEntropy) {
      ok = info_pass<InfoKind::kEntropy>(pp, qp, lq, tp, gp, rows, n, check, tol);
    } else if (kind == InfoKind::kCrossEntropy) {
      ok = info_pass<InfoKind::kCrossEntropy>(pp, qp, lq, tp, gp, rows, n, check, tol);
    } else {
      ok = info_pass<InfoKind::kKl>(pp, qp, lq, tp, gp, rows, n, check, tol);
    }
  });
  if (!ok) {
    *failed = true;
    return {};
  }
  at::Tensor sums = terms.sum({-1});
  if (kind != InfoKind::kKl) sums.neg_();
  return {sums, grad};
}

// The everyday eager call of info.cross_entropy / entropy / kl_divergence of probabilities:
// the checks, the rows, and where the gradient of q is wanted (``want``) the autograd node
// (``node``: (node name, what, reference); see attach_one). None where a check would fail
// (the Python checks then raise) or for a call not served here.
py::object info_eager(const std::string& kind, const at::Tensor& p, const at::Tensor& q, double tol, bool want,
                      const py::object& node) {
  at::Tensor rows, grad;
  bool failed = false;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    std::tie(rows, grad) = info_rows(kind, p, q, want, true, tol, &failed);
  }
  if (!rows.defined()) return py::none();
  if (!want) return py::cast(rows);
  return py::cast(losskit::attach_one(node, rows, q, grad, true));
}

}  // namespace

// ---- the row divergences (kernels/row_divergence.py's row_divergence_forward) -----------------
// functional.js_divergence of a student against a fixed teacher and info.kl_divergence of
// checked probabilities, rows along the last dimension: the rows by the composed form's ops
// and the student's gradient kept from their terms, op for op as the Python form.

namespace {

at::Tensor log_softmax_last(const at::Tensor& x) {
  at::Tensor shifted = at::sub(x, x.amax({-1}, true));
  return at::sub(shifted, shifted.exp().sum({-1}, true).log());
}

// row_divergence_forward(input, target, labels, options=RowDivergenceOptions(kind,
// reduction, param, flag, ignore_index), needs) -> (loss, grad_input), or None.
py::object row_divergence(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& labels,
                          const std::string& kind, const std::string& reduction, double beta, bool from_logits,
                          int64_t ignore_index, const std::vector<bool>& needs) {
  if (!input.is_cpu() || !target.is_cpu() || (labels.has_value() && !labels->is_cpu())) return py::none();
  if (input.numel() == 0 || needs.empty()) return py::none();
  const bool info = kind == "info_kl" || kind == "info_ce" || kind == "info_entropy";
  if (kind != "js" && !info) throw std::invalid_argument("losskit row_divergence: unknown kind " + kind);
  at::Tensor loss, grad;
  if (info) {
    // from_logits here means: run losskit.info's value checks first (with the tolerance in
    // beta's place); where they would fail, decline, and the Python checks raise.
    bool failed = false;
    {
      py::gil_scoped_release release;
      at::NoGradGuard no_grad;
      std::tie(loss, grad) = info_rows(kind, target, input, needs[0], from_logits, beta, &failed);
    }
    if (!loss.defined()) return py::none();
  } else {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    at::ScalarType compute = at::promote_types(input.scalar_type(), target.scalar_type());
    const at::ScalarType out = compute;
    if (compute == at::kHalf || compute == at::kBFloat16) compute = at::kFloat;
    at::Tensor log_q = cast(input, compute), log_p = cast(target, compute);
    if (from_logits) {
      log_q = log_softmax_last(log_q);
      log_p = log_softmax_last(log_p);
    }
    at::Tensor q = beta != 0.0 || from_logits ? at::exp(log_q) : at::Tensor();
    at::Tensor rows;
    if (beta == 0.0) {
      at::Tensor p = log_p.exp();
      rows = at::mul(p, at::where(p.gt(0), at::sub(log_p, log_q), at::Scalar(0.0))).sum({-1});
      grad = p.neg_();
    } else if (beta == 1.0) {
      at::Tensor terms = at::mul(q, at::where(q.gt(0), at::sub(log_q, log_p), at::Scalar(0.0)));
      rows = terms.sum({-1});
      grad = terms.add_(q);
    } else {
      at::Tensor log_m = at::logaddexp(log_p.add(std::log(beta)), log_q.add(std::log(1.0 - beta)));
      at::Tensor p = log_p.exp();
      at::Tensor kl_p = at::mul(p, at::where(p.gt(0), at::sub(log_p, log_m), at::Scalar(0.0))).sum({-1});
      at::Tensor terms = at::mul(q, at::where(q.gt(0), at::sub(log_q, log_m), at::Scalar(0.0)));
      rows = at::add(kl_p.mul(beta), terms.sum({-1}).mul(1.0 - beta));
      grad = terms.mul_(1.0 - beta);
    }
    at::Tensor counted, count;
    if (labels.has_value()) {
      counted = labels->ne(ignore_index);
      rows = at::where(counted, rows, at::Scalar(0.0));
      count = counted.sum();
    }
    at::Tensor factor;
    double scalar = 1.0;
    if (reduction == "batchmean") {
      if (count.defined()) {
        loss = at::div(rows.sum(), count);
        factor = at::where(counted, count.reciprocal(), at::Scalar(0.0));
      } else {
        loss = rows.sum().div(rows.numel());
        scalar = 1.0 / static_cast<double>(std::max<int64_t>(rows.numel(), 1));
      }
    } else {
      loss = reduction == "sum" ? rows.sum() : rows;
      if (counted.defined()) factor = at::where(counted, at::Scalar(1.0), at::Scalar(0.0));
    }
    if (factor.defined()) {
      grad = grad.mul_(factor.unsqueeze(-1));
    } else if (scalar != 1.0) {
      grad = grad.mul_(scalar);
    }
    if (from_logits) grad = grad.sub_(at::mul(q, grad.sum({-1}, true)));
    loss = cast(loss, out);
    grad = needs[0] ? cast(grad, input.scalar_type()) : at::Tensor();
  }
  return py::make_tuple(loss, grad.defined() ? py::cast(grad) : py::none());
}

}  // namespace

void register_pointwise(py::module& m) {
  m.def("bf16_blocks_check", &bf16_blocks_check, "half_blocks.h's bfloat16 conversions beside c10's (a test hook)");
  m.def("pointwise_regression", &pointwise_regression,
        "the fused pointwise regression losses' forward (kernels/pointwise.py's pointwise_forward)");
  m.def("elementwise_loss", &elementwise_loss,
        "the fused element-wise likelihood losses' forward (kernels/likelihood.py's elementwise_forward)");
  m.def("target_prob_loss", &target_prob_loss,
        "the fused focal and poly-1 losses' forward (kernels/target_probability.py's target_prob_forward)");
  m.def("row_divergence", &row_divergence,
        "the fused row divergences' forward (kernels/row_divergence.py's row_divergence_forward)");
  m.def("distribution_ok", &distribution_ok, "whether losskit.info's distribution checks pass");
  m.def("logits_ok", &logits_ok, "whether losskit.info's logit checks pass");
  m.def("info_eager", &info_eager,
        "info.cross_entropy / entropy / kl_divergence of probabilities: checks, rows and autograd node in one call");
}
LOSSKIT_REGISTER(register_pointwise)
