// Kernel side of conv_bn_act on CUDA: plain CUDA, no ATen headers, so nvcc stays fast.
//   epilogue:  y = act(y * scale[c] + shift[c] + residual), in place over cuDNN's output, one pass,
//              16-byte vector loads/stores where the layout allows;
//   depthwise: direct 3x3 depthwise convolution (stride 1 or 2) with the same epilogue fused in.
// Both read NCHW or NHWC (channels_last) tensors; accumulation is in float (double for double).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/conv_bn_act_launch.h"

namespace fastvision {

namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return v; }

template <typename A>
__device__ __forceinline__ A apply_epilogue(A v, const EpilogueArgs& e, int64_t c, A residual) {
  if (e.scale) v *= static_cast<const A*>(e.scale)[c];
  if (e.shift) v += static_cast<const A*>(e.shift)[c];
  v += residual;
  if (e.relu) v = v < A(0) ? A(0) : v;  // NaN passes through, as torch.relu
  return v;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// One thread per VEC consecutive elements. NCHW: all VEC share a channel (HW % VEC == 0);
// NHWC: they are VEC consecutive channels (C % VEC == 0).
template <typename T, int VEC, bool CHANNELS_LAST>
__global__ void epilogue_kernel(T* __restrict__ y, const T* __restrict__ residual, EpilogueArgs e, int64_t packs,
                                int64_t C, int64_t HW) {
  using A = typename Acc<T>::type;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = p * VEC;
    Pack<T, VEC> out = reinterpret_cast<const Pack<T, VEC>*>(y)[p];
    Pack<T, VEC> res;
    if (residual) res = reinterpret_cast<const Pack<T, VEC>*>(residual)[p];
    const int64_t c0 = CHANNELS_LAST ? base % C : (base / HW) % C;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = CHANNELS_LAST ? c0 + j : c0;
      const A r = residual ? to_acc(res.v[j]) : A(0);
      out.v[j] = from_acc<T>(apply_epilogue<A>(to_acc(out.v[j]), e, c, r));
    }
    reinterpret_cast<Pack<T, VEC>*>(y)[p] = out;
  }
}

unsigned grid_for(int64_t work, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 65535 * 8)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t launch_epilogue_typed(const EpilogueLaunch& l, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int threads = 256;
  T* y = static_cast<T*>(l.out);
  const T* r = static_cast<const T*>(l.residual);
  const int64_t total = l.N * l.C * l.HW;
  const bool vector_ok = aligned16(y) && (r == nullptr || aligned16(r)) &&
                         (l.channels_last ? l.C % VEC == 0 : l.HW % VEC == 0);
  if (total == 0) return cudaSuccess;
  if (vector_ok) {
    const int64_t packs = total / VEC;
    if (l.channels_last)
      epilogue_kernel<T, VEC, true><<<grid_for(packs, threads), threads, 0, stream>>>(y, r, l.e, packs, l.C, l.HW);
    else
      epilogue_kernel<T, VEC, false><<<grid_for(packs, threads), threads, 0, stream>>>(y, r, l.e, packs, l.C, l.HW);
  } else if (l.channels_last) {
    epilogue_kernel<T, 1, true><<<grid_for(total, threads), threads, 0, stream>>>(y, r, l.e, total, l.C, l.HW);
  } else {
    epilogue_kernel<T, 1, false><<<grid_for(total, threads), threads, 0, stream>>>(y, r, l.e, total, l.C, l.HW);
  }
  return cudaGetLastError();
}

// One thread per output element, in the output's memory order (coalesced loads and stores
// in both layouts). Weight is (C, 1, 3, 3) contiguous.
template <typename T, bool CHANNELS_LAST>
__global__ void depthwise3x3_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ residual,
                                    T* __restrict__ y, EpilogueArgs e, DepthwiseShape s) {
  using A = typename Acc<T>::type;
  const int64_t total = s.N * s.C * s.OH * s.OW;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow, t = i;
    if (CHANNELS_LAST) {
      c = t % s.C; t /= s.C; ow = t % s.OW; t /= s.OW; oh = t % s.OH; n = t / s.OH;
    } else {
      ow = t % s.OW; t /= s.OW; oh = t % s.OH; t /= s.OH; c = t % s.C; n = t / s.C;
    }
    const int64_t h0 = oh * s.stride - s.pad_h, w0 = ow * s.stride - s.pad_w;
    A acc = A(0);
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t ih = h0 + kh;
      if (ih < 0 || ih >= s.H) continue;
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
        const int64_t iw = w0 + kw;
        if (iw < 0 || iw >= s.W) continue;
        const int64_t xi = CHANNELS_LAST ? ((n * s.H + ih) * s.W + iw) * s.C + c : ((n * s.C + c) * s.H + ih) * s.W + iw;
        acc += to_acc(x[xi]) * to_acc(w[c * 9 + kh * 3 + kw]);
      }
    }
    const A r = residual ? to_acc(residual[i]) : A(0);
    y[i] = from_acc<T>(apply_epilogue<A>(acc, e, c, r));
  }
}

template <typename T>
cudaError_t launch_depthwise_typed(const DepthwiseLaunch& l, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t total = l.s.N * l.s.C * l.s.OH * l.s.OW;
  if (total == 0) return cudaSuccess;
  const T* x = static_cast<const T*>(l.input);
  const T* w = static_cast<const T*>(l.weight);
  const T* r = static_cast<const T*>(l.residual);
  T* y = static_cast<T*>(l.out);
  if (l.channels_last)
    depthwise3x3_kernel<T, true><<<grid_for(total, threads), threads, 0, stream>>>(x, w, r, y, l.e, l.s);
  else
    depthwise3x3_kernel<T, false><<<grid_for(total, threads), threads, 0, stream>>>(x, w, r, y, l.e, l.s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_conv_epilogue(const EpilogueLaunch& l, cudaStream_t stream) {
  switch (l.dtype) {
    case DType::kFloat: return launch_epilogue_typed<float>(l, stream);
    case DType::kHalf: return launch_epilogue_typed<__half>(l, stream);
    case DType::kBFloat16: return launch_epilogue_typed<__nv_bfloat16>(l, stream);
    case DType::kDouble: return launch_epilogue_typed<double>(l, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_depthwise3x3(const DepthwiseLaunch& l, cudaStream_t stream) {
  switch (l.dtype) {
    case DType::kFloat: return launch_depthwise_typed<float>(l, stream);
    case DType::kHalf: return launch_depthwise_typed<__half>(l, stream);
    case DType::kBFloat16: return launch_depthwise_typed<__nv_bfloat16>(l, stream);
    case DType::kDouble: return launch_depthwise_typed<double>(l, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastvision
