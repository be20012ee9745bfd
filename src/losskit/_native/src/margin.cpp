// The eager CPU forms of multi_margin_loss and multilabel_margin_loss (see
// losskit/functional/margin.py, whose Python kernels these replace in eager calls).
//
// multi_margin and the pairwise multilabel form (C <= PAIRWISE_CLASSES) give the Python
// kernels' bits (tests/test_native.py): their element-wise float32 arithmetic is one loop here
// (each operation exactly rounded, in the same order, gives the same value as ATen's vectorised
// op), and every sum over floats is the same ATen reduction over the same tensor. Integer
// counts (how often a class is listed, how many terms a class takes part in) are exact in
// any order and are plain loops.
//
// Beyond PAIRWISE_CLASSES, multilabel_margin is torch's own loop (aten LossMultiLabelMargin.cpp):
// for each listed target a of a row and each non-target value v, the term z = (1 - a) + v in
// the input's precision, counted where z > 0, summed in double and rounded once per row, so
// the per-row loss is torch's to the bit. The Python form (sort + prefix sums, same O(N C)
// memory) sums the same terms in another order: its losses agree with these to float32
// rounding, its gradients exactly (both count the terms, then scale the count once).
#include "losskit_native.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// The Python kernels' threshold (functional/margin.py PAIRWISE_CLASSES).
constexpr int64_t kPairwiseClasses = 32;

// 1 / C, and for 'mean' also 1 / N (functional/margin.py _row_scale); callers decline C = 0.
double row_scale(int64_t rows, int64_t classes, const std::string& reduction) {
  return reduction == "mean" && rows ? 1.0 / static_cast<double>(classes * rows) : 1.0 / static_cast<double>(classes);
}

// What the kernels serve: CPU scores computed in float32 (float32 and the half types; float64
// keeps the Python path).
bool served(const at::Tensor& input) {
  const auto type = input.scalar_type();
  return input.device().is_cpu() && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf);
}

// f(pointer to the scores) in their own type: the loops read float32, bfloat16 and float16
// alike, each value widened to float32 exactly (what the Python kernels' .to(float32) does),
// without a float32 copy of the input.
template <typename F>
void with_scores(const at::Tensor& x, F&& f) {
  switch (x.scalar_type()) {
    case at::kBFloat16:
      f(x.const_data_ptr<at::BFloat16>());
      break;
    case at::kHalf:
      f(x.const_data_ptr<at::Half>());
      break;
    default:
      f(x.const_data_ptr<float>());
  }
}

// functional/margin.py _reduced: the per-row losses, already scaled, summed unless 'none'
// (an empty batch never reaches here).
at::Tensor reduced(const at::Tensor& loss, const std::string& reduction) {
  return reduction == "none" ? loss : loss.sum();
}

// Whether every element of an integer tensor lies in [lowest, classes): the extremes check of
// functional/margin.py _check_classes, read here in one pass. False sends the call to the
// Python check, which names the first bad index (or, for multilabel targets past a row's
// first -1, finds nothing wrong).
bool classes_in_range(const at::Tensor& target, int64_t lowest, int64_t classes) {
  if (!target.device().is_cpu() || target.numel() == 0) return false;
  at::Tensor t = target.contiguous();
  bool ok = true;
  AT_DISPATCH_INTEGRAL_TYPES(t.scalar_type(), "losskit classes_in_range", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    const int64_t n = t.numel();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = static_cast<int64_t>(data[i]);
      if (v < lowest || v >= classes) {
        ok = false;
        break;
      }
    }
  });
  return ok;
}

