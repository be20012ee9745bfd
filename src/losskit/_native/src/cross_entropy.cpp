// The compiled forms of the class-index cross-entropy and nll_loss kernels for eager CPU
// calls (see losskit/kernels/cross_entropy.py), and the one-pass check of their targets.
//
// Each forward is the Python kernel's ATen op sequence, op by op, in the same order and
// with the same operands (a Python float stays a double Scalar, a tensor stays a tensor):
// bit for bit the same loss and gradient (tests/test_native.py, test_native_cross_entropy.py),
// at ~1 us an op instead of ~6 from Python. What they do not serve they decline (None),
// and the Python kernel runs: another device, float64, soft-capping, temperature, the
// z-loss, and batches the CPU kernel would take in several chunks.
#include "losskit_native.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace py = pybind11;
using at::Tensor;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// A coefficient of kernels.rows: a Python float or a tensor, kept as what it is there so
// that each op sees the same operands as in Python.
struct Value {
  std::optional<Tensor> t;
  double d = 0.0;
  static Value of(double v) { return Value{std::nullopt, v}; }
  static Value of(Tensor v) { return Value{std::move(v), 0.0}; }
  bool is_tensor() const { return t.has_value(); }
};

// a * b with Python's operand kinds: float * float in double, else one ATen mul.
Value mul(const Value& a, const Value& b) {
  if (!a.is_tensor() && !b.is_tensor()) return Value::of(a.d * b.d);
  if (a.is_tensor() && b.is_tensor()) return Value::of(at::mul(*a.t, *b.t));
  if (a.is_tensor()) return Value::of(at::mul(*a.t, b.d));
  return Value::of(at::mul(*b.t, a.d));  // float * tensor: tensor.__rmul__, the same mul
}

Value add(const Value& a, const Value& b) {
  if (!a.is_tensor() && !b.is_tensor()) return Value::of(a.d + b.d);
  if (a.is_tensor() && b.is_tensor()) return Value::of(at::add(*a.t, *b.t));
  if (a.is_tensor()) return Value::of(at::add(*a.t, b.d));
  return Value::of(at::add(*b.t, a.d));
}

Value neg(const Value& a) { return a.is_tensor() ? Value::of(at::neg(*a.t)) : Value::of(-a.d); }

// kernels.rows.row_sums: one row is summed as two, so that it rounds as it does in a batch.
Tensor row_sums(const Tensor& t) {
  if (t.size(0) == 1 && t.is_cpu()) return t.expand({2, -1}).sum(1).slice(0, 0, 1);
  return t.sum(1);
}

// kernels.cross_entropy._logsumexp
Tensor logsumexp_rows(const Tensor& z) {
  Tensor row_max = z.amax({1});
  Tensor safe = at::where(at::isfinite(row_max), row_max, at::Scalar(0.0));
  return at::add(safe, row_sums(at::exp(at::sub(z, safe.unsqueeze(1)))).log());
}

// kernels.rows.target_gap without shift: (1 - p_y, 1 / total, -log p_y).
std::tuple<Tensor, Tensor, Tensor> target_gap(const Tensor& others, const Tensor& share) {
  Tensor total = at::add(others, share);
  Tensor scale = total.reciprocal();
  Tensor nll = at::log1p(at::div(others, share));
  return {at::mul(others, scale), scale, nll};
}

// kernels.cross_entropy._renormalise: (1 - p_y, 1 / total, -log p_y, p_y).
std::tuple<Tensor, Tensor, Tensor, Tensor> renormalise(Tensor& probs, const Tensor& index) {
  Tensor p_target = probs.gather(1, index).squeeze(1);
  probs.scatter_(1, index, at::Scalar(0.0));
  auto [gap, scale, nll] = target_gap(row_sums(probs), p_target);
  return {gap, scale, nll, p_target};
}

// Rows per chunk of the CPU kernel (kernels.cross_entropy.rows_per_chunk): the budget is
// a switch of the calling thread, read from Python.
int64_t rows_per_chunk(int64_t num_classes) {
  static py::object* chunks = nullptr;
  if (chunks == nullptr) {
    chunks = new py::object(py::module::import("losskit._core.switches").attr("chunks"));  // lives with the process
  }
  int64_t budget = (*chunks)().attr("cross_entropy_bytes").cast<int64_t>();
  return std::max<int64_t>(1, budget / (4 * std::max<int64_t>(num_classes, 1)));
}

