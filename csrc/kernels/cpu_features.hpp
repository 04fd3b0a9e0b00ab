// Which SIMD paths this build has, which this CPU runs, and which one is in use.
#pragma once
#include <string>
#include <vector>

#include "kernels.hpp"

namespace dllama {

std::vector<std::string> compiled_isas();   // e.g. {"scalar", "avx2", "avx512", "avx512vnni"}
std::vector<std::string> supported_isas();  // compiled paths this CPU can run, slowest first
std::string best_isa();                     // the last of supported_isas()
std::string get_isa();
// Force a path; throws std::invalid_argument naming the paths that would work.
void set_isa(const std::string& name);

}  // namespace dllama
