// What the CUDA launchers share with the binding, which compiles with the host compiler alone (no
// CUDA header here): the text of the last failed launch.
#pragma once

namespace unif2ace {

// The CUDA error string of the last kCudaError a launcher returned on this host thread ("no error"
// if none).
const char* cuda_last_error();

}  // namespace unif2ace
