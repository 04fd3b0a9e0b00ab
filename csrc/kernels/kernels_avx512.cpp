// AVX-512 (F, BW, VL, DQ) without VNNI.
#define DLLAMA_VNNI 0
#define DLLAMA_NS avx512
#define DLLAMA_TABLE_NAME "avx512"
#define DLLAMA_TABLE_FN kernels_avx512
#include "kernels_x86_512.inc"
