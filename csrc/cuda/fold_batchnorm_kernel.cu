// Kernel side of fold_batchnorm: plain CUDA, no ATen headers, so nvcc stays fast.
#include <cuda_runtime.h>

#include <cstdint>

namespace fastvision {

__global__ void fold_batchnorm_kernel(const double* __restrict__ w, const double* __restrict__ b,
                                      const double* __restrict__ mean, const double* __restrict__ var,
                                      const double* __restrict__ gamma, const double* __restrict__ beta, double eps,
                                      int64_t channels, int64_t per_channel, double* __restrict__ w_out,
                                      double* __restrict__ b_out) {
  const int64_t c = blockIdx.x;
  if (c >= channels) return;
  const double scale = gamma[c] / sqrt(var[c] + eps);
  for (int64_t k = threadIdx.x; k < per_channel; k += blockDim.x) {
    w_out[c * per_channel + k] = w[c * per_channel + k] * scale;
  }
  if (threadIdx.x == 0) b_out[c] = beta[c] + (b[c] - mean[c]) * scale;
}

cudaError_t launch_fold_batchnorm(const double* w, const double* b, const double* mean, const double* var,
                                  const double* gamma, const double* beta, double eps, int64_t channels,
                                  int64_t per_channel, double* w_out, double* b_out, cudaStream_t stream) {
  if (channels == 0) return cudaSuccess;
  fold_batchnorm_kernel<<<static_cast<unsigned>(channels), 128, 0, stream>>>(w, b, mean, var, gamma, beta, eps,
                                                                              channels, per_channel, w_out, b_out);
  return cudaGetLastError();
}

}  // namespace fastvision
