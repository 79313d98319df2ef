// Compile-check shim only: never used by a real CUDA build.
//
// The CPU-only torch wheel on machines without a GPU ships c10/cuda/*.h but not this header,
// which CMake generates when torch itself is built with CUDA.  tests/test_cuda_compile.py puts
// csrc/cuda/compile_shim on nvcc's include path so that csrc/cuda/*.cu can be compiled (not
// linked or run) against that wheel.  A CUDA build of torch has the real file; setup.py never
// adds this directory.  The real header only defines the macro below, which matters for
// C10_CUDA_API's dllexport on Windows.
#pragma once

#define C10_CUDA_BUILD_SHARED_LIBS
