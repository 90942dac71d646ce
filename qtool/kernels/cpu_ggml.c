/* CPU kernels for the GGML block types that dominate GGUF conversion time: Q8_0, Q4_0, Q4_1,
 * Q5_0, Q5_1, IQ4_NL, IQ4_XS and the K-quants (Q6_K: the output matrix of every plain-type recipe).
 *
 * Each function is the torch code of qtool/schemes/ggml.py / ggml_kquants.py for one block,
 * operation by operation in float32: the same divisions (torch's `scalar / tensor` is a
 * reciprocal then a multiply), round-half-even (rintf) where the torch code calls torch.round,
 * roundf where it calls roundf, sums in the fixed pairwise order of `pairwise_sum`. Built with
 * -ffp-contract=off and without -ffast-math, so the compiler neither fuses multiply-adds nor
 * reorders sums: the bytes equal the torch path's (tests compare them).
 *
 * Input blocks are float32 (dtype 0) or bfloat16 (dtype 1). No global state: callers run
 * several chunks of a tensor on several threads (ctypes releases the GIL).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float load(const void *src, int dtype, int64_t i) {
    if (dtype == 1) {
        uint32_t bits = (uint32_t)((const uint16_t *)src)[i] << 16;
        float value;
        memcpy(&value, &bits, 4);
        return value;
    }
    return ((const float *)src)[i];
}

static inline void store_half(uint8_t *dst, float value) {
    _Float16 half = (_Float16)value;   /* round to nearest even, like torch's .to(float16) */
    memcpy(dst, &half, 2);
}

static inline float half_value(const uint8_t *src) {
    _Float16 half;
    memcpy(&half, src, 2);
    return (float)half;
}

static inline float reciprocal_or_zero(float scale) {
    return scale == 0.0f ? 0.0f : 1.0f / scale;
}

/* The element of largest magnitude, sign kept; the first one on ties (torch.argmax). */
static inline float signed_absmax(const float *x, int n) {
    float best = x[0];
    float best_abs = fabsf(x[0]);
    for (int i = 1; i < n; i++) {
        if (fabsf(x[i]) > best_abs) {
            best_abs = fabsf(x[i]);
            best = x[i];
        }
    }
    return best;
}

/* Loads one block and returns 1 when it holds inf, NaN or a magnitude of 2^30 or more (exponent
 * field >= 157; ggml.LARGEST_INPUT): the kernels report it instead of writing a block whose scale
 * is inf, whose NaN vanished in a max, or whose float32 sums overflowed (no GGML type stores such
 * values: the largest, Q6_K's, is below 2^28). An integer test on the bits, in the load's own loop,
 * costs no pass over the weight. */
static inline int load_block(const void *src, int dtype, int64_t block, int n, float *x) {
    uint32_t special = 0;
    for (int i = 0; i < n; i++) {
        x[i] = load(src, dtype, block * n + i);
        uint32_t bits;
        memcpy(&bits, &x[i], 4);
        special |= (bits & 0x7F800000u) >= (157u << 23);
    }
    return (int)special;
}

static inline float clampf(float v, float lo, float hi) {
    /* Two plain selects (not nested) so that the compiler if-converts and vectorizes them. */
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* rintf (round half to even): below 2^22, adding and subtracting 1.5 * 2^23 rounds to an integer
 * exactly, in a form the compiler vectorizes. rint_level is for a level then clamped to [-32, 31]
 * or narrower: values past +-64 are clamped first (they round past the range either way). The
 * scale searches use rint_small where |inverse * x| <= nmax + 1 by construction. */
static inline float rint_small(float v) {   /* |v| < 2^22 */
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

static inline float rint_level(float v) {
    return rint_small(clampf(v, -64.0f, 64.0f));
}

/* Exported kernels are built for AVX2 and for plain x86-64; the loader picks one at run time. The
 * helpers they call are always inlined, so that each clone has its own build of them too (a helper
 * left out of line is built once, for plain x86-64). */
#define HELPER static inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(QTOOL_PORTABLE)
#define KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define KERNEL
#endif

KERNEL int quantize_q8_0(const void *src, int dtype, int64_t n_blocks, uint8_t *out) {
    int nonfinite = 0;
    float x[32];
    for (int64_t b = 0; b < n_blocks; b++, out += 34) {
        nonfinite |= load_block(src, dtype, b, 32, x);
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[i]));
        float scale = amax / 127.0f;
        float inverse = reciprocal_or_zero(scale);
        store_half(out, scale);
        for (int i = 0; i < 32; i++) {
            /* roundf (halves away from zero) in a form that vectorizes: |v| <= 127 here. */
            float v = x[i] * inverse;
            int whole = (int)v;
            float fraction = v - (float)whole;
            out[2 + i] = (uint8_t)(int8_t)(whole + (fraction >= 0.5f) - (fraction <= -0.5f));
        }
    }
    return nonfinite;
}

/* Q4_0 / Q5_0: scale = signed absmax / -half_range, q = trunc(x / scale + half_range + 0.5). */
static inline void symmetric_levels(const float *x, float half_range, float *scale_out, uint8_t *q) {
    float scale = signed_absmax(x, 32) / -half_range;
    float inverse = reciprocal_or_zero(scale);
    float top = 2.0f * half_range - 1.0f;
    /* clamp then truncate (an int conversion, which vectorizes) = truncate then clamp. */
    for (int i = 0; i < 32; i++) q[i] = (uint8_t)(int)clampf(x[i] * inverse + (half_range + 0.5f), 0.0f, top);
    *scale_out = scale;
}

/* Q4_1 / Q5_1: low = min, scale = (max - low) / top, q = trunc((x - low) / scale + 0.5). */
static inline void affine_levels(const float *x, float top, float *scale_out, float *low_out, uint8_t *q) {
    float low = x[0], high = x[0];
    for (int i = 1; i < 32; i++) {
        low = fminf(low, x[i]);
        high = fmaxf(high, x[i]);
    }
    float scale = (high - low) / top;
    float inverse = reciprocal_or_zero(scale);
    for (int i = 0; i < 32; i++) q[i] = (uint8_t)(int)clampf((x[i] - low) * inverse + 0.5f, 0.0f, top);
    *scale_out = scale;
    *low_out = low;
}

static inline void store_nibbles(uint8_t *dst, const uint8_t *q) {
    for (int i = 0; i < 16; i++) dst[i] = (uint8_t)((q[i] & 0x0F) | ((q[i + 16] & 0x0F) << 4));
}

static inline void store_high_bits(uint8_t *dst, const uint8_t *q) {
    for (int byte = 0; byte < 4; byte++) {
        uint8_t bits = 0;
        for (int bit = 0; bit < 8; bit++) bits |= (uint8_t)(((q[byte * 8 + bit] >> 4) & 1) << bit);
        dst[byte] = bits;
    }
}

/* The four 4/5-bit 32-blocks: [fp16 scale][fp16 low, affine types][high bits, 5-bit types][nibbles].
 * `range` is half the level range (symmetric types) or the top level (affine types). With element
 * weights (`importance`: the row-weighted importance ggml.py's row_element_weights computes, one per
 * element) llama.cpp's weighted searches: make_qx_quants (symmetric), make_qkx3_quants (affine). */
static float qkx3_fit(const float *x, const float *w, int n, float nmax, float *levels, float *the_min);
HELPER float qx_fit(const float *x, const float *w, int n, int nmax, float *levels);
static inline const float *block_importance(const float *importance, int64_t period, int64_t index, int n);

static inline int quantize_32(const void *src, int dtype, int64_t n_blocks, const float *importance, int64_t period,
                              int64_t first, uint8_t *out, int affine, float range, int five_bit) {
    int nonfinite = 0;
    float x[32], levels[32], scale, low;
    uint8_t q[32];
    int type_size = 2 + (affine ? 2 : 0) + (five_bit ? 4 : 0) + 16;
    for (int64_t b = 0; b < n_blocks; b++, out += type_size) {
        nonfinite |= load_block(src, dtype, b, 32, x);
        const float *w = block_importance(importance, period, first + b, 32);
        uint8_t *next = out + 2;
        if (w != NULL) {
            float the_min = 0.0f;
            scale = affine ? qkx3_fit(x, w, 32, range, levels, &the_min) : qx_fit(x, w, 32, (int)range, levels);
            low = -the_min;
            for (int i = 0; i < 32; i++) q[i] = (uint8_t)levels[i];
        } else if (affine) {
            affine_levels(x, range, &scale, &low, q);
        } else {
            symmetric_levels(x, range, &scale, q);
        }
        if (affine) {
            store_half(next, low);
            next += 2;
        }
        store_half(out, scale);
        if (five_bit) {
            store_high_bits(next, q);
            next += 4;
        }
        store_nibbles(next, q);
    }
    return nonfinite;
}

KERNEL int quantize_q4_0(const void *src, int dtype, int64_t n_blocks, const float *importance, int64_t period,
                         int64_t first, uint8_t *out) {
    return quantize_32(src, dtype, n_blocks, importance, period, first, out, 0, 8.0f, 0);
}

KERNEL int quantize_q5_0(const void *src, int dtype, int64_t n_blocks, const float *importance, int64_t period,
                         int64_t first, uint8_t *out) {
    return quantize_32(src, dtype, n_blocks, importance, period, first, out, 0, 16.0f, 1);
}

KERNEL int quantize_q4_1(const void *src, int dtype, int64_t n_blocks, const float *importance, int64_t period,
                         int64_t first, uint8_t *out) {
    return quantize_32(src, dtype, n_blocks, importance, period, first, out, 1, 15.0f, 0);
}

KERNEL int quantize_q5_1(const void *src, int dtype, int64_t n_blocks, const float *importance, int64_t period,
                         int64_t first, uint8_t *out) {
    return quantize_32(src, dtype, n_blocks, importance, period, first, out, 1, 31.0f, 1);
}

/* IQ4_NL: indices into a fixed table; ggml.py's IQ4_NL.quantize_blocks, whose sums run left to
 * right like llama.cpp's loop. */
static const float iq4_nl_table[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* The table index nearest to v, ties to the upper entry, as llama.cpp's best_index_int8 (a binary
 * search, then v - low < high - v) decides: step j moves to entry j + 1 unless v - t[j] < t[j + 1] - v.
 * That test holds for every step past v's interval and fails for every step before it, so the last
 * step taken is the binary search's answer (NaN takes every step: entry 15, as there). Branch-free,
 * so that a loop over values or over candidate scales vectorizes. */
