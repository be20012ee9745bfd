// The compiled form of losskit/kernels/topk_distillation.py's topk_distillation_forward, op
// for op, so that the bits are the same (tests/test_native.py, tests/test_native_topk.py);
// see that file for the math. And the cached teacher's checks of
// losskit/functional/distillation.py's _check_topk in one read of the small [N, k] inputs.
//
// Where the Python form multiplies by a Python float, the float is a wrapped number (the
// Scalar overloads below wrap it the same way): the product is formed in the tensor's
// dtype, exactly as the Python form does; Python's arithmetic on floats is kept in order.
#include "losskit_native.h"

#include <ATen/Dispatch.h>
#include <ATen/ScalarOps.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// topk_distillation.py's chunk_rows.
int64_t chunk_rows(int64_t num_classes) {
  return std::max<int64_t>(16, (int64_t{1} << 19) / std::max<int64_t>(num_classes, 1));
}

struct Rest {
  at::Tensor z_y, z_top, m_r, e_r;
};

// topk_distillation.py's _rest.
Rest rest(at::Tensor z, const at::Tensor& ids, const at::Tensor& present, const at::Tensor& y) {
  Rest r;
  if (y.defined()) r.z_y = z.gather(1, y);
  r.z_top = z.gather(1, ids);
  z.scatter_(1, ids, r.z_top.masked_fill(present, -kInf));
  r.m_r = z.amax({1}, true).nan_to_num_(0.0, 0.0, 0.0);
  r.e_r = z.sub_(r.m_r).exp_().sum(1, true);
  return r;
}

