# Lets Torch's CMake config (find_package(Torch)) succeed with a CUDA build of the torch wheel on
# a machine whose CUDA toolkit lacks the runtime libraries where FindCUDA looks: pip's CUDA wheels
# (site-packages/nvidia/cu13/lib beside torch) ship libcudart/libnvrtc as versioned files only,
# which FindCUDA does not match by itself. Included by CMakeLists.txt and by bsbrConfig.cmake
# (so applications get the same behaviour); it only sets cache hints and never overrides a value
# the user already gave. A CUDA torch wheel still needs nvcc at configure time (Torch's config
# enables the CUDA language); a CPU-only wheel needs nothing.
if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
  if(DEFINED ENV{CUDA_HOME})
    set(CUDA_TOOLKIT_ROOT_DIR $ENV{CUDA_HOME})
  elseif(DEFINED ENV{CUDA_PATH})
    set(CUDA_TOOLKIT_ROOT_DIR $ENV{CUDA_PATH})
  elseif(EXISTS /usr/local/cuda)
    set(CUDA_TOOLKIT_ROOT_DIR /usr/local/cuda)
  endif()
endif()
set(_bsbr_cuda_hints)
foreach(_bsbr_prefix IN LISTS CMAKE_PREFIX_PATH Torch_DIR BSBR_TORCH_HINT_DIRS)
  # <site-packages>/torch/share/cmake[/Torch] -> <site-packages>/nvidia/cu*/lib
  foreach(_bsbr_up ../../.. ../../../..)
    list(APPEND _bsbr_cuda_hints ${_bsbr_prefix}/${_bsbr_up}/nvidia/cu13/lib
                                 ${_bsbr_prefix}/${_bsbr_up}/nvidia/cu12/lib
                                 ${_bsbr_prefix}/${_bsbr_up}/nvidia/cuda_runtime/lib
                                 ${_bsbr_prefix}/${_bsbr_up}/nvidia/cuda_nvrtc/lib)
  endforeach()
endforeach()
find_library(CUDA_CUDART_LIBRARY NAMES cudart libcudart.so.13 libcudart.so.12
             HINTS ${CUDA_TOOLKIT_ROOT_DIR}/lib64 ${CUDA_TOOLKIT_ROOT_DIR}/lib /usr/local/cuda/lib64
                   ${_bsbr_cuda_hints})
find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
             HINTS ${CUDA_TOOLKIT_ROOT_DIR}/lib64 ${CUDA_TOOLKIT_ROOT_DIR}/lib /usr/local/cuda/lib64
                   ${_bsbr_cuda_hints})
unset(_bsbr_cuda_hints)
unset(_bsbr_prefix)
unset(_bsbr_up)