static inline int iq4_nl_index(float v) {
    int index = 0;
    for (int j = 0; j < 15; j++) index = v - iq4_nl_table[j] < iq4_nl_table[j + 1] - v ? index : j + 1;
    return index;
}

static inline float iq4_nl_value(float v) {
    float value = iq4_nl_table[0];
    for (int j = 0; j < 15; j++) value = v - iq4_nl_table[j] < iq4_nl_table[j + 1] - v ? value : iq4_nl_table[j + 1];
    return value;
}

/* IQ4_NL's scale search over one block of 32 with element weights w (ggml.py's _iq4_scales): the
 * scale mapping the largest-magnitude element onto the table's end, then 15 inverse scales, each with
 * its weighted least-squares scale; 0 for an empty block or one whose weights are all zero. The 16
 * candidates' sums run side by side (one vector lane each), every sum still left to right over the
 * block; the candidates are then compared in llama.cpp's order. */
static inline float iq4_block_scale(const float *x, const float *w) {
    float peak = signed_absmax(x, 32);
    if (fabsf(peak) < 1e-15f) return 0.0f;
    float inverse[16], sum_qx[16], sum_q2[16];
    inverse[0] = 1.0f / (peak / 127.0f);
    for (int k = 1; k < 16; k++) inverse[k] = (float)(k - 8 - 127) / peak;
    for (int k = 0; k < 16; k++) sum_qx[k] = sum_q2[k] = 0.0f;
    for (int i = 0; i < 32; i++) {
        for (int k = 0; k < 16; k++) {
            float q = iq4_nl_value(inverse[k] * x[i]);
            float wq = w[i] * q;
            sum_qx[k] = sum_qx[k] + wq * x[i];
            sum_q2[k] = sum_q2[k] + wq * q;
        }
    }
    float scale = sum_q2[0] > 0.0f ? sum_qx[0] / sum_q2[0] : 0.0f;
    float best = scale * sum_qx[0];
    for (int k = 1; k < 16; k++) {
        if (sum_q2[k] > 0.0f && sum_qx[k] * sum_qx[k] > best * sum_q2[k]) {
            scale = sum_qx[k] / sum_q2[k];
            best = scale * sum_qx[k];
        }
    }
    return scale;
}

/* The search's element weights over n values (ggml.py's _iq4_weights): x^2, or with an importance
 * matrix importance * sqrt(sigma2 + x^2), sigma2 twice the mean square of the n values (summed left
 * to right). */
HELPER void iq4_weights(const float *x, int n, const float *importance, float *w) {
    if (importance == NULL) {
        for (int i = 0; i < n; i++) w[i] = x[i] * x[i];
        return;
    }
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum = sum + x[i] * x[i];
    float sigma2 = sum * (2.0f / (float)n);
    for (int i = 0; i < n; i++) w[i] = importance[i] * sqrtf(sigma2 + x[i] * x[i]);
}

/* The IQ4 kernels take an optional importance matrix: one float per column of a row of `period`
 * blocks, the same for every row; `first` is the index of the first block in its tensor. */
static inline const float *block_importance(const float *importance, int64_t period, int64_t index, int n) {
    return importance == NULL ? NULL : importance + (index % period) * n;
}

KERNEL int quantize_iq4_nl(const void *src, int dtype, int64_t n_blocks, const float *importance, int64_t period,
                           int64_t first, uint8_t *out) {
    int nonfinite = 0;
    float x[32], w[32];
    uint8_t q[32];
    for (int64_t b = 0; b < n_blocks; b++, out += 18) {
        nonfinite |= load_block(src, dtype, b, 32, x);
        iq4_weights(x, 32, block_importance(importance, period, first + b, 32), w);
        float scale = iq4_block_scale(x, w);
        float inverse = reciprocal_or_zero(scale);
        for (int i = 0; i < 32; i++) q[i] = (uint8_t)iq4_nl_index(inverse * x[i]);
        store_half(out, scale);
        store_nibbles(out + 2, q);
    }
    return nonfinite;
}

/* IQ4_XS: super-blocks of 256 (ggml.py's IQ4_XS.quantize_blocks): each block of 32's IQ4_NL scale,
 * then d = -(the one of largest magnitude) / 32 in fp16 and a 6-bit code per block, the indices
 * chosen again for d * code (d in float32). */
KERNEL int quantize_iq4_xs(const void *src, int dtype, int64_t n_blocks, const float *importance, int64_t period,
                           int64_t first, uint8_t *out) {
    int nonfinite = 0;
    float x[256], w[256], scales[8];
    uint8_t q[32];
    for (int64_t b = 0; b < n_blocks; b++, out += 136) {
        nonfinite |= load_block(src, dtype, b, 256, x);
        iq4_weights(x, 256, block_importance(importance, period, first + b, 256), w);
        float peak = 0.0f, peak_abs = 0.0f;
        for (int j = 0; j < 8; j++) {
            scales[j] = iq4_block_scale(x + 32 * j, w + 32 * j);
            if (fabsf(scales[j]) > peak_abs) {
                peak_abs = fabsf(scales[j]);
                peak = scales[j];
            }
        }
        float d = -peak / 32.0f;
        float inverse_d = reciprocal_or_zero(d);
        uint16_t scales_h = 0;
        store_half(out, d);
        for (int j = 0; j < 8; j++) {
            float code = rintf(inverse_d * scales[j]);
            code = code < -32.0f ? -32.0f : (code > 31.0f ? 31.0f : code);
            float inverse = reciprocal_or_zero(d * code);
            for (int i = 0; i < 32; i++) q[i] = (uint8_t)iq4_nl_index(inverse * x[32 * j + i]);
            store_nibbles(out + 8 + 16 * j, q);
            int level = (int)code + 32;
            if (j % 2 == 0) out[4 + j / 2] = (uint8_t)(level & 0xF);
            else out[4 + j / 2] |= (uint8_t)((level & 0xF) << 4);
            scales_h |= (uint16_t)((level >> 4) << (2 * j));
        }
        out[2] = (uint8_t)(scales_h & 0xFF);
        out[3] = (uint8_t)(scales_h >> 8);
    }
    return nonfinite;
}

/* pairwise_sum of 16 values: neighbours first, level by level. */
static inline float pairwise16(const float *v) {
    float a[8], b[4];
    for (int i = 0; i < 8; i++) a[i] = v[2 * i] + v[2 * i + 1];
    for (int i = 0; i < 4; i++) b[i] = a[2 * i] + a[2 * i + 1];
    return (b[0] + b[1]) + (b[2] + b[3]);
}

/* pairwise_sum of 32 values. */
static inline float pairwise32(const float *v) {
    float a[16];
    for (int i = 0; i < 16; i++) a[i] = v[2 * i] + v[2 * i + 1];
    return pairwise16(a);
}

/* _refine_symmetric / _refine_asymmetric for one group of n (16 or 32): the code, one step down,
 * one step up; keeps the code whose levels (x + offset) / (d * code), rounded and clamped, give
 * the lowest squared error (pairwise sum), and writes those levels. Symmetric types pass offset 0,
 * which changes no value. */
static inline float refine_code(const float *x, int n, float d, float code, float offset, float code_lo, float code_hi,
                                float level_lo, float level_hi, float *best_levels) {
    float best_error = 0.0f, best_code = code, trial_levels[32], squares[32];
    for (int t = 0; t < 3; t++) {
        float trial = clampf(code + (t == 0 ? 0.0f : (t == 1 ? -1.0f : 1.0f)), code_lo, code_hi);
        float scale = d * trial;
        float safe = scale == 0.0f ? 1.0f : scale;
        for (int i = 0; i < n; i++) {
            float level = scale == 0.0f ? 0.0f : clampf(rint_level((x[i] + offset) / safe), level_lo, level_hi);
            float diff = scale * level - offset - x[i];
            trial_levels[i] = level;
            squares[i] = diff * diff;
        }
        float error = n == 16 ? pairwise16(squares) : pairwise32(squares);
        if (t == 0 || error < best_error) {
            best_error = error;
            best_code = trial;
            memcpy(best_levels, trial_levels, (size_t)n * sizeof(float));
        }
    }
    return best_code;
}

/* _search_scale_symmetric for one group of 16 with nstep 4 (Q6_K: nmax 32, Q3_K: nmax 4; rdelta 0.2):
 * levels in [-nmax, nmax - 1]. candidates[k] are the float32 constants nmax + rdelta*step,
 * step = -4..4 without 0. */
HELPER float symmetric_group_scale(const float *x, float nmax, const float *candidates) {
    float peak = signed_absmax(x, 16);
    int zero_group = fabsf(peak) < 1e-15f;
    if (zero_group) peak = 1.0f;
    float weights[16], weighted_x[16], terms_lx[16], terms_l2[16];
    for (int i = 0; i < 16; i++) {
        weights[i] = x[i] * x[i];
        weighted_x[i] = weights[i] * x[i];
    }
    float reciprocal = 1.0f / peak;
    float best_scale = 0.0f, best = 0.0f;
    for (int k = -1; k < 8; k++) {
        float inverse = reciprocal * (k < 0 ? -nmax : -candidates[k]);
        for (int i = 0; i < 16; i++) {
            float level = clampf(rint_small(inverse * x[i]), -nmax, nmax - 1.0f);
            terms_lx[i] = weighted_x[i] * level;
            terms_l2[i] = weights[i] * level * level;
        }
        float sum_lx = pairwise16(terms_lx), sum_l2 = pairwise16(terms_l2);
        if (k < 0) {
            best_scale = sum_l2 > 0.0f ? sum_lx / sum_l2 : 0.0f;
            best = best_scale * sum_lx;
        } else if (sum_l2 > 0.0f && sum_lx * sum_lx > best * sum_l2) {
            best_scale = sum_lx / sum_l2;
            best = best_scale * sum_lx;
        }
    }
    return zero_group ? 0.0f : best_scale;
}

/* ql[64h + l] = q(128h + l) | q(128h + l + 64) << 4, ql[64h + 32 + l] = q(+32) | q(+96) << 4,
 * qh[32h + l] = top two bits of q(128h + l + 32k) at bits 2k; q = level + bias, in 0..63. */