bool served_dtype(const Tensor& t) {
  auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

// kernels.rows.RowTerms (one process, no z-loss, temperature 1).
struct Terms {
  int64_t num_classes = 0;
  std::optional<Tensor> valid;
  bool uniform = true, weighted = false;
  Value target_weight, counts, denominator, count, total_weight;
  std::optional<Tensor> class_weight;
  std::string reduction;
  double eps = 0.0;

  Terms(const std::optional<Tensor>& valid_, const std::optional<Tensor>& weight, const Tensor& safe,
        int64_t n, int64_t c, double eps_, std::string reduction_)
      : num_classes(c), valid(valid_), reduction(std::move(reduction_)), eps(eps_) {
    if (!weight.has_value()) {
      total_weight = Value::of(double(c));
      if (!valid.has_value()) {
        uniform = true;
        target_weight = counts = Value::of(1.0);
        denominator = count = Value::of(double(n));
      } else {
        uniform = false;
        target_weight = Value::of(valid->to(at::kFloat));
        counts = target_weight;
        denominator = Value::of(target_weight.t->sum());
        count = denominator;
      }
      return;
    }
    Tensor w = weight->to(at::kFloat);
    Tensor picked = w.index({safe});
    Tensor tw = valid.has_value() ? at::where(*valid, picked, at::Scalar(0.0)) : picked;
    uniform = false;
    weighted = true;
    class_weight = w;
    total_weight = Value::of(w.sum());
    target_weight = Value::of(tw);
    Tensor counted = valid.has_value() ? *valid : at::ones_like(tw, tw.options().dtype(at::kBool));
    counts = Value::of(counted.to(at::kFloat));
    denominator = Value::of(tw.sum());
    count = Value::of(counts.t->sum());
  }

  static Tensor reciprocal_or_zero(const Tensor& d) { return at::where(d.ne(0), d, at::Scalar(kInf)).reciprocal(); }

  // RowTerms.scales: the cross-entropy's divisor as a factor.
  Value ce_scale() const {
    if (reduction != "mean") return Value::of(1.0);
    if (uniform) return Value::of(1.0 / denominator.d);
    return Value::of(reciprocal_or_zero(*denominator.t));
  }

  struct Coefficients {
    Value coef, target_step;
    std::optional<Value> smooth_step, rest;
  };

  // RowTerms.coefficients (inv_t = 1, no z-loss, no row factor).
  Coefficients coefficients() const {
    Value a = ce_scale();
    Value target_part = mul(target_weight, eps == 0.0 ? a : mul(Value::of(1.0 - eps), a));
    Coefficients out{target_part, neg(target_part), std::nullopt, std::nullopt};
    if (eps > 0.0) {
      Value smooth_a = mul(counts, a);
      // eps * total_weight / C: in double for a float, else mul then div by the int C.
      Value share = total_weight.is_tensor()
                        ? Value::of(at::div(at::mul(*total_weight.t, eps), at::Scalar(num_classes)))
                        : Value::of(eps * total_weight.d / double(num_classes));
      out.rest = mul(smooth_a, share);
      out.coef = add(target_part, *out.rest);
      out.smooth_step = mul(smooth_a, Value::of(-eps / double(num_classes)));
    }
    return out;
  }

  // RowTerms.loss(lse, z_target, smooth_dot, nll)
  Tensor loss(const std::optional<Tensor>& lse, const std::optional<Tensor>& smooth_dot, const Tensor& nll) const {
    Tensor loss = nll;
    if (!uniform) loss = at::mul(*target_weight.t, loss);
    if (eps > 0.0) {
      Tensor weighted_lse = total_weight.is_tensor() ? at::mul(*total_weight.t, *lse) : at::mul(*lse, total_weight.d);
      loss = at::add(at::mul(loss, 1.0 - eps), at::mul(at::sub(weighted_lse, *smooth_dot), eps / double(num_classes)));
    }
    if (valid.has_value()) loss = at::where(*valid, loss, at::Scalar(0.0));
    if (reduction == "none") return loss;
    if (reduction == "sum") return loss.sum();
    if (uniform) return loss.mean();
    return at::div(loss.sum(), *denominator.t);
  }
};

// kernels.rows.apply_gradient with gap and scale, one process, no tanh, no z-loss.
void apply_gradient(Tensor& probs, const Terms& terms, const Terms::Coefficients& c, const Tensor& index,
                    const Tensor& gap, const Tensor& scale) {
  const Value& coef = c.coef;
  Tensor factor = coef.is_tensor() ? at::mul(scale, *coef.t) : at::mul(scale, coef.d);
  probs.mul_(factor.unsqueeze(1));  // factor has a dim: scale is per row
  Tensor value = coef.is_tensor() ? at::mul(gap.neg(), *coef.t) : at::mul(gap.neg(), coef.d);
  if (c.rest.has_value()) value = c.rest->is_tensor() ? at::add(value, *c.rest->t) : at::add(value, c.rest->d);
  probs.scatter_(1, index, value.to(probs.scalar_type()).unsqueeze(1));
  if (terms.valid.has_value()) probs.masked_fill_(terms.valid->unsqueeze(1).bitwise_not(), at::Scalar(0.0));
  if (c.smooth_step.has_value()) {
    const Value& smooth = *c.smooth_step;
    if (!terms.class_weight.has_value()) {
      if (smooth.is_tensor()) {
        probs.add_(smooth.t->dim() ? smooth.t->unsqueeze(1) : *smooth.t);
      } else {
        probs.add_(at::Scalar(smooth.d));
      }
    } else if (smooth.is_tensor()) {
      probs.addcmul_(smooth.t->dim() ? smooth.t->unsqueeze(1) : *smooth.t, *terms.class_weight);
    } else {
      probs.add_(*terms.class_weight, smooth.d);
    }
  }
}

// kernels.cross_entropy._plain_cpu: float32, every row counting with weight 1, plain options.
Tensor plain_cpu(const Tensor& x, const Terms& terms, const Terms::Coefficients& c, const Tensor& index,
                 Tensor& grad) {
  at::_softmax_out(grad, x, 1, false);
  auto [gap, scale, nll, p_target] = renormalise(grad, index);
  (void)p_target;
  Tensor loss = terms.loss(std::nullopt, std::nullopt, nll);
  double seen = loss.dim() == 0 ? loss.item<double>() : nll.sum().item<double>();
  if (!std::isfinite(seen)) {
    Tensor underflow = nll.eq(kInf);
    if (underflow.any().item<bool>()) {
      Tensor rows = x.index({underflow});
      nll.index_put_({underflow}, at::sub(logsumexp_rows(rows), rows.gather(1, index.index({underflow})).squeeze(1)));
      loss = terms.loss(std::nullopt, std::nullopt, nll);
    }
  }
  apply_gradient(grad, terms, c, index, gap, scale);
  return loss;
}

// kernels.cross_entropy.logits_chunk + _cpu_softmax (not in place) for one chunk of all
// rows, no transform: the loss, with the gradient written into ``grad`` when given.
Tensor general_cpu(const Tensor& z, const Terms& terms, const std::optional<Terms::Coefficients>& c,
                   const Tensor& index, std::optional<Tensor> grad) {
  std::optional<Tensor> smooth_dot;
  if (terms.eps > 0.0) smooth_dot = row_sums(terms.class_weight.has_value() ? at::mul(z, *terms.class_weight) : z);
  Tensor z_target = z.gather(1, index).squeeze(1);
  Tensor probs = grad.has_value() ? *grad : at::empty_like(z);
  at::_softmax_out(probs, z, 1, false);
  auto [gap, scale, nll, p_target] = renormalise(probs, index);
  Tensor lse = at::add(z_target, nll);
  Tensor risky = p_target.lt(1e-30);
  if (terms.valid.has_value()) risky.bitwise_and_(*terms.valid);
  if (risky.any().item<bool>()) {
    Tensor fallback = logsumexp_rows(z.index({risky}));
    lse.index_put_({risky}, fallback);
    nll.index_put_({risky}, at::sub(fallback, z_target.index({risky})));
  }
  if (grad.has_value()) apply_gradient(probs, terms, *c, index, gap, scale);
  return terms.loss(lse, smooth_dot, nll);
}

// ---- every row counting with weight 1 (no class weights, nothing ignored) ------------------
//
// The everyday call, where a dozen ATen ops on a (64, 10) batch cost more than the loss.
// Here only what depends on an ATen kernel's own rounding stays an ATen op (the softmax,
// the row sums and the reductions, whose order of summation is aten's, and log1p, whose
// vectorised and scalar forms may differ); every element-wise step of the Python kernel
// that IEEE arithmetic rounds exactly (+, -, *, /, the gathers and scatters, 1 / x, the
// float <-> double conversions of Python floats) is a plain loop, op for op in the same
// order, so the bits are those of the ATen ops it replaces. (No FMA contraction: the
// build passes -ffp-contract=off.)

// The input as a contiguous float32 (N, C) tensor: itself when it is one; otherwise the
// exact conversion of cast(input, float32).contiguous().
Tensor float_rows(const Tensor& input) {
  if (input.scalar_type() == at::kFloat) return input.contiguous();
  Tensor out = at::empty(input.sizes(), input.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  float* o = out.data_ptr<float>();
  const int64_t n = input.size(0), c = input.size(1), s0 = input.stride(0), s1 = input.stride(1);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "float_rows", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < c; ++j) o[i * c + j] = static_cast<float>(in[i * s0 + j * s1]);
  });
  return out;
}

