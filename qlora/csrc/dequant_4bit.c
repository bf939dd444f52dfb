/* bitsandbytes' 4-bit weights (NF4 or FP4, double-quantized or not) to fp32 on CPU, for
 * qlora/dequant.py. Each byte holds two weights, the high nibble first; a block of `blocksize`
 * weights shares one scale. With double quantization the scales are themselves 8-bit codes,
 * one fp32 scale per 256 of them, plus an offset. The arithmetic is bitsandbytes' own
 * (code * scale, and code8 * scale2 + offset for the scales, never fused into one rounding:
 * build with -ffp-contract=off), so the result is bit for bit theirs. */
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>

/* code[idx] for eight indices in 0..15: two 8-entry permutes, chosen by bit 3 of the index */
static inline __m256 lookup16(__m256 low, __m256 high, __m256i idx) {
    __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, idx), _mm256_permutevar8x32_ps(high, idx), pick);
}
#endif

static void dequantize_block(const uint8_t *src, float *dst, int64_t n_bytes, const float *code, float scale) {
    int64_t j = 0;
#ifdef __AVX2__
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

/* packed: n_bytes bytes, 2 * n_bytes weights (the last block may be short); code: the 16 values.
 * Scales: `absmax` (one fp32 per block), or, where it is NULL, code8[absmax_q[k]] *
 * absmax2[k / blocksize2] + offset for block k. */
void qlora_dequantize_4bit(const uint8_t *packed, int64_t n_bytes, int64_t blocksize, const float *code,
                           const float *absmax, const uint8_t *absmax_q, const float *code8,
                           const float *absmax2, int64_t blocksize2, float offset, float *out, int threads) {
    const int64_t block_bytes = blocksize / 2, blocks = (n_bytes + block_bytes - 1) / block_bytes;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < blocks; k++) {
        const int64_t left = n_bytes - k * block_bytes;
        const float scale = absmax ? absmax[k] : code8[absmax_q[k]] * absmax2[k / blocksize2] + offset;
        dequantize_block(packed + k * block_bytes, out + k * blocksize, left < block_bytes ? left : block_bytes,
                         code, scale);
    }
}