static void store_q6_k_levels(uint8_t *out, const float *levels, float bias) {
    for (int h = 0; h < 2; h++) {
        for (int l = 0; l < 32; l++) {
            uint8_t q[4];
            for (int k = 0; k < 4; k++) q[k] = (uint8_t)(levels[128 * h + 32 * k + l] + bias);
            out[64 * h + l] = (uint8_t)((q[0] & 0x0F) | ((q[2] & 0x0F) << 4));
            out[64 * h + 32 + l] = (uint8_t)((q[1] & 0x0F) | ((q[3] & 0x0F) << 4));
            out[128 + 32 * h + l] = (uint8_t)((q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6));
        }
    }
}

HELPER void q6_k_weighted(const float *x, const float *importance, uint8_t *out);

KERNEL int quantize_q6_k(const void *src, int dtype, int64_t n_blocks, const float *candidates,
                         const float *importance, int64_t period, int64_t first, uint8_t *out) {
    int nonfinite = 0;
    float x[256], scales[16];
    float levels[256];
    for (int64_t b = 0; b < n_blocks; b++, out += 210) {
        nonfinite |= load_block(src, dtype, b, 256, x);
        if (importance != NULL) {
            q6_k_weighted(x, block_importance(importance, period, first + b, 256), out);
            continue;
        }
        for (int g = 0; g < 16; g++) scales[g] = symmetric_group_scale(x + 16 * g, 32.0f, candidates);
        float peak = signed_absmax(scales, 16);
        int nonzero = fabsf(peak) >= 1e-15f;
        float inverse = nonzero ? (1.0f / peak) * -128.0f : 0.0f;
        float d_stored = nonzero ? 1.0f / inverse : 0.0f;
        store_half(out + 208, d_stored);
        float d = half_value(out + 208);
        for (int g = 0; g < 16; g++) {
            const float *xg = x + 16 * g;
            float code = clampf(rintf(inverse * scales[g]), -128.0f, 127.0f);
            float best_code = refine_code(xg, 16, d, code, 0.0f, -128.0f, 127.0f, -32.0f, 31.0f, levels + 16 * g);
            out[192 + g] = (uint8_t)(int8_t)best_code;
        }
        store_q6_k_levels(out, levels, 32.0f);
    }
    return nonfinite;
}


/* _super_block_codes' scales: the largest sub-block scale and min (llama.cpp's running max from +0
 * with `>`: all-zero blocks, whose mins are -0, give +0, and NaN never wins) stored as fp16 d and
 * dmin (largest / smax); returns the factors that turn a scale / min into its code (smax / largest,
 * 0 for 0) and the decoded d and dmin. */
static inline void super_block_scales(const float *scales, const float *mins, int n, float smax, uint8_t *d_out,
                                      uint8_t *dmin_out, float *inv_scale, float *inv_min, float *d, float *dmin) {
    float max_scale = 0.0f, max_min = 0.0f;
    for (int g = 0; g < n; g++) {
        if (scales[g] > max_scale) max_scale = scales[g];
        if (mins[g] > max_min) max_min = mins[g];
    }
    *inv_scale = max_scale > 0.0f ? (1.0f / max_scale) * smax : 0.0f;
    *inv_min = max_min > 0.0f ? (1.0f / max_min) * smax : 0.0f;
    store_half(d_out, max_scale / smax);
    store_half(dmin_out, max_min / smax);
    *d = half_value(d_out);
    *dmin = half_value(dmin_out);
}

/* _group_range: the group's min clamped to <= 0 (a -0 kept, as clamp(max=0) keeps it) and its span
 * max - min, 1 when 0 (*flat set then). */
static inline float group_range(const float *x, int n, float *low_out, int *flat) {
    float low = x[0], high = x[0];
    for (int i = 1; i < n; i++) {
        low = fminf(low, x[i]);
        high = fmaxf(high, x[i]);
    }
    low = low > 0.0f ? 0.0f : low;
    float span = high - low;
    *flat = span == 0.0f;
    *low_out = low;
    return *flat ? 1.0f : span;
}

/* Σ w (scale*l + offset - x)^2 from the group sums, in the torch code's order of operations. */
static inline float closed_form_error(float scale, float offset, float sum_w, float sum_x, float sum_x2,
                                      float sum_l, float sum_l2, float sum_xl) {
    return scale * scale * sum_l2 + 2.0f * scale * offset * sum_l - 2.0f * scale * sum_xl
           + offset * offset * sum_w - 2.0f * offset * sum_x + sum_x2;
}

/* _search_scale_min for one group of 16 (Q2_K: nmax 3, weights |x|): x ≈ scale * l - min with l in
 * [0, nmax], weighted least squares over the plain min/max grid, then candidates[0..nstep] (the
 * float32 constants rmin + rdelta*step + nmax), each kept only when strictly better. */
