// The autograd node of losskit's fused losses in eager mode (see losskit/kernels/fused_op.py).
//
// A fused kernel makes the loss and its gradients in forward, without autograd. attach()
// gives the loss a grad_fn whose backward scales those gradients by grad_output (in place:
// they are handed out once) and returns them: what the Python autograd.Function of
// fused_op.py does, without its per-call cost in Python. A backward it cannot serve
// (create_graph=True, or a second backward through a retained graph, which finds the
// gradients used up) calls back into Python, which replays the call on the reference path.
//
// A derived first gradient (fused_op.py's FusedOp.derives): the node keeps every gradient
// but the first, which backward forms from the others once they are scaled, as
// fused_op.derived_first does: -(g_1 + g_2 + ...), summed left to right, then negated; in
// a half type each sum is formed in float32 and rounded once, as ATen's add.
#include "losskit_native.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_cpp_function.h>

#include <mutex>

namespace py = pybind11;
using torch::autograd::Node;
using torch::autograd::variable_list;

namespace {

// losskit.kernels.fused_op._replay_for_native(name, replay, grad_output, create_graph),
// set once when losskit first loads this module.
py::object* replay_handler = nullptr;

// Whether a one-element CPU tensor holds exactly 1, read in place (item() would dispatch).
bool is_one(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return *t.const_data_ptr<float>() == 1.0f;
    case at::kDouble: return *t.const_data_ptr<double>() == 1.0;
    case at::kBFloat16: return static_cast<float>(*t.const_data_ptr<at::BFloat16>()) == 1.0f;
    case at::kHalf: return static_cast<float>(*t.const_data_ptr<at::Half>()) == 1.0f;
    default: return t.item<double>() == 1.0;
  }
}

class PrecomputedBackward : public Node {
 public:
  PrecomputedBackward(std::string name, std::vector<at::Tensor> grads, bool per_row, bool derive_first,
                      py::object replay)
      : name_(std::move(name)),
        grads_(std::move(grads)),
        per_row_(per_row),
        derive_first_(derive_first),
        replay_(std::move(replay)) {}

  ~PrecomputedBackward() override {
    // The node may die in a thread that does not hold the GIL (autograd's device threads).
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      replay_ = py::object();
    } else {
      replay_.release();
    }
  }

  std::string name() const override { return name_; }
  const std::vector<at::Tensor>& held() const { return grads_; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(lock_);
    grads_.clear();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    const at::Tensor& grad_output = grad_outputs[0];
    variable_list grads;
    if (!at::GradMode::is_enabled()) {
      // Handed out once: two threads running backward through one retained graph take
      // them in turn, and the second finds them gone and replays.
      std::lock_guard<std::mutex> lock(lock_);
      grads = std::move(grads_);
      grads_.clear();
    }
    if (grads.empty()) {
      TORCH_CHECK(replay_handler != nullptr,
                  "losskit: a backward to replay, but no replay handler is set (losskit.kernels.fused_op.native_module "
                  "sets it when it loads this module)");
      py::gil_scoped_acquire gil;
      auto replayed = (*replay_handler)(name_, replay_, grad_output, at::GradMode::is_enabled())
                          .cast<std::vector<std::optional<at::Tensor>>>();
      for (auto& grad : replayed) grads.push_back(grad.has_value() ? *grad : at::Tensor());
      return grads;
    }
    // A scalar grad_output of exactly 1 (loss.backward()) leaves the buffers as they are;
    // reading it is free on the CPU only (elsewhere it would wait for the device).
    if (per_row_ || !grad_output.is_cpu() || grad_output.numel() != 1 || !is_one(grad_output)) {
      for (auto& grad : grads) {
        if (!grad.defined()) continue;
        at::Tensor factor = grad_output;
        if (per_row_ && grad.dim() > grad_output.dim()) {
          std::vector<int64_t> shape(grad_output.sizes().begin(), grad_output.sizes().end());
          shape.resize(grad.dim(), 1);
          factor = grad_output.reshape(shape);
        }
        grad.mul_(factor.scalar_type() == grad.scalar_type() ? factor : factor.to(grad.scalar_type()));
      }
    }
    if (derive_first_) grads[0] = derived_first(grads);
    return grads;
  }

 private:
  std::string name_;
  std::mutex lock_;
  std::vector<at::Tensor> grads_;
  bool per_row_;
  bool derive_first_;
  py::object replay_;

  // fused_op.derived_first: the same bits. Two contiguous float32/float64 gradients of one
  // shape (triplet_margin's dp and dn) in one pass, -(g1[i] + g2[i]): the sum rounded, then
  // negated exactly, as at::add(g1, g2).neg_() does in two (a pass over [N, D] saved). The
  // half types take ATen's two passes, whose vectorised conversions to and from float32
  // are several times faster than a scalar loop's (measured: 2.2 ms against 17 ms at
  // 2048x1024 bfloat16, one thread).
  static at::Tensor derived_first(const variable_list& grads) {
    if (grads.size() == 3 && grads[1].is_cpu() && grads[1].is_contiguous() && grads[2].is_contiguous() &&
        grads[1].sizes() == grads[2].sizes() && grads[1].scalar_type() == grads[2].scalar_type()) {
      if (grads[1].scalar_type() == at::kFloat) return negated_sum<float>(grads[1], grads[2]);
      if (grads[1].scalar_type() == at::kDouble) return negated_sum<double>(grads[1], grads[2]);
    }
    if (grads.size() == 2) return grads[1].neg();
    at::Tensor total = at::add(grads[1], grads[2]);
    for (size_t i = 3; i < grads.size(); ++i) total.add_(grads[i]);
    return total.neg_();
  }

  template <typename T>
  static at::Tensor negated_sum(const at::Tensor& a, const at::Tensor& b) {
    at::Tensor out = at::empty_like(a, at::MemoryFormat::Contiguous);
    const T* x = a.const_data_ptr<T>();
    const T* y = b.const_data_ptr<T>();
    T* z = out.mutable_data_ptr<T>();
    at::parallel_for(0, a.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) z[i] = -(x[i] + y[i]);
    });
    return out;
  }
};

}  // namespace

