// The Python module fastguide._C. Importing it registers the ops (torch.ops.fastguide.*, defined in
// ops.cpp with static TORCH_LIBRARY initialisers); the module itself only carries what the loader,
// fastguide/_ext.py, needs to tell whether this build matches the running torch.
#include <pybind11/pybind11.h>
#include <torch/headeronly/version.h>

#define FG_STRINGIFY_(x) #x
#define FG_STRINGIFY(x) FG_STRINGIFY_(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastguide's compiled batched guided step; the ops are torch.ops.fastguide.*";
  // torch.__version__ of the build, passed by setup.py / CMakeLists.txt as a bare token
#ifdef FASTGUIDE_TORCH_VERSION
  m.attr("TORCH_VERSION") = FG_STRINGIFY(FASTGUIDE_TORCH_VERSION);
#else
  m.attr("TORCH_VERSION") = "";
#endif
  // the version of the torch headers compiled against (no local suffix such as "+cpu")
  m.attr("TORCH_HEADER_VERSION") =
      FG_STRINGIFY(TORCH_VERSION_MAJOR) "." FG_STRINGIFY(TORCH_VERSION_MINOR) "." FG_STRINGIFY(TORCH_VERSION_PATCH);
#ifdef FASTGUIDE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