// (loss, d loss / d input in float32), or None to leave the call to the Python kernel.
// ``input`` is the caller's (C,) or (N, C) scores, ``target`` its () / (N,) class indices,
// already checked; the loss is in the input's dtype (float32 or lower), reshaped for 'none'
// to ``target_shape``. The element-wise part of functional/margin.py _MultiMargin is one loop
// here (the same float32 operations, each exactly rounded, so the same values); its sums are
// the same ATen reductions over the same tensors.
py::object multi_margin(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        int64_t p, double margin, const std::string& reduction, std::vector<int64_t> target_shape,
                        bool need_grad) {
  if (!served(input) || input.dim() < 1 || input.dim() > 2) return py::none();
  at::NoGradGuard no_grad;  // the loss and gradient are made here; attach() gives the autograd node
  at::Tensor x = input.contiguous();
  const int64_t n = x.dim() == 1 ? 1 : x.size(0), c = x.size(-1);
  const auto f32 = x.options().dtype(at::kFloat);
  if (n == 0 || c == 0) return py::none();
  at::Tensor index = (target.scalar_type() == at::kLong ? target : target.to(at::kLong)).contiguous();
  const int64_t* t = index.const_data_ptr<int64_t>();
  const double scale = row_scale(n, c, reduction);
  const float step = static_cast<float>(scale);  // a Python float meets a float32 tensor as float32
  at::Tensor w;  // the class weights, as the Python kernel's weight.to(float32)
  if (weight.has_value()) w = weight->to(at::kFloat).contiguous();
  const float* ws = w.defined() ? w.const_data_ptr<float>() : nullptr;

  at::Tensor hinge = at::empty({n, c}, f32);
  at::Tensor grad = need_grad ? at::empty({n, c}, f32) : at::Tensor();
  at::Tensor row_step;  // weight of the row's target times scale, (N, 1), where weighted
  if (ws != nullptr) row_step = at::empty({n, 1}, f32);
  float* hs = hinge.data_ptr<float>();
  float* gs = need_grad ? grad.data_ptr<float>() : nullptr;
  const float at_margin = static_cast<float>(margin);
  float* steps = ws != nullptr ? row_step.data_ptr<float>() : nullptr;
  with_scores(x, [&](const auto* xs) {
    // Rows are independent (each writes its own row of hinge and grad): split them over
    // torch's threads, which changes no value.
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / c), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto* row = xs + r * c;
        const int64_t y = t[r];
        const float shift = at_margin - static_cast<float>(row[y]);  // margin - x_y, then x_i + that: torch's order
        const float g = ws != nullptr ? ws[y] * step : step;
        if (steps != nullptr) steps[r] = g;
        int64_t terms = 0;
        for (int64_t i = 0; i < c; ++i) {
          float h = static_cast<float>(row[i]) + shift;
          h = std::isnan(h) ? h : (h < 0 ? 0.0f : h);  // clamp_min(0), which keeps nan
          if (i == y) h = 0.0f;
          terms += h > 0;
          if (need_grad) gs[r * c + i] = p == 1 ? static_cast<float>(h > 0) * g : h * (g * 2);
          hs[r * c + i] = p == 1 ? h : h * h;
        }
        // p = 1: the target's gradient is minus the count of terms, scaled once.
        if (need_grad && p == 1) gs[r * c + y] = -static_cast<float>(terms) * g;
      }
    });
  });
  if (need_grad && p != 1) {
    at::Tensor sums = grad.sum(1);
    const float* ss = sums.const_data_ptr<float>();
    for (int64_t r = 0; r < n; ++r) gs[r * c + t[r]] = -ss[r];
  }
  at::Tensor loss;
  if (ws == nullptr && reduction != "none") {
    loss = hinge.sum();
    float* value = loss.data_ptr<float>();
    *value = *value * step;  // the Python kernel's hinge.sum() * scale, in float32
  } else if (ws == nullptr) {
    loss = hinge.sum(1) * scale;
  } else {
    loss = (hinge.sum(1, true) * row_step).squeeze(1);
  }
  if (loss.dim()) loss = reduced(loss, reduction);
  if (reduction == "none") loss = loss.reshape(target_shape);
  if (loss.scalar_type() != input.scalar_type()) loss = loss.to(input.scalar_type());
  if (need_grad && input.dim() == 1) grad = grad.squeeze(0);
  return py::make_tuple(loss, need_grad ? py::cast(grad) : py::none());
}

