// losskit's CTC kernel (losskit/kernels/ctc.py: ctc_loss_and_grad) for eager CPU calls:
// the Python kernel's ATen op sequence, op by op, in the same order and with the same
// operands, so the same bits (tests/test_native.py, tests/test_native_ctc.py), at ~1 us an
// op instead of ~6 from Python.
//
// Two things differ in how the ops are issued, never in what they compute:
// - The frame loop makes its views once and moves them along the buffer (a storage
//   offset set in place), instead of five views made per frame.
// - With the gradient wanted, the forward problem and the reversed one (the buffer's two
//   halves, [2, T + 1, L + 2, N]) each run their frames on a thread of their own. A frame
//   of one problem is then one contiguous row of L N elements, exactly what each of the
//   Python kernel's ops over both ([2, L N], rows apart in memory) runs per row: ATen's
//   elementwise loops take a row at a time, vectorised from its start, its tail alone
//   element by element. So this holds only where the Python op itself runs in one piece,
//   2 L N <= at::internal::GRAIN_SIZE; above that ATen splits it between threads at
//   places of its own, and the ops run here as in Python, over both problems at once.
#include "losskit_native.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <limits>
#include <mutex>

namespace py = pybind11;
using at::Tensor;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// A view of ``base``'s storage, [D, n] with rows ``row_stride`` apart, whose offset the
// frame loop moves in place (no op, no new tensor per frame).
Tensor movable_view(const Tensor& base, int64_t directions, int64_t n, int64_t row_stride) {
  return base.as_strided({directions, n}, {row_stride, 1}, base.storage_offset());
}

void move_to(Tensor& view, int64_t offset) { view.unsafeGetTensorImpl()->set_storage_offset(offset); }

// kernels/ctc.py: the loop of _forward_variables over the problems of ``buffer``
// [D, T + 1, L + 2, N] and ``emit`` [D, T, L, N] (slices of the whole, in place), with the
// mask ``skip`` [D, L N].
void run_frames(const Tensor& buffer, const Tensor& emit, const Tensor& skip) {
  const int64_t directions = emit.size(0), steps = emit.size(1), width = emit.size(2), batch = emit.size(3);
  const int64_t row = (width + 2) * batch, span = width * batch;
  const int64_t buffer_stride = buffer.stride(0), emit_stride = emit.stride(0);
  const int64_t base = buffer.storage_offset(), emit_base = emit.storage_offset();
  Tensor stay_or_step = at::empty_like(skip), jump = at::empty_like(skip);
  Tensor rows_t = movable_view(buffer, directions, span, buffer_stride);
  Tensor left_t = movable_view(buffer, directions, span, buffer_stride);
  Tensor two_left_t = movable_view(buffer, directions, span, buffer_stride);
  Tensor next = movable_view(buffer, directions, span, buffer_stride);
  Tensor emission = movable_view(emit, directions, span, emit_stride);
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t at_row = base + t * row;
    move_to(rows_t, at_row + 2 * batch);
    move_to(left_t, at_row + batch);
    move_to(two_left_t, at_row);
    move_to(next, at_row + row + 2 * batch);
    move_to(emission, emit_base + t * span);
    at::logaddexp_out(stay_or_step, rows_t, left_t);
    at::add_out(jump, two_left_t, skip);
    at::logaddexp_out(stay_or_step, stay_or_step, jump);
    at::add_out(next, stay_or_step, emission);
  }
}

// kernels/ctc.py: _forward_variables.
Tensor forward_variables(const Tensor& emit, const Tensor& labels, const Tensor& first_state) {
  const int64_t directions = emit.size(0), steps = emit.size(1), width = emit.size(2), batch = emit.size(3);
  Tensor buffer = at::full({directions, steps + 1, width + 2, batch}, -kInf, emit.options());
  buffer.select(1, 0).slice(1, 2).scatter_(1, first_state.unsqueeze(1), 0.0);
  Tensor skip = at::full({directions, width, batch}, -kInf, emit.options());
  skip.slice(1, 2).masked_fill_(labels.slice(1, 2).ne(labels.slice(1, 0, std::max<int64_t>(width - 2, 0))), 0.0);
  skip = skip.view({directions, -1});
  const bool split = directions > 1 && at::get_num_threads() > 1 && !at::in_parallel_region() &&
                     directions * width * batch <= at::internal::GRAIN_SIZE;
  if (!split) {
    run_frames(buffer, emit, skip);
    return buffer;
  }
  // One problem a thread; the caller's thread-local state (grad mode, inference mode, the
  // dispatch keys excluded) goes with it.
  // The GIL is let go first: the state can hold Python objects (saved-tensor hooks) that
  // the other thread increfs as it takes the state on, while this one waits for it.
  const at::ThreadLocalState state;
  py::gil_scoped_release release;
  at::parallel_for(0, directions, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t d = begin; d < end; ++d) {
      run_frames(buffer.slice(0, d, d + 1), emit.slice(0, d, d + 1), skip.slice(0, d, d + 1));
    }
  });
  return buffer;
}

