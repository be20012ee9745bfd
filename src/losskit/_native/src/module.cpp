// The Python module of losskit's compiled part: every file's LOSSKIT_REGISTER functions.
#include "losskit_native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "losskit's compiled part (see losskit._native)";
  for (auto registrar : losskit::registrars()) registrar(m);
}
