// The compiled forms of the fused soft margin losses (losskit/kernels/soft_margin.py's
// soft_margin_forward and multilabel_soft_margin_forward; the math is written out there).
//
// The Python forms are a dozen ATen passes over the logits; here, block by block (kBlock
// elements, or whole rows of the multilabel input, the blocks shared among the threads), one
// loop writes -|z| into a float32 block (z = -y x, or x), ATen's exp_ and log1p run on it
// (their vectorised kernels give other bits than std::exp / std::log1p, so they are called,
// not rewritten; they give an element the same bits wherever it lies in a tensor, the last
// partial vector being loaded partially, so a block gets the Python form's bits on the whole
// tensor), and a second loop forms each element's term and gradients with the roundings of
// the Python form's ops, in their order:
//
//   soft_margin:   z = -(y x)               torch.mul(y, x).neg_()
//                  term = max(z, 0) + L     z.clamp_min(0).add_(L)   (NaN kept)
//                  s = (z >= 0 ? 1 : e) / (e + 1)                    where(...).div_(e.add_(1.0))
//                  dx = (y s) (-k)   dy = (x s) (-k)                 torch.mul(y, s).mul_(-k)
//   multilabel:    term = (x >= 0 ? (1 - y) x : -(y x)) + L, times w
//                  dx = (((1 - y) a - b y) / (e + 1)) w k,  (a, b) = x >= 0 ? (1, e) : (e, 1)
//                  dy = (x w) (-k)
//
// Every value is a float: the half types are read into float32 (exactly, as ATen's cast
// does) and the loss and gradients rounded once to them at the end, as the Python form
// does. k is the Python double 1 / n as ATen reads a scalar beside a float32 tensor:
// rounded to float. The sums are ATen's (sum along the last dimension, mean, sum) on the
// float32 terms, so they add in the Python form's order. The build passes
// -ffp-contract=off, so every product is rounded before the sum that follows it, as ATen's
// element-wise kernels do.
//
// Served: eager CPU calls on contiguous tensors of one dtype (float32, bfloat16, float16)
// and one shape (multilabel: [N, C], with a weight of that dtype that broadcasts to it).
// Anything else returns None and takes the Python form.
#include "losskit_native.h"
#include "half_blocks.h"  // the bit helpers

#include <ATen/Parallel.h>
#include <ATen/ScalarOps.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;
namespace hb = losskit::half_blocks;

