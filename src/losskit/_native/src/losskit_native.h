// What every source file of losskit's compiled part shares: each file registers its
// functions into the one Python module with LOSSKIT_REGISTER, so that adding a file
// touches no other.
#pragma once

// ATen and torch's pybind11 type casters only: torch/extension.h (the whole C++ frontend)
// doubles each file's compile time. A file that needs more includes it itself.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

namespace losskit {

using Registrar = void (*)(pybind11::module&);

inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> all;
  return all;
}

// precomputed.cpp's attach(): ``loss`` gets the precomputed-gradient autograd node ``name``,
// for a loss's own compiled call that makes its autograd node without going back to Python.
at::Tensor attach_precomputed(std::string name, at::Tensor loss, const std::vector<std::optional<at::Tensor>>& inputs,
                              const std::vector<std::optional<at::Tensor>>& grads, bool per_row,
                              pybind11::object replay);

// attach_precomputed for a loss of one differentiable input, from a compiled eager call:
// ``node`` is (node name, what, reference), and the replay a double backward may ask for is
// (reference, a weak reference to ``input``, its version), which
// losskit.kernels.fused_op._replay_for_native turns into a Replay only then.
at::Tensor attach_one(const pybind11::object& node, at::Tensor loss, const at::Tensor& input, const at::Tensor& grad,
                      bool per_row);

// _core/reduction.py's reduce_loss: the losses as they are ('none'), their sum, or their
// mean (over the elements, or their sum divided by ``denominator`` where one is given).
// The reduction is checked before (the Python callers validate it).
inline at::Tensor reduce_loss(const at::Tensor& loss, const std::string& reduction,
                              const at::Tensor& denominator = at::Tensor()) {
  if (reduction == "sum") return loss.sum();
  if (reduction != "mean") return loss;
  return denominator.defined() ? at::div(loss.sum(), denominator) : loss.mean();
}

// kernels/linear_distillation.py's _reduce_rows: the rows as they are ('none'), their sum, or
// their mean over the ``n`` rows, or over the rows ``valid`` counts (at least one).
inline at::Tensor reduce_counted_rows(const at::Tensor& rows, const std::optional<at::Tensor>& valid,
                                      const std::string& reduction, int64_t n) {
  if (reduction == "none") return rows;
  at::Tensor total = rows.sum();
  if (reduction == "sum") return total;
  if (!valid.has_value()) return at::div(total, static_cast<double>(std::max<int64_t>(n, 1)));
  at::Tensor count = valid->sum().clamp_min(1);
  return at::div(total, count.scalar_type() == total.scalar_type() ? count : count.to(total.scalar_type()));
}

struct Register {
  explicit Register(Registrar registrar) { registrars().push_back(registrar); }
};

}  // namespace losskit

// LOSSKIT_REGISTER(fn): fn(module) runs when the module is imported.
#define LOSSKIT_REGISTER(fn) static ::losskit::Register losskit_register_##fn(fn);
