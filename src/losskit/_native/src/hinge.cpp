// The compiled form of Keras's hinge and squared hinge (losskit/kernels/hinge.py's
// hinge_forward; see that file for the math). The Python form is eight ATen passes over the
// scores (the 0/1 test, the labels, the product, the clamp, the gradient); here one pass
// forms each element's term and gradient with the roundings of those ops, in the same order:
//
//   t' = t, or 2 t - 1 where every label is 0 or 1 (then exactly -1 or +1)
//   p = round(t' x)          torch.mul(t, input)
//   m = round(1 - p)         .neg_().add_(1.0): the negation is exact
//   h = m < 0 ? 0 : m        clamp_min(0.0), NaN kept
//   term = h, or round(h h)  torch.mul(h, h)
//   grad = round((m >= 0 ? t' : 0) k)         where(m >= 0, t, 0.0).mul_(-1 / n)
//   grad = round(round(h t') k)               torch.mul(h, t).mul_(-2 / n)
//
// round() is the tensor dtype's rounding of a float (none for float32: ATen computes the
// half types in float and rounds each op's result); k is the Python float -1 / n or -2 / n
// as ATen reads a scalar beside a float or half tensor: rounded to float. The rows are the
// terms' mean along the last dimension by ATen's own mean, as in the Python form. The build
// passes -ffp-contract=off, so every product is rounded before the sum that follows it, as
// ATen's element-wise kernels do.
//
// bfloat16 goes through half_blocks.h: blocks of kBlock elements whose conversions to float
// and back (c10's bits) vectorise, so one pass serves every size. float16 takes c10's
// per-element conversions (a scalar loop), faster than the Python form's eight ATen passes
// only up to about 2^16 elements (kLargestHalf): larger float16 calls are left to those.
#include "losskit_native.h"

#include <ATen/Parallel.h>

#include "half_blocks.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace py = pybind11;

namespace {

using losskit::half_blocks::kBlock;

// The most elements of a float16 call served here (see hinge_forward).
constexpr int64_t kLargestHalf = 1 << 16;

template <typename scalar_t>
inline float rounded(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}

template <>
inline float rounded<float>(float v) {
  return v;
}

// Python's binary_labels: every label == 0 or == 1 (NaN is neither). Reads blocks of
// labels without a branch per label (random labels would mispredict one), stopping after
// the first block that holds another label: with -1 / +1 labels, the first.
template <typename scalar_t>
bool all_binary(const scalar_t* t, int64_t n) {
  constexpr int64_t kLabels = 1024;
  for (int64_t start = 0; start < n; start += kLabels) {
    const int64_t end = std::min(n, start + kLabels);
    bool other = false;
    for (int64_t i = start; i < end; ++i) {
      float v;
      if constexpr (losskit::half_blocks::is_half<scalar_t>::value) {
        v = losskit::half_blocks::to_float<scalar_t>(t[i].x);  // c10's conversion, vectorised
      } else {
        v = static_cast<float>(t[i]);
      }
      other |= (v != 0.0f) & (v != 1.0f);
    }
    if (other) return false;
  }
  return true;
}

// ``binary`` a template argument: each loop is compiled for its labels, with no branch on a
// label inside (2 t - 1 is exact for t = 0 and 1).
template <typename scalar_t, bool squared, bool binary>
void hinge_pass(const scalar_t* x, const scalar_t* t, scalar_t* terms, scalar_t* grad, int64_t count, float k) {
  at::parallel_for(0, count, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float label = static_cast<float>(t[i]);
      if (binary) label = 2.0f * label - 1.0f;
      float p = rounded<scalar_t>(label * static_cast<float>(x[i]));
      float m = rounded<scalar_t>(1.0f - p);
      float h = m < 0.0f ? 0.0f : m;
      if (squared) {
        terms[i] = static_cast<scalar_t>(h * h);
        if (grad != nullptr) grad[i] = static_cast<scalar_t>(rounded<scalar_t>(h * label) * k);
      } else {
        terms[i] = static_cast<scalar_t>(h);
        if (grad != nullptr) grad[i] = static_cast<scalar_t>((m >= 0.0f ? label : 0.0f) * k);
      }
    }
  });
}

LOSSKIT_HALF_LOOPS_BEGIN
// bfloat16: kBlock elements, the bits of the 16-bit values in and out, each op's float
// result rounded to T as above (to_float(from_float(v))); a loop GCC vectorises whole.
template <typename T, bool squared, bool binary>
__attribute__((noinline)) void hinge_half_block(const uint16_t* __restrict x, const uint16_t* __restrict t, uint16_t* __restrict terms,
                             uint16_t* __restrict grad, float k) {
  using namespace losskit::half_blocks;
  for (int64_t i = 0; i < kBlock; ++i) {
    float label = to_float<T>(t[i]);
    if (binary) label = 2.0f * label - 1.0f;
    const float p = to_float<T>(from_float<T>(label * to_float<T>(x[i])));
    const float m = to_float<T>(from_float<T>(1.0f - p));
    const float h = m < 0.0f ? 0.0f : m;
    if (squared) {
      terms[i] = from_float<T>(h * h);
      grad[i] = from_float<T>(to_float<T>(from_float<T>(h * label)) * k);
    } else {
      terms[i] = from_float<T>(h);
      grad[i] = from_float<T>((m >= 0.0f ? label : 0.0f) * k);
    }
  }
}

