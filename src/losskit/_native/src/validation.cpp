// Value checks of losskit/_core/validation.py that read a tensor on the host: one loop in
// C++ where Python would dispatch a reduction and read its results one by one.
#include "losskit_native.h"

#include <limits>

namespace {

// (smallest, largest) value of a non-empty, contiguous integer CPU tensor: what
// validation.extremes reads with aminmax; None for anything else (Python then reads it).
pybind11::object int_extremes(const at::Tensor& t) {
  if (!t.is_cpu() || !t.is_contiguous() || t.numel() == 0 || t.is_complex() || at::isFloatingType(t.scalar_type()) ||
      t.scalar_type() == at::kBool) {
    return pybind11::none();
  }
  int64_t low = std::numeric_limits<int64_t>::max(), high = std::numeric_limits<int64_t>::min();
  AT_DISPATCH_INTEGRAL_TYPES(t.scalar_type(), "int_extremes", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
      const int64_t v = static_cast<int64_t>(data[i]);
      low = v < low ? v : low;
      high = v > high ? v : high;
    }
  });
  return pybind11::make_tuple(low, high);
}

void register_validation(pybind11::module& m) {
  m.def("int_extremes", &int_extremes, "(smallest, largest) value of an integer CPU tensor, or None");
}
LOSSKIT_REGISTER(register_validation)

}  // namespace
