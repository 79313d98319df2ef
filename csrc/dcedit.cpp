// The `_C` module: an empty Python module whose import runs the TORCH_LIBRARY_IMPL blocks of
// csrc/cpu/*.cpp (and csrc/cuda/*.cu when built with CUDA).  The schemas are defined from
// Python (dcedit_kernels/_library.py) so the package also works without this module.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddObject(m, "WITH_CUDA", Py_True);
  Py_INCREF(Py_True);
#else
  PyModule_AddObject(m, "WITH_CUDA", Py_False);
  Py_INCREF(Py_False);
#endif
  return m;
}
}