HELPER void search_scale_min16(const float *x, const float *w, float nmax, int nstep, const float *candidates,
                               float *scale_out, float *min_out) {
    float low;
    int flat;
    float span = group_range(x, 16, &low, &flat);
    float shifted[16], wx[16], t_l[16], t_l2[16], t_xl[16], t[16];
    for (int i = 0; i < 16; i++) {
        shifted[i] = x[i] - low;
        wx[i] = w[i] * x[i];
        t[i] = wx[i] * x[i];
    }
    float sum_w = pairwise16(w), sum_x = pairwise16(wx), sum_x2 = pairwise16(t);
    float reciprocal = 1.0f / span;
    float best_scale = 0.0f, best_min = low, best_error = 0.0f;
    for (int k = -1; k <= nstep; k++) {
        float inverse = reciprocal * (k < 0 ? nmax : candidates[k]);
        for (int i = 0; i < 16; i++) {
            /* a subnormal span can make inverse infinite: cap first, as torch's clamp would */
            float scaled = inverse * shifted[i];
            float level = clampf(rint_small(scaled > 64.0f ? 64.0f : scaled), 0.0f, nmax);
            t_l[i] = w[i] * level;
            t_l2[i] = w[i] * level * level;
            t_xl[i] = wx[i] * level;
        }
        float sum_l = pairwise16(t_l), sum_l2 = pairwise16(t_l2), sum_xl = pairwise16(t_xl);
        if (k < 0) {   /* the plain min/max grid */
            best_scale = 1.0f / inverse;
            best_error = closed_form_error(best_scale, best_min, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl);
            continue;
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        float scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float offset = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (offset > 0.0f) {
            scale = sum_xl / sum_l2;
            offset = 0.0f;
        }
        float error = closed_form_error(scale, offset, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl);
        if (det > 0.0f && error < best_error) {
            best_error = error;
            best_scale = scale;
            best_min = offset;
        }
    }
    *scale_out = flat ? 0.0f : best_scale;
    *min_out = flat ? -low : -best_min;
}

/* Q2_K: [scales 16][qs 64][d][dmin]; 4-bit scale and min codes (low and high nibble) against the
 * super-block's largest, the scale code refined one step up or down; levels in [0, 3]. */
/* qs[32h + l] bits 2k: level 128h + 32k + l (+ bias), the low two bits. */
static void store_crumbs(uint8_t *qs, const float *levels, float bias) {
    for (int h = 0; h < 2; h++) {
        for (int l = 0; l < 32; l++) {
            uint8_t crumbs = 0;
            for (int k = 0; k < 4; k++) crumbs |= (uint8_t)(((uint8_t)(levels[128 * h + 32 * k + l] + bias) & 3) << (2 * k));
            qs[32 * h + l] = crumbs;
        }
    }
}

HELPER void q2_k_weighted(const float *x, const float *importance, uint8_t *out);

KERNEL int quantize_q2_k(const void *src, int dtype, int64_t n_blocks, const float *candidates,
                         const float *importance, int64_t period, int64_t first, uint8_t *out) {
    int nonfinite = 0;
    float x[256], w[16], scales[16], mins[16], levels[256];
    for (int64_t b = 0; b < n_blocks; b++, out += 84) {
        nonfinite |= load_block(src, dtype, b, 256, x);
        if (importance != NULL) {
            q2_k_weighted(x, block_importance(importance, period, first + b, 256), out);
            continue;
        }
        for (int g = 0; g < 16; g++) {
            for (int i = 0; i < 16; i++) w[i] = fabsf(x[16 * g + i]);
            search_scale_min16(x + 16 * g, w, 3.0f, 7, candidates, &scales[g], &mins[g]);
        }
        float inv_scale, inv_min, d, dmin;
        super_block_scales(scales, mins, 16, 15.0f, out + 80, out + 82, &inv_scale, &inv_min, &d, &dmin);
        for (int g = 0; g < 16; g++) {
            float ls = clampf(rintf(inv_scale * scales[g]), 0.0f, 15.0f);
            float lm = clampf(rintf(inv_min * mins[g]), 0.0f, 15.0f);
            ls = refine_code(x + 16 * g, 16, d, ls, dmin * lm, 0.0f, 15.0f, 0.0f, 3.0f, levels + 16 * g);
            out[g] = (uint8_t)((uint8_t)ls | ((uint8_t)lm << 4));
        }
        store_crumbs(out + 16, levels, 0.0f);
    }
    return nonfinite;
}

/* Q3_K: [hmask 32][qs 64][scales 12][d]. Group scales as Q6_K's with nmax 4, 6-bit codes against
 * -32 / the largest, refined one step up or down; levels in [-4, 3] stored + 4. */
/* hmask[j] bit k: the third bit of level 32k + j; qs[32h + l] bits 2k: the low two bits of level
 * 128h + 32k + l (levels + bias in 0..7); scales: low nibbles of codes g and g + 8 in byte g < 8, the
 * top two bits of codes 4k + j at bits 2k of byte 8 + j. */
static void store_q3_k_fields(uint8_t *out, const uint8_t *codes, const float *levels, float bias) {
    for (int j = 0; j < 32; j++) {
        uint8_t bits = 0;
        for (int k = 0; k < 8; k++) bits |= (uint8_t)((((uint8_t)(levels[32 * k + j] + bias) >> 2) & 1) << k);
        out[j] = bits;
    }
    store_crumbs(out + 32, levels, bias);
    for (int g = 0; g < 8; g++) out[96 + g] = (uint8_t)((codes[g] & 0x0F) | ((codes[g + 8] & 0x0F) << 4));
    for (int j = 0; j < 4; j++) {
        uint8_t top = 0;
        for (int k = 0; k < 4; k++) top |= (uint8_t)((codes[4 * k + j] >> 4) << (2 * k));
        out[104 + j] = top;
    }
}

HELPER void q3_k_weighted(const float *x, const float *importance, uint8_t *out);

KERNEL int quantize_q3_k(const void *src, int dtype, int64_t n_blocks, const float *candidates,
                         const float *importance, int64_t period, int64_t first, uint8_t *out) {
    int nonfinite = 0;
    float x[256], scales[16], levels[256];
    uint8_t codes[16];
    for (int64_t b = 0; b < n_blocks; b++, out += 110) {
        nonfinite |= load_block(src, dtype, b, 256, x);
        if (importance != NULL) {
            q3_k_weighted(x, block_importance(importance, period, first + b, 256), out);
            continue;
        }
        for (int g = 0; g < 16; g++) scales[g] = symmetric_group_scale(x + 16 * g, 4.0f, candidates);
        float peak = signed_absmax(scales, 16);
        int nonzero = peak != 0.0f;
        float inverse = nonzero ? (1.0f / peak) * -32.0f : 0.0f;
        store_half(out + 108, nonzero ? 1.0f / inverse : 0.0f);
        float d = half_value(out + 108);
        for (int g = 0; g < 16; g++) {
            float code = clampf(rintf(inverse * scales[g]), -32.0f, 31.0f);
            codes[g] = (uint8_t)(refine_code(x + 16 * g, 16, d, code, 0.0f, -32.0f, 31.0f, -4.0f, 3.0f,
                                             levels + 16 * g) + 32.0f);
        }
        store_q3_k_fields(out, codes, levels, 4.0f);
    }
    return nonfinite;
}


/* Σl and Σl² (small integers: exact in any order) and Σx·l (pairwise order) of one group's levels. */
static inline void level_sums(const float *x, const float *levels, float *sum_l, float *sum_l2, float *sum_xl) {
    float t_l2[32], t_xl[32];
    for (int i = 0; i < 32; i++) {
        t_l2[i] = levels[i] * levels[i];
        t_xl[i] = x[i] * levels[i];
    }
    *sum_l = pairwise32(levels);
    *sum_l2 = pairwise32(t_l2);
    *sum_xl = pairwise32(t_xl);
}

#define K32_CANDIDATES 4   /* len(ggml_kquants.K32_CANDIDATES[...]) */
#define K32_CODE_ROUNDS 2  /* ggml_kquants.K32_CODE_ROUNDS */

/* _search_k32 for one group of 32: the scale and -offset of the best candidate, and the sums of its
 * levels (sums[0..2]) and Σx (sums[3]). */
HELPER void search_k32(const float *x, float nmax, const float *candidates, float *scale_out, float *min_out,
                       float *sums) {
    float low;
    int flat;
    float span = group_range(x, 32, &low, &flat);
    float shifted[32], levels[32];
    for (int i = 0; i < 32; i++) shifted[i] = x[i] - low;
    float sum_x = pairwise32(x);
    float reciprocal = 1.0f / span;
    float best_scale = 0.0f, best_offset = 0.0f, best_error = 0.0f, best_l = 0.0f, best_l2 = 0.0f, best_xl = 0.0f;
    for (int k = 0; k < K32_CANDIDATES; k++) {
        float inverse = reciprocal * candidates[k];
        for (int i = 0; i < 32; i++) {
            /* shifted >= 0, but a subnormal span can make inverse infinite: cap first, as torch's
             * clamp would turn that infinity into nmax. */
            float scaled = inverse * shifted[i];
            levels[i] = clampf(rint_small(scaled > 64.0f ? 64.0f : scaled), 0.0f, nmax);
        }
        float sum_l, sum_l2, sum_xl;
        level_sums(x, levels, &sum_l, &sum_l2, &sum_xl);
        float det = 32.0f * sum_l2 - sum_l * sum_l;
        float scale = (32.0f * sum_xl - sum_x * sum_l) / det;
        float offset = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (offset > 0.0f || !(det > 0.0f)) {   /* through zero; det 0: levels all equal */
            scale = sum_xl / sum_l2;
            offset = 0.0f;
        }
        float error = -(scale * sum_xl + offset * sum_x);   /* the fit's error less Σx² */
        if (k == 0 || error < best_error) {
            best_error = error;
            best_scale = scale;
            best_offset = offset;
            best_l = sum_l;
            best_l2 = sum_l2;
            best_xl = sum_xl;
        }
    }
    *scale_out = flat ? 0.0f : best_scale;
    *min_out = flat ? -low : -best_offset;
    sums[0] = best_l;
    sums[1] = best_l2;
    sums[2] = best_xl;
    sums[3] = sum_x;
}

/* _code_error: Σ (scale*l - offset - x)^2 less Σx², from the level sums. */
static inline float code_error(float scale, float offset, const float *sums) {
    return scale * scale * sums[1] - 2.0f * scale * offset * sums[0] - 2.0f * scale * sums[2]
           + 32.0f * offset * offset + 2.0f * offset * sums[3];
}

/* _fit_codes: of the codes (ls, lm) and their neighbours one step away, the pair that fits best. */
static inline void fit_codes(float d, float dmin, const float *sums, float *ls, float *lm) {
    float best_error = 0.0f, best_ls = *ls, best_lm = *lm;
    static const float steps[3] = {0.0f, -1.0f, 1.0f};
    for (int a = 0; a < 3; a++) {
        for (int b = 0; b < 3; b++) {
            float trial_ls = clampf(*ls + steps[a], 0.0f, 63.0f);
            float trial_lm = clampf(*lm + steps[b], 0.0f, 63.0f);
            float error = code_error(d * trial_ls, dmin * trial_lm, sums);
            if ((a == 0 && b == 0) || error < best_error) {
                best_error = error;
                best_ls = trial_ls;
                best_lm = trial_lm;
            }
        }
    }
    *ls = best_ls;
    *lm = best_lm;
}

/* _quantize_k32 for Q4_K / Q5_K: writes d and dmin (fp16 bytes) to out[0..3], the codes to ls/lm
 * and the levels. */
HELPER void quantize_k32(const float *x, float nmax, const float *candidates, uint8_t *out,
                         uint8_t *ls_out, uint8_t *lm_out, uint8_t *levels_out) {
    float scales[8], mins[8], sums[8][4];
    for (int g = 0; g < 8; g++) search_k32(x + 32 * g, nmax, candidates, &scales[g], &mins[g], sums[g]);
    float inv_scale, inv_min, d, dmin;
    super_block_scales(scales, mins, 8, 63.0f, out, out + 2, &inv_scale, &inv_min, &d, &dmin);
    for (int g = 0; g < 8; g++) {
        const float *xg = x + 32 * g;
        float ls = clampf(rintf(inv_scale * scales[g]), 0.0f, 63.0f);
        float lm = clampf(rintf(inv_min * mins[g]), 0.0f, 63.0f);
        float levels[32];
        for (int round = 0; round < K32_CODE_ROUNDS; round++) {
            fit_codes(d, dmin, sums[g], &ls, &lm);
            float scale = d * ls, offset = dmin * lm;
            float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
            for (int i = 0; i < 32; i++) levels[i] = clampf(rint_level((xg[i] + offset) * inverse), 0.0f, nmax);
            level_sums(xg, levels, &sums[g][0], &sums[g][1], &sums[g][2]);
        }
        for (int i = 0; i < 32; i++) levels_out[32 * g + i] = (uint8_t)levels[i];
        ls_out[g] = (uint8_t)ls;
        lm_out[g] = (uint8_t)lm;
    }
}

/* get_scale_min_k4's layout: eight 6-bit scales and mins in 12 bytes. */
static inline void store_scale_min_k4(uint8_t *dst, const uint8_t *ls, const uint8_t *lm) {
    for (int i = 0; i < 4; i++) {
        dst[i] = (uint8_t)(ls[i] | ((ls[i + 4] >> 4) << 6));
        dst[4 + i] = (uint8_t)(lm[i] | ((lm[i + 4] >> 4) << 6));
        dst[8 + i] = (uint8_t)((ls[i + 4] & 0x0F) | ((lm[i + 4] & 0x0F) << 4));
    }
}

/* qs[32j + l] = level(64j + l) | level(64j + 32 + l) << 4. */
static inline void store_k_nibbles(uint8_t *dst, const uint8_t *levels) {
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++)
            dst[32 * j + l] = (uint8_t)((levels[64 * j + l] & 0x0F) | ((levels[64 * j + 32 + l] & 0x0F) << 4));
}

/* Q4_K: [d][dmin][scales 12][qs 128]; Q5_K: [d][dmin][scales 12][qh 32][qs 128]. */
static void k32_weighted(const float *x, const float *importance, int five_bit, uint8_t *out, uint8_t *ls,
                         uint8_t *lm, uint8_t *levels);

static inline int quantize_k_blocks(const void *src, int dtype, int64_t n_blocks, const float *candidates,
                                     const float *importance, int64_t period, int64_t first, uint8_t *out,
                                     int five_bit) {
    int nonfinite = 0;
    float x[256];
    uint8_t ls[8], lm[8], levels[256];
    int type_size = five_bit ? 176 : 144;
    for (int64_t b = 0; b < n_blocks; b++, out += type_size) {
        nonfinite |= load_block(src, dtype, b, 256, x);
        if (importance != NULL)
            k32_weighted(x, block_importance(importance, period, first + b, 256), five_bit, out, ls, lm, levels);
        else
            quantize_k32(x, five_bit ? 31.0f : 15.0f, candidates, out, ls, lm, levels);
        store_scale_min_k4(out + 4, ls, lm);
        if (five_bit) {
            /* qh[j] bit k is the fifth bit of level 32k + j. */
            for (int j = 0; j < 32; j++) {
                uint8_t bits = 0;
                for (int k = 0; k < 8; k++) bits |= (uint8_t)(((levels[32 * k + j] >> 4) & 1) << k);
                out[16 + j] = bits;
            }
        }
        store_k_nibbles(out + (five_bit ? 48 : 16), levels);
    }
    return nonfinite;
}

KERNEL int quantize_q4_k(const void *src, int dtype, int64_t n_blocks, const float *candidates,
                         const float *importance, int64_t period, int64_t first, uint8_t *out) {
    return quantize_k_blocks(src, dtype, n_blocks, candidates, importance, period, first, out, 0);
}

KERNEL int quantize_q5_k(const void *src, int dtype, int64_t n_blocks, const float *candidates,
                         const float *importance, int64_t period, int64_t first, uint8_t *out) {
    return quantize_k_blocks(src, dtype, n_blocks, candidates, importance, period, first, out, 1);
}