py::object topk_distillation(const at::Tensor& student, const at::Tensor& ids_in, const at::Tensor& logps,
                             const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& valid,
                             double beta, double temperature, int64_t ignore_index, double w_hard, double w_soft,
                             const std::string& reduction, const std::vector<bool>& needs) {
  (void)ignore_index;  // the targets come validated, their mask in ``valid``
  if (!student.is_cpu() || !at::isFloatingType(student.scalar_type()) || student.dim() != 2 || !ids_in.is_cpu() ||
      ids_in.scalar_type() != at::kLong || ids_in.dim() != 2 || !logps.is_cpu() ||
      !at::isFloatingType(logps.scalar_type()) || (target.has_value() && !target->is_cpu()) ||
      (valid.has_value() && !valid->is_cpu()) || student.size(0) == 0) {
    return py::none();
  }
  at::Tensor loss, grad_out;
  {
    at::NoGradGuard no_grad;
    at::ScalarType out = at::promote_types(student.scalar_type(), logps.scalar_type());
    at::ScalarType compute = (out == at::kHalf || out == at::kBFloat16) ? at::kFloat : out;
    const int64_t n = ids_in.size(0), k = ids_in.size(1);
    const bool hard = w_hard != 0.0 && target.has_value();
    const int64_t v = student.size(1);
    at::Tensor ids = ids_in;
    at::Tensor ignored, log_p_top;
    if (valid.has_value()) {
      at::Tensor counted = valid->unsqueeze(1);
      ignored = counted.logical_not();
      ids = at::where(counted, ids, at::arange(k, ids.options()));
      log_p_top = at::where(counted, cast(logps, compute), -kInf);
    } else {
      log_p_top = cast(logps, compute);
    }
    at::Tensor column, y;
    if (target.has_value()) column = target->unsqueeze(1);
    if (hard && temperature == 1.0) y = column;
    at::Tensor present = at::gt(log_p_top, -kInf);
    const int64_t size = chunk_rows(v);
    at::Tensor buf;
    Rest r;
    if (size >= n) {
      buf = temperature == 1.0 ? student.to(compute, false, true, at::MemoryFormat::Contiguous)
                               : at::div(cast(student, compute), temperature);
      if (ignored.defined()) buf.masked_fill_(ignored, 0.0);
      r = rest(buf, ids, present, y);
    } else {
      buf = at::empty({n, v}, student.options().dtype(compute));
      std::vector<Rest> parts;
      for (int64_t start = 0; start < n; start += size) {
        const int64_t stop = std::min(start + size, n);
        at::Tensor chunk = buf.slice(0, start, stop);
        if (temperature == 1.0) {
          chunk.copy_(student.slice(0, start, stop));
        } else {
          at::div_out(chunk, cast(student.slice(0, start, stop), compute),
                      at::native::wrapped_scalar_tensor(temperature, chunk.device()));
        }
        if (ignored.defined()) chunk.masked_fill_(ignored.slice(0, start, stop), 0.0);
        parts.push_back(rest(chunk, ids.slice(0, start, stop), present.slice(0, start, stop),
                             y.defined() ? y.slice(0, start, stop) : at::Tensor()));
      }
      auto joined = [&](at::Tensor Rest::*field) {
        std::vector<at::Tensor> all;
        for (const Rest& part : parts) all.push_back(part.*field);
        return at::cat(all);
      };
      if (y.defined()) r.z_y = joined(&Rest::z_y);
      r.z_top = joined(&Rest::z_top);
      r.m_r = joined(&Rest::m_r);
      r.e_r = joined(&Rest::e_r);
    }
    at::Tensor e = buf, z_y = r.z_y, z_top = r.z_top, m_r = r.m_r, e_r = r.e_r;
    at::Tensor log_q = at::cat({z_top.masked_fill_(present.logical_not(), -kInf), e_r.log().add_(m_r)}, 1);
    at::Tensor shift = log_q.amax({1}, true);
    at::Tensor lse = at::sub(log_q, shift).exp_().sum(1, true).log_().add_(shift);
    log_q = log_q.sub_(lse);
    at::Tensor q = log_q.exp();
    at::Tensor p_top = log_p_top.exp();
    at::Tensor p_rest = p_top.sum(1, true).log_().expm1_().neg_().clamp_min_(0.0);
    at::Tensor p = at::cat({p_top, p_rest}, 1);
    at::Tensor log_p = at::cat({log_p_top, p_rest.log()}, 1);
    at::Tensor soft, g;
    if (beta == 0.0) {
      soft = at::mul(p, at::sub(log_p, log_q).masked_fill_(at::eq(p, 0), 0.0)).sum(1);
      g = p.neg_();
    } else if (beta == 1.0) {
      at::Tensor qr = at::mul(q, at::sub(log_q, log_p).masked_fill_(at::eq(q, 0), 0.0));
      soft = qr.sum(1);
      g = qr.add_(q);
    } else {
      at::Tensor m = at::add(at::mul(p, beta), at::mul(q, 1.0 - beta));
      at::Tensor log_m = m.masked_fill_(at::eq(m, 0), 1.0).log_();
      at::Tensor qr = at::mul(q, at::sub(log_q, log_m).masked_fill_(at::eq(q, 0), 0.0));
      soft = at::add(at::mul(at::mul(p, at::sub(log_p, log_m).masked_fill_(at::eq(p, 0), 0.0)).sum(1), beta),
                     at::mul(qr.sum(1), 1.0 - beta));
      g = qr.mul_(1.0 - beta);
    }
    at::Tensor rows = w_soft == 1.0 ? soft : at::mul(soft, w_soft);
    at::Tensor log_q1;
    if (hard) {
      at::Tensor hard_rows;
      if (temperature == 1.0) {
        hard_rows = at::sub(lse, z_y).squeeze(1);
      } else {
        at::Tensor x = cast(student, compute);
        if (valid.has_value()) x = x.masked_fill(valid->unsqueeze(1).logical_not(), 0.0);
        log_q1 = at::sub(x, x.amax({1}, true));
        log_q1 = at::sub(log_q1, log_q1.exp().sum(1, true).log());
        hard_rows = log_q1.gather(1, column).squeeze(1).neg();
      }
      rows = at::add(rows, at::mul(hard_rows, w_hard));
    }
    if (valid.has_value()) rows = at::where(*valid, rows, 0.0);
    loss = losskit::reduce_counted_rows(rows, valid, reduction, n);
    loss = cast(loss, out);
    if (needs[0]) {
      // The row factor: a number (factor_v) or a column (factor).
      at::Tensor factor;
      double factor_v = 1.0;
      if (reduction == "mean") {
        if (valid.has_value()) {
          factor = cast(valid->sum().clamp_min(1), compute).reciprocal();
        } else {
          factor_v = 1.0 / static_cast<double>(std::max<int64_t>(n, 1));
        }
      }
      if (valid.has_value()) {
        factor = factor.defined() ? at::where(*valid, factor, 0.0) : at::mul(valid->to(compute), factor_v);
        factor = factor.unsqueeze(1);
      }
      at::Tensor gamma = g.sum(1, true);
      at::Tensor q_shift = at::sub(m_r, lse).exp_();
      at::Tensor coef = at::div(g.slice(1, k), e_r.clamp_min(1.0)).sub_(at::mul(gamma, q_shift));
      at::Tensor q_top = q.slice(1, 0, k);
      at::Tensor values = at::sub(g.slice(1, 0, k), at::mul(q_top, gamma));
      const double soft_scale = w_soft / temperature;
      if (factor.defined()) {
        at::Tensor scale = at::mul(factor, soft_scale);
        coef = at::mul(coef, scale);
        values = at::mul(values, scale);
      } else if (factor_v * soft_scale != 1.0) {
        coef = at::mul(coef, factor_v * soft_scale);
        values = at::mul(values, factor_v * soft_scale);
      }
      at::Tensor h;
      const double h_v = factor_v * w_hard;
      if (factor.defined()) h = at::mul(factor, w_hard);
      if (hard && temperature == 1.0) {
        coef = at::add(coef, h.defined() ? at::mul(q_shift, h) : at::mul(q_shift, h_v));
        values = at::add(values, h.defined() ? at::mul(q_top, h) : at::mul(q_top, h_v));
      }
      at::Tensor grad = e.mul_(coef).scatter_add_(1, ids, values);
      if (hard) {
        if (temperature == 1.0) {
          grad.scatter_add_(1, column, h.defined() ? h.neg() : at::full_like(z_y, -h_v));
        } else {
          at::Tensor hard_grad =
              log_q1.exp_().scatter_add_(1, column, at::full_like(column, -1, column.options().dtype(compute)));
          grad.add_(h.defined() ? hard_grad.mul_(h) : hard_grad.mul_(h_v));
        }
      }
      grad_out = cast(grad, student.scalar_type());
    }
  }
  return py::make_tuple(loss, grad_out.defined() ? py::cast(grad_out) : py::none());
}