// kernels/ctc.py: _reduce, on the loss alone (functional.sequence.ctc_loss without a gradient).
Tensor reduce_loss(const Tensor& losses, const Tensor& target_lengths, int64_t reduction) {
  if (reduction == 2) return losses.sum();
  if (reduction == 1) return at::div(losses, target_lengths.clamp_min(1)).mean();
  return losses;
}

// kernels/ctc.py: ctc_loss_and_grad, for CPU float32 / float64 (the caller's choice);
// ``floor`` is the Python kernel's _log_flush(dtype); ``reduction`` 0 (none), 1 (mean) or 2
// (sum), as kernels/ctc.py: _reduce applies it to the loss and its gradient. Returns
// (loss, grad or None).
py::object ctc_loss_and_grad(const Tensor& log_probs, const Tensor& labels_in, const Tensor& input_lengths,
                             const Tensor& target_lengths, bool zero_infinity, bool want_grad, double floor,
                             int64_t reduction) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // no autograd here: the caller attaches the gradient
  const int64_t steps = log_probs.size(0), batch = log_probs.size(1);
  const int64_t width = labels_in.size(0);
  const auto long_options = input_lengths.options();
  Tensor extended = at::add(at::mul(target_lengths, 2), 1);  // 2 * target_lengths + 1
  Tensor emit = at::empty({want_grad ? 2 : 1, steps, width, batch}, log_probs.options());
  Tensor forward_emit = emit.select(0, 0);
  at::gather_out(forward_emit, log_probs.transpose(1, 2), 1, labels_in.expand({steps, width, batch}));
  Tensor first_state = at::zeros_like(extended);
  Tensor labels;
  if (want_grad) {
    first_state = at::stack({first_state, at::rsub(extended, width)});
    Tensor waiting = at::full({width, batch}, -kInf, emit.options()).scatter_(0, first_state.slice(0, 1), 0.0);
    Tensor before = at::arange(steps, long_options).unsqueeze(1).lt(at::rsub(input_lengths, steps));
    Tensor reversed_emit = emit.select(0, 1);
    at::where_out(reversed_emit, before.unsqueeze(1), waiting, forward_emit.flip({0, 1}));
    labels = at::stack({labels_in, labels_in.flip({0})});
  } else {
    first_state = first_state.unsqueeze(0);
    labels = labels_in.unsqueeze(0);
  }
  Tensor buffer = forward_variables(emit, labels, first_state);

  Tensor sequences = at::arange(batch, long_options);
  Tensor forward = buffer.select(0, 0);
  Tensor last_one = forward.index({input_lengths, at::add(extended, 1), sequences});
  Tensor last_two = forward.index({input_lengths, extended, sequences});
  Tensor losses = at::logaddexp(last_one, last_two).neg_();
  Tensor finite = losses.abs().lt(kInf);
  Tensor safe_loss = at::where(finite, losses, at::Scalar(0.0));
  Tensor loss = zero_infinity ? safe_loss : losses;
  if (!want_grad) return py::make_tuple(reduce_loss(loss, target_lengths, reduction), py::none());

  Tensor alpha = buffer.slice(1, 1).slice(2, 2);
  Tensor log_occupancy = alpha.select(0, 1).flip({0, 1}).add_(alpha.select(0, 0)).sub_(forward_emit).add_(safe_loss);
  Tensor passed = log_occupancy.gt(floor);
  Tensor occupancy = at::where(passed, log_occupancy.clamp_min_(floor).exp_(), at::Scalar(0.0)).neg_();
  Tensor grad = log_probs.exp();
  grad.transpose(1, 2).scatter_add_(1, labels.select(0, 0).expand({steps, width, batch}), occupancy);
  grad.masked_fill_(finite.view({1, -1, 1}).bitwise_not(), zero_infinity ? 0.0 : std::numeric_limits<double>::quiet_NaN());
  Tensor outside = at::arange(steps, long_options).unsqueeze(1).ge(input_lengths);
  grad.masked_fill_(outside.unsqueeze(2), 0.0);
  if (reduction == 1) {  // kernels/ctc.py: _reduce
    Tensor divisor = target_lengths.clamp_min(1);
    return py::make_tuple(at::div(loss, divisor).mean(), grad.div_(at::mul(divisor, batch).view({1, -1, 1})));
  }
  return py::make_tuple(reduce_loss(loss, target_lengths, reduction), grad);
}