/* ---------------------------------------------------------------------------------------------
 * The lattice i-quants' search (ggml_iquants.py's _Lattice._fit, operation by operation): per
 * super-block of 256, element weights and sign groups, then per sub-block the scale search over
 * inverse scales with every group snapped to the grid through its neighbour list. Outputs per
 * sub-block the grid index of each group, the sign bits of each 8 elements (7 with even parity),
 * the scale and an empty flag; ggml_iquants.py lays out the bytes. The grid tables come from the
 * caller (levels (G, group), the code -> index map, the padded neighbour lists).
 *
 * config: sub, group, kmax, steps, sigma2_factor, redo (0: all when one left the grid, 1: only
 * those, 2: always all), even_signs, qp_start, no_importance_weights (0: x^2, 1: sigma2 / 4 + x^2);
 * fconfig: step_size, empty_below. */

HELPER float qp_fit(const float *x, const float *w, int n, int nmax, uint8_t *levels_out) {
    float peak = 0.0f;
    for (int i = 0; i < n; i++) peak = x[i] > peak ? x[i] : peak;
    if (!(peak >= 1e-15f)) {
        if (levels_out != NULL) memset(levels_out, 0, (size_t)n);
        return 0.0f;
    }
    uint8_t stored[32];
    float iscale = (float)nmax / peak;
    for (int i = 0; i < n; i++) stored[i] = (uint8_t)(int)rintf(iscale * x[i]);
    float scale = 1.0f / iscale;
    float best = 0.0f;
    for (int i = 0; i < n; i++) {
        float diff = x[i] - scale * (float)stored[i];
        best = best + w[i] * diff * diff;
    }
    for (int step = -4; step <= 4; step++) {
        if (step == 0) continue;
        float trial = (0.1f * (float)step + (float)nmax) / peak;
        float trial_scale = 1.0f / trial;
        float mse = 0.0f;
        for (int i = 0; i < n; i++) {
            float l = rintf(trial * x[i]);
            l = l < (float)nmax ? l : (float)nmax;
            float diff = x[i] - trial_scale * l;
            mse = mse + w[i] * diff * diff;
        }
        if (mse < best) {
            best = mse;
            iscale = trial;
        }
    }
    float sum_lx = 0.0f, sum_l2 = 0.0f;
    for (int i = 0; i < n; i++) {
        float l = rintf(iscale * x[i]);
        l = l < (float)nmax ? l : (float)nmax;
        stored[i] = (uint8_t)(int)l;
        sum_lx = sum_lx + w[i] * x[i] * l;
        sum_l2 = sum_l2 + w[i] * l * l;
    }
    for (int round = 0; round < 5; round++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float li = (float)stored[i];
            float slx = sum_lx - w[i] * x[i] * li;
            float sl2 = sum_l2 - w[i] * li * li;
            if (slx > 0.0f && sl2 > 0.0f) {
                float nl = rintf(x[i] * sl2 / slx);
                nl = nl < (float)nmax ? nl : (float)nmax;
                if (nl != li) {
                    float slx_new = slx + w[i] * x[i] * nl;
                    float sl2_new = sl2 + w[i] * nl * nl;
                    if (slx_new * slx_new * sum_l2 > sum_lx * sum_lx * sl2_new) {
                        stored[i] = (uint8_t)(int)nl;
                        sum_lx = slx_new;
                        sum_l2 = sl2_new;
                        changed = 1;
                    }
                }
            }
        }
        if (!changed) break;
    }
    if (levels_out != NULL) memcpy(levels_out, stored, (size_t)n);
    return sum_l2 > 0.0f ? sum_lx / sum_l2 : 0.0f;
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

/* Lane by lane: a where mask is set (all ones), else b. */
static inline f32x8 select_f32x8(i32x8 mask, f32x8 a, f32x8 b) {
    return (f32x8)((mask & (i32x8)a) | (~mask & (i32x8)b));
}

static inline i32x8 select_i32x8(i32x8 mask, i32x8 a, i32x8 b) {
    return (mask & a) | (~mask & b);
}

/* The first neighbour of least weighted distance to one group of M values (M a constant, so that the
 * loop over elements unrolls), or -1 when none is below infinity. Eight neighbours side by side, one
 * vector lane each, each distance summed over the group left to right as one at a time would; each
 * lane keeps its first strict minimum, and of the lanes' the least, the earliest in list order: the
 * neighbour a scan in list order keeps. Neighbours come as packed codes (levels of `bits` each),
 * `count` of them, padded to a multiple of 8 with the last one (a repeat at a later place never wins). */
static inline int nearest_neighbour(int M, int bits, const uint16_t *packed, int count, const float *xval,
                                    const float *waux, float scale) {
    const i32x8 lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    f32x8 best = (f32x8){0} + INFINITY;
    i32x8 best_index = (i32x8){0} - 1;
    /* Each element's distance term for each level it can take (at most 8), computed as the scan
     * computes it: a neighbour's distance is then a sum of table lookups, one per element. */
    const f32x8 magnitudes = {1, 3, 5, 7, 9, 11, 13, 15};
    f32x8 terms[8];
    for (int i = 0; i < M; i++) {
        f32x8 diff = scale * magnitudes - xval[i];
        terms[i] = waux[i] * diff * diff;
    }
    for (int j0 = 0; j0 < count; j0 += 8) {
        u16x8 codes16;
        memcpy(&codes16, packed + j0, sizeof codes16);
        i32x8 codes = __builtin_convertvector(codes16, i32x8);
        f32x8 d = (f32x8){0};
        for (int i = 0; i < M; i++) d = d + __builtin_shuffle(terms[i], (codes >> (bits * i)) & ((1 << bits) - 1));
        i32x8 index = lanes + j0;
        i32x8 better = d < best;
        best = select_f32x8(better, d, best);
        best_index = select_i32x8(better, index, best_index);
    }
    /* Without branches (which lane wins is unpredictable): the least distance over the lanes, then
     * the earliest neighbour of the lanes holding it, each by halving three times (minima: exact); a
     * lane that found none holds infinity and index -1; when none found any the answer is -1. */
    const i32x8 halves[3] = {{4, 5, 6, 7, 0, 1, 2, 3}, {2, 3, 0, 1, 6, 7, 4, 5}, {1, 0, 3, 2, 5, 4, 7, 6}};
    f32x8 least = best;
    for (int h = 0; h < 3; h++) {
        f32x8 other = __builtin_shuffle(least, halves[h]);
        least = select_f32x8(other < least, other, least);
    }
    i32x8 first = select_i32x8((best == least) & (best_index >= 0), best_index, (i32x8){0} + INT32_MAX);
    for (int h = 0; h < 3; h++) {
        i32x8 other = __builtin_shuffle(first, halves[h]);
        first = select_i32x8(other < first, other, first);
    }
    return first[0] == INT32_MAX ? -1 : first[0];
}

/* The most candidate scales a lattice type tries (IQ3_XXS: 31). */
#define MAX_CANDIDATES 32

/* A lattice's tables as lattice_fit reads them (ggml_iquants.py's lattice_packed): the grid index of
 * each code (-1 off the grid), each reachable code's row of neighbours (-1 for codes rounding never
 * gives), each row's neighbour count and its neighbours' packed codes, `width` (a multiple of 8) a row. */
typedef struct {
    const int32_t *grid_map, *code_rows, *counts;
    const uint16_t *packed;
    int64_t width;
} Lattice;

static inline int group_code(const int *levels, int m, int bits) {
    int code = 0;
    for (int i = 0; i < m; i++) code |= levels[i] << (bits * i);
    return code;
}

/* An off-grid group (its code) moved to its nearest neighbour on the grid (the first of the smallest
 * weighted distance, in list order). */
static inline void snap_off_grid(int *levels, int code, int m, int bits, const float *xval, const float *waux,
                                 float scale, const Lattice *lattice) {
    int64_t row = lattice->code_rows[code];
    const uint16_t *packed = lattice->packed + row * lattice->width;
    int count = lattice->counts[row];
    int nearest = m == 8 ? nearest_neighbour(8, bits, packed, count, xval, waux, scale)
                         : nearest_neighbour(4, bits, packed, count, xval, waux, scale);
    uint32_t chosen = packed[nearest < 0 ? 0 : nearest];
    for (int i = 0; i < m; i++) levels[i] = (int)((chosen >> (bits * i)) & ((1u << bits) - 1u));
}

/* Snap one group's levels to the grid: 1 if they were on it, else 0 with the nearest neighbour's. */
static inline int lattice_snap(int *levels, int m, int bits, const float *xval, const float *waux, float scale,
                               const Lattice *lattice) {
    int code = group_code(levels, m, bits);
    if (lattice->grid_map[code] >= 0) return 1;
    snap_off_grid(levels, code, m, bits, xval, waux, scale, lattice);
    return 0;
}

static inline void lattice_sums(const int *levels, const float *xval, const float *w, int n, float *sum_qx, float *sum_q2) {
    float qx = 0.0f, q2 = 0.0f;
    for (int i = 0; i < n; i++) {
        float q = (float)(2 * levels[i] + 1);
        qx = qx + w[i] * xval[i] * q;
        q2 = q2 + w[i] * q * q;
    }
    *sum_qx = qx;
    *sum_q2 = q2;
}