template <typename T, bool squared, bool binary>
void hinge_half_pass(const T* x, const T* t, T* terms, T* grad, int64_t count, float k) {
  using losskit::half_blocks::bits_of;
  const int64_t blocks = (count + kBlock - 1) / kBlock;
  // 64 blocks (16384 elements) a task, as the float32 pass's grain.
  at::parallel_for(0, blocks, 64, [&](int64_t first, int64_t last) {
    alignas(64) uint16_t spare[kBlock];  // the gradient of a call that wants none
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * kBlock, size = std::min(kBlock, count - start);
      if (size == kBlock) {
        hinge_half_block<T, squared, binary>(bits_of(x + start), bits_of(t + start), bits_of(terms + start),
                                             grad != nullptr ? bits_of(grad + start) : spare, k);
        continue;
      }
      // The last, short block, through zero-padded copies.
      alignas(64) uint16_t xs[kBlock] = {}, ts[kBlock] = {}, hs[kBlock], gs[kBlock];
      std::memcpy(xs, x + start, size * sizeof(uint16_t));
      std::memcpy(ts, t + start, size * sizeof(uint16_t));
      hinge_half_block<T, squared, binary>(xs, ts, hs, gs, k);
      std::memcpy(static_cast<void*>(terms + start), hs, size * sizeof(uint16_t));
      if (grad != nullptr) std::memcpy(static_cast<void*>(grad + start), gs, size * sizeof(uint16_t));
    }
  });
}

LOSSKIT_HALF_LOOPS_END

template <typename scalar_t, bool squared>
void hinge_pass(const scalar_t* x, const scalar_t* t, scalar_t* terms, scalar_t* grad, int64_t count, bool binary,
                float k) {
  if constexpr (losskit::half_blocks::is_half<scalar_t>::value) {
    if (binary) {
      hinge_half_pass<scalar_t, squared, true>(x, t, terms, grad, count, k);
    } else {
      hinge_half_pass<scalar_t, squared, false>(x, t, terms, grad, count, k);
    }
  } else if (binary) {
    hinge_pass<scalar_t, squared, true>(x, t, terms, grad, count, k);
  } else {
    hinge_pass<scalar_t, squared, false>(x, t, terms, grad, count, k);
  }
}

// hinge_forward(input, target, options=HingeOptions(squared), needs) -> (rows, grad_input),
// or None for the calls left to the Python form (not on the CPU, other shapes or dtypes).
py::object hinge_forward(const at::Tensor& input, const at::Tensor& target, bool squared,
                         const std::vector<bool>& needs) {
  if (!input.is_cpu() || !target.is_cpu() || input.dim() == 0 || input.numel() == 0) return py::none();
  if (!input.sizes().equals(target.sizes()) || input.scalar_type() != target.scalar_type()) return py::none();
  // Strided inputs: the Python form's row means would add each row in another order.
  if (!input.is_contiguous() || !target.is_contiguous()) return py::none();
  const at::ScalarType dtype = input.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) return py::none();
  // float16's every op rounded to it element by element (the Python form's bits) takes a
  // scalar conversion per op here: past a small batch the Python form's vectorised ATen ops
  // are faster, and serve it.
  if (dtype == at::kHalf && input.numel() > kLargestHalf) return py::none();
  const bool want = !needs.empty() && needs[0];
  at::Tensor rows, grad;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    at::Tensor x = input.contiguous(), t = target.contiguous();
    const int64_t count = x.numel(), n = x.size(-1);
    at::Tensor terms = at::empty(x.sizes(), x.options());
    if (want) grad = at::empty(x.sizes(), x.options());
    // Python: mul_(-2.0 / n) / mul_(-1.0 / n), a double read as float beside these dtypes.
    const float k = static_cast<float>((squared ? -2.0 : -1.0) / static_cast<double>(n));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "losskit_hinge", [&] {
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const bool binary = all_binary(tp, count);
      scalar_t* gp = want ? grad.mutable_data_ptr<scalar_t>() : nullptr;
      if (squared) {
        hinge_pass<scalar_t, true>(x.const_data_ptr<scalar_t>(), tp, terms.mutable_data_ptr<scalar_t>(), gp, count,
                                   binary, k);
      } else {
        hinge_pass<scalar_t, false>(x.const_data_ptr<scalar_t>(), tp, terms.mutable_data_ptr<scalar_t>(), gp, count,
                                    binary, k);
      }
    });
    rows = terms.mean({-1});
  }
  return py::make_tuple(rows, grad.defined() ? py::cast(grad) : py::none());
}

// The everyday eager call of keras.hinge / squared_hinge whole: hinge_forward and, where a
// gradient is made, the autograd node (``node``: (node name, what, reference); see
// attach_one). None where hinge_forward declines.
py::object hinge_eager(const at::Tensor& input, const at::Tensor& target, bool squared, bool want,
                       const py::object& node) {
  py::object made = hinge_forward(input, target, squared, {want});
  if (made.is_none() || !want) return made.is_none() ? made : made.cast<py::tuple>()[0];
  auto out = made.cast<py::tuple>();
  return py::cast(losskit::attach_one(node, out[0].cast<at::Tensor>(), input, out[1].cast<at::Tensor>(), true));
}

}  // namespace

void register_hinge(py::module& m) {
  m.def("hinge_forward", &hinge_forward, "Keras's hinge losses' forward (kernels/hinge.py's hinge_forward)");
  m.def("hinge_eager", &hinge_eager, "keras.hinge / squared_hinge's eager call, with its autograd node");
}
LOSSKIT_REGISTER(register_hinge)
