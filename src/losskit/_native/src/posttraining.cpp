// The compiled forms of the fused post-training losses of losskit/functional/preference.py:
// pair_forward (DPO's sigmoid, SimPO, CPO: the logistic pair loss; ORPO) and kto_forward,
// op for op, so that the bits are the same (tests/test_native.py,
// tests/test_native_posttraining.py). See that file for the math: the loss and the
// written-out gradients of the policy log-probs, made in forward.
//
// Where the Python form multiplies by a Python float, the float is a wrapped number (the
// Scalar overloads below wrap it the same way): the product is formed in the tensor's
// dtype whatever the float's, exactly as the Python form does. Python's left-to-right
// arithmetic on the floats (-beta * k * w) is kept in the same order.
#include "losskit_native.h"

#include <ATen/ScalarOps.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// losskit/_core/dtypes.py's result_dtypes: (compute, result).
std::pair<at::ScalarType, at::ScalarType> result_dtypes(const std::vector<const at::Tensor*>& tensors) {
  at::ScalarType out = tensors[0]->scalar_type();
  for (size_t i = 1; i < tensors.size(); ++i) out = at::promote_types(out, tensors[i]->scalar_type());
  at::ScalarType compute = (out == at::kHalf || out == at::kBFloat16) ? at::kFloat : out;
  return {compute, out};
}

// _reduce_negated: the negation on the scalar, not on every term.
at::Tensor reduce_negated(const at::Tensor& terms, const std::string& reduction) {
  if (reduction == "none") return terms.neg();
  return (reduction == "mean" ? terms.mean() : terms.sum()).neg();
}

bool plain_cpu(const std::optional<at::Tensor>& t) {
  return !t.has_value() || (t->is_cpu() && at::isFloatingType(t->scalar_type()));
}

py::object grad_or_none(const at::Tensor& g) { return g.defined() ? py::cast(g) : py::none(); }

// pair_forward(chosen, rejected, ref_chosen, ref_rejected, options, needs, check) ->
// (loss, d/d chosen, d/d rejected), or None for a call it does not serve; with ``check``,
// also None where a log-prob is positive (ORPO's check: the Python caller then reports it).
py::object preference_pair(const at::Tensor& chosen, const at::Tensor& rejected,
                           const std::optional<at::Tensor>& ref_chosen, const std::optional<at::Tensor>& ref_rejected,
                           const std::string& kind, double beta, double gamma, double label_smoothing,
                           const std::string& reduction, bool check, const std::vector<bool>& needs) {
  if (!plain_cpu(chosen) || !plain_cpu(rejected) || !plain_cpu(ref_chosen) || !plain_cpu(ref_rejected)) {
    return py::none();
  }
  if (ref_chosen.has_value() != ref_rejected.has_value() || chosen.numel() == 0) return py::none();
  if (kind != "orpo" && kind != "logistic") return py::none();
  at::Tensor loss, g0, g1;
  {
    at::NoGradGuard no_grad;
    std::vector<const at::Tensor*> all{&chosen, &rejected};
    if (ref_chosen.has_value()) {
      all.push_back(&*ref_chosen);
      all.push_back(&*ref_rejected);
    }
    auto [compute, out] = result_dtypes(all);
    at::Tensor c = cast(chosen, compute), r = cast(rejected, compute);
    const double k = reduction == "mean" ? 1.0 / static_cast<double>(chosen.numel()) : 1.0;
    const bool want = needs[0] || needs[1];
    if (kind == "orpo") {
      const int64_t n = c.numel();
      at::Tensor x = at::cat({c.reshape(-1), r.reshape(-1)});
      // Casting to the compute dtype is exact, so the check reads the caller's values.
      if (check && at::gt(x, 0).any().item<bool>()) return py::none();
      at::Tensor em = at::expm1(x);
      at::Tensor low = at::lt(x, -std::log(2.0));
      at::Tensor log1mexp = at::where(low, at::log1p(at::exp(x).neg_()), at::log(em.neg()));
      at::Tensor log_odds = at::sub((c - r).reshape(-1), log1mexp.slice(0, 0, n) - log1mexp.slice(0, n, 2 * n));
      at::Tensor ls = at::log_sigmoid(log_odds);
      loss = losskit::reduce_loss(at::mul(ls, -beta).reshape(chosen.sizes()), reduction);
      if (want) {
        at::Tensor sk = at::mul(at::sigmoid(log_odds.neg()), beta * k);
        if (needs[0]) g0 = at::div(sk, em.slice(0, 0, n)).reshape(chosen.sizes());
        if (needs[1]) g1 = at::div(sk.neg(), em.slice(0, n, 2 * n)).reshape(rejected.sizes());
      }
    } else {
      at::Tensor h = ref_chosen.has_value()
                         ? at::sub(at::sub(c, cast(*ref_chosen, compute)), at::sub(r, cast(*ref_rejected, compute)))
                         : at::sub(c, r);
      at::Tensor z = at::mul(h, beta);
      if (gamma != 0.0) z = at::sub(z, gamma);
      const double eps = label_smoothing;
      at::Tensor ls = at::log_sigmoid(z);
      if (eps == 0.0) {
        loss = reduce_negated(ls, reduction);
      } else {
        loss = losskit::reduce_loss(at::sub(at::mul(ls, -(1 - eps)), at::mul(at::log_sigmoid(z.neg()), eps)), reduction);
      }
      if (want) {
        at::Tensor dz = at::sigmoid(z.neg());
        if (eps != 0.0) dz = at::sub(at::mul(dz, 1 - eps), at::mul(at::sigmoid(z), eps));
        if (needs[0]) g0 = at::mul(dz, -beta * k);
        if (needs[1]) g1 = at::mul(dz, beta * k);
      }
    }
    loss = cast(loss, out);
    if (g0.defined()) g0 = cast(g0, chosen.scalar_type());
    if (g1.defined()) g1 = cast(g1, rejected.scalar_type());
  }
  return py::make_tuple(loss, grad_or_none(g0), grad_or_none(g1));
}