// The targets as int64 values, or false where one lies outside [0, C): the Python kernel's
// gather then raises its error.
bool read_targets(const Tensor& target, int64_t num_classes, std::vector<int64_t>& out) {
  if (target.scalar_type() != at::kLong || target.dim() != 1) return false;
  const int64_t n = target.size(0), stride = target.stride(0);
  const int64_t* t = target.const_data_ptr<int64_t>();
  out.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = t[i * stride];
    if (out[i] < 0 || out[i] >= num_classes) return false;
  }
  return true;
}

// The 0-d ``sum`` divided by ``n`` in float32, in place: what aten's mean does after its sum
// (sum_out, then div_ by the element count), and what ``loss.sum() / float(n)`` gives,
// without the two ops that convert the count into a tensor first.
Tensor divided(Tensor sum, int64_t n) {
  float* s = sum.data_ptr<float>();
  *s = *s / static_cast<float>(n);
  return sum;
}

// loss.to(dtype) of a reduced (one-element) float32 loss: ATen's copy converts a single
// element by its scalar path (c10's float -> bfloat16 / float16 rounding), as here, without
// the dispatch of a copy (a few microseconds of a small call). Larger tensors: ATen's copy.
Tensor as_dtype(const Tensor& loss, at::ScalarType dtype) {
  if (loss.scalar_type() == dtype) return loss;
  if (loss.numel() != 1 || loss.scalar_type() != at::kFloat || (dtype != at::kBFloat16 && dtype != at::kHalf)) {
    return loss.to(dtype);
  }
  Tensor out = at::empty(loss.sizes(), loss.options().dtype(dtype));
  const float value = *loss.const_data_ptr<float>();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "as_dtype", [&] { *out.data_ptr<scalar_t>() = static_cast<scalar_t>(value); });
  return out;
}