namespace {

// ``loss`` (made without autograd) gets a grad_fn named ``name`` whose edges lead to the
// ``inputs`` that require grad and whose gradients are ``grads`` (None where not made);
// ``derive_first``: the first gradient (None) is formed in backward from all the others,
// which must be made (fused_op.py's FusedOp.derives).
at::Tensor attach_node(std::string name, at::Tensor loss, const std::vector<std::optional<at::Tensor>>& inputs,
                       const std::vector<std::optional<at::Tensor>>& grads, bool per_row, py::object replay,
                       bool derive_first) {
  TORCH_CHECK(inputs.size() == grads.size(), "losskit attach: ", inputs.size(), " inputs, ", grads.size(), " grads");
  torch::autograd::edge_list edges;
  std::vector<at::Tensor> kept;
  edges.reserve(inputs.size());
  kept.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& input = inputs[i];
    const bool made = grads[i].has_value() && grads[i]->defined();
    const bool requires = input.has_value() && input->defined() && input->requires_grad();
    if (derive_first && i > 0) {
      TORCH_CHECK(requires && made, "losskit attach: a derived first gradient needs every other gradient");
    }
    bool wanted = requires && (made || (derive_first && i == 0));
    edges.push_back(wanted ? torch::autograd::impl::gradient_edge(*input) : torch::autograd::Edge());
    kept.push_back(wanted && made ? *grads[i] : at::Tensor());
  }
  TORCH_CHECK(!derive_first || (inputs.size() >= 2 && edges[0].is_valid() && !kept[0].defined()),
              "losskit attach: a derived first gradient is wanted and not made");
  auto node = c10::make_intrusive<PrecomputedBackward>(std::move(name), std::move(kept), per_row, derive_first,
                                                       std::move(replay));
  node->set_next_edges(std::move(edges));
  torch::autograd::set_history(loss, node);
  return loss;
}

}  // namespace

at::Tensor losskit::attach_precomputed(std::string name, at::Tensor loss, const std::vector<std::optional<at::Tensor>>& inputs,
                  const std::vector<std::optional<at::Tensor>>& grads, bool per_row, py::object replay) {
  return attach_node(std::move(name), std::move(loss), inputs, grads, per_row, std::move(replay), false);
}

at::Tensor losskit::attach_one(const py::object& node, at::Tensor loss, const at::Tensor& input,
                               const at::Tensor& grad, bool per_row) {
  auto spec = node.cast<py::tuple>();
  if (loss.is_view()) loss = loss.detach();  // as fused_op.attach_precomputed: never an autograd view
  py::list needs, shapes;
  needs.append(true);
  shapes.append(py::cast(input.sizes().vec()));
  py::object tensor = py::cast(input);  // the input's Python object
  auto handle = py::reinterpret_steal<py::object>(PyWeakref_NewRef(tensor.ptr(), nullptr));
  if (!handle) throw py::error_already_set();
  py::tuple replay = py::make_tuple(spec[2], handle, input._version());
  return attach_precomputed(spec[0].cast<std::string>(), loss, {input}, {grad}, per_row,
                            py::make_tuple(spec[1], replay, needs, shapes));
}

namespace {

// The gradients a grad_fn made by attach() keeps for backward (none for any other node):
// what tests/test_memory.py counts.
std::vector<at::Tensor> held(py::handle grad_fn) {
  if (!torch::autograd::THPCppFunction_Check(grad_fn.ptr())) return {};
  auto* node = dynamic_cast<PrecomputedBackward*>(((torch::autograd::THPCppFunction*)grad_fn.ptr())->cdata.get());
  if (node == nullptr) return {};
  std::vector<at::Tensor> out;
  for (const auto& grad : node->held()) {
    if (grad.defined()) out.push_back(grad);
  }
  return out;
}

void set_replay_handler(py::object handler) {
  if (replay_handler == nullptr) replay_handler = new py::object();  // never freed: lives as long as the process
  *replay_handler = std::move(handler);
}

}  // namespace

void register_precomputed(py::module& m) {
  m.def("attach", &attach_node, "the precomputed-gradient autograd node of a fused loss");
  m.def("held", &held, "the gradients a losskit grad_fn keeps for backward");
  m.def("set_replay_handler", &set_replay_handler, "the Python function that replays a call for create_graph");
}
LOSSKIT_REGISTER(register_precomputed)
