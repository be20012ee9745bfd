// The eager CPU forms of the composed margin and embedding losses (margin_ranking,
// hinge_embedding, cosine_embedding and triplet_margin with the p-norm distance; see
// losskit/functional/margin.py). soft_margin and multilabel_soft_margin are fused ops of
// their own (soft_margin.cpp).
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

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

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

// margin_ranking_loss: max(0, (x2 - x1) y + margin).
at::Tensor margin_ranking(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& target, double margin,
                          const std::string& reduction) {
  const auto types = {input1.scalar_type(), input2.scalar_type(), target.scalar_type()};
  at::ScalarType out = input1.scalar_type();
  for (auto type : types) out = at::promote_types(out, type);
  const auto compute = compute_type(types);
  at::Tensor loss = input2.to(compute).sub(input1.to(compute)).mul(target.to(compute)).add(margin).clamp_min(0);
  return losskit::reduce_loss(loss, reduction).to(out);
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
  return losskit::reduce_loss(margin_term.add(self_term), reduction).to(out);
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
  return losskit::reduce_loss(loss, reduction).to(out);
}

// pairwise_distance: |x1 - x2 + eps|_p over the last dimension.
at::Tensor distance(const at::Tensor& x1, const at::Tensor& x2, double p, double eps) {
  return at::linalg_vector_norm(x1.sub(x2).add(eps), p, at::IntArrayRef{-1}, false, std::nullopt);
}

// triplet_margin_loss: max(d(a, p) - d(a, n) + margin, 0); with swap, d(a, n) becomes
// min(d(a, n), d(p, n)); computed in result_dtypes' type and cast back, as
// triplet_margin_loss and triplet_margin_with_distance_loss with its default distance do
// (p = 2, eps = 1e-6).
at::Tensor triplet_margin(const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
                          double margin, double p, double eps, bool swap, const std::string& reduction) {
  at::ScalarType out = at::promote_types(at::promote_types(anchor.scalar_type(), positive.scalar_type()),
                                         negative.scalar_type());
  const auto compute = compute_type({out});
  at::Tensor a = anchor.to(compute), pos = positive.to(compute), neg = negative.to(compute);
  at::Tensor dist_pos = distance(a, pos, p, eps);
  at::Tensor dist_neg = distance(a, neg, p, eps);
  if (swap) dist_neg = at::minimum(dist_neg, distance(pos, neg, p, eps));
  return losskit::reduce_loss(dist_pos.add(margin).sub(dist_neg).clamp_min(0), reduction).to(out);
}

}  // namespace

// ---- the fused forms (kernels/embedding.py) ------------------------------------------------
// triplet_margin (the p-norm distance, 1 <= p < inf) and cosine_embedding of [N, D] inputs:
// the per-row loss and the written-out gradient of each differentiable input, by
// _triplet_rows / _cosine_rows op for op (see that file's docstring for the math), on blocks
// of rows split over torch's threads, so that a block's float32 temporaries stay in cache:
// the inputs are read, and the gradients written, once (without swap, where all three
// triplet inputs want a gradient, the caller asks for dp and dn only: the node forms
// da = -(dp + dn) in backward, precomputed.cpp). Every op is row-wise and each row's
// norm or sum reduces that row alone, in an order that does not depend on the other rows (up
// to ATen's grain, the longest row served), so the blocks give the Python form's bits; the
// per-row losses are then reduced whole, as there.

namespace py = pybind11;

