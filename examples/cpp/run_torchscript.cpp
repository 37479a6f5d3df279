// Runs a scripted BSBRModel (saved from Python with torch.jit.script(model.eval()).save(path))
// on token ids. Usage: bsbr_torchscript MODEL.pt IDS.pt|N [OUT.pt]
// IDS.pt: a [batch, seq_len] integer tensor saved with torch.save; N: use a [1, N] test sequence.
// OUT.pt: the hidden states [batch, seq_len, hidden_dim], readable with torch.load.
// Nothing here refers to libbsbr: linking bsbr::bsbr is what registers torch.ops.bsbr.
#include <torch/script.h>

#include <cstdio>
#include <exception>

#include "io.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL.pt IDS.pt|N [OUT.pt]\n", argv[0]);
    return 2;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    model.eval();
    const at::Tensor ids = bsbr_example::token_ids(argv[2]);
    at::NoGradGuard no_grad;
    const at::Tensor out = model.forward({ids}).toTensor();
    bsbr_example::print_summary(out);
    if (argc > 3) bsbr_example::save_tensor(out, argv[3]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