KERNEL int lattice_fit(const void *src, int dtype, int64_t n_blocks, const float *importance, const int32_t *config,
                       const float *fconfig, const int32_t *grid_map, const int32_t *code_rows,
                       const int32_t *counts, const uint16_t *packed, int32_t width, int32_t *index_out, int32_t *signs_out,
                       float *scale_out, uint8_t *empty_out) {
    const int sub = config[0], m = config[1], kmax = config[2], steps = config[3], factor = config[4];
    const int redo = config[5], even = config[6], qp_start = config[7], flat_weights = config[8];
    const float step_size = fconfig[0], empty_below = fconfig[1];
    const int bits = m == 4 ? 3 : 2, groups = sub / m;
    int nonfinite = 0;
    float x[256], w[256], waux[256], xval[256];
    int chosen[32], trial[32], on_grid[8];
    int trials[MAX_CANDIDATES][32], trial_flags[MAX_CANDIDATES][8];
    float q_by_element[32][MAX_CANDIDATES] = {{0.0f}};
    const Lattice lattice = {grid_map, code_rows, counts, packed, width};
    for (int64_t b = 0; b < n_blocks; b++) {
        nonfinite |= load_block(src, dtype, b, 256, x);
        float sum_x2 = 0.0f;
        for (int i = 0; i < 256; i++) sum_x2 = sum_x2 + x[i] * x[i];
        float sigma2 = (float)factor * sum_x2 / 256.0f;
        for (int i = 0; i < 256; i++) {
            if (importance != NULL) w[i] = importance[b * 256 + i] * sqrtf(sigma2 + x[i] * x[i]);
            else if (flat_weights) w[i] = 0.25f * (2.0f * sum_x2 / 256.0f) + x[i] * x[i];
            else w[i] = x[i] * x[i];
            waux[i] = sqrtf(w[i]);
            xval[i] = x[i] >= 0.0f ? x[i] : -x[i];
        }
        for (int k = 0; k < 32; k++) {       /* sign groups of 8 */
            const float *xs = x + 8 * k;
            int s = 0, count = 0;
            for (int i = 0; i < 8; i++) if (xs[i] < 0.0f) { s |= 1 << i; count++; }
            if (even && count % 2) {
                int low = 0;
                float least = w[8 * k] * xs[0] * xs[0];
                for (int i = 1; i < 8; i++) {
                    float cost = w[8 * k + i] * xs[i] * xs[i];
                    if (cost < least) { least = cost; low = i; }
                }
                xval[8 * k + low] = -xval[8 * k + low];
                s ^= 1 << low;
            }
            signs_out[b * 32 + k] = even ? (s & 127) : s;
        }
        for (int r = 0; r < 256 / sub; r++) {
            const float *xv = xval + r * sub, *wr = w + r * sub, *wa = waux + r * sub;
            int64_t row = b * (256 / sub) + r;
            float peak = xv[0];
            for (int i = 1; i < sub; i++) peak = xv[i] > peak ? xv[i] : peak;
            int empty = empty_below > 0.0f ? !(peak >= empty_below) : peak == 0.0f;
            if (empty) {       /* left as llama.cpp clears it (the caller zeroes its fields) */
                for (int g = 0; g < groups; g++) index_out[row * groups + g] = 0;
                scale_out[row] = 0.0f;
                empty_out[row] = 1;
                continue;
            }
            float safe_peak = peak;
            float scale = qp_start ? qp_fit(xv, wr, sub, kmax + 1, NULL) : safe_peak / (float)(2 * kmax - 1);
            float span = redo == 2 ? scale * (float)kmax : peak;
            if (!(span > 0.0f)) empty = 1;
            if (empty) span = 1.0f;
            float best = 0.0f;
            for (int i = 0; i < sub; i++) chosen[i] = 0;
            for (int g = 0; g < groups; g++) on_grid[g] = redo != 0;
            /* Every candidate scale's levels, snapped, first; then their sums side by side (one vector
             * lane per candidate, each sum left to right over the sub-block); then llama.cpp's choice,
             * candidate by candidate in its order. The off-grid groups of all candidates are listed
             * first and then snapped one after another: no branch on whether each group was on the
             * grid (which is unpredictable). */
            const int candidates = 2 * steps + 1;
            float inverses[MAX_CANDIDATES];
            int codes[MAX_CANDIDATES * 8], off_list[MAX_CANDIDATES * 8], n_off = 0;
            for (int k = 0; k < candidates; k++) {
                inverses[k] = ((float)(2 * kmax - 1) + (float)(k - steps) * step_size) / span;
                int *levels = trials[k];
                for (int i = 0; i < sub; i++) {
                    float l = rint_level(0.5f * (inverses[k] * xv[i] - 1.0f));
                    levels[i] = (int)clampf(l, 0.0f, (float)(kmax - 1));
                }
                for (int g = 0; g < groups; g++) {
                    int code = group_code(levels + g * m, m, bits);
                    int on = lattice.grid_map[code] >= 0;
                    codes[8 * k + g] = code;
                    trial_flags[k][g] = on;
                    off_list[n_off] = 8 * k + g;
                    n_off += !on;
                }
            }
            for (int e = 0; e < n_off; e++) {
                int k = off_list[e] >> 3, g = off_list[e] & 7;
                snap_off_grid(trials[k] + g * m, codes[off_list[e]], m, bits, xv + g * m, wa + g * m,
                              1.0f / inverses[k], &lattice);
            }
            for (int k = 0; k < candidates; k++)
                for (int i = 0; i < sub; i++) q_by_element[i][k] = (float)(2 * trials[k][i] + 1);
            float sum_qx[MAX_CANDIDATES], sum_q2[MAX_CANDIDATES];
            const int lanes = (candidates + 7) & ~7;     /* whole vectors; the lanes past are zeros */
            for (int k = 0; k < lanes; k++) sum_qx[k] = sum_q2[k] = 0.0f;
            for (int i = 0; i < sub; i++) {
                for (int k = 0; k < lanes; k++) {
                    float q = q_by_element[i][k];
                    sum_qx[k] = sum_qx[k] + wr[i] * xv[i] * q;
                    sum_q2[k] = sum_q2[k] + wr[i] * q * q;
                }
            }
            for (int k = 0; k < candidates; k++) {
                if (sum_q2[k] > 0.0f && sum_qx[k] * sum_qx[k] > best * sum_q2[k]) {
                    scale = sum_qx[k] / sum_q2[k];
                    best = scale * sum_qx[k];
                    for (int i = 0; i < sub; i++) chosen[i] = trials[k][i];
                    for (int g = 0; g < groups; g++) on_grid[g] = trial_flags[k][g];
                }
            }
            int off = 0;
            for (int g = 0; g < groups; g++) off |= !on_grid[g];
            if (scale > 0.0f && !empty && (redo == 2 || off)) {
                float inverse = 1.0f / scale;
                for (int g = 0; g < groups; g++) {
                    int *levels = trial + g * m;
                    if (redo == 1 && on_grid[g]) {
                        for (int i = 0; i < m; i++) levels[i] = chosen[g * m + i];
                        continue;
                    }
                    for (int i = 0; i < m; i++) {
                        float l = rint_level(0.5f * (inverse * xv[g * m + i] - 1.0f));
                        levels[i] = (int)clampf(l, 0.0f, (float)(kmax - 1));
                    }
                    lattice_snap(levels, m, bits, xv + g * m, wa + g * m, scale, &lattice);
                }
                float sum_qx, sum_q2;
                lattice_sums(trial, xv, wr, sub, &sum_qx, &sum_q2);
                for (int i = 0; i < sub; i++) chosen[i] = trial[i];
                if (sum_q2 > 0.0f) scale = sum_qx / sum_q2;
            }
            for (int g = 0; g < groups; g++) {
                int code = 0;
                for (int i = 0; i < m; i++) code |= chosen[g * m + i] << (bits * i);
                index_out[row * groups + g] = grid_map[code];
            }
            scale_out[row] = scale;
            empty_out[row] = (uint8_t)empty;
        }
    }
    return nonfinite;
}

/* ---------------------------------------------------------------------------------------------
 * The K-quants with an importance matrix (ggml_kweighted.py, operation by operation: llama.cpp's
 * quantize_row_q{2,3,4,5,6}_K_impl). Sums left to right from 0 unless noted. */

/* importance * sqrt(sigma2 + x^2), sigma2 the super-block's mean square times `factor`. */
HELPER void kquant_weights(const float *x, const float *importance, float factor, float *w) {
    float sum = 0.0f;
    for (int i = 0; i < 256; i++) sum = sum + x[i] * x[i];
    float sigma2 = sum * (factor / 256.0f);
    for (int i = 0; i < 256; i++) w[i] = importance[i] * sqrtf(sigma2 + x[i] * x[i]);
}

/* make_qkx3_quants (rmin -0.9, rdelta 0.05, 37 steps): x ~ scale * l - the_min, l in [0, nmax]. */
static float qkx3_fit(const float *x, const float *w, int n, float nmax, float *levels, float *the_min) {
    float low = x[0], high = x[0];
    float sum_w = w[0], sum_x = w[0] * x[0];    /* from the first term */
    for (int i = 1; i < n; i++) {
        if (x[i] < low) low = x[i];
        if (x[i] > high) high = x[i];
        sum_w = sum_w + w[i];
        sum_x = sum_x + w[i] * x[i];
    }
    if (low > 0.0f) low = 0.0f;
    if (high <= low) {
        for (int i = 0; i < n; i++) levels[i] = 0.0f;
        *the_min = -low;
        return 0.0f;
    }
    float inverse = nmax / (high - low);
    float scale = 1.0f / inverse;
    float best = 0.0f;
    for (int i = 0; i < n; i++) {
        levels[i] = clampf(rintf(inverse * (x[i] - low)), 0.0f, nmax);
        float diff = scale * levels[i] + low - x[i];
        best = best + w[i] * (diff * diff);
    }
    float trial_levels[32];
    for (int step = 0; step <= 36; step++) {
        /* each candidate rounds against the min of the best fit so far, as the C loop does */
        float trial = (-0.9f + 0.05f * (float)step + nmax) / (high - low);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < n; i++) {
            float l = clampf(rintf(trial * (x[i] - low)), 0.0f, nmax);
            trial_levels[i] = l;
            float wl = w[i] * l;
            sum_l = sum_l + wl;
            sum_l2 = sum_l2 + wl * l;
            sum_xl = sum_xl + wl * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        if (!(det > 0.0f)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0.0f) {
            this_min = 0.0f;
            this_scale = sum_xl / sum_l2;
        }
        float error = 0.0f;
        for (int i = 0; i < n; i++) {
            float diff = this_scale * trial_levels[i] + this_min - x[i];
            error = error + w[i] * (diff * diff);
        }
        if (error < best) {
            memcpy(levels, trial_levels, (size_t)n * sizeof(float));
            best = error;
            scale = this_scale;
            low = this_min;
        }
    }
    *the_min = -low;
    return scale;
}

