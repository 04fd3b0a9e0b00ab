// AVX-512 with VNNI: the integer dot products use vpdpbusd.
#define DLLAMA_VNNI 1
#define DLLAMA_NS avx512vnni
#define DLLAMA_TABLE_NAME "avx512vnni"
#define DLLAMA_TABLE_FN kernels_avx512vnni
#include "kernels_x86_512.inc"
