// fasttrack._C as a Python extension module: an empty module whose import loads this shared library,
// and with it the op registrations of csrc/module.cpp and csrc/{cpu,cuda}/*.cpp. Kept apart so that
// CMake can build the same sources without Python (its C++ test loads the library with dlopen).
#include <Python.h>

static PyModuleDef fasttrack_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fasttrack_C_module); }