namespace {

at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

constexpr int64_t kLongestRow = 32767;  // kernels/embedding.py _LONGEST_ROW
// Elements of one block: a block runs some 35 ATen ops, a few microseconds each whatever
// their size, so that blocks of 16384 elements (a float32 temporary in a core's L2) spent
// most of their time in that (measured at 2048x1024, one thread: the triplet's forward
// about twice as fast in blocks of 65536, its temporaries in L3; 131072 and 262144 no
// faster, 524288 slower). The Python form takes whole tensors: the blocks give its bits.
constexpr int64_t kBlockElements = 65536;

// (||x||_p per row, the factor of its gradient): _distance.
std::pair<at::Tensor, at::Tensor> norm_and_factor(const at::Tensor& x, double p) {
  at::Tensor d = at::linalg_vector_norm(x, p, at::IntArrayRef{-1}, false, std::nullopt);
  if (p == 1.0) return {d, at::ones_like(d)};
  at::Tensor c = p == 2.0 ? d.reciprocal() : d.pow(p - 1).reciprocal_();
  return {d, c.masked_fill_(d.eq(0), 0.0)};
}

// _direction: x (p = 2), sign(x) (p = 1), sign(x) |x|^(p - 1); in place of x where it can be.
at::Tensor direction(at::Tensor x, double p) {
  if (p == 2.0) return x;
  if (p == 1.0) return x.sign_();
  at::Tensor s = x.sign();
  return s.mul_(x.abs_().pow_(p - 1));
}

struct Rows {
  at::Tensor loss;
  std::vector<at::Tensor> grads;
};

// _triplet_rows
Rows triplet_rows(const at::Tensor& a, const at::Tensor& pos, const at::Tensor& neg, double margin, double p,
                  double eps, bool swap, double k, const std::vector<bool>& needs) {
  at::Tensor x_ap = at::sub(a, pos).add_(eps);
  at::Tensor x_an = at::sub(a, neg).add_(eps);
  auto [d_ap, c_ap] = norm_and_factor(x_ap, p);
  auto [d_an, c_an] = norm_and_factor(x_an, p);
  at::Tensor x_pn, d_pn, c_pn, z;
  if (swap) {
    x_pn = at::sub(pos, neg).add_(eps);
    std::tie(d_pn, c_pn) = norm_and_factor(x_pn, p);
    z = at::add(d_ap, margin).sub_(at::minimum(d_an, d_pn));
  } else {
    z = at::add(d_ap, margin).sub_(d_an);
  }
  Rows rows;
  rows.loss = z.clamp_min(0);
  rows.grads.resize(3);
  if (!(needs[0] || needs[1] || needs[2])) return rows;
  at::Tensor h = z.ge(0).to(z.scalar_type());
  if (k != 1.0) h.mul_(k);
  c_ap.mul_(h);
  c_an.mul_(h);
  if (swap) {
    at::Tensor tie = d_an.eq(d_pn).to(z.scalar_type()).mul_(-0.5).add_(1);
    c_pn.mul_(h).mul_(tie.masked_fill(d_an.lt(d_pn), 0.0));
    c_an.mul_(tie.masked_fill_(d_an.gt(d_pn), 0.0));
  }
  const bool negated = !swap && !needs[0];  // dp = x_ap (-c_ap): -(x c) exactly, a pass saved
  if (negated) c_ap.neg_();
  at::Tensor u = direction(x_ap, p).mul_(c_ap.unsqueeze(1));
  at::Tensor v = direction(x_an, p).mul_(c_an.unsqueeze(1));
  at::Tensor t = swap ? direction(x_pn, p).mul_(c_pn.unsqueeze(1)) : at::Tensor();
  if (needs[0]) rows.grads[0] = at::sub(u, v);
  if (needs[2]) rows.grads[2] = t.defined() ? v.add_(t) : v;
  if (needs[1]) rows.grads[1] = negated ? u : t.defined() ? u.add_(t).neg_() : u.neg_();
  return rows;
}

// _cosine_rows
Rows cosine_rows(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& target, double margin, double k,
                 const std::vector<bool>& needs) {
  constexpr double epsilon = 1e-12;
  at::Tensor dot = at::mul(x1, x2).sum(-1);
  at::Tensor m1 = at::mul(x1, x1).sum(-1).add_(epsilon);
  at::Tensor m2 = at::mul(x2, x2).sum(-1).add_(epsilon);
  at::Tensor q = at::mul(m1, m2).sqrt_();
  at::Tensor cos = dot.div_(q);
  at::Tensor positive = target.eq(1), negative = target.eq(-1);
  at::Tensor shifted = at::sub(cos, margin);
  Rows rows;
  rows.loss = at::where(positive, at::rsub(cos, 1), 0.0).add_(at::where(negative, shifted.clamp_min(0), 0.0));
  rows.grads.resize(2);
  if (!(needs[0] || needs[1])) return rows;
  at::Tensor g = shifted.ge_(0).logical_and_(negative).to(cos.scalar_type()).sub_(positive.to(cos.scalar_type()));
  if (k != 1.0) g.mul_(k);
  at::Tensor gc = at::mul(g, cos);
  at::Tensor alpha = g.div_(q).unsqueeze(1);
  if (needs[0]) rows.grads[0] = at::mul(x2, alpha).addcmul_(x1, gc.div(m1).unsqueeze(1), -1);
  if (needs[1]) rows.grads[1] = at::mul(x1, alpha).addcmul_(x2, gc.div_(m2).unsqueeze(1), -1);
  return rows;
}

// Contiguous tensors only: a strided input gives the Python form's results the input's
// strides, whose whole-tensor reductions need not follow the order of these blocks.
bool rows_served(const std::vector<at::Tensor>& tensors) {
  const at::Tensor& first = tensors[0];
  if (first.dim() != 2 || first.size(0) == 0 || first.size(1) == 0 || first.size(1) > kLongestRow) return false;
  for (const auto& t : tensors) {
    if (!t.is_cpu() || !t.is_contiguous() || t.sizes() != first.sizes() || !at::isFloatingType(t.scalar_type())) {
      return false;
    }
  }
  return true;
}

// The blocks: `units_of(begin, end)` -> Rows of units [begin, end) in the compute dtype, a
// unit being a row of [N, D] inputs (the loss per row: `loss_shape` {N}) or an element of
// the (flattened) inputs (the loss per element: `loss_shape` their shape); `per_block`
// units at a time, split over torch's threads. The losses are gathered whole in the
// compute dtype (their sum is the Python form's sum of the same tensor), the gradients
// written into tensors of the inputs' dtypes and shapes.
template <typename F>
std::pair<at::Tensor, std::vector<at::Tensor>> by_blocks(const std::vector<at::Tensor>& inputs,
                                                         const std::vector<bool>& needs, at::ScalarType compute,
                                                         at::IntArrayRef loss_shape, int64_t units, int64_t per_block,
                                                         F units_of) {
  std::vector<at::Tensor> grads(inputs.size());
  if (units <= per_block) {  // one block: the whole-tensor form itself
    Rows rows = units_of(0, units);
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (needs[i]) grads[i] = cast(rows.grads[i], inputs[i].scalar_type()).view(inputs[i].sizes());
    }
    return {rows.loss.view(loss_shape), grads};
  }
  at::Tensor loss = at::empty(loss_shape, inputs[0].options().dtype(compute));
  at::Tensor flat_loss = loss.view(-1);
  std::vector<at::Tensor> flat(inputs.size());  // [units, the rest]
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (needs[i]) {
      grads[i] = at::empty(inputs[i].sizes(), inputs[i].options().memory_format(at::MemoryFormat::Contiguous));
      flat[i] = grads[i].view({units, -1});
    }
  }
  const int64_t blocks = (units + per_block - 1) / per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    at::NoGradGuard no_grad;  // grad mode is per thread
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * per_block, end = std::min(units, begin + per_block);
      Rows rows = units_of(begin, end);
      flat_loss.slice(0, begin, end).copy_(rows.loss);
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (flat[i].defined()) flat[i].slice(0, begin, end).copy_(rows.grads[i].view({end - begin, -1}));
      }
    }
  });
  return {loss, grads};
}