/* make_qx_quants (rmse_type 1, weighted): x ~ scale * l, l in [-nmax, nmax-1], stored l + nmax. */
HELPER float qx_fit(const float *x, const float *w, int n, int nmax, float *levels) {
    float peak = 0.0f, peak_abs = 0.0f;
    for (int i = 0; i < n; i++) {
        if (fabsf(x[i]) > peak_abs) {
            peak_abs = fabsf(x[i]);
            peak = x[i];
        }
    }
    if (peak_abs < 1e-15f) {
        for (int i = 0; i < n; i++) levels[i] = 0.0f;
        return 0.0f;
    }
    float lo = (float)-nmax, hi = (float)(nmax - 1);
    float inverse = (float)-nmax / peak;
    float sum_lx = 0.0f, sum_l2 = 0.0f;
    for (int i = 0; i < n; i++) {
        float l = clampf(rintf(inverse * x[i]), lo, hi);
        levels[i] = l + (float)nmax;
        sum_lx = sum_lx + w[i] * x[i] * l;
        sum_l2 = sum_l2 + w[i] * l * l;
    }
    float scale = sum_l2 != 0.0f ? sum_lx / sum_l2 : 0.0f;
    float best = scale * sum_lx;
    for (int step = -9; step <= 9; step++) {
        if (step == 0) continue;
        float trial = -((float)nmax + 0.1f * (float)step) / peak;
        sum_lx = 0.0f;
        sum_l2 = 0.0f;
        for (int i = 0; i < n; i++) {
            float l = clampf(rintf(trial * x[i]), lo, hi);
            sum_lx = sum_lx + w[i] * x[i] * l;
            sum_l2 = sum_l2 + w[i] * l * l;
        }
        if (sum_l2 > 0.0f && sum_lx * sum_lx > best * sum_l2) {
            for (int i = 0; i < n; i++) levels[i] = clampf(rintf(trial * x[i]), lo, hi) + (float)nmax;
            scale = sum_lx / sum_l2;
            best = scale * sum_lx;
        }
    }
    return scale;
}

HELPER float running_sum(const float *v, int n) {
    float total = 0.0f;
    for (int i = 0; i < n; i++) total = total + v[i];
    return total;
}

/* rint((x + offset) / scale) clamped, for the decoded sub-block scale; a zero scale keeps the levels. */
HELPER void requantize(const float *x, int n, float scale, float offset, float lo, float hi, float bias,
                       float *levels) {
    if (scale == 0.0f) return;
    for (int i = 0; i < n; i++) levels[i] = clampf(rintf((x[i] + offset) / scale), lo, hi) + bias;
}

HELPER void q2_k_weighted(const float *x, const float *importance, uint8_t *out) {
    float w[256], levels[256], scales[16], mins[16], sub_weights[16];
    uint8_t ls[16], lm[16];
    kquant_weights(x, importance, 1.0f, w);
    for (int g = 0; g < 16; g++) {
        sub_weights[g] = running_sum(w + 16 * g, 16);
        scales[g] = qkx3_fit(x + 16 * g, w + 16 * g, 16, 3.0f, levels + 16 * g, &mins[g]);
    }
    store_half(out + 80, qp_fit(scales, sub_weights, 16, 15, ls));
    store_half(out + 82, qp_fit(mins, sub_weights, 16, 15, lm));
    float d = half_value(out + 80), dmin = half_value(out + 82);
    for (int g = 0; g < 16; g++) {
        out[g] = (uint8_t)(ls[g] | (lm[g] << 4));
        requantize(x + 16 * g, 16, d * (float)(out[g] & 0xF), dmin * (float)(out[g] >> 4), 0.0f, 3.0f, 0.0f,
                   levels + 16 * g);
    }
    store_crumbs(out + 16, levels, 0.0f);
}

HELPER void q3_k_weighted(const float *x, const float *importance, uint8_t *out) {
    float w[256], levels[256], scales[16], sub_weights[16], codes[16];
    uint8_t code_bytes[16];
    kquant_weights(x, importance, 2.0f, w);
    for (int g = 0; g < 16; g++) {
        sub_weights[g] = running_sum(w + 16 * g, 16);
        scales[g] = qx_fit(x + 16 * g, w + 16 * g, 16, 4, levels + 16 * g);
    }
    store_half(out + 108, qx_fit(scales, sub_weights, 16, 32, codes));
    float d = half_value(out + 108);
    for (int g = 0; g < 16; g++) {
        code_bytes[g] = (uint8_t)codes[g];
        requantize(x + 16 * g, 16, d * (codes[g] - 32.0f), 0.0f, -4.0f, 3.0f, 4.0f, levels + 16 * g);
    }
    store_q3_k_fields(out, code_bytes, levels, 0.0f);
}

static void k32_weighted(const float *x, const float *importance, int five_bit, uint8_t *out, uint8_t *ls,
                         uint8_t *lm, uint8_t *levels) {
    float w[256], fitted[256], scales[8], mins[8], sub_weights[8];
    float nmax = five_bit ? 31.0f : 15.0f;
    kquant_weights(x, importance, 2.0f, w);
    for (int g = 0; g < 8; g++) {
        sub_weights[g] = running_sum(w + 32 * g, 32);
        scales[g] = qkx3_fit(x + 32 * g, w + 32 * g, 32, nmax, fitted + 32 * g, &mins[g]);
    }
    store_half(out, qp_fit(scales, sub_weights, 8, 63, ls));
    store_half(out + 2, qp_fit(mins, sub_weights, 8, 63, lm));
    if (five_bit)   /* Q5_K clamps its codes to 6 bits; Q4_K stores them as they are */
        for (int g = 0; g < 8; g++) {
            ls[g] = ls[g] < 63 ? ls[g] : 63;
            lm[g] = lm[g] < 63 ? lm[g] : 63;
        }
    /* what get_scale_min_k4 reads back (a code over 63 spills into its neighbour's top bits) */
    uint8_t packed[12];
    store_scale_min_k4(packed, ls, lm);
    float d = half_value(out), dmin = half_value(out + 2);
    for (int g = 0; g < 8; g++) {
        int sc = g < 4 ? packed[g] & 63 : (packed[g + 4] & 0xF) | ((packed[g - 4] >> 6) << 4);
        int m = g < 4 ? packed[g + 4] & 63 : (packed[g + 4] >> 4) | ((packed[g] >> 6) << 4);
        requantize(x + 32 * g, 32, d * (float)sc, dmin * (float)m, 0.0f, nmax, 0.0f, fitted + 32 * g);
    }
    for (int i = 0; i < 256; i++) levels[i] = (uint8_t)fitted[i];
}

HELPER void q6_k_weighted(const float *x, const float *importance, uint8_t *out) {
    float levels[256], scales[16];
    for (int g = 0; g < 16; g++) scales[g] = qx_fit(x + 16 * g, importance + 16 * g, 16, 32, levels + 16 * g);
    float peak = signed_absmax(scales, 16);
    if (fabsf(peak) < 1e-15f) {
        memset(out, 0, 210);
        return;
    }
    float inverse = -128.0f / peak;
    store_half(out + 208, 1.0f / inverse);
    float d = half_value(out + 208);
    for (int g = 0; g < 16; g++) {
        float code = rintf(inverse * scales[g]);
        code = code < 127.0f ? code : 127.0f;
        out[192 + g] = (uint8_t)(int8_t)code;
        requantize(x + 16 * g, 16, d * code, 0.0f, -32.0f, 31.0f, 32.0f, levels + 16 * g);
    }
    store_q6_k_levels(out, levels, 0.0f);
}

/* ---------------------------------------------------------------------------------------------
 * IQ1_S / IQ1_M (ggml_iq1.py, operation by operation: llama.cpp's quantize_row_iq1_{s,m}_impl):
 * per sub-block every split of the sorted values into three levels, for each delta sign, scored
 * from running sums; the winner snapped to the IQ1 grid through its neighbour lists, its scale
 * refit; then the 3-bit codes under the super-block scale (IQ1_M: d refit over the super-block).
 * The grid tables come from the caller as for lattice_fit. medium: 0 IQ1_S, 1 IQ1_M. */

static const float IQ1_PLUS[3] = {-0.875f, 0.125f, 1.125f}, IQ1_MINUS[3] = {-1.125f, -0.125f, 0.875f};

/* The first candidate with sum_qx^2 > best * sum_q2 replaces the best (llama.cpp's test). */
static inline int iq1_better(float qx, float q2, float *best, float *scale) {
    if (q2 > 0.0f && qx * qx > *best * q2) {
        *scale = qx / q2;
        *best = *scale * qx;
        return 1;
    }
    return 0;
}

/* One sub-block of n (32 or 16) elements: grid indices (n / 8), each group's delta sign (1: minus),
 * the scale; returns 0 when the sub-block stays empty (index 0, plus, scale 0). */
