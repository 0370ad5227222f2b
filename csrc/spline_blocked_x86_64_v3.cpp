// The blocked spline forward compiled for the x86_64_v3 instruction set (flags in CMakeLists.txt).
#include <algorithm>
#include <cmath>
#include <vector>

#include "spline_blocked.h"
#include "spline_math.h"

namespace fastflow_spline::x86_64_v3 {
#include "spline_blocked.inc"
}  // namespace fastflow_spline::x86_64_v3