// Rows of [N, D] inputs, about `kBlockElements` elements a block (at least one row).
template <typename F>
std::pair<at::Tensor, std::vector<at::Tensor>> by_row_blocks(const std::vector<at::Tensor>& inputs,
                                                             const std::vector<bool>& needs, at::ScalarType compute,
                                                             F rows_of) {
  const int64_t n = inputs[0].size(0);
  return by_blocks(inputs, needs, compute, {n}, n, std::max<int64_t>(1, kBlockElements / inputs[0].size(1)), rows_of);
}

py::object loss_and_grads(const at::Tensor& loss, const std::vector<at::Tensor>& grads) {
  py::tuple out(1 + grads.size());
  out[0] = py::cast(loss);
  for (size_t i = 0; i < grads.size(); ++i) out[i + 1] = grads[i].defined() ? py::cast(grads[i]) : py::none();
  return out;
}

// triplet_forward(anchor, positive, negative, options=TripletOptions(margin, p, eps, swap,
// reduction), needs) -> (loss, d anchor, d positive, d negative), or None (not served).
py::object fused_triplet_margin(const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
                                double margin, double p, double eps, bool swap, const std::string& reduction,
                                const std::vector<bool>& needs) {
  const bool served = p >= 1.0 && std::isfinite(p) && rows_served({anchor, positive, negative});
  if (needs.size() != 3 || !served) return py::none();
  at::Tensor loss;
  std::vector<at::Tensor> grads;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    const at::ScalarType out =
        at::promote_types(at::promote_types(anchor.scalar_type(), positive.scalar_type()), negative.scalar_type());
    const at::ScalarType compute = compute_type({out});
    const double k = reduction == "mean" ? 1.0 / static_cast<double>(anchor.size(0)) : 1.0;
    auto rows_of = [&](int64_t begin, int64_t end) {
      return triplet_rows(cast(anchor.slice(0, begin, end), compute), cast(positive.slice(0, begin, end), compute),
                          cast(negative.slice(0, begin, end), compute), margin, p, eps, swap, k, needs);
    };
    std::tie(loss, grads) = by_row_blocks({anchor, positive, negative}, needs, compute, rows_of);
    loss = cast(losskit::reduce_loss(loss, reduction), out);
  }
  return loss_and_grads(loss, grads);
}