// reduce_loss(loss, reduction) of a float32 (N,) loss, every row counting.
Tensor reduce(const Tensor& loss, const std::string& reduction) {
  if (reduction == "none") return loss;
  return reduction == "sum" ? loss.sum() : divided(loss.sum(), loss.size(0));
}

py::object uniform_cpu(const Tensor& input, const Tensor& target, double eps, const std::string& reduction,
                       bool with_grad) {
  const int64_t n = input.size(0), C = input.size(1);
  std::vector<int64_t> y;
  if (!read_targets(target, C, y)) return py::none();
  const auto f32 = input.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  std::optional<Tensor> grad;
  if (with_grad) grad = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  // _plain_cpu: float32 with a gradient and no smoothing; else logits_chunk + _cpu_softmax.
  const bool plain = with_grad && eps == 0.0 && input.scalar_type() == at::kFloat;
  Tensor x = float_rows(input);
  const float* xs = x.const_data_ptr<float>();
  std::optional<Tensor> smooth_dot;
  if (eps > 0.0) smooth_dot = row_sums(x);
  Tensor probs = (with_grad && input.scalar_type() == at::kFloat) ? *grad : at::empty_like(x);
  at::_softmax_out(probs, x, 1, false);
  float* p = probs.data_ptr<float>();
  // _renormalise: the target's share taken out, the others summed (kernels.rows.target_gap)
  std::vector<float> p_target(n), gap(n), scale(n);
  for (int64_t i = 0; i < n; ++i) {
    p_target[i] = p[i * C + y[i]];
    p[i * C + y[i]] = 0.0f;
  }
  Tensor others_t = row_sums(probs);
  const float* others = others_t.const_data_ptr<float>();
  Tensor ratio = at::empty({n}, f32);
  float* q = ratio.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float total = others[i] + p_target[i];
    scale[i] = 1.0f / total;
    q[i] = others[i] / p_target[i];
    gap[i] = others[i] * scale[i];
  }
  Tensor nll = at::log1p(ratio);
  float* nl = nll.data_ptr<float>();
  std::optional<Tensor> lse;
  if (plain) {
    // A row whose p_y underflows has an infinite loss: only those are redone.
    bool infinite = false;
    for (int64_t i = 0; i < n && !infinite; ++i) infinite = nl[i] == static_cast<float>(kInf);
    if (infinite) {
      Tensor underflow = nll.eq(kInf);
      Tensor rows = x.index({underflow});
      Tensor index = target.unsqueeze(1).index({underflow});
      nll.index_put_({underflow}, at::sub(logsumexp_rows(rows), rows.gather(1, index).squeeze(1)));
    }
  } else {
    lse = at::empty({n}, f32);
    float* l = lse->data_ptr<float>();
    bool risky_any = false;
    for (int64_t i = 0; i < n; ++i) {
      l[i] = xs[i * C + y[i]] + nl[i];
      risky_any = risky_any || p_target[i] < 1e-30f;
    }
    if (risky_any) {  // p_y underflowed: a direct logsumexp for those rows
      Tensor risky = at::empty({n}, f32.dtype(at::kBool));
      bool* r = risky.data_ptr<bool>();
      for (int64_t i = 0; i < n; ++i) r[i] = p_target[i] < 1e-30f;
      Tensor z_target = x.gather(1, target.unsqueeze(1)).squeeze(1);
      Tensor fallback = logsumexp_rows(x.index({risky}));
      lse->index_put_({risky}, fallback);
      nll.index_put_({risky}, at::sub(fallback, z_target.index({risky})));
    }
  }
  // RowTerms.loss
  Tensor loss = nll;
  if (eps > 0.0) {
    loss = at::empty({n}, f32);
    float* o = loss.data_ptr<float>();
    const float* l = lse->const_data_ptr<float>();
    const float* sd = smooth_dot->const_data_ptr<float>();
    const float keep = static_cast<float>(1.0 - eps), fc = static_cast<float>(double(C)),
                spread = static_cast<float>(eps / double(C));
    for (int64_t i = 0; i < n; ++i) o[i] = nl[i] * keep + (l[i] * fc - sd[i]) * spread;
  }
  loss = reduce(loss, reduction);
  if (with_grad) {
    // RowTerms.coefficients of uniform terms: Python floats (doubles), used as float32.
    const double a = reduction == "mean" ? 1.0 / double(n) : 1.0;
    const double target_part = 1.0 * (eps == 0.0 ? a : (1.0 - eps) * a);
    double coef = target_part, rest = 0.0, smooth_step = 0.0;
    if (eps > 0.0) {
      const double smooth_a = 1.0 * a;
      rest = smooth_a * (eps * double(C) / double(C));
      coef = target_part + rest;
      smooth_step = smooth_a * (-eps / double(C));
    }
    const float cf = static_cast<float>(coef), rf = static_cast<float>(rest), sf = static_cast<float>(smooth_step);
    // apply_gradient: p (coef / total), the target's entry -coef (1 - p_y) (+ rest), + smooth_step
    for (int64_t i = 0; i < n; ++i) {
      float* row = p + i * C;
      const float factor = scale[i] * cf;
      for (int64_t j = 0; j < C; ++j) row[j] = row[j] * factor;
      float value = -gap[i] * cf;
      if (eps > 0.0) value = value + rf;
      row[y[i]] = value;
      if (eps > 0.0)
        for (int64_t j = 0; j < C; ++j) row[j] = row[j] + sf;
    }
    if (grad->scalar_type() != at::kFloat) grad->copy_(probs);
  }
  loss = as_dtype(loss, input.scalar_type());
  return py::make_tuple(loss, grad.has_value() ? py::cast(*grad) : py::none());
}

