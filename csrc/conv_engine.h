#pragma once
// Which CUDA path conv_bn_act takes; a process-wide switch so benchmarks can compare engines.
#include <atomic>
#include <stdexcept>
#include <string>

namespace fastvision {

enum class ConvEngine : int { kEpilogue = 0, kCudnnFused = 1 };

inline std::atomic<int>& conv_engine_slot() {
  static std::atomic<int> engine{static_cast<int>(ConvEngine::kEpilogue)};
  return engine;
}

inline ConvEngine current_conv_engine() { return static_cast<ConvEngine>(conv_engine_slot().load()); }

inline void set_cuda_conv_engine(const std::string& name) {
  if (name == "epilogue") {
    conv_engine_slot() = static_cast<int>(ConvEngine::kEpilogue);
  } else if (name == "cudnn_fused") {
    conv_engine_slot() = static_cast<int>(ConvEngine::kCudnnFused);
  } else {
    throw std::invalid_argument("engine must be 'epilogue' or 'cudnn_fused', got '" + name + "'");
  }
}

inline std::string cuda_conv_engine() {
  return current_conv_engine() == ConvEngine::kCudnnFused ? "cudnn_fused" : "epilogue";
}

}  // namespace fastvision