// The everyday eager call of multi_margin_loss, whole: (N, C) scores of a served dtype, (N,)
// integer class indices all in [0, C), no weight or a (C,) floating CPU weight that wants no
// gradient, p 1 or 2, a known reduction; then multi_margin and, where a gradient is made,
// the autograd node (``node``: None or (node name, what, reference); see attach_one). None
// for anything else: functional/margin.py then checks, raises and computes as before.
py::object multi_margin_eager(const at::Tensor& input, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, int64_t p, double margin,
                              const std::string& reduction, bool need_grad, const py::object& node) {
  if (!served(input) || input.dim() != 2 || target.dim() != 1 || target.size(0) != input.size(0) ||
      input.size(0) == 0 || input.size(1) == 0 || (p != 1 && p != 2) ||
      (reduction != "mean" && reduction != "sum" && reduction != "none")) {
    return py::none();
  }
  const auto kind = target.scalar_type();
  if (!at::isIntegralType(kind, /*includeBool=*/false) || !target.device().is_cpu()) return py::none();
  if (weight.has_value() && (weight->dim() != 1 || weight->size(0) != input.size(1) || !weight->device().is_cpu() ||
                             !at::isFloatingType(weight->scalar_type()) || weight->requires_grad())) {
    return py::none();
  }
  if (!classes_in_range(target, 0, input.size(1))) return py::none();
  py::object made = multi_margin(input, target, weight, p, margin, reduction, {input.size(0)}, need_grad);
  if (made.is_none() || node.is_none()) return made;
  auto out = made.cast<py::tuple>();
  if (out[1].is_none()) return made;
  return py::make_tuple(losskit::attach_one(node, out[0].cast<at::Tensor>(), input, out[1].cast<at::Tensor>(),
                                            reduction == "none"),
                        py::none());
}

// How often each class is listed among the targets of its row (up to the row's first -1):
// the Python kernel's scatter_add of the counted mask, whose float32 sums are integers.
std::vector<float> listed_counts(const at::Tensor& target, int64_t rows, int64_t classes) {
  std::vector<float> listed(rows * classes, 0.0f);
  const int64_t* t = target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < classes; ++k) {
      const int64_t j = t[r * classes + k];
      if (j < 0) break;  // the first -1 ends the row's targets (checked: j < classes)
      listed[r * classes + j] += 1.0f;
    }
  }
  return listed;
}

// functional/margin.py _multilabel_margin_pairs: the terms z (times listed_j * scale) of the
// counted pairs in one loop, summed by the same ATen reduction; the gradient from exact
// integer counts, scaled once (as the Python kernel does).
std::pair<at::Tensor, at::Tensor> multilabel_pairs(const at::Tensor& x, const std::vector<float>& listed,
                                                   double scale, bool per_row, bool need_grad) {
  const int64_t rows = x.size(0), classes = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor terms = at::empty({rows, classes, classes}, f32);
  at::Tensor grad = need_grad ? at::empty({rows, classes}, f32) : at::Tensor();
  const float* ls = listed.data();
  float* zs = terms.data_ptr<float>();
  float* gs = need_grad ? grad.data_ptr<float>() : nullptr;
  const float step = static_cast<float>(scale);
  std::vector<float> count(classes);  // (pairs as non-target) - (pairs as target), an integer
  with_scores(x, [&](const auto* xs) {
    for (int64_t r = 0; r < rows; ++r) {
      const auto* row = xs + r * classes;
      const float* times = ls + r * classes;
      std::fill(count.begin(), count.end(), 0.0f);
      for (int64_t j = 0; j < classes; ++j) {
        float* out = zs + (r * classes + j) * classes;
        const float one_minus_a = 1.0f - static_cast<float>(row[j]);
        const float weight = times[j] * step;
        for (int64_t i = 0; i < classes; ++i) {
          const float z = one_minus_a + static_cast<float>(row[i]);
          const bool counted = z > 0 && times[j] > 0 && times[i] == 0;
          out[i] = counted ? z * weight : 0.0f;
          if (counted) {
            count[i] += times[j];
            count[j] -= times[j];
          }
        }
      }
      if (need_grad) {
        for (int64_t i = 0; i < classes; ++i) gs[r * classes + i] = count[i] * step;
      }
    }
  });
  return {per_row ? terms.sum(at::IntArrayRef{1, 2}) : terms.sum(), grad};
}

