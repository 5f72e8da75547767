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
target_compile_options(moemesh_kernels PRIVATE -O3 -fno-fast-math -ffp-contract=off)

if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  target_sources(moemesh_kernels PRIVATE ${MOEMESH_CSRC}/kernels_avx2.cpp ${MOEMESH_CSRC}/kernels_avx512.cpp)
  set_source_files_properties(${MOEMESH_CSRC}/kernels_avx2.cpp PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
  # The AVX2 source again with AVX-VNNI's 256-bit vpdpbusd (Alder Lake, Zen 5 and later laptops):
  # its own table, chosen at run time when the CPU has it.
  include(CheckCXXCompilerFlag)
  check_cxx_compiler_flag("-mavxvnni" MOEMESH_COMPILER_HAS_AVXVNNI)
  if(MOEMESH_COMPILER_HAS_AVXVNNI)
    add_library(moemesh_kernels_avx2_vnni OBJECT ${MOEMESH_CSRC}/kernels_avx2.cpp)
    set_target_properties(moemesh_kernels_avx2_vnni PROPERTIES POSITION_INDEPENDENT_CODE ON)
    target_include_directories(moemesh_kernels_avx2_vnni PRIVATE ${MOEMESH_CSRC})
    target_compile_definitions(moemesh_kernels_avx2_vnni PRIVATE MOEMESH_AVXVNNI)
    target_compile_options(moemesh_kernels_avx2_vnni PRIVATE -O3 -fno-fast-math -ffp-contract=off
                           -mavx2 -mfma -mf16c -mavxvnni)
    target_sources(moemesh_kernels PRIVATE $<TARGET_OBJECTS:moemesh_kernels_avx2_vnni>)
    target_compile_definitions(moemesh_kernels PUBLIC MOEMESH_AVXVNNI_BUILT)
  endif()
  set(MOEMESH_AVX512_FLAGS -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512vnni)
  set_source_files_properties(${MOEMESH_CSRC}/kernels_avx512.cpp PROPERTIES COMPILE_OPTIONS "${MOEMESH_AVX512_FLAGS}")
  # The same source again with VBMI's byte permutes (Ice Lake, Zen 4 and later): its own table,
  # chosen at run time; Cascade Lake has VNNI without VBMI and takes the first build.
  add_library(moemesh_kernels_avx512_vbmi OBJECT ${MOEMESH_CSRC}/kernels_avx512.cpp)
  set_target_properties(moemesh_kernels_avx512_vbmi PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_include_directories(moemesh_kernels_avx512_vbmi PRIVATE ${MOEMESH_CSRC})
  target_compile_definitions(moemesh_kernels_avx512_vbmi PRIVATE MOEMESH_VBMI)
  target_compile_options(moemesh_kernels_avx512_vbmi PRIVATE -O3 -fno-fast-math -ffp-contract=off
                         ${MOEMESH_AVX512_FLAGS} -mavx512vbmi)
  target_sources(moemesh_kernels PRIVATE $<TARGET_OBJECTS:moemesh_kernels_avx512_vbmi>)
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
  add_library(moemesh_kernels_neon_dot OBJECT ${MOEMESH_CSRC}/kernels_neon.cpp)
  set_target_properties(moemesh_kernels_neon_dot PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_include_directories(moemesh_kernels_neon_dot PRIVATE ${MOEMESH_CSRC})
  target_compile_definitions(moemesh_kernels_neon_dot PRIVATE MOEMESH_DOTPROD)
  target_compile_options(moemesh_kernels_neon_dot PRIVATE -O3 -fno-fast-math -ffp-contract=off
                         -march=armv8.2-a+dotprod)
  target_sources(moemesh_kernels PRIVATE $<TARGET_OBJECTS:moemesh_kernels_neon_dot>)
  # A third build with the int8 matrix multiply (ARMv8.6 smmla, optional from ARMv8.2: Cortex-A510,
  # A710, X2 and later phone cores) for many tokens, where the compiler knows it.
  include(CheckCXXCompilerFlag)
  check_cxx_compiler_flag("-march=armv8.2-a+dotprod+i8mm" MOEMESH_COMPILER_HAS_I8MM)
  if(MOEMESH_COMPILER_HAS_I8MM)
    add_library(moemesh_kernels_neon_i8mm OBJECT ${MOEMESH_CSRC}/kernels_neon.cpp)
    set_target_properties(moemesh_kernels_neon_i8mm PROPERTIES POSITION_INDEPENDENT_CODE ON)
    target_include_directories(moemesh_kernels_neon_i8mm PRIVATE ${MOEMESH_CSRC})
    target_compile_definitions(moemesh_kernels_neon_i8mm PRIVATE MOEMESH_DOTPROD MOEMESH_I8MM)
    target_compile_options(moemesh_kernels_neon_i8mm PRIVATE -O3 -fno-fast-math -ffp-contract=off
                           -march=armv8.2-a+dotprod+i8mm)
    target_sources(moemesh_kernels PRIVATE $<TARGET_OBJECTS:moemesh_kernels_neon_i8mm>)
    target_compile_definitions(moemesh_kernels PUBLIC MOEMESH_I8MM_BUILT)
  endif()
endif()