namespace {

// Elements of a block: -|z|, e and L of a block (float32) stay in a core's cache between the
// passes, so that memory sees the inputs read, the terms and gradients written, once each.
constexpr int64_t kBlock = 1 << 13;

bool served_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

bool served_pair(const at::Tensor& input, const at::Tensor& target) {
  return input.is_cpu() && target.is_cpu() && input.numel() > 0 && input.sizes().equals(target.sizes()) &&
         input.scalar_type() == target.scalar_type() && served_dtype(input.scalar_type()) && input.is_contiguous() &&
         target.is_contiguous();
}

bool wants(const std::vector<bool>& needs, size_t i) { return needs.size() > i && needs[i]; }

py::object loss_and_grads(const at::Tensor& loss, const at::Tensor& gx, const at::Tensor& gy) {
  return py::make_tuple(loss, gx.defined() ? py::cast(gx) : py::none(), gy.defined() ? py::cast(gy) : py::none());
}

// e = exp(-|z|) in place of ``tail`` (which holds -|z|), and L = log1p(e) into ``out``: ATen's
// kernels on a contiguous float32 block. Their vectorised loops give each element the same
// bits wherever it lies in the tensor (the last, partial vector is loaded partially, not
// computed by the scalar function), so a block gives the Python form's bits on the whole
// tensor (tests/test_fused_soft_margin.py, with blocks ending mid-vector).
void exp_and_log1p(at::Tensor& tail, at::Tensor& out) {
  tail.exp_();
  at::log1p_out(out, tail);
}

// Float tests and selects written on the bits, so that GCC emits no branch for them (it
// keeps a float comparison's ?: as a branch under the default -ftrapping-math, and the
// random signs of y x mispredict it about every other element: the soft_margin forward at
// 2048x1024 took 34 ms on one thread, 20 of them in these loops). Each gives the float
// comparison's answer for every value, NaN and -0 included (the bit helpers are
// half_blocks.h's).

// v < 0: the sign bit set, above -0 and at most -inf (the negative NaNs lie above it).
inline uint32_t is_negative(float v) {
  const uint32_t u = hb::to_bits(v);
  return static_cast<uint32_t>(u > UINT32_C(0x80000000)) & static_cast<uint32_t>(u <= UINT32_C(0xFF800000));
}

// v >= 0: +0 up to +inf, or -0 (NaN is neither).
inline uint32_t is_non_negative(float v) {
  const uint32_t u = hb::to_bits(v);
  return static_cast<uint32_t>(u <= UINT32_C(0x7F800000)) | static_cast<uint32_t>(u == UINT32_C(0x80000000));
}

template <typename scalar_t>
void soft_margin_pass(const scalar_t* x, const scalar_t* y, const float* e, float* terms, scalar_t* gx,
                      scalar_t* gy, int64_t count, float neg_k) {
  for (int64_t i = 0; i < count; ++i) {
    const float xv = static_cast<float>(x[i]), yv = static_cast<float>(y[i]);
    const float z = -(yv * xv);
    const float ev = e[i];
    terms[i] = hb::select(hb::mask_if(is_negative(z)), 0.0f, z) + terms[i];  // z < 0 ? 0 : z, plus L
    if (gx == nullptr && gy == nullptr) continue;
    const float s = hb::select(hb::mask_if(is_non_negative(z)), 1.0f, ev) / (ev + 1.0f);  // (z >= 0 ? 1 : e) / (e + 1)
    if (gx != nullptr) gx[i] = static_cast<scalar_t>((yv * s) * neg_k);
    if (gy != nullptr) gy[i] = static_cast<scalar_t>((xv * s) * neg_k);
  }
}

// soft_margin_forward(input, target, options=SoftMarginOptions(reduction), needs) ->
// (loss, d input, d target), or None (not served).
py::object soft_margin_forward(const at::Tensor& input, const at::Tensor& target, const std::string& reduction,
                               const std::vector<bool>& needs) {
  if (!served_pair(input, target)) return py::none();
  const bool want_x = wants(needs, 0), want_y = wants(needs, 1);
  at::Tensor loss, gx, gy;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    const int64_t count = input.numel();
    at::Tensor tail = at::empty({count}, input.options().dtype(at::kFloat));  // the terms
    if (want_x) gx = at::empty_like(input);
    if (want_y) gy = at::empty_like(target);
    // Python: mul_(-k) with k = 1 / n for 'mean', else 1: a double read as float.
    const double k = reduction == "mean" ? 1.0 / static_cast<double>(count) : 1.0;
    const float neg_k = static_cast<float>(-k);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "losskit_soft_margin", [&] {
      const scalar_t* xp = input.const_data_ptr<scalar_t>();
      const scalar_t* yp = target.const_data_ptr<scalar_t>();
      scalar_t* gxp = want_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gyp = want_y ? gy.mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t blocks = (count + kBlock - 1) / kBlock;
      at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
        at::NoGradGuard no_grad;  // grad mode is per thread
        for (int64_t b = first; b < last; ++b) {
          const int64_t begin = b * kBlock, size = std::min(count, begin + kBlock) - begin;
          at::Tensor block = at::empty({size}, tail.options());
          float* tp = block.mutable_data_ptr<float>();
          for (int64_t i = 0; i < size; ++i) {
            const float z = -(static_cast<float>(yp[begin + i]) * static_cast<float>(xp[begin + i]));
            tp[i] = -std::fabs(z);
          }
          at::Tensor terms = tail.slice(0, begin, begin + size);
          exp_and_log1p(block, terms);
          soft_margin_pass<scalar_t>(xp + begin, yp + begin, tp, terms.mutable_data_ptr<float>(),
                                     gxp == nullptr ? nullptr : gxp + begin, gyp == nullptr ? nullptr : gyp + begin,
                                     size, neg_k);
        }
      });
      loss = losskit::reduce_loss(reduction == "none" ? tail.view(input.sizes()) : tail, reduction);
    });
    if (loss.scalar_type() != input.scalar_type()) loss = loss.to(input.scalar_type());
  }
  return loss_and_grads(loss, gx, gy);
}

