/* bitsandbytes' 4-bit weights (NF4 or FP4, double-quantized or not) to fp32 or bf16 on CPU, for
 * qlora/dequant.py. Each byte holds two weights, the high nibble first; a block of `blocksize`
 * weights shares one scale. With double quantization the scales are themselves 8-bit codes,
 * one fp32 scale per 256 of them, plus an offset. The arithmetic is bitsandbytes' own
 * (code * scale, and code8 * scale2 + offset for the scales, never fused into one rounding:
 * build with -ffp-contract=off), so the fp32 weights are bit for bit theirs, and the bf16 ones
 * are those rounded as torch rounds fp32 to bf16 (to nearest, ties to even). */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAX_BLOCK 4096 /* bitsandbytes' largest blocksize */

#ifdef __AVX512F__
/* the weights of 16 bytes: those of their high nibbles and those of their low ones, each looked up
 * in the 16 code values by one permute */
static inline void nibbles16(const uint8_t *src, __m512 code, __m512 scale, __m512 *high, __m512 *low) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
    *high = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), code), scale);
    *low = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), code), scale);
}
#elif defined(__AVX2__)
/* code[idx] for eight indices in 0..15: two 8-entry permutes, chosen by bit 3 of the index */
static inline __m256 lookup16(__m256 low, __m256 high, __m256i idx) {
    __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, idx), _mm256_permutevar8x32_ps(high, idx), pick);
}
#endif

static void dequantize_block(const uint8_t *src, float *dst, int64_t n_bytes, const float *code, float scale) {
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 table = _mm512_loadu_ps(code), s = _mm512_set1_ps(scale);
    /* interleave: h0 l0 h1 l1 ... */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; j + 16 <= n_bytes; j += 16) {
        __m512 high, low;
        nibbles16(src + j, table, s, &high, &low);
        _mm512_storeu_ps(dst + 2 * j, _mm512_permutex2var_ps(high, first, low));
        _mm512_storeu_ps(dst + 2 * j + 16, _mm512_permutex2var_ps(high, second, low));
    }
#elif defined(__AVX2__)
    const __m256 low = _mm256_loadu_ps(code), high = _mm256_loadu_ps(code + 8), s = _mm256_set1_ps(scale);
    const __m256i nibble = _mm256_set1_epi32(15);
    for (; j + 8 <= n_bytes; j += 8) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + j)));
        __m256 first = _mm256_mul_ps(lookup16(low, high, _mm256_srli_epi32(b, 4)), s);
        __m256 second = _mm256_mul_ps(lookup16(low, high, _mm256_and_si256(b, nibble)), s);
        /* interleave: f0 s0 f1 s1 ... f7 s7 */
        __m256 a = _mm256_unpacklo_ps(first, second), c = _mm256_unpackhi_ps(first, second);
        _mm256_storeu_ps(dst + 2 * j, _mm256_permute2f128_ps(a, c, 0x20));
        _mm256_storeu_ps(dst + 2 * j + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
#endif
    for (; j < n_bytes; j++) {
        dst[2 * j] = code[src[j] >> 4] * scale;
        dst[2 * j + 1] = code[src[j] & 15] * scale;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* the upper 16-bit halves of two vectors of 16, interleaved (h0 l0 h1 l1 ...): 16-bit halves 0-31
 * are the first vector's, 32-63 the second's */
static const uint16_t UPPER_HALVES[32] = {1, 33, 3, 35, 5, 37, 7, 39, 9, 41, 11, 43, 13, 45, 15, 47,
                                          17, 49, 19, 51, 21, 53, 23, 55, 25, 57, 27, 59, 29, 61, 31, 63};

/* 16 finite fp32 values rounded to bf16 as torch rounds them, each left in the upper half of its 32 bits */
static inline __m512i rounded(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
}
#endif

static void dequantize_block_bf16(const uint8_t *src, uint16_t *dst, int64_t n_bytes, const float *code, float scale) {
    int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 table = _mm512_loadu_ps(code), s = _mm512_set1_ps(scale);
    const __m512i order = _mm512_loadu_si512(UPPER_HALVES);
    for (; j + 16 <= n_bytes; j += 16) {
        __m512 high, low;
        nibbles16(src + j, table, s, &high, &low);
        _mm512_storeu_si512(dst + 2 * j, _mm512_permutex2var_epi16(rounded(high), order, rounded(low)));
    }
#endif
    if (j == n_bytes)
        return;
    /* the rest (all of it without AVX-512) through fp32, rounded as torch rounds (NaN stays NaN) */
    float rest[MAX_BLOCK];
    const int64_t n = 2 * (n_bytes - j);
    dequantize_block(src + j, rest, n_bytes - j, code, scale);
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, rest + i, 4);
        dst[2 * j + i] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                                          : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
    }
}

/* packed: n_bytes bytes, 2 * n_bytes weights (the last block may be short); code: the 16 values.
 * Scales: `absmax` (one fp32 per block), or, where it is NULL, code8[absmax_q[k]] *
 * absmax2[k / blocksize2] + offset for block k. out: fp32 weights, or bf16 ones where bf16 is set. */
void qlora_dequantize_4bit(const uint8_t *packed, int64_t n_bytes, int64_t blocksize, const float *code,
                           const float *absmax, const uint8_t *absmax_q, const float *code8,
                           const float *absmax2, int64_t blocksize2, float offset, void *out, int bf16,
                           int threads) {
    const int64_t block_bytes = blocksize / 2, blocks = (n_bytes + block_bytes - 1) / block_bytes;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < blocks; k++) {
        const int64_t left = n_bytes - k * block_bytes, n = left < block_bytes ? left : block_bytes;
        const float scale = absmax ? absmax[k] : code8[absmax_q[k]] * absmax2[k / blocksize2] + offset;
        if (bf16)
            dequantize_block_bf16(packed + k * block_bytes, (uint16_t *)out + k * blocksize, n, code, scale);
        else
            dequantize_block(packed + k * block_bytes, (float *)out + k * blocksize, n, code, scale);
    }
}
