#pragma once
// Interface between the host code (conv_bn_act_cuda.cpp, ATen) and the kernels (conv_bn_act_kernel.cu, no ATen).
#include <cuda_runtime.h>

#include <cstdint>

namespace fastvision {

enum class DType : int { kFloat, kHalf, kBFloat16, kDouble };

// scale/shift: per-channel vectors in the accumulation type (float; double for double), or null.
struct EpilogueArgs {
  const void* scale;
  const void* shift;
  bool relu;
};

struct EpilogueLaunch {
  void* out;             // conv output, updated in place
  const void* residual;  // same layout as out, or null
  EpilogueArgs e;
  DType dtype;
  int64_t N, C, HW;
  bool channels_last;
};

struct DepthwiseShape {
  int64_t N, C, H, W, OH, OW, stride, pad_h, pad_w;
};

struct DepthwiseLaunch {
  const void* input;   // (N, C, H, W) in the output's memory format
  const void* weight;  // (C, 1, 3, 3) contiguous
  const void* residual;
  void* out;
  EpilogueArgs e;
  DType dtype;
  DepthwiseShape s;
  bool channels_last;
};

cudaError_t launch_conv_epilogue(const EpilogueLaunch& launch, cudaStream_t stream);
cudaError_t launch_depthwise3x3(const DepthwiseLaunch& launch, cudaStream_t stream);

}  // namespace fastvision