// kto_forward(logps, ref_logps, desirable, options, needs) -> (loss, d/d logps), or None.
py::object kto(const at::Tensor& logps, const std::optional<at::Tensor>& ref_logps, const at::Tensor& desirable,
               double beta, double z0, double desirable_weight, double undesirable_weight, const std::string& reduction,
               const std::vector<bool>& needs) {
  if (!plain_cpu(logps) || !plain_cpu(ref_logps) || !desirable.is_cpu() || desirable.scalar_type() != at::kBool ||
      logps.numel() == 0) {
    return py::none();
  }
  at::Tensor loss, grad;
  {
    at::NoGradGuard no_grad;
    std::vector<const at::Tensor*> all{&logps};
    if (ref_logps.has_value()) all.push_back(&*ref_logps);
    auto [compute, out] = result_dtypes(all);
    at::Tensor r = cast(logps, compute);
    if (ref_logps.has_value()) r = at::sub(r, cast(*ref_logps, compute));
    const double wd = desirable_weight, wu = undesirable_weight;
    at::Tensor a = at::mul(z0 != 0.0 ? at::sub(r, z0) : r, beta);
    at::Tensor s = at::sigmoid(at::where(desirable, a.neg(), a));
    loss = losskit::reduce_loss(wd == 1.0 && wu == 1.0 ? s : at::where(desirable, at::mul(s, wd), at::mul(s, wu)), reduction);
    if (needs[0]) {
      const double k = reduction == "mean" ? 1.0 / static_cast<double>(logps.numel()) : 1.0;
      at::Tensor ds = at::mul(s, at::rsub(s, 1));
      grad = cast(at::where(desirable, at::mul(ds, -beta * k * wd), at::mul(ds, beta * k * wu)), logps.scalar_type());
    }
    loss = cast(loss, out);
  }
  return py::make_tuple(loss, grad_or_none(grad));
}

// losskit/_core/ops.py's log_softmax: (x - max) - log(sum(exp(x - max))).
at::Tensor log_softmax(const at::Tensor& x) {
  at::Tensor shifted = at::sub(x, x.amax({-1}, true));
  return at::sub(shifted, shifted.exp().sum({-1}, true).log());
}

// losskit/kernels/linear_distillation.py's _chunk: (per-row loss, d loss / d s or undefined),
// overwriting the buffers s and t.
std::pair<at::Tensor, at::Tensor> distillation_chunk(at::Tensor s, at::Tensor t, const std::optional<at::Tensor>& target,
                                                     double beta, double temperature, double weight_hard,
                                                     double weight_soft, bool want_grad) {
  at::Tensor hard_rows, hard_grad;
  if (weight_hard != 0.0 && target.has_value()) {
    at::Tensor column = target->unsqueeze(1);
    at::Tensor log_q1 = log_softmax(s);
    hard_rows = log_q1.gather(1, column).squeeze(1).neg();
    if (want_grad) {
      hard_grad = log_q1.exp_().scatter_add_(1, column, at::full_like(column, -1, log_q1.options()));
    }
  }
  if (temperature != 1.0) {
    s.div_(temperature);
    t.div_(temperature);
  }
  at::Tensor log_q = log_softmax(s), log_p = log_softmax(t);
  at::Tensor q = log_q.exp();
  at::Tensor rows, grad;
  if (beta == 0.0) {
    at::Tensor p = log_p.exp();
    rows = at::mul(p, at::where(at::gt(p, 0), at::sub(log_p, log_q), 0.0)).sum(-1);
    if (want_grad) grad = q.sub_(p);
  } else if (beta == 1.0) {
    at::Tensor qr = at::mul(q, at::where(at::gt(q, 0), at::sub(log_q, log_p), 0.0));
    rows = qr.sum(-1);
    if (want_grad) grad = qr.sub_(q.mul_(rows.unsqueeze(1)));
  } else {
    at::Tensor p = log_p.exp();
    at::Tensor m = at::add(at::mul(p, beta), at::mul(q, 1.0 - beta));
    at::Tensor log_m = at::where(at::gt(m, 0), m, 1.0).log_();
    rows = at::mul(at::mul(p, at::where(at::gt(p, 0), at::sub(log_p, log_m), 0.0)).sum(-1), beta);
    at::Tensor qr = at::mul(q, at::where(at::gt(q, 0), at::sub(log_q, log_m), 0.0));
    at::Tensor kl_q = qr.sum(-1);
    rows = at::add(rows, at::mul(kl_q, 1.0 - beta));
    if (want_grad) grad = qr.sub_(q.mul_(kl_q.unsqueeze(1))).mul_(1.0 - beta);
  }
  if (weight_soft != 1.0) rows = at::mul(rows, weight_soft);
  if (grad.defined() && weight_soft / temperature != 1.0) grad.mul_(weight_soft / temperature);
  if (hard_rows.defined()) {
    rows = at::add(rows, at::mul(hard_rows, weight_hard));
    if (hard_grad.defined()) grad.add_(hard_grad, weight_hard);
  }
  return {rows, grad};
}