// cosine_forward(input1, input2, target, options=CosineOptions(margin, reduction), needs) ->
// (loss, d input1, d input2), or None (not served).
py::object fused_cosine_embedding(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& target,
                                  double margin, const std::string& reduction, const std::vector<bool>& needs) {
  if (needs.size() != 2 || !rows_served({input1, input2}) || !target.is_cpu() || target.dim() != 1 ||
      !target.is_contiguous() || target.size(0) != input1.size(0)) {
    return py::none();
  }
  at::Tensor loss;
  std::vector<at::Tensor> grads;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    const at::ScalarType out = at::promote_types(input1.scalar_type(), input2.scalar_type());
    const at::ScalarType compute = compute_type({out});
    const double k = reduction == "mean" ? 1.0 / static_cast<double>(input1.size(0)) : 1.0;
    std::tie(loss, grads) = by_row_blocks({input1, input2}, needs, compute, [&](int64_t begin, int64_t end) {
      return cosine_rows(cast(input1.slice(0, begin, end), compute), cast(input2.slice(0, begin, end), compute),
                         target.slice(0, begin, end), margin, k, needs);
    });
    loss = cast(losskit::reduce_loss(loss, reduction), out);
  }
  return loss_and_grads(loss, grads);
}

// _ranking_elements
Rows ranking_elements(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& y, double margin, double k,
                      const std::vector<bool>& needs) {
  at::Tensor e = at::sub(x2, x1);
  at::Tensor z = at::mul(e, y).add_(margin);
  Rows rows;
  rows.loss = z.clamp_min(0);
  rows.grads.resize(3);
  if (!(needs[0] || needs[1] || needs[2])) return rows;
  at::Tensor m = z.ge_(0);
  if (k != 1.0) m.mul_(k);
  at::Tensor g2 = needs[0] || needs[1] ? at::mul(y, m) : at::Tensor();
  if (needs[0]) rows.grads[0] = g2.neg();
  if (needs[1]) rows.grads[1] = g2;
  if (needs[2]) rows.grads[2] = e.mul_(m);
  return rows;
}

// _hinge_elements
Rows hinge_elements(const at::Tensor& x, const at::Tensor& target, double margin, double k,
                    const std::vector<bool>& needs) {
  at::Tensor not_positive = target.ne(1), not_negative = target.ne(-1);
  at::Tensor gap = at::rsub(x, margin);
  Rows rows;
  rows.loss = at::where(not_positive, gap.clamp_min(0), 0.0).add_(at::where(not_negative, x, 0.0));
  rows.grads.resize(1);
  if (!needs[0]) return rows;
  at::Tensor g = not_negative.to(x.scalar_type()).sub_(gap.ge_(0).logical_and_(not_positive));
  rows.grads[0] = k == 1.0 ? g : g.mul_(k);
  return rows;
}

