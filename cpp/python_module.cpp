// The Python extension module bsbr_ext._C: loading it registers the ops (torch.ops.bsbr.*);
// build_info() tells what this build contains and which CPU kernels it runs here.
#include <torch/extension.h>

#include "cpu/microkernels.h"

#define BSBR_STR(x) #x
#define BSBR_XSTR(x) BSBR_STR(x)

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = BSBR_XSTR(BSBR_TORCH_VERSION);  // the torch it was built against
  info["cpu_isa"] = bsbr::cpu::cpu_isa();  // the CPU kernels' ISA level on this machine
#ifdef BSBR_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = BSBR_XSTR(BSBR_CUDA_VERSION);
  info["cuda_archs"] = BSBR_XSTR(BSBR_CUDA_ARCHS);
  py::list head_dims, dtypes;
#ifdef BSBR_HDIM32
  head_dims.append(32);
#endif
#ifdef BSBR_HDIM64
  head_dims.append(64);
#endif
#ifdef BSBR_HDIM128
  head_dims.append(128);
#endif
#ifdef BSBR_FP16
  dtypes.append("float16");
#endif
#ifdef BSBR_BF16
  dtypes.append("bfloat16");
#endif
#ifdef BSBR_FP32
  dtypes.append("float32");
#endif
  info["cuda_head_dims"] = head_dims;
  info["cuda_dtypes"] = dtypes;
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bsbr_ext native extension: registers torch.ops.bsbr";
  m.def("build_info", &build_info, "What this build of bsbr_ext contains");
}
