// Runs a BSBRModel compiled ahead of time with AOTInductor (torch.export.export, then
// torch._inductor.aoti_compile_and_package) on token ids.
// Usage: bsbr_aoti PACKAGE.pt2 IDS.pt|N [OUT.pt]   (arguments as for bsbr_torchscript)
// The compiled model calls torch.ops.bsbr.* through the dispatcher; linking bsbr::bsbr registers
// them. Inputs must be on the device the package was compiled for (CPU here).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <exception>
#include <vector>

#include "io.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s PACKAGE.pt2 IDS.pt|N [OUT.pt]\n", argv[0]);
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const at::Tensor ids = bsbr_example::token_ids(argv[2]);
    at::NoGradGuard no_grad;
    const std::vector<at::Tensor> outputs = loader.run({ids});
    bsbr_example::print_summary(outputs.at(0));
    if (argc > 3) bsbr_example::save_tensor(outputs.at(0), argv[3]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