// The autograd node of an eager CPU call reduced to a scalar: kernels/ctc.py's CTCLoss
// (backward: the gradient made in forward times grad_output; differentiable once) without
// an autograd.Function's cost in Python. Unlike precomputed.cpp's node it keeps its
// gradient for every backward of a retained graph, as CTCLoss does, so that no backward
// needs the inputs again (a replay would, and they are often freed by then: gradcheck
// through a log_softmax). The last backward (the graph not retained) hands the buffer out.
class CTCLossBackward : public torch::autograd::Node {
 public:
  explicit CTCLossBackward(Tensor grad) : grad_(std::move(grad)) {}
  std::string name() const override { return "CTCLossBackward"; }
  const Tensor& held() const { return grad_; }
  void will_release_variables() override {
    std::lock_guard<std::mutex> lock(lock_);
    last_ = true;
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(lock_);
    grad_.reset();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grad_outputs) override {
    // Two threads may run backward through one retained graph: one reads the buffer while
    // the other may hand it out (autograd's generated nodes lock the same way).
    std::lock_guard<std::mutex> lock(lock_);
    TORCH_CHECK(grad_.defined(), torch::autograd::ERR_BACKWARD_TWICE);
    // An undefined grad_output is zeros, as an autograd.Function materialises it.
    const Tensor grad_output = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros({}, grad_.options());
    Tensor out;
    {
      at::NoGradGuard no_grad;  // CTCLoss.backward is once_differentiable: it runs without grad
      if (!last_) {
        out = at::mul(grad_, grad_output);  // grad * grad_output, a new tensor each time
      } else {
        out = std::move(grad_);  // the same product, in place: x * 1 is x, so 1 (backward()) skips it
        grad_.reset();
        if (!(grad_output.is_cpu() && grad_output.numel() == 1 && grad_output.item<double>() == 1.0)) {
          out.mul_(grad_output);
        }
      }
    }
    if (at::GradMode::is_enabled() && grad_output.requires_grad()) {
      // once_differentiable: the result of a create_graph backward errs when differentiated.
      torch::autograd::DelayedError error(
          "trying to differentiate twice a function that was marked with @once_differentiable", 1);
      return error.apply({out.detach().requires_grad_(true)});
    }
    return {out};
  }

 private:
  std::mutex lock_;
  Tensor grad_;
  bool last_ = false;
};

// ctc_loss_and_grad reduced to a scalar (reduction 1 or 2), the loss given the node above.
Tensor ctc_loss_attached(const Tensor& log_probs, const Tensor& labels, const Tensor& input_lengths,
                         const Tensor& target_lengths, bool zero_infinity, double floor, int64_t reduction) {
  TORCH_CHECK(reduction == 1 || reduction == 2, "losskit ctc_loss_attached: a scalar reduction, not ", reduction);
  auto result = ctc_loss_and_grad(log_probs, labels, input_lengths, target_lengths, zero_infinity, true, floor,
                                  reduction).cast<py::tuple>();
  Tensor loss = result[0].cast<Tensor>(), grad = result[1].cast<Tensor>();
  auto node = c10::make_intrusive<CTCLossBackward>(std::move(grad));
  node->set_next_edges({torch::autograd::impl::gradient_edge(log_probs)});
  torch::autograd::set_history(loss, node);
  return loss;
}

// The gradient a CTCLossBackward node keeps ([] for any other node, or once handed out).
std::vector<Tensor> ctc_held(py::handle grad_fn) {
  if (!torch::autograd::THPCppFunction_Check(grad_fn.ptr())) return {};
  auto* node = dynamic_cast<CTCLossBackward*>(((torch::autograd::THPCppFunction*)grad_fn.ptr())->cdata.get());
  if (node == nullptr || !node->held().defined()) return {};
  return {node->held()};
}

void register_ctc(py::module& m) {
  m.def("ctc_loss_and_grad", &ctc_loss_and_grad, "losskit's CTC loss and gradient (kernels/ctc.py)");
  m.def("ctc_loss_attached", &ctc_loss_attached, "losskit's CTC loss, reduced, with its C++ autograd node");
  m.def("ctc_held", &ctc_held, "the gradient a CTCLossBackward node keeps");
}
LOSSKIT_REGISTER(register_ctc)

}  // namespace