HELPER int iq1_sub_block(const float *xb, const float *w, int n, int medium, float empty_below,
                         const int32_t *grid_levels, const int32_t *grid_map, const int32_t *neighbours,
                         int32_t width, int *index, int *minus, float *scale_out) {
    int order[32], rank[32], levels[32];
    float sum_x[2][33], sum_w[2][33];
    int groups = n / 8;
    for (int g = 0; g < groups; g++) { index[g] = 0; minus[g] = 0; }
    *scale_out = 0.0f;
    float peak = fabsf(xb[0]);
    for (int i = 1; i < n; i++) peak = fabsf(xb[i]) > peak ? fabsf(xb[i]) : peak;
    if (peak < empty_below) return 0;
    for (int i = 0; i < n; i++) {      /* stable insertion sort, ascending */
        int j = i;
        while (j > 0 && xb[order[j - 1]] > xb[i]) { order[j] = order[j - 1]; j--; }
        order[j] = i;
    }
    int halves = medium ? 2 : 1;
    for (int h = 0; h < halves; h++) { sum_x[h][0] = 0.0f; sum_w[h][0] = 0.0f; }
    for (int j = 0; j < n; j++) {
        int i = order[j], half = medium && i >= n / 2;
        for (int h = 0; h < halves; h++) {
            if (h == half) {
                sum_x[h][j + 1] = sum_x[h][j] + w[i] * xb[i];
                sum_w[h][j + 1] = sum_w[h][j] + w[i];
            } else {
                sum_x[h][j + 1] = sum_x[h][j];
                sum_w[h][j + 1] = sum_w[h][j];
            }
        }
    }
    float best = -3.40282347e+38f, scale = peak;
    int best1 = -1, best2 = -1, best_k = -1;
    for (int i1 = 0; i1 <= n; i1++) {
        for (int i2 = i1; i2 <= n; i2++) {
            if (!medium) {
                for (int k = 0; k < 2; k++) {
                    const float *v = k ? IQ1_MINUS : IQ1_PLUS;
                    float lx = sum_x[0][i1] - sum_x[0][0], mx = sum_x[0][i2] - sum_x[0][i1], hx = sum_x[0][n] - sum_x[0][i2];
                    float lw = sum_w[0][i1] - sum_w[0][0], mw = sum_w[0][i2] - sum_w[0][i1], hw = sum_w[0][n] - sum_w[0][i2];
                    float qx = (lx * v[0] + mx * v[1]) + hx * v[2];
                    float q2 = (lw * v[0] * v[0] + mw * v[1] * v[1]) + hw * v[2] * v[2];
                    if (iq1_better(qx, q2, &best, &scale)) { best1 = i1; best2 = i2; best_k = k; }
                }
                continue;
            }
            float qx[2][2], q2[2][2];      /* [half][0 plus, 1 minus] */
            for (int h = 0; h < 2; h++) {
                float both = sum_x[h][i1] + sum_x[h][i2];
                for (int s = 0; s < 2; s++) {
                    const float *v = s ? IQ1_MINUS : IQ1_PLUS;
                    float c1 = v[0] * v[0] - v[1] * v[1], c2 = v[1] * v[1] - v[2] * v[2];
                    qx[h][s] = sum_x[h][n] * v[2] - both;
                    q2[h][s] = (sum_w[h][n] * v[2] * v[2] + sum_w[h][i1] * c1) + sum_w[h][i2] * c2;
                }
            }
            for (int k = 0; k < 4; k++) {
                if (iq1_better(qx[0][k >> 1] + qx[1][k & 1], q2[0][k >> 1] + q2[1][k & 1], &best, &scale)) {
                    best1 = i1; best2 = i2; best_k = k;
                }
            }
        }
    }
    if (best_k < 0) return 0;
    for (int j = 0; j < n; j++) rank[order[j]] = j;
    int flip = scale < 0.0f;
    for (int i = 0; i < n; i++) {
        levels[i] = (rank[i] >= best1) + (rank[i] >= best2);
        if (flip) levels[i] = 2 - levels[i];
    }
    if (flip) scale = -scale;
    for (int g = 0; g < groups; g++) {
        int sign = medium ? (g == 0 ? best_k >> 1 : best_k & 1) : best_k;
        minus[g] = sign ^ flip;
    }
    int off = 0;
    for (int g = 0; g < groups; g++) {
        const float *v = minus[g] ? IQ1_MINUS : IQ1_PLUS;
        int code = 0;
        for (int i = 0; i < 8; i++) code |= levels[8 * g + i] << (2 * i);
        index[g] = grid_map[code];
        if (index[g] >= 0) continue;
        off = 1;
        const int32_t *candidates = neighbours + (int64_t)code * width;
        float least = 3.40282347e+38f;
        int chosen = candidates[0];
        for (int j = 0; j < width && candidates[j] >= 0; j++) {
            const int32_t *point = grid_levels + (int64_t)candidates[j] * 8;
            float d2 = 0.0f;
            for (int i = 0; i < 8; i++) {
                float diff = scale * v[point[i]] - xb[8 * g + i];
                d2 = d2 + w[8 * g + i] * diff * diff;
            }
            if (d2 < least) { least = d2; chosen = candidates[j]; }
        }
        index[g] = chosen;
    }
    if (off) {
        float sum_qx = 0.0f, sum_q2 = 0.0f;
        for (int g = 0; g < groups; g++) {
            const float *v = minus[g] ? IQ1_MINUS : IQ1_PLUS;
            const int32_t *point = grid_levels + (int64_t)index[g] * 8;
            for (int i = 0; i < 8; i++) {
                float q = v[point[i]];
                sum_qx = sum_qx + w[8 * g + i] * q * xb[8 * g + i];
                sum_q2 = sum_q2 + w[8 * g + i] * q * q;
            }
        }
        if (sum_qx > 0.0f && sum_q2 > 0.0f) scale = sum_qx / sum_q2;
    }
    *scale_out = scale;
    return 1;
}

KERNEL int quantize_iq1(const void *src, int dtype, int64_t n_blocks, const float *importance, int medium,
                        const int32_t *grid_levels, const int32_t *grid_map, const int32_t *neighbours,
                        int32_t width, uint8_t *out) {
    const int n = medium ? 16 : 32, subs = 256 / n, type_size = medium ? 56 : 50;
    const float empty_below = medium ? 1e-7f : 1e-12f;
    int nonfinite = 0;
    float x[256], w[256], scales[16];
    int index[16][4], minus[16][4];
    for (int64_t b = 0; b < n_blocks; b++, out += type_size) {
        nonfinite |= load_block(src, dtype, b, 256, x);
        float sum_x2 = 0.0f;
        for (int i = 0; i < 256; i++) sum_x2 = sum_x2 + x[i] * x[i];
        float sigma2 = 2.0f * sum_x2 / 256.0f;
        for (int i = 0; i < 256; i++)
            w[i] = importance != NULL ? importance[b * 256 + i] * sqrtf(sigma2 + x[i] * x[i]) : x[i] * x[i];
        float max_scale = 0.0f;
        for (int s = 0; s < subs; s++) {
            iq1_sub_block(x + s * n, w + s * n, n, medium, empty_below, grid_levels, grid_map, neighbours, width,
                          index[s], minus[s], &scales[s]);
            max_scale = scales[s] > max_scale ? scales[s] : max_scale;
        }
        memset(out, 0, (size_t)type_size);
        int live = max_scale > 0.0f;
        float d = max_scale / 15.0f;
        float inverse = 1.0f / (live ? d : 1.0f);
        int codes[16];
        for (int s = 0; s < subs; s++) {
            float code = rintf(0.5f * (inverse * scales[s] - 1.0f));
            codes[s] = live ? (int)clampf(code, 0.0f, 7.0f) : 0;
        }
        if (!medium) {
            if (live) store_half(out, d * 1.125f);
            for (int s = 0; s < subs; s++) {
                uint16_t word = 0;
                for (int g = 0; g < 4; g++) {
                    out[2 + 4 * s + g] = (uint8_t)(index[s][g] & 0xFF);
                    word |= (uint16_t)((index[s][g] >> 8) << (3 * g));
                }
                if (live) word |= (uint16_t)((codes[s] << 12) | (minus[s][0] << 15));
                out[34 + 2 * s] = (uint8_t)(word & 0xFF);
                out[35 + 2 * s] = (uint8_t)(word >> 8);
            }
            continue;
        }
        for (int s = 0; s < subs; s++) {
            out[2 * s] = (uint8_t)(index[s][0] & 0xFF);
            out[2 * s + 1] = (uint8_t)(index[s][1] & 0xFF);
            out[32 + s] = (uint8_t)((index[s][0] >> 8) | ((index[s][1] >> 8) << 4));
        }
        if (!live) continue;
        float sum_qx = 0.0f, sum_q2 = 0.0f;
        for (int s = 0; s < subs; s++) {
            out[32 + s] |= (uint8_t)((minus[s][0] ? 0x08 : 0) | (minus[s][1] ? 0x80 : 0));
            for (int g = 0; g < 2; g++) {
                const float *v = minus[s][g] ? IQ1_MINUS : IQ1_PLUS;
                const int32_t *point = grid_levels + (int64_t)index[s][g] * 8;
                for (int i = 0; i < 8; i++) {
                    int e = s * 16 + g * 8 + i;
                    float q = v[point[i]] * (float)(2 * codes[s] + 1);
                    sum_qx = sum_qx + w[e] * q * x[e];
                    sum_q2 = sum_q2 + w[e] * q * q;
                }
            }
        }
        if (sum_q2 > 0.0f) d = sum_qx / sum_q2;
        uint8_t half[2];
        store_half(half, d * 1.1125f);
        uint16_t bits = (uint16_t)(half[0] | (half[1] << 8));
        for (int q = 0; q < 4; q++) {
            uint16_t word = (uint16_t)(((bits >> (4 * q)) & 0xF) << 12);
            for (int i = 0; i < 4; i++) word |= (uint16_t)(codes[4 * q + i] << (3 * i));
            out[48 + 2 * q] = (uint8_t)(word & 0xFF);
            out[49 + 2 * q] = (uint8_t)(word >> 8);
        }
    }
    return nonfinite;
}

/* GPTQ's column loop (qtool/schemes/gptq.py's torch loop, qtool/kernels/gptq.py's Triton kernel) for
 * rows row0 .. row1 - 1 of one lazy-update block: columns first .. last - 1, one after another. Each
 * column's level on the grid (uniform: clamp(rint((x - offset) * (1 / scale)), 0, qmax); codebook: the
 * number of codebook midpoints below), its value scale * level + offset, the error divided by the
 * inverse-Hessian diagonal, and that error spread over the block's later columns through the Cholesky
 * row. Every element sees the torch loop's float32 operations in its order (no contraction), so the
 * results are its bits. block: [rows, count] at block_stride; levels / values at out_stride; errors
 * [rows, count]; hinv [count, count]; scale / offset [rows, n_sub]; codebook NULL or qmax + 1 floats. */
void gptq_columns(float *block, int64_t block_stride, const float *hinv, int64_t count, const float *scale,
                  const float *offset, int64_t n_sub, const int32_t *sub_of_column, const float *codebook,
                  int32_t qmax, float *levels, float *values, int64_t out_stride, float *errors,
                  int64_t row0, int64_t row1, int64_t first, int64_t last) {
    float middle[256];
    if (codebook)
        for (int k = 0; k < qmax; k++) middle[k] = (codebook[k + 1] + codebook[k]) / 2.0f;   /* qmax <= 256 */
    for (int64_t r = row0; r < row1; r++) {
        float *b = block + r * block_stride;
        for (int64_t i = first; i < last; i++) {
            float x = b[i];
            float s = scale[r * n_sub + sub_of_column[i]], o = offset[r * n_sub + sub_of_column[i]];
            float inverse = s != 0.0f ? 1.0f / s : 0.0f;
            float scaled = (x - o) * inverse;
            float level, value;
            if (codebook) {
                int index = 0, top = qmax;      /* the midpoints below scaled (they are sorted) */
                while (index < top) {
                    int mid = (index + top) / 2;
                    if (scaled > middle[mid]) index = mid + 1; else top = mid;
                }
                level = (float)index;
                value = s * codebook[index] + o;
            } else {
                level = clampf(rintf(scaled), 0.0f, (float)qmax);
                value = s * level + o;
            }
            float error = (x - value) / hinv[i * count + i];
            const float *spread = hinv + i * count;
            for (int64_t j = i; j < count; j++) b[j] = b[j] - error * spread[j];
            levels[r * out_stride + i] = level;
            values[r * out_stride + i] = value;
            errors[r * count + i] = error;
        }
    }
}
