// The blocked spline forward compiled for the generic instruction set (flags in CMakeLists.txt).
#include <algorithm>
#include <cmath>
#include <vector>

#include "spline_blocked.h"
#include "spline_math.h"

namespace fastflow_spline::generic {
#include "spline_blocked.inc"
}  // namespace fastflow_spline::generic
