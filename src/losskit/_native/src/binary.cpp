// The binary losses' kernels in C++ (see losskit/kernels/binary_cross_entropy.py).
//
// Each function is the Python kernel's ATen op sequence, op for op, so that it gives the
// same bits: only the cost of dispatching each op from Python (5-10 us) goes. A call it
// does not serve (not on the CPU, or the Triton kernel's) returns None and the Python
// kernel runs instead.
#include "losskit_native.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <optional>
#include <tuple>
#include <utility>
#include <string>
#include <vector>

namespace {

using OptTensor = std::optional<at::Tensor>;
// (loss, gradient of input or None), or None: the call is left to the Python kernel.
using Made = std::optional<std::vector<OptTensor>>;

// result_dtypes: half precision computes in float32.
at::ScalarType compute_type(const at::Tensor& t) {
  auto type = t.scalar_type();
  return (type == at::kHalf || type == at::kBFloat16) ? at::kFloat : type;
}

// Tensor.to(dtype): the tensor itself when it already has that dtype.
at::Tensor as(const at::Tensor& t, at::ScalarType type) { return t.scalar_type() == type ? t : t.to(type); }

// A number as a 0-dimensional tensor of the compute dtype: an op with a Python number
// (1.0 - y, grad * scale) wraps it in a double tensor and casts that on every call, which
// costs more than the op itself on a small batch; the arithmetic, and so every bit, is the
// same.
at::Tensor number(double value, const at::Tensor& like) { return at::scalar_tensor(value, like.options()); }

// reduce_loss: 'mean' is what aten's mean does on the CPU, the sum divided by the count.
at::Tensor reduce(const at::Tensor& loss, const std::string& reduction) {
  if (reduction == "sum") return loss.sum();
  if (reduction == "mean") return loss.sum().div_(number(static_cast<double>(loss.numel()), loss));
  return loss;
}

// How a weight is read in a written-out loop over a contiguous input of ``like``'s shape:
// 0 absent, 1 one number, 2 one per column of the last dimension (broadcast from the
// right), 3 one per element; -1 for any other layout, which takes the ATen ops instead.
int weight_kind(const at::Tensor& w, const at::Tensor& like, int64_t cols) {
  if (!w.defined()) return 0;
  if (w.scalar_type() != like.scalar_type() || !w.is_contiguous()) return -1;
  if (w.numel() == 1) return 1;
  if (w.sizes() == like.sizes()) return 3;
  if (w.numel() == cols && w.dim() >= 1 && w.size(-1) == cols) return 2;
  return -1;
}

template <typename T>
inline T weight_at(const T* w, int kind, int64_t i, int64_t cols) {
  return kind == 1 ? w[0] : (kind == 2 ? w[i % cols] : w[i]);
}

// Whether the arithmetic between the transcendental ops may run as one written-out loop:
// contiguous float or double operands. Each step is still one IEEE operation rounded to
// the dtype (no fused multiply-add: the build passes -ffp-contract=off), so the bits are
// those of the ATen op sequence, which ATen's kernels also round once per op.
bool written_out(const at::Tensor& x, const at::Tensor& y, int wk, int pk) {
  const auto type = x.scalar_type();
  return (type == at::kFloat || type == at::kDouble) && y.scalar_type() == type && x.is_contiguous() &&
         y.is_contiguous() && x.sizes() == y.sizes() && wk >= 0 && pk >= 0;
}

// _bce_with_logits_chunk: (loss, gradient or undefined) of a chunk in the compute dtype.
// ``loss_into`` / ``grad_into``, when defined, are where the written-out loop puts its
// results (contiguous, of x's shape and dtype): the chunked caller's output rows, which
// saves copying each chunk there.
std::pair<at::Tensor, at::Tensor> bce_with_logits_chunk(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w,
                                                        const at::Tensor& pw, bool with_grad, double scale,
                                                        at::Tensor loss_into = at::Tensor(),
                                                        at::Tensor grad_into = at::Tensor()) {
  const int64_t cols = x.dim() ? x.size(-1) : 1;
  const int wk = weight_kind(w, x, cols), pk = weight_kind(pw, x, cols);
  if (written_out(x, y, wk, pk)) {
    // The transcendental ops as ATen's; the arithmetic around them in one loop, in place
    // in their results: loss = (1 - y) x - lw log_sigmoid, grad = (1 - y) - lw sigmoid(-x).
    at::Tensor lw;
    if (pw.defined()) lw = at::addcmul(at::sub(number(1.0, y), y), pw, y);
    at::Tensor loss = loss_into.defined() ? loss_into : at::empty_like(x);
    at::Tensor buffer = at::empty({0}, x.options());
    at::log_sigmoid_forward_out(loss, buffer, x);
    at::Tensor grad;
    if (with_grad) {
      grad = grad_into.defined() ? grad_into : at::empty_like(x);
      if (lw.defined()) {
        at::log_sigmoid_backward_out(grad, lw, x, buffer);
      } else {
        at::sigmoid_out(grad, x.neg());
      }
    }
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "losskit_bce_with_logits", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* lwp = lw.defined() ? lw.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* wp = wk ? w.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
      scalar_t* gp = with_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t factor = static_cast<scalar_t>(scale);
      // Element by element, so the threads' split changes no bit.
      at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t not_y = scalar_t(1) - yp[i];
          const scalar_t linear = not_y * xp[i];
          const scalar_t weighted = lwp ? lp[i] * lwp[i] : lp[i];
          scalar_t l = linear - weighted;
          if (wp) l = l * weight_at(wp, wk, i, cols);
          lp[i] = l;
          if (gp) {
            scalar_t g = not_y - gp[i];
            if (wp) g = g * weight_at(wp, wk, i, cols);
            if (scale != 1.0) g = g * factor;
            gp[i] = g;
          }
        }
      });
    });
    return {loss, grad};
  }
  at::Tensor not_y = at::sub(number(1.0, y), y);
  at::Tensor lw;
  if (pw.defined()) lw = at::addcmul(not_y, pw, y);
  auto [log_sigmoid, buffer] = at::log_sigmoid_forward(x);
  at::Tensor loss = at::mul(not_y, x).sub_(lw.defined() ? log_sigmoid.mul_(lw) : log_sigmoid);
  if (w.defined()) loss.mul_(w);
  if (!with_grad) return {loss, at::Tensor()};
  at::Tensor sigmoid_neg = lw.defined() ? at::log_sigmoid_backward(lw, x, buffer) : at::sigmoid(x.neg());
  at::Tensor grad = not_y.sub_(sigmoid_neg);
  if (w.defined()) grad.mul_(w);
  if (scale != 1.0) grad.mul_(number(scale, grad));
  return {loss, grad};
}