// losskit::cross_entropy's forward (kernels.cross_entropy.cross_entropy_forward) for one
// chunk on the CPU: (loss, grad or None), or None where the Python kernel must run.
py::object cross_entropy_forward(const Tensor& input, const Tensor& target, const std::optional<Tensor>& valid_in,
                                 const std::optional<Tensor>& weight, int64_t ignore_index, double label_smoothing,
                                 double lse_square_scale, std::optional<double> softcap, double temperature,
                                 const std::string& reduction, const std::vector<bool>& needs) {
  (void)ignore_index;
  if (!input.is_cpu() || input.dim() != 2 || !served_dtype(input) || softcap.has_value() || temperature != 1.0 ||
      lse_square_scale != 0.0 || (weight.has_value() && !weight->is_cpu()) || !target.is_cpu()) {
    return py::none();
  }
  const int64_t n = input.size(0), num_classes = input.size(1);
  if (rows_per_chunk(num_classes) < n) return py::none();
  at::NoGradGuard no_grad;
  if (!valid_in.has_value() && !weight.has_value()) {
    return uniform_cpu(input, target, label_smoothing, reduction, !needs.empty() && needs[0]);
  }
  // _all_valid: a mask with every row valid is no mask.
  std::optional<Tensor> valid = valid_in;
  if (valid.has_value() && valid->all().item<bool>()) valid.reset();
  Tensor safe = valid.has_value() ? at::where(*valid, target, at::Scalar(0)) : target;
  Terms terms(valid, weight, safe, n, num_classes, label_smoothing, reduction);
  Tensor index = safe.unsqueeze(1);
  const bool with_grad = !needs.empty() && needs[0];
  std::optional<Terms::Coefficients> c;
  if (with_grad) c = terms.coefficients();
  std::optional<Tensor> grad;
  if (with_grad) grad = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  const bool is_plain = label_smoothing == 0.0;
  Tensor loss;
  if (with_grad && terms.uniform && is_plain && input.scalar_type() == at::kFloat) {
    loss = plain_cpu(input.contiguous(), terms, *c, index, *grad);
  } else {
    Tensor x = input.to(at::kFloat).contiguous();
    std::optional<Tensor> grad_chunk;
    if (grad.has_value()) grad_chunk = grad->scalar_type() == at::kFloat ? *grad : at::empty_like(x);
    loss = general_cpu(x, terms, c, index, grad_chunk);
    if (grad.has_value() && grad->scalar_type() != at::kFloat) grad->copy_(*grad_chunk);
  }
  loss = as_dtype(loss, input.scalar_type());
  return py::make_tuple(loss, grad.has_value() ? py::cast(*grad) : py::none());
}