bool elements_served(const std::vector<at::Tensor>& tensors) {
  const at::Tensor& first = tensors[0];
  if (first.numel() == 0) return false;
  for (const auto& t : tensors) {
    if (!t.is_cpu() || !t.is_contiguous() || t.sizes() != first.sizes()) return false;
  }
  return true;
}

// ranking_forward(input1, input2, target, options=ElementOptions(margin, reduction), needs)
// -> (loss, d input1, d input2, d target), or None (not served).
py::object fused_margin_ranking(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& target,
                                double margin, const std::string& reduction, const std::vector<bool>& needs) {
  if (needs.size() != 3 || !elements_served({input1, input2, target})) return py::none();
  at::Tensor loss;
  std::vector<at::Tensor> grads;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    const at::ScalarType out =
        at::promote_types(at::promote_types(input1.scalar_type(), input2.scalar_type()), target.scalar_type());
    const at::ScalarType compute = compute_type({out});
    const double k = reduction == "mean" ? 1.0 / static_cast<double>(input1.numel()) : 1.0;
    at::Tensor a = input1.reshape(-1), b = input2.reshape(-1), y = target.reshape(-1);
    std::tie(loss, grads) = by_blocks({input1, input2, target}, needs, compute, input1.sizes(), input1.numel(),
                                      kBlockElements, [&](int64_t begin, int64_t end) {
      return ranking_elements(cast(a.slice(0, begin, end), compute), cast(b.slice(0, begin, end), compute),
                              cast(y.slice(0, begin, end), compute), margin, k, needs);
    });
    loss = cast(losskit::reduce_loss(loss, reduction), out);
  }
  return loss_and_grads(loss, grads);
}

// hinge_embedding_forward(input, target, options=ElementOptions(margin, reduction), needs) ->
// (loss, d input), or None (not served).
py::object fused_hinge_embedding(const at::Tensor& input, const at::Tensor& target, double margin,
                                 const std::string& reduction, const std::vector<bool>& needs) {
  if (needs.size() != 1 || !elements_served({input, target})) return py::none();
  at::Tensor loss;
  std::vector<at::Tensor> grads;
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    const at::ScalarType out = input.scalar_type();
    const at::ScalarType compute = compute_type({out});
    const double k = reduction == "mean" ? 1.0 / static_cast<double>(input.numel()) : 1.0;
    at::Tensor x = input.reshape(-1), y = target.reshape(-1);
    std::tie(loss, grads) = by_blocks({input}, needs, compute, input.sizes(), input.numel(), kBlockElements,
                                      [&](int64_t begin, int64_t end) {
      return hinge_elements(cast(x.slice(0, begin, end), compute), y.slice(0, begin, end), margin, k, needs);
    });
    loss = cast(losskit::reduce_loss(loss, reduction), out);
  }
  return loss_and_grads(loss, grads);
}

}  // namespace

void register_embedding(pybind11::module& m) {
  m.def("margin_ranking", &margin_ranking, "margin_ranking_loss, the Python form's ops (eager CPU)");
  m.def("hinge_embedding", &hinge_embedding, "hinge_embedding_loss, the Python form's ops (eager CPU)");
  m.def("cosine_embedding", &cosine_embedding, "cosine_embedding_loss, the Python form's ops (eager CPU)");
  m.def("triplet_margin", &triplet_margin, "triplet_margin_loss, the Python form's ops (eager CPU)");
  m.def("fused_triplet_margin", &fused_triplet_margin, "kernels/embedding.py triplet_forward on blocks of rows");
  m.def("fused_margin_ranking", &fused_margin_ranking, "kernels/embedding.py ranking_forward on blocks of elements");
  m.def("fused_hinge_embedding", &fused_hinge_embedding, "kernels/embedding.py hinge_embedding_forward on blocks of elements");
  m.def("fused_cosine_embedding", &fused_cosine_embedding, "kernels/embedding.py cosine_forward on blocks of rows");
}
LOSSKIT_REGISTER(register_embedding)