// linear_distillation.py's distillation_forward: (loss, d loss / d student), or None.
py::object distillation(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                        const std::optional<at::Tensor>& valid, double beta, double temperature, int64_t ignore_index,
                        double weight_hard, double weight_soft, const std::string& reduction, int64_t chunk_rows,
                        const std::vector<bool>& needs) {
  (void)ignore_index;  // the targets come validated, their mask in ``valid``
  if (!plain_cpu(student) || !plain_cpu(teacher) || student.dim() < 1 || (target.has_value() && !target->is_cpu()) ||
      (valid.has_value() && !valid->is_cpu())) {
    return py::none();
  }
  const bool want_grad = needs[0];
  at::Tensor loss, grad;
  {
    at::NoGradGuard no_grad;
    auto [compute, out] = result_dtypes({&student, &teacher});
    const int64_t num_classes = student.size(-1);
    at::Tensor s_all = student.reshape({-1, num_classes}), t_all = teacher.reshape({-1, num_classes});
    const int64_t n = s_all.size(0);
    if (n == 0) return py::none();
    // _row_factor: a number (factor_value) or one value per row (factor).
    at::Tensor factor;
    double factor_value = 1.0;
    if (want_grad) {
      if (reduction == "mean") {
        if (valid.has_value()) {
          factor = at::reciprocal(cast(valid->sum().clamp_min(1), compute));
        } else {
          factor_value = 1.0 / static_cast<double>(std::max<int64_t>(n, 1));
        }
      }
      if (valid.has_value()) {
        factor = factor.defined() ? at::where(*valid, factor, 0.0) : at::mul(valid->to(compute), factor_value);
      }
      grad = at::empty({n, num_classes}, s_all.options().dtype(compute));
    }
    at::Tensor losses = at::empty({n}, s_all.options().dtype(compute));
    const int64_t size = std::max<int64_t>(1, std::min(chunk_rows, n));
    for (int64_t start = 0; start < n; start += size) {
      const int64_t stop = std::min(start + size, n);
      at::Tensor s = s_all.slice(0, start, stop).to(compute, false, true, at::MemoryFormat::Contiguous);
      at::Tensor t = t_all.slice(0, start, stop).to(compute, false, true, at::MemoryFormat::Contiguous);
      at::Tensor chunk_valid;
      if (valid.has_value()) {
        chunk_valid = valid->slice(0, start, stop);
        at::Tensor ignored = chunk_valid.logical_not().unsqueeze(1);
        s.masked_fill_(ignored, 0.0);
        t.masked_fill_(ignored, 0.0);
      }
      std::optional<at::Tensor> chunk_target;
      if (target.has_value()) chunk_target = target->slice(0, start, stop);
      auto [row_loss, grad_s] =
          distillation_chunk(s, t, chunk_target, beta, temperature, weight_hard, weight_soft, want_grad);
      losses.slice(0, start, stop).copy_(chunk_valid.defined() ? at::where(chunk_valid, row_loss, 0.0) : row_loss);
      if (grad_s.defined()) {
        at::Tensor part = grad.slice(0, start, stop);
        if (factor.defined()) {
          at::mul_out(part, grad_s, factor.slice(0, start, stop).unsqueeze(1));
        } else {
          at::mul_out(part, grad_s, at::native::wrapped_scalar_tensor(factor_value, grad_s.device()));
        }
      }
    }
    loss = losskit::reduce_counted_rows(losses, valid, reduction, n);
    loss = cast(loss, out);
    if (grad.defined()) grad = cast(grad.reshape(student.sizes()), student.scalar_type());
  }
  return py::make_tuple(loss, grad_or_none(grad));
}

}  // namespace

void register_posttraining(py::module& m) {
  m.def("preference_pair", &preference_pair, "losskit.functional.preference's pair_forward (logistic, orpo)");
  m.def("kto", &kto, "losskit.functional.preference's kto_forward");
  m.def("distillation", &distillation, "losskit.kernels.linear_distillation's distillation_forward");
}
LOSSKIT_REGISTER(register_posttraining)