// bce_with_logits_forward: one chunk for a small input, else chunks of rows of the last
// dimension, as the Python kernel (the chunk edges matter for the bits: ATen computes a
// loop's tail past its last full vector with its scalar code).
Made bce_with_logits(const at::Tensor& input, const at::Tensor& target, const OptTensor& weight,
                     const OptTensor& pos_weight, const std::string& reduction, int64_t chunk,
                     const std::vector<bool>& needs) {
  if (!input.is_cpu() || chunk <= 0 || input.numel() == 0) return std::nullopt;
  at::NoGradGuard no_grad;
  const auto compute = compute_type(input);
  const auto dtype = input.scalar_type();
  const auto shape = input.sizes();
  const int64_t cols = input.dim() ? input.size(-1) : 1;
  const int64_t n = input.numel();
  const double scale = reduction == "mean" ? 1.0 / static_cast<double>(n) : 1.0;
  const int64_t step = std::max<int64_t>(1, chunk / std::max<int64_t>(cols, 1));
  const bool with_grad = !needs.empty() && needs[0];
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_pw = pos_weight.has_value() && pos_weight->defined();
  std::vector<OptTensor> out;
  if (n <= step * cols) {
    auto [loss, grad] = bce_with_logits_chunk(as(input, compute), as(target, compute),
                                              has_w ? as(*weight, compute) : at::Tensor(),
                                              has_pw ? as(*pos_weight, compute) : at::Tensor(), with_grad, scale);
    out.push_back(as(reduce(loss, reduction), dtype));
    out.push_back(grad.defined() ? OptTensor(as(grad, dtype)) : std::nullopt);
    return out;
  }
  const at::Tensor x = input.reshape({-1, cols});
  const at::Tensor y = target.reshape({-1, cols});
  at::Tensor w, pw;
  if (has_w) w = as(*weight, compute).expand(shape).reshape({-1, cols});
  if (has_pw) pw = as(*pos_weight, compute).expand(shape).reshape({-1, cols});
  at::Tensor loss = at::empty(x.sizes(), x.options().dtype(compute));
  at::Tensor grad;
  if (with_grad) grad = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0);
  // A float input's rows are computed in place in the outputs (x is then contiguous, so its
  // row slices are too); a half one's in float32, converted into them.
  const bool in_place = dtype == compute && x.is_contiguous();
  for (int64_t start = 0; start < rows; start += step) {
    const int64_t end = std::min(start + step, rows);
    at::Tensor loss_rows = loss.slice(0, start, end);
    at::Tensor grad_rows = with_grad ? grad.slice(0, start, end) : at::Tensor();
    auto [chunk_loss, chunk_grad] = bce_with_logits_chunk(
        as(x.slice(0, start, end), compute), as(y.slice(0, start, end), compute),
        w.defined() ? w.slice(0, start, end) : at::Tensor(), pw.defined() ? pw.slice(0, start, end) : at::Tensor(),
        with_grad, scale, in_place ? loss_rows : at::Tensor(), in_place ? grad_rows : at::Tensor());
    if (!chunk_loss.is_same(loss_rows)) loss_rows.copy_(chunk_loss);
    if (with_grad && !chunk_grad.is_same(grad_rows)) grad_rows.copy_(chunk_grad);
  }
  out.push_back(as(reduce(loss.view(shape), reduction), dtype));
  out.push_back(grad.defined() ? OptTensor(grad.view(shape)) : std::nullopt);
  return out;
}