// _check_topk's four checks on the counted rows, in one read of ids and logps: True when
// every id is in [0, num_classes), no row names an id twice, every log-probability is <= 0
// (not nan) and each row's logsumexp is clearly below ``slack``. False for anything else,
// including a logsumexp too close to ``slack`` to call in double precision against
// torch's float32: Python then runs its own checks, which raise with their messages (or
// pass), so the result never differs from Python's.
bool topk_check(const at::Tensor& ids_in, const at::Tensor& logps_in, const std::optional<at::Tensor>& valid_in,
                int64_t num_classes, double slack) {
  if (!ids_in.is_cpu() || !logps_in.is_cpu() || ids_in.scalar_type() != at::kLong || ids_in.dim() != 2 ||
      logps_in.sizes() != ids_in.sizes() || !at::isFloatingType(logps_in.scalar_type()) ||
      (valid_in.has_value() && (!valid_in->is_cpu() || valid_in->scalar_type() != at::kBool ||
                                valid_in->numel() != ids_in.size(0)))) {
    return false;
  }
  const at::Tensor ids = ids_in.contiguous(), logps = logps_in.contiguous();
  at::Tensor valid;
  if (valid_in.has_value()) valid = valid_in->contiguous();
  const int64_t n = ids.size(0), k = ids.size(1);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const bool* counted = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  // The row that last named each class: a repeat is a class seen twice in one row.
  std::vector<int64_t> seen(static_cast<size_t>(std::max<int64_t>(num_classes, 0)), -1);
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logps.scalar_type(), "topk_check", [&] {
    const scalar_t* lp = logps.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < n && ok; ++r) {
      if (counted != nullptr && !counted[r]) continue;
      double top = -kInf;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t c = id[r * k + j];
        const double x = static_cast<double>(lp[r * k + j]);
        if (c < 0 || c >= num_classes || seen[c] == r || !(x <= 0)) {
          ok = false;
          break;
        }
        seen[c] = r;
        top = std::max(top, x);
      }
      if (!ok || k == 0 || top == -kInf) continue;
      double sum = 0.0;
      for (int64_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(lp[r * k + j]) - top);
      const double lse = top + std::log(sum);
      // float32's logsumexp of k terms is within a few ulps of k terms of this one.
      const double margin = 1e-5 * static_cast<double>(k + 1) * (1.0 + std::abs(top));
      if (!(lse < slack - margin)) ok = false;
    }
  });
  return ok;
}

}  // namespace

void register_topk_distillation(py::module& m) {
  m.def("topk_distillation", &topk_distillation, "losskit.kernels.topk_distillation's topk_distillation_forward");
  m.def("topk_check", &topk_check, "functional.distillation's _check_topk on CPU: True when every check passes");
}
LOSSKIT_REGISTER(register_topk_distillation)