// nll_forward where every row counts with weight 1: the gather, the negation and the
// scatter as loops (exact), the sum an ATen op.
py::object uniform_nll(const Tensor& input, const Tensor& target, const std::string& reduction, bool with_grad) {
  const int64_t n = input.size(0), C = input.size(1), s0 = input.stride(0), s1 = input.stride(1);
  std::vector<int64_t> y;
  if (!read_targets(target, C, y)) return py::none();
  Tensor loss = at::empty({n}, input.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  float* l = loss.data_ptr<float>();
  std::optional<Tensor> grad;
  if (with_grad) grad = at::zeros(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  const double step = reduction == "mean" ? -1.0 / double(n) : -1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "nll_loss", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) l[i] = -static_cast<float>(x[i * s0 + y[i] * s1]);
    if (with_grad) {
      scalar_t* g = grad->data_ptr<scalar_t>();
      const scalar_t value = at::Scalar(step).to<scalar_t>();  // as scatter_ converts its value
      for (int64_t i = 0; i < n; ++i) g[i * C + y[i]] = value;
    }
  });
  loss = reduce(loss, reduction);  // 'mean': loss.sum() / float(n)
  loss = as_dtype(loss, input.scalar_type());
  return py::make_tuple(loss, grad.has_value() ? py::cast(*grad) : py::none());
}