// torch's loop (see the top of this file), one row at a time, rows in parallel: the per-row
// loss times scale, and the gradient as (count of the terms a class takes part in, + for a
// non-target, - for a target) times scale.
std::pair<at::Tensor, at::Tensor> multilabel_rows(const at::Tensor& x, const at::Tensor& target, double scale,
                                                  bool need_grad) {
  const int64_t rows = x.size(0), classes = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32);
  at::Tensor grad = need_grad ? at::empty({rows, classes}, f32) : at::Tensor();
  const int64_t* ts = target.const_data_ptr<int64_t>();
  float* ls = loss.data_ptr<float>();
  float* gs = need_grad ? grad.data_ptr<float>() : nullptr;
  const float step = static_cast<float>(scale);  // as a float32 tensor times a Python float
  with_scores(x, [&](const auto* xs) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(classes, 1)), [&](int64_t begin, int64_t end) {
      std::vector<char> is_target(classes);
      std::vector<int64_t> count(need_grad ? classes : 0);
      for (int64_t r = begin; r < end; ++r) {
        const auto* row = xs + r * classes;
        const int64_t* t = ts + r * classes;
        std::fill(is_target.begin(), is_target.end(), 0);
        for (int64_t k = 0; k < classes && t[k] >= 0; ++k) is_target[t[k]] = 1;
        if (need_grad) std::fill(count.begin(), count.end(), 0);
        double sum = 0;
        for (int64_t k = 0; k < classes && t[k] >= 0; ++k) {
          const int64_t j = t[k];
          const float one_minus_a = 1.0f - static_cast<float>(row[j]);
          int64_t terms = 0;
          for (int64_t d = 0; d < classes; ++d) {
            if (is_target[d]) continue;
            const float z = one_minus_a + static_cast<float>(row[d]);
            if (z > 0) {
              sum += z;
              ++terms;
              if (need_grad) ++count[d];
            }
          }
          if (need_grad) count[j] -= terms;
        }
        ls[r] = static_cast<float>(sum) * step;
        if (need_grad) {
          float* g = gs + r * classes;
          for (int64_t d = 0; d < classes; ++d) g[d] = static_cast<float>(count[d]) * step;
        }
      }
    });
  });
  return {loss, grad};
}

// (loss, d loss / d input in float32), or None to leave the call to the Python kernel.
// ``input`` is the caller's (C,) or (N, C) scores, ``target`` the same shape, already checked.
py::object multilabel_margin(const at::Tensor& input, const at::Tensor& target, const std::string& reduction,
                             bool need_grad) {
  if (!served(input) || input.dim() < 1 || input.dim() > 2 || input.sizes() != target.sizes()) {
    return py::none();
  }
  at::NoGradGuard no_grad;  // the loss and gradient are made here; attach() gives the autograd node
  at::Tensor x = input.contiguous();
  const bool unbatched = x.dim() == 1;
  if (unbatched) x = x.unsqueeze(0);
  const int64_t n = x.size(0), c = x.size(1);
  if (n == 0 || c == 0) return py::none();
  at::Tensor t = (target.scalar_type() == at::kLong ? target : target.to(at::kLong)).contiguous();
  const double scale = row_scale(n, c, reduction);
  at::Tensor loss, grad;
  if (c <= kPairwiseClasses) {
    std::tie(loss, grad) = multilabel_pairs(x, listed_counts(t, n, c), scale, reduction == "none", need_grad);
  } else {
    std::tie(loss, grad) = multilabel_rows(x, t, scale, need_grad);
  }
  if (loss.dim()) loss = reduced(loss, reduction);
  if (unbatched && reduction == "none") loss = loss.squeeze(0);
  if (loss.scalar_type() != input.scalar_type()) loss = loss.to(input.scalar_type());
  if (need_grad && unbatched) grad = grad.squeeze(0);
  return py::make_tuple(loss, need_grad ? py::cast(grad) : py::none());
}

}  // namespace

void register_margin(py::module& m) {
  m.def("classes_in_range", &classes_in_range, "whether every class index lies in [lowest, classes)");
  m.def("multi_margin", &multi_margin, "multi_margin_loss and its gradient (eager CPU)");
  m.def("multi_margin_eager", &multi_margin_eager, "an eager CPU multi_margin_loss call: checks, forward and node");
  m.def("multilabel_margin", &multilabel_margin, "multilabel_margin_loss and its gradient (eager CPU)");
}
LOSSKIT_REGISTER(register_margin)
