// Compiler spellings for the hand-dispatched kernels of convert.cc and quant.cc:
// each hot loop is compiled for the baseline ISA and, on x86-64, once more for
// AVX2, picked at run time from CPUID (file.h: cpu_has_avx2). GCC's
// target_clones would do this too, but MSVC, Apple clang and mingw lack it.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define GS_X86_64 1
#if defined(__GNUC__) || defined(__clang__)
#define GS_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define GS_TARGET_AVX2  // MSVC compiles AVX2 code in any function
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#define GS_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define GS_ALWAYS_INLINE __forceinline
#else
#define GS_ALWAYS_INLINE inline
#endif