// losskit::nll_loss's forward (kernels.cross_entropy.nll_forward) on the CPU.
py::object nll_forward(const Tensor& input, const Tensor& target, const std::optional<Tensor>& valid_in,
                       const std::optional<Tensor>& weight, int64_t ignore_index, double label_smoothing,
                       double lse_square_scale, std::optional<double> softcap, double temperature,
                       const std::string& reduction, const std::vector<bool>& needs) {
  (void)ignore_index, (void)label_smoothing, (void)lse_square_scale, (void)softcap, (void)temperature;
  if (!input.is_cpu() || input.dim() != 2 || !served_dtype(input) || !target.is_cpu() ||
      (weight.has_value() && !weight->is_cpu())) {
    return py::none();
  }
  at::NoGradGuard no_grad;
  const int64_t n = input.size(0);
  if (!valid_in.has_value() && !weight.has_value()) return uniform_nll(input, target, reduction, !needs.empty() && needs[0]);
  std::optional<Tensor> valid = valid_in;
  if (valid.has_value() && valid->all().item<bool>()) valid.reset();
  Tensor safe = valid.has_value() ? at::where(*valid, target, at::Scalar(0)) : target;
  Tensor index = safe.unsqueeze(1);
  Tensor loss = input.gather(1, index).squeeze(1);
  if (loss.scalar_type() != at::kFloat) loss = loss.to(at::kFloat);
  loss = loss.neg();
  std::optional<Tensor> row_weight;
  if (weight.has_value()) {
    row_weight = weight->to(at::kFloat).index({safe});
    loss = at::mul(loss, *row_weight);
    if (valid.has_value()) row_weight = at::where(*valid, *row_weight, at::Scalar(0.0));
  } else if (valid.has_value()) {
    row_weight = valid->to(at::kFloat);
  }
  if (valid.has_value()) loss = at::where(*valid, loss, at::Scalar(0.0));
  std::optional<Tensor> denominator;
  if (reduction == "mean") {
    if (row_weight.has_value()) {
      denominator = row_weight->sum();
      loss = at::div(loss.sum(), *denominator);
    } else {
      loss = at::div(loss.sum(), double(n));
    }
  } else if (reduction == "sum") {
    loss = loss.sum();
  }
  std::optional<Tensor> grad;
  if (!needs.empty() && needs[0]) {
    grad = at::zeros(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
    if (!row_weight.has_value()) {
      grad->scatter_(1, index, at::Scalar(reduction == "mean" ? -1.0 / double(n) : -1.0));
    } else {
      Tensor value = *row_weight;
      if (denominator.has_value()) value = at::mul(value, Terms::reciprocal_or_zero(*denominator));
      grad->scatter_(1, index, value.neg().to(input.scalar_type()).unsqueeze(1));
    }
  }
  loss = as_dtype(loss, input.scalar_type());
  return py::make_tuple(loss, grad.has_value() ? py::cast(*grad) : py::none());
}

// The value checks of class-index targets and logits, in one read (functional.classification):
// bit 0: every target lies in [0, C) and none is ignore_index (the batch needs no mask);
// bit 1: some target is ignore_index and every other lies in [0, C);
// bit 2: the first 8 rows of logits hold no negative value (they may be probabilities:
//        Python's warn_if_probabilities decides). Where bits 0 and 1 are both clear the
// targets are left to the Python checks, which raise the error.
int64_t check_class_targets(const Tensor& input, const Tensor& target, int64_t ignore_index, bool probe) {
  int64_t flags = 0;
  const int64_t num_classes = input.size(1);
  const auto kind = target.scalar_type();
  const bool integral = kind == at::kByte || kind == at::kChar || kind == at::kShort || kind == at::kInt ||
                        kind == at::kLong;  // what AT_DISPATCH_INTEGRAL_TYPES serves; others go to Python
  if (target.dim() == 1 && target.is_cpu() && integral && num_classes > 0) {
    bool in_range = true, ignored = false;
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "check_class_targets", [&] {
      const scalar_t* data = target.const_data_ptr<scalar_t>();
      const int64_t stride = target.stride(0), n = target.size(0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(data[i * stride]);
        if (v == ignore_index) {
          ignored = true;
        } else if (v < 0 || v >= num_classes) {
          in_range = false;
        }
      }
    });
    if (in_range) flags |= ignored ? 2 : 1;
  }
  if (probe && input.numel() > 0 && num_classes >= 2 && input.is_cpu()) {
    // The first 8 rows read in place: a slice of logits that require grad would be an
    // autograd view (a node and its bookkeeping: ~10 us, more than the loop).
    bool negative = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "check_class_targets", [&] {
      const int64_t rows = std::min<int64_t>(input.size(0), 8), s0 = input.stride(0), s1 = input.stride(1);
      const scalar_t* data = input.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows && !negative; ++i) {
        for (int64_t j = 0; j < num_classes; ++j) {
          if (static_cast<float>(data[i * s0 + j * s1]) < 0.0f) {
            negative = true;
            break;
          }
        }
      }
    });
    if (!negative) flags |= 4;
  }
  return flags;
}