// bce_forward: binary cross-entropy on probabilities, torch's clamps, the gradient of the
// input written out (finite at p = 0 or 1).
Made bce(const at::Tensor& input, const at::Tensor& target, const OptTensor& weight, const std::string& reduction,
         const std::vector<bool>& needs) {
  if (!input.is_cpu()) return std::nullopt;
  at::NoGradGuard no_grad;
  const auto compute = compute_type(input);
  const at::Tensor x = as(input, compute);
  const at::Tensor y = as(target, compute);
  at::Tensor w;
  if (weight.has_value() && weight->defined()) w = as(*weight, compute);
  const int64_t cols = x.dim() ? x.size(-1) : 1;
  const int wk = weight_kind(w, x, cols);
  const bool with_grad = !needs.empty() && needs[0];
  std::vector<OptTensor> out;
  if (written_out(x, y, wk, 0)) {
    // The logs as ATen's; the clamps and the arithmetic in one loop, in place in the logs'
    // results and one gradient buffer.
    at::Tensor loss = at::log1p(x.neg());
    at::Tensor log_p = at::log(x);
    at::Tensor grad = with_grad ? at::empty_like(x) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "losskit_bce", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* wp = wk ? w.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* pp = log_p.const_data_ptr<scalar_t>();
      scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
      scalar_t* gp = with_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t floor = static_cast<scalar_t>(-100.0), tiny = static_cast<scalar_t>(1e-12);
      const scalar_t count = static_cast<scalar_t>(static_cast<double>(x.numel()));
      const bool mean = reduction == "mean";
      // Element by element, so the threads' split changes no bit.
      at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          // clamp_min as aten's: max(v, floor), a nan stays nan.
          const scalar_t log_1mp = lp[i] < floor ? floor : lp[i];
          const scalar_t log_pi = pp[i] < floor ? floor : pp[i];
          const scalar_t negative = (scalar_t(1) - yp[i]) * log_1mp;
          const scalar_t positive = yp[i] * log_pi;
          scalar_t l = -(negative + positive);
          if (wp) l = l * weight_at(wp, wk, i, cols);
          lp[i] = l;
          if (gp) {
            const scalar_t diff = xp[i] - yp[i];
            scalar_t denominator = (scalar_t(1) - xp[i]) * xp[i];
            denominator = denominator < tiny ? tiny : denominator;
            scalar_t g = diff / denominator;
            if (wp) g = g * weight_at(wp, wk, i, cols);
            if (mean) g = g / count;
            gp[i] = g;
          }
        }
      });
    });
    out.push_back(as(reduce(loss, reduction), input.scalar_type()));
    out.push_back(grad.defined() ? OptTensor(as(grad, input.scalar_type())) : std::nullopt);
    return out;
  }
  const at::Tensor one = number(1.0, x);
  at::Tensor log_p = at::log(x).clamp_min_(-100.0);
  at::Tensor log_1mp = at::log1p(x.neg()).clamp_min_(-100.0);
  at::Tensor loss = at::sub(one, y).mul_(log_1mp).add_(at::mul(y, log_p)).neg_();
  if (w.defined()) loss.mul_(w);
  at::Tensor grad;
  if (with_grad) {
    grad = at::sub(x, y).div_(at::sub(one, x).mul_(x).clamp_min_(1e-12));
    if (w.defined()) grad.mul_(w);
    if (reduction == "mean") grad.div_(number(static_cast<double>(input.numel()), grad));
    grad = as(grad, input.scalar_type());
  }
  out.push_back(as(reduce(loss, reduction), input.scalar_type()));
  out.push_back(grad.defined() ? OptTensor(grad) : std::nullopt);
  return out;
}

// Whether every element of a CPU floating-point tensor lies in [0, 1] (NaN does not), read
// in place: the check of check_in_unit_interval without its half a dozen dispatched ops.
// False for anything it cannot read so (then the Python check runs and names the value).
bool in_unit_interval(const at::Tensor& t) {
  if (!t.is_cpu() || !t.is_floating_point() || t.is_complex()) return false;
  const at::Tensor c = t.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "losskit_in_unit_interval", [&] {
    const scalar_t* data = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = c.numel(); i < n; ++i) {
      const auto v = static_cast<at::opmath_type<scalar_t>>(data[i]);
      if (!(v >= 0 && v <= 1)) {
        ok = false;
        break;
      }
    }
  });
  return ok;
}

}  // namespace

void register_binary(pybind11::module& m) {
  m.def("binary_cross_entropy_with_logits", &bce_with_logits, "the CPU kernel of bce_with_logits_forward");
  m.def("binary_cross_entropy", &bce, "the CPU kernel of bce_forward");
  m.def("in_unit_interval", &in_unit_interval, "every element of a CPU float tensor in [0, 1], NaN not");
}
LOSSKIT_REGISTER(register_binary)