// Rows [first, last) of the multilabel terms and gradients; ``e``: their exp(-|x|), from the
// block's first element; ``terms``: their L, replaced by the terms.
template <typename scalar_t>
void multilabel_pass(const scalar_t* x, const scalar_t* y, const scalar_t* w, int64_t w_row_stride,
                     const float* e, float* terms, scalar_t* gx, scalar_t* gy, int64_t first, int64_t last,
                     int64_t classes, float k, float neg_k) {
  for (int64_t r = first; r < last; ++r) {
    const scalar_t* wr = w == nullptr ? nullptr : w + r * w_row_stride;
    for (int64_t c = 0, i = r * classes; c < classes; ++c, ++i) {
      const int64_t j = i - first * classes;
      const float xv = static_cast<float>(x[i]), yv = static_cast<float>(y[i]);
      const float ev = e[j];
      const uint32_t positive = hb::mask_if(is_non_negative(xv));  // x >= 0
      const float not_y = 1.0f - yv;
      float term = hb::select(positive, not_y * xv, -(yv * xv)) + terms[i];  // terms holds L
      const float wv = wr == nullptr ? 1.0f : static_cast<float>(wr[c]);
      if (wr != nullptr) term = term * wv;
      terms[i] = term;
      if (gx != nullptr) {
        const float a = hb::select(positive, 1.0f, ev), b = hb::select(positive, ev, 1.0f);
        float g = (not_y * a - b * yv) / (ev + 1.0f);
        if (wr != nullptr) g = g * wv;
        gx[i] = static_cast<scalar_t>(g * k);
      }
      if (gy != nullptr) gy[i] = static_cast<scalar_t>((wr != nullptr ? xv * wv : xv) * neg_k);
    }
  }
}

