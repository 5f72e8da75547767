# The native kernels as a static library: per-ISA sources get their own target flags, and the
# runtime dispatch (dispatch.cpp) only selects a path the CPU supports. Shared by the Python
# module and the standalone kernel check used for cross-compiled (NEON) runs.
set(MOEMESH_CSRC ${CMAKE_CURRENT_LIST_DIR})
add_library(moemesh_kernels STATIC
  ${MOEMESH_CSRC}/kernels_scalar.cpp
  ${MOEMESH_CSRC}/dispatch.cpp
  ${MOEMESH_CSRC}/threadpool.cpp
  ${MOEMESH_CSRC}/ops.cpp)
set_target_properties(moemesh_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_include_directories(moemesh_kernels PUBLIC ${MOEMESH_CSRC})
# No -ffast-math anywhere: results must not depend on the compiler reassociating sums.
set(MOEMESH_KERNEL_FLAGS -O3 -fno-fast-math -ffp-contract=off)
target_compile_options(moemesh_kernels PRIVATE ${MOEMESH_KERNEL_FLAGS})
include(CheckCXXCompilerFlag)

# A kernel source built once more with extra definitions and instruction-set flags, linked into the
# kernels: the variant's own table, which the runtime dispatch picks when the CPU has them.
function(moemesh_kernel_variant name source defines flags)
  add_library(${name} OBJECT ${source})
  set_target_properties(${name} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_include_directories(${name} PRIVATE ${MOEMESH_CSRC})
  target_compile_definitions(${name} PRIVATE ${defines})
  target_compile_options(${name} PRIVATE ${MOEMESH_KERNEL_FLAGS} ${flags})
  target_sources(moemesh_kernels PRIVATE $<TARGET_OBJECTS:${name}>)
endfunction()

if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  target_sources(moemesh_kernels PRIVATE ${MOEMESH_CSRC}/kernels_avx2.cpp ${MOEMESH_CSRC}/kernels_avx512.cpp)
  set_source_files_properties(${MOEMESH_CSRC}/kernels_avx2.cpp PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
  # The AVX2 source again with AVX-VNNI's 256-bit vpdpbusd (Alder Lake, Zen 5 and later laptops):
  # its own table, chosen at run time when the CPU has it.
  check_cxx_compiler_flag("-mavxvnni" MOEMESH_COMPILER_HAS_AVXVNNI)
  if(MOEMESH_COMPILER_HAS_AVXVNNI)
    moemesh_kernel_variant(moemesh_kernels_avx2_vnni ${MOEMESH_CSRC}/kernels_avx2.cpp MOEMESH_AVXVNNI
                           "-mavx2;-mfma;-mf16c;-mavxvnni")
    target_compile_definitions(moemesh_kernels PUBLIC MOEMESH_AVXVNNI_BUILT)
  endif()
  set(MOEMESH_AVX512_FLAGS -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512vnni)
  set_source_files_properties(${MOEMESH_CSRC}/kernels_avx512.cpp PROPERTIES COMPILE_OPTIONS "${MOEMESH_AVX512_FLAGS}")
  # The same source again with VBMI's byte permutes (Ice Lake, Zen 4 and later): its own table,
  # chosen at run time; Cascade Lake has VNNI without VBMI and takes the first build.
  moemesh_kernel_variant(moemesh_kernels_avx512_vbmi ${MOEMESH_CSRC}/kernels_avx512.cpp MOEMESH_VBMI
                         "${MOEMESH_AVX512_FLAGS};-mavx512vbmi")
  # AMX tiles (Sapphire Rapids and later) where the compiler knows them; used only when the CPU
  # has them and the kernel grants the tile state (dispatch.cpp).
  check_cxx_compiler_flag("-mamx-tile -mamx-int8 -mamx-bf16" MOEMESH_COMPILER_HAS_AMX)
  if(MOEMESH_COMPILER_HAS_AMX)
    target_sources(moemesh_kernels PRIVATE ${MOEMESH_CSRC}/kernels_amx.cpp)
    set_source_files_properties(${MOEMESH_CSRC}/kernels_amx.cpp PROPERTIES COMPILE_OPTIONS
                                "${MOEMESH_AVX512_FLAGS};-mavx512vbmi;-mamx-tile;-mamx-int8;-mamx-bf16")
    target_compile_definitions(moemesh_kernels PUBLIC MOEMESH_AMX)
    target_compile_definitions(moemesh_kernels_avx512_vbmi PRIVATE MOEMESH_AMX)
  endif()
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "aarch64|arm64")
  target_sources(moemesh_kernels PRIVATE ${MOEMESH_CSRC}/kernels_neon.cpp)
  # The same source again with the dot-product instructions (ARMv8.2 sdot: Cortex-A55/A76 and
  # later), chosen at run time from HWCAP; the baseline build stays for the Cortex-A72.
  moemesh_kernel_variant(moemesh_kernels_neon_dot ${MOEMESH_CSRC}/kernels_neon.cpp MOEMESH_DOTPROD
                         -march=armv8.2-a+dotprod)
  # A third build with the int8 matrix multiply (ARMv8.6 smmla, optional from ARMv8.2: Cortex-A510,
  # A710, X2 and later phone cores) for many tokens, where the compiler knows it.
  check_cxx_compiler_flag("-march=armv8.2-a+dotprod+i8mm" MOEMESH_COMPILER_HAS_I8MM)
  if(MOEMESH_COMPILER_HAS_I8MM)
    moemesh_kernel_variant(moemesh_kernels_neon_i8mm ${MOEMESH_CSRC}/kernels_neon.cpp
                           "MOEMESH_DOTPROD;MOEMESH_I8MM" -march=armv8.2-a+dotprod+i8mm)
    target_compile_definitions(moemesh_kernels PUBLIC MOEMESH_I8MM_BUILT)
  endif()
endif()
