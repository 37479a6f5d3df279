// Tensor files shared with Python: torch.save(tensor, path) <-> torch::jit::pickle_load, and
// torch::jit::pickle_save(tensor) <-> torch.load(path).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace bsbr_example {

inline at::Tensor load_tensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return torch::jit::pickle_load(bytes).toTensor();
}

inline void save_tensor(const at::Tensor& t, const std::string& path) {
  const std::vector<char> bytes = torch::jit::pickle_save(t.contiguous());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

// Token ids from a file written by torch.save, or a deterministic [1, n] sequence when the
// argument is a number.
inline at::Tensor token_ids(const std::string& arg) {
  if (!arg.empty() && arg.find_first_not_of("0123456789") == std::string::npos) {
    const int64_t n = std::stoll(arg);
    return (at::arange(n, at::kLong) * 7 % 50).unsqueeze(0);
  }
  return load_tensor(arg).to(at::kLong);
}

inline void print_summary(const at::Tensor& out) {
  std::printf("output shape [");
  for (int64_t i = 0; i < out.dim(); ++i) std::printf(i ? ", %ld" : "%ld", static_cast<long>(out.size(i)));
  std::printf("], mean %.6f, abs max %.6f\n", out.mean().item<double>(), out.abs().max().item<double>());
}

}  // namespace bsbr_example