// multilabel_soft_margin_forward(input, target, weight, options=SoftMarginOptions(reduction),
// needs) -> (loss, d input, d target), or None (not served).
py::object multilabel_soft_margin_forward(const at::Tensor& input, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight, const std::string& reduction,
                                          const std::vector<bool>& needs) {
  if (input.dim() != 2 || !served_pair(input, target)) return py::none();
  const int64_t rows = input.size(0), classes = input.size(1);
  at::Tensor w;
  int64_t w_row_stride = 0;
  if (weight.has_value()) {
    const at::Tensor& given = *weight;
    if (!given.is_cpu() || given.scalar_type() != input.scalar_type() || given.dim() > 2) return py::none();
    for (int64_t d = 1; d <= given.dim(); ++d) {
      const int64_t size = given.size(-d);
      if (size != 1 && size != input.size(-d)) return py::none();  // would enlarge the result
    }
    w = given.expand({rows, classes});
    if (w.stride(1) != 1 || (w.stride(0) != 0 && w.stride(0) != classes)) w = w.contiguous();
    w_row_stride = w.stride(0);
  }
  const bool want_x = wants(needs, 0), want_y = wants(needs, 1);
  at::Tensor loss, gx, gy;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    at::Tensor tail = at::empty(input.sizes(), input.options().dtype(at::kFloat));
    if (want_x) gx = at::empty_like(input);
    if (want_y) gy = at::empty_like(target);
    const double k = reduction == "mean" ? 1.0 / static_cast<double>(classes * rows) : 1.0 / classes;
    const float kf = static_cast<float>(k), neg_k = static_cast<float>(-k);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "losskit_multilabel_soft_margin",
                                    [&] {
      const scalar_t* xp = input.const_data_ptr<scalar_t>();
      const scalar_t* yp = target.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* gxp = want_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gyp = want_y ? gy.mutable_data_ptr<scalar_t>() : nullptr;
      float* all = tail.mutable_data_ptr<float>();
      const int64_t per_block = std::max<int64_t>(1, kBlock / classes);
      const int64_t blocks = (rows + per_block - 1) / per_block;
      at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
        at::NoGradGuard no_grad;  // grad mode is per thread
        for (int64_t b = first_block; b < last_block; ++b) {
          const int64_t first = b * per_block, last = std::min(rows, first + per_block);
          const int64_t begin = first * classes, size = (last - first) * classes;
          at::Tensor block = at::empty({size}, tail.options());
          float* tp = block.mutable_data_ptr<float>();
          for (int64_t i = 0; i < size; ++i) tp[i] = -std::fabs(static_cast<float>(xp[begin + i]));
          at::Tensor terms = tail.view({-1}).slice(0, begin, begin + size);
          exp_and_log1p(block, terms);
          multilabel_pass<scalar_t>(xp, yp, wp, w_row_stride, tp, all, gxp, gyp, first, last, classes, kf, neg_k);
        }
      });
      at::Tensor terms = tail;
      // Python's `/ classes` divides by a wrapped-number tensor: the same kernel here.
      at::Tensor per_row = terms.sum(-1).div(at::native::wrapped_scalar_tensor(at::Scalar(classes), terms.device()));
      loss = losskit::reduce_loss(per_row, reduction);
    });
    if (loss.scalar_type() != input.scalar_type()) loss = loss.to(input.scalar_type());
  }
  return loss_and_grads(loss, gx, gy);
}

// The everyday eager call whole, where only the input wants a gradient: the forward above
// and the autograd node (``node``: (node name, what, reference of the input alone); see
// attach_one). None where the forward declines.
py::object soft_margin_eager(const at::Tensor& input, const at::Tensor& target, const std::string& reduction,
                             bool want, const py::object& node) {
  py::object made = soft_margin_forward(input, target, reduction, {want, false});
  if (made.is_none() || !want) return made.is_none() ? made : made.cast<py::tuple>()[0];
  auto out = made.cast<py::tuple>();
  return py::cast(
      losskit::attach_one(node, out[0].cast<at::Tensor>(), input, out[1].cast<at::Tensor>(), reduction == "none"));
}

py::object multilabel_soft_margin_eager(const at::Tensor& input, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight, const std::string& reduction,
                                        bool want, const py::object& node) {
  py::object made = multilabel_soft_margin_forward(input, target, weight, reduction, {want, false});
  if (made.is_none() || !want) return made.is_none() ? made : made.cast<py::tuple>()[0];
  auto out = made.cast<py::tuple>();
  return py::cast(
      losskit::attach_one(node, out[0].cast<at::Tensor>(), input, out[1].cast<at::Tensor>(), reduction == "none"));
}

}  // namespace

void register_soft_margin(py::module& m) {
  m.def("soft_margin_forward", &soft_margin_forward, "soft_margin's fused forward (kernels/soft_margin.py)");
  m.def("multilabel_soft_margin_forward", &multilabel_soft_margin_forward,
        "multilabel_soft_margin's fused forward (kernels/soft_margin.py)");
  m.def("soft_margin_eager", &soft_margin_eager, "soft_margin_loss's eager call, with its autograd node");
  m.def("multilabel_soft_margin_eager", &multilabel_soft_margin_eager,
        "multilabel_soft_margin_loss's eager call, with its autograd node");
}
LOSSKIT_REGISTER(register_soft_margin)
