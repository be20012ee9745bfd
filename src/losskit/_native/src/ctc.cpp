// The frame loop of losskit's CTC (losskit/kernels/ctc.py: _forward_variables), the same
// four ATen ops per frame in the same order, so the same bits; from C++ a frame costs a few
// microseconds instead of four Python-dispatched ops.
#include "losskit_native.h"

namespace {

// Fills rows 1..T of ``buffer`` [T + 1, L + 2, B] (row 0 seeded, the first two state rows
// -inf) with alpha, for emissions ``emit`` [T, L, B] and the additive mask of steps of two
// ``skip`` [L * B].
void ctc_frames(at::Tensor buffer, const at::Tensor& emit, const at::Tensor& skip) {
  const int64_t steps = emit.size(0), batch = emit.size(2);
  at::Tensor flat = buffer.view({steps + 1, -1});
  const int64_t n = flat.size(1);
  at::Tensor rows = flat.slice(1, 2 * batch, n), left = flat.slice(1, batch, n - batch),
             two_left = flat.slice(1, 0, n - 2 * batch);
  at::Tensor emissions = emit.view({steps, -1});
  at::Tensor stay_or_step = at::empty_like(skip), jump = at::empty_like(skip);
  for (int64_t t = 0; t < steps; ++t) {
    at::Tensor next = rows.select(0, t + 1);
    at::logaddexp_out(stay_or_step, rows.select(0, t), left.select(0, t));
    at::add_out(jump, two_left.select(0, t), skip);
    at::logaddexp_out(stay_or_step, stay_or_step, jump);
    at::add_out(next, stay_or_step, emissions.select(0, t));
  }
}

void register_ctc(pybind11::module& m) {
  m.def("ctc_frames", &ctc_frames, "alpha for every frame of losskit's CTC (kernels/ctc.py)");
}
LOSSKIT_REGISTER(register_ctc)

}  // namespace
