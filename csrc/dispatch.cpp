// Runtime ISA selection: the best path this CPU supports, or the one MOEMESH_ISA names
// (scalar, avx2, avx512, neon) so tests and benchmarks can pin a path.
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "kernels.h"

namespace moemesh {

namespace {
bool cpu_supports(Isa isa) {
    switch (isa) {
        case Isa::Scalar: return true;
#if defined(__x86_64__) || defined(_M_X64)
        case Isa::Avx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        case Isa::Avx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
#if defined(__aarch64__)
        case Isa::Neon: return true;  // Advanced SIMD is mandatory on AArch64
#endif
        default: return false;
    }
}
// NAME=0 turns an optional CPU feature off (benchmarks compare a path with and without it).
[[maybe_unused]] bool disabled_by_env(const char* name) {
    const char* env = std::getenv(name);
    return env && std::strcmp(env, "0") == 0;
}
#if defined(__aarch64__)
// The dot-product instructions when Linux reports them, unless MOEMESH_DOTPROD=0.
bool neon_dot_usable() { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) && !disabled_by_env("MOEMESH_DOTPROD"); }
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)  // older kernel headers
#endif
// The int8 matrix multiply beside them when Linux reports it, unless MOEMESH_I8MM=0.
bool neon_i8mm_usable() {
#if defined(MOEMESH_I8MM_BUILT)
    return neon_dot_usable() && (getauxval(AT_HWCAP2) & HWCAP2_I8MM) && !disabled_by_env("MOEMESH_I8MM");
#else
    return false;
#endif
}
#endif
#if defined(MOEMESH_AMX)
// AMX tiles when the CPU and kernel allow them, unless MOEMESH_AMX=0.
bool amx_wanted() { return !disabled_by_env("MOEMESH_AMX") && __builtin_cpu_supports("avx512vbmi") && amx_usable(); }
#endif
}  // namespace

const KernelTable* kernel_table(Isa isa) {
    if (!cpu_supports(isa)) return nullptr;
    switch (isa) {
        case Isa::Scalar: return &kScalarKernels;
#if defined(__x86_64__) || defined(_M_X64)
        case Isa::Avx2:
#if defined(MOEMESH_AVXVNNI_BUILT)
            if (__builtin_cpu_supports("avxvnni") && !disabled_by_env("MOEMESH_AVXVNNI")) return &kAvx2VnniKernels;
#endif
            return &kAvx2Kernels;
        case Isa::Avx512:
#if defined(MOEMESH_AMX)
            if (amx_wanted()) return &kAvx512AmxKernels;
#endif
            return __builtin_cpu_supports("avx512vbmi") ? &kAvx512VbmiKernels : &kAvx512Kernels;
#endif
#if defined(__aarch64__)
        case Isa::Neon:
#if defined(MOEMESH_I8MM_BUILT)
            if (neon_i8mm_usable()) return &kNeonI8mmKernels;
#endif
            return neon_dot_usable() ? &kNeonDotKernels : &kNeonKernels;
#endif
        default: return nullptr;
    }
}

std::vector<const KernelTable*> all_kernel_tables() {
    std::vector<const KernelTable*> tables;
    for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon})
        if (const KernelTable* kt = kernel_table(isa)) tables.push_back(kt);
#if defined(__x86_64__) || defined(_M_X64)
    // The other builds of the AVX2 and the best AVX-512 path this CPU runs (they must agree bit for bit).
    if (const KernelTable* avx2 = kernel_table(Isa::Avx2); avx2 && avx2 != &kAvx2Kernels) tables.push_back(&kAvx2Kernels);
    if (const KernelTable* best = kernel_table(Isa::Avx512)) {
        if (__builtin_cpu_supports("avx512vbmi") && best != &kAvx512VbmiKernels) tables.push_back(&kAvx512VbmiKernels);
        if (best != &kAvx512Kernels) tables.push_back(&kAvx512Kernels);
    }
#endif
#if defined(__aarch64__)
    // The builds below the best one beside it: sdot beside smmla, the baseline beside sdot.
    if (neon_i8mm_usable()) tables.push_back(&kNeonDotKernels);
    if (neon_dot_usable()) tables.push_back(&kNeonKernels);
#endif
    return tables;
}

const char* table_variant(const KernelTable* kt) {
#if defined(MOEMESH_AVXVNNI_BUILT)
    if (kt == &kAvx2VnniKernels) return "vnni";
#endif
#if defined(__x86_64__) || defined(_M_X64)
    if (kt == &kAvx512VbmiKernels) return "vbmi";
#if defined(MOEMESH_AMX)
    if (kt == &kAvx512AmxKernels) return "amx";
#endif
#endif
#if defined(__aarch64__)
    if (kt == &kNeonDotKernels) return "dotprod";
#if defined(MOEMESH_I8MM_BUILT)
    if (kt == &kNeonI8mmKernels) return "i8mm";
#endif
#endif
    (void)kt;
    return "";
}

Isa best_isa() {
    for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Neon})
        if (kernel_table(isa)) return isa;
    return Isa::Scalar;
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Scalar: return "scalar";
        case Isa::Avx2: return "avx2";
        case Isa::Avx512: return "avx512";
        case Isa::Neon: return "neon";
    }
    return "?";
}

bool parse_isa(const char* name, Isa* out) {
    for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon})
        if (std::strcmp(name, isa_name(isa)) == 0) {
            *out = isa;
            return true;
        }
    return false;
}

Isa active_isa() {
    const char* env = std::getenv("MOEMESH_ISA");
    Isa forced;
    if (env && *env && parse_isa(env, &forced) && kernel_table(forced)) return forced;
    return best_isa();
}

}  // namespace moemesh
