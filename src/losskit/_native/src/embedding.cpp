// The eager CPU forms of the composed margin and embedding losses (soft_margin,
// multilabel_soft_margin, margin_ranking, hinge_embedding, cosine_embedding and
// triplet_margin with the p-norm distance; see losskit/functional/margin.py).
//
// Each is the Python form's ATen op sequence, op for op, called from C++ with autograd
// recording as usual: the same ops on the same tensors build the same graph, so the loss,
// every gradient (for any grad_output, create_graph included) and the grad_fn are the
// Python form's to the bit (tests/test_native.py, tests/test_native_margin.py). What it
// saves is the Python dispatch of each op (several microseconds each, against about one
// here), most of a call at a batch of 64. Python scalars become the same at::Scalar
// overloads (`x + margin` is at::add(x, Scalar), `margin - x` at::rsub, `torch.where(c, t,
// 0.0)` the ScalarOther where).
//
// The callers validate first (the same checks and messages on both paths), and pass only
// eager CPU calls on plain tensors (functional/margin.py _composed_native).
#include "losskit_native.h"

#include <ATen/ScalarOps.h>

#include <string>
#include <vector>

namespace {

// losskit/_core/dtypes.py result_dtypes: the promoted dtype, float32 for the half types.
at::ScalarType compute_type(std::initializer_list<at::ScalarType> types) {
  auto it = types.begin();
  at::ScalarType out = *it;
  for (++it; it != types.end(); ++it) out = at::promote_types(out, *it);
  return out == at::kHalf || out == at::kBFloat16 ? at::kFloat : out;
}

// reduce_loss (_core/reduction.py) without a denominator.
at::Tensor reduce(const at::Tensor& loss, const std::string& reduction) {
  if (reduction == "sum") return loss.sum();
  if (reduction == "mean") return loss.mean();
  return loss;
}

// soft_margin_loss: softplus(-y x), the result in the input's dtype.
at::Tensor soft_margin(const at::Tensor& input, const at::Tensor& target, const std::string& reduction) {
  const auto compute = compute_type({input.scalar_type(), target.scalar_type()});
  at::Tensor z = target.to(compute).neg().mul(input.to(compute));
  return reduce(at::softplus(z, 1, 20), reduction).to(input.scalar_type());
}

// multilabel_soft_margin_loss: -(y log sigmoid(x) + (1 - y) log sigmoid(-x)), times the
// weight, summed over the last dimension and divided by its length.
at::Tensor multilabel_soft_margin(const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const std::string& reduction) {
  at::ScalarType compute = at::promote_types(input.scalar_type(), target.scalar_type());
  if (weight.has_value()) compute = at::promote_types(compute, weight->scalar_type());
  const at::ScalarType out = compute;
  if (compute == at::kHalf || compute == at::kBFloat16) compute = at::kFloat;
  at::Tensor x = input.to(compute), y = target.to(compute);
  at::Tensor loss = y.mul(at::log_sigmoid(x)).add(at::rsub(y, 1).mul(at::log_sigmoid(x.neg()))).neg();
  if (weight.has_value()) loss = loss.mul(weight->to(compute));
  // Python's `/ C` divides by a wrapped-number tensor (div.Tensor, DivBackward0), not div.Scalar.
  loss = loss.sum(-1).div(at::native::wrapped_scalar_tensor(at::Scalar(input.size(-1)), loss.device()));
  return reduce(loss, reduction).to(out);
}

// margin_ranking_loss: max(0, (x2 - x1) y + margin).
at::Tensor margin_ranking(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& target, double margin,
                          const std::string& reduction) {
  const auto types = {input1.scalar_type(), input2.scalar_type(), target.scalar_type()};
  at::ScalarType out = input1.scalar_type();
  for (auto type : types) out = at::promote_types(out, type);
  const auto compute = compute_type(types);
  at::Tensor loss = input2.to(compute).sub(input1.to(compute)).mul(target.to(compute)).add(margin).clamp_min(0);
  return reduce(loss, reduction).to(out);
}

// hinge_embedding_loss: max(0, margin - x) where y != 1, plus x where y != -1.
at::Tensor hinge_embedding(const at::Tensor& input, const at::Tensor& target, double margin,
                           const std::string& reduction) {
  at::ScalarType compute = input.scalar_type();
  const at::ScalarType out = compute;
  if (compute == at::kHalf || compute == at::kBFloat16) compute = at::kFloat;
  at::Tensor x = input.to(compute);
  at::Tensor margin_term = at::where(target.ne(1), at::rsub(x, margin).clamp_min(0), 0.0);
  at::Tensor self_term = at::where(target.ne(-1), x, 0.0);
  return reduce(margin_term.add(self_term), reduction).to(out);
}

// cosine_embedding_loss: 1 - cos where y = 1, max(0, cos - margin) where y = -1, with
// cos = a.b / sqrt((|a|^2 + 1e-12)(|b|^2 + 1e-12)).
at::Tensor cosine_embedding(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& target,
                            double margin, const std::string& reduction) {
  at::ScalarType out = at::promote_types(input1.scalar_type(), input2.scalar_type());
  const auto compute = compute_type({out});
  at::Tensor a = input1.to(compute), b = input2.to(compute);
  constexpr double epsilon = 1e-12;
  at::Tensor cos =
      a.mul(b).sum(-1).div(a.mul(a).sum(-1).add(epsilon).mul(b.mul(b).sum(-1).add(epsilon)).sqrt());
  at::Tensor loss = at::where(target.eq(1), at::rsub(cos, 1), 0.0)
                        .add(at::where(target.eq(-1), cos.sub(margin).clamp_min(0), 0.0));
  return reduce(loss, reduction).to(out);
}

// pairwise_distance: |x1 - x2 + eps|_p over the last dimension.
at::Tensor distance(const at::Tensor& x1, const at::Tensor& x2, double p, double eps) {
  return at::linalg_vector_norm(x1.sub(x2).add(eps), p, at::IntArrayRef{-1}, false, std::nullopt);
}

// triplet_margin_loss: max(d(a, p) - d(a, n) + margin, 0); with swap, d(a, n) becomes
// min(d(a, n), d(p, n)). ``promote``: computed in result_dtypes' type and cast back, as
// triplet_margin_loss does; without it, in the inputs' own types, as
// triplet_margin_with_distance_loss does with its default distance (p = 2, eps = 1e-6).
at::Tensor triplet_margin(const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
                          double margin, double p, double eps, bool swap, const std::string& reduction,
                          bool promote) {
  at::ScalarType out = at::promote_types(at::promote_types(anchor.scalar_type(), positive.scalar_type()),
                                         negative.scalar_type());
  const auto compute = compute_type({out});
  at::Tensor a = promote ? anchor.to(compute) : anchor, pos = promote ? positive.to(compute) : positive,
             neg = promote ? negative.to(compute) : negative;
  at::Tensor dist_pos = distance(a, pos, p, eps);
  at::Tensor dist_neg = distance(a, neg, p, eps);
  if (swap) dist_neg = at::minimum(dist_neg, distance(pos, neg, p, eps));
  at::Tensor loss = reduce(dist_pos.add(margin).sub(dist_neg).clamp_min(0), reduction);
  return promote ? loss.to(out) : loss;
}

}  // namespace

void register_embedding(pybind11::module& m) {
  m.def("soft_margin", &soft_margin, "soft_margin_loss, the Python form's ops (eager CPU)");
  m.def("multilabel_soft_margin", &multilabel_soft_margin, "multilabel_soft_margin_loss, the Python form's ops");
  m.def("margin_ranking", &margin_ranking, "margin_ranking_loss, the Python form's ops (eager CPU)");
  m.def("hinge_embedding", &hinge_embedding, "hinge_embedding_loss, the Python form's ops (eager CPU)");
  m.def("cosine_embedding", &cosine_embedding, "cosine_embedding_loss, the Python form's ops (eager CPU)");
  m.def("triplet_margin", &triplet_margin, "triplet_margin_loss, the Python form's ops (eager CPU)");
}
LOSSKIT_REGISTER(register_embedding)