// The whole eager call of cross_entropy / nll_loss on (N, C) logits and (N,) class indices
// of any integer dtype: the checks of check_class_targets, then the forward. None where
// either declines (the Python path then checks, raises and computes); else (loss,
// gradient or None, whether the first rows may be probabilities).
//
// ``node``: None, or (node name, what, reference) to attach the fused op's autograd node
// here (attach_precomputed) when a gradient is made, instead of a second call from Python.
// Its replay is (reference, a weak reference to the logits, their version), which
// fused_op._replay_for_native turns into a Replay if a double backward asks for one.
template <typename Forward>
py::object eager(Forward forward, const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                 int64_t ignore_index, double label_smoothing, const std::string& reduction, bool probe, bool needs_grad,
                 const py::object& node) {
  // What the Python checks would look at, cheaper here: (N, C) logits of a served dtype on
  // the CPU, (N,) targets, N > 0, a floating (C,) weight on the CPU.
  if (input.dim() != 2 || target.dim() != 1 || !input.is_cpu() || !served_dtype(input) ||
      target.size(0) != input.size(0) || input.size(0) == 0) {
    return py::none();
  }
  // Options the Python checks would reject (or convert) are theirs to report.
  if ((reduction != "mean" && reduction != "sum" && reduction != "none") ||
      !(label_smoothing >= 0.0 && label_smoothing <= 1.0)) {
    return py::none();
  }
  if (weight.has_value() && (weight->dim() != 1 || weight->size(0) != input.size(1) ||
                             !at::isFloatingType(weight->scalar_type()) || !weight->is_cpu())) {
    return py::none();
  }
  const int64_t flags = check_class_targets(input, target, ignore_index, probe);
  if (!(flags & 3)) return py::none();
  Tensor index = target.scalar_type() == at::kLong ? target : target.to(at::kLong);
  std::optional<Tensor> valid;
  if (flags & 2) valid = index.ne(ignore_index);
  py::object made = forward(input, index, valid, weight, ignore_index, label_smoothing, 0.0, std::nullopt, 1.0,
                            reduction, std::vector<bool>{needs_grad});
  if (made.is_none()) return made;
  auto out = made.cast<py::tuple>();
  if (node.is_none() || out[1].is_none()) return py::make_tuple(out[0], out[1], bool(flags & 4));
  Tensor loss = losskit::attach_one(node, out[0].cast<Tensor>(), input, out[1].cast<Tensor>(), reduction == "none");
  return py::make_tuple(loss, py::none(), bool(flags & 4));
}

py::object cross_entropy_eager(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                               int64_t ignore_index, double label_smoothing, const std::string& reduction, bool probe,
                               bool needs_grad, const py::object& node) {
  return eager(cross_entropy_forward, input, target, weight, ignore_index, label_smoothing, reduction, probe,
               needs_grad, node);
}

py::object nll_eager(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                     int64_t ignore_index, const std::string& reduction, bool needs_grad, const py::object& node) {
  return eager(nll_forward, input, target, weight, ignore_index, 0.0, reduction, false, needs_grad, node);
}

}  // namespace

void register_cross_entropy(py::module& m) {
  m.def("cross_entropy", &cross_entropy_forward, "losskit::cross_entropy's forward on the CPU, or None");
  m.def("nll_loss", &nll_forward, "losskit::nll_loss's forward on the CPU, or None");
  m.def("check_class_targets", &check_class_targets, "the value checks of class-index targets, in one read");
  m.def("cross_entropy_eager", &cross_entropy_eager, "an eager CPU cross_entropy call: checks, forward and autograd node, or None");
  m.def("nll_loss_eager", &nll_eager, "an eager CPU nll_loss call: checks, forward and autograd node, or None");
}
LOSSKIT_REGISTER(register_cross_entropy)
