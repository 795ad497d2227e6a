/* lowvox CPU kernels: the two hot spots of decoding one token at a time on a CPU.
 *
 * Compiled on the user's machine by lowvox/runtime/kernels/build.py (-O3 -march=native
 * -fopenmp) and called through ctypes; torch's own kernels are used wherever this library
 * cannot be built. Every function takes plain contiguous float32/int8 buffers.
 *
 * lv_int8_linear: y[m, n] = (x[m, k] . w[n, k]) * scale[n] + bias[n], with int8 weights
 *   and float32 activations. Decoding streams every weight once per token, so the kernel
 *   is shaped for memory: each thread walks a contiguous band of rows (four at a time,
 *   one pass over memory whatever m is), prefetching ahead, and converts int8 -> float32
 *   in registers. Activations stay float32 (no rounding of x to bf16).
 * lv_attend_one: attention of one query per head over a key/value cache (decode steps);
 *   no mask is needed because the cache holds exactly the positions to attend.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LV_ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LV_ISA 1
#else
#define LV_ISA 0
#endif

#define ROWS 4    /* weight rows per block: four streams from memory at once */
#define XTILE 4   /* activation rows per pass over a block (ROWS * XTILE accumulators) */
#define AHEAD 2048 /* prefetch distance in bytes along each weight row */

#define LV_INLINE static inline __attribute__((always_inline))

/* Which code path this build took: 2 AVX-512, 1 AVX2+FMA, 0 portable C. */
int lv_isa(void) { return LV_ISA; }

#if LV_ISA == 2
/* One block: ROWS weight rows against `mt` (compile-time after inlining) activation rows. */
LV_INLINE void block_tile(const int mt, const float *x, int64_t k, const int8_t *const wr[ROWS],
                          __m512 acc[XTILE][ROWS]) {
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        if ((j & 63) == 0)
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(wr[r] + j + AHEAD), _MM_HINT_T0);
        __m512 wv[ROWS];
        for (int r = 0; r < ROWS; r++)
            wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr[r] + j))));
        for (int i = 0; i < mt; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * k + j);
            for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
        }
    }
    if (j < k) {
        __mmask16 mask = (__mmask16)((1u << (k - j)) - 1u);
        __m512 wv[ROWS];
        for (int r = 0; r < ROWS; r++)
            wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, wr[r] + j)));
        for (int i = 0; i < mt; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * k + j);
            for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
        }
    }
}

LV_INLINE void block_rows(const int mt, const float *x, int64_t k, const int8_t *const wr[ROWS],
                          int rows, const float *scale, const float *bias, float *y, int64_t n) {
    __m512 acc[XTILE][ROWS];
    block_tile(mt, x, k, wr, acc);
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < rows; r++)
            y[i * n + r] = _mm512_reduce_add_ps(acc[i][r]) * scale[r] + (bias ? bias[r] : 0.0f);
}

#elif LV_ISA == 1
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

LV_INLINE void block_rows(const int mt, const float *x, int64_t k, const int8_t *const wr[ROWS],
                          int rows, const float *scale, const float *bias, float *y, int64_t n) {
    __m256 acc[XTILE][ROWS];
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        if ((j & 63) == 0)
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(wr[r] + j + AHEAD), _MM_HINT_T0);
        __m256 wv[ROWS];
        for (int r = 0; r < ROWS; r++)
            wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wr[r] + j))));
        for (int i = 0; i < mt; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * k + j);
            for (int r = 0; r < ROWS; r++) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
        }
    }
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < rows; r++) {
            float s = hsum256(acc[i][r]);
            for (int64_t t = j; t < k; t++) s += x[i * k + t] * (float)wr[r][t];
            y[i * n + r] = s * scale[r] + (bias ? bias[r] : 0.0f);
        }
}

#else
LV_INLINE void block_rows(const int mt, const float *x, int64_t k, const int8_t *const wr[ROWS],
                          int rows, const float *scale, const float *bias, float *y, int64_t n) {
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < rows; r++) {
            float s = 0.0f;
            for (int64_t t = 0; t < k; t++) s += x[i * k + t] * (float)wr[r][t];
            y[i * n + r] = s * scale[r] + (bias ? bias[r] : 0.0f);
        }
}
#endif

void lv_int8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                    const float *bias, float *y, int64_t n, int nthreads) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t r0 = b * ROWS;
        const int rows = (int)(n - r0 < ROWS ? n - r0 : ROWS);
        /* A short last block repeats its first row rather than read past the weights. */
        const int8_t *wr[ROWS];
        for (int r = 0; r < ROWS; r++) wr[r] = w + (r0 + (r < rows ? r : 0)) * k;
        const float *sb = scale + r0;
        const float *bb = bias ? bias + r0 : NULL;
        for (int64_t i0 = 0; i0 < m; i0 += XTILE) {
            const float *xi = x + i0 * k;
            float *yi = y + i0 * n + r0;
            switch (m - i0 < XTILE ? (int)(m - i0) : XTILE) {
            case 1: block_rows(1, xi, k, wr, rows, sb, bb, yi, n); break;
            case 2: block_rows(2, xi, k, wr, rows, sb, bb, yi, n); break;
            case 3: block_rows(3, xi, k, wr, rows, sb, bb, yi, n); break;
            default: block_rows(4, xi, k, wr, rows, sb, bb, yi, n); break;
            }
        }
    }
}

/* out[h, :] = softmax(q[h] . K[h, :len]^T * scale) V[h, :len] for each head h.
 * q and out: [heads, dim]; keys/values: head h's rows start at h * head_stride, row
 * stride dim (the layout of a [1, heads, max_len, dim] cache). scratch: nthreads * len
 * floats for the attention weights. */
void lv_attend_one(const float *q, const float *keys, const float *values, int64_t heads,
                   int64_t len, int64_t dim, int64_t head_stride, float scale, float *out,
                   float *scratch, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *p = scratch + (int64_t)omp_get_thread_num() * len;
#else
        float *p = scratch;
#endif
#pragma omp for schedule(static)
        for (int64_t h = 0; h < heads; h++) {
            const float *qh = q + h * dim;
            const float *kh = keys + h * head_stride;
            const float *vh = values + h * head_stride;
            float *oh = out + h * dim;
            float top = -INFINITY;
            for (int64_t j = 0; j < len; j++) {
                const float *kj = kh + j * dim;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < dim; d++) s += qh[d] * kj[d];
                s *= scale;
                p[j] = s;
                top = s > top ? s : top;
            }
            float total = 0.0f;
            for (int64_t j = 0; j < len; j++) {
                p[j] = expf(p[j] - top);
                total += p[j];
            }
            for (int64_t d = 0; d < dim; d++) oh[d] = 0.0f;
            for (int64_t j = 0; j < len; j++) {
                const float *vj = vh + j * dim;
                const float pj = p[j] / total;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) oh[d] += pj * vj[d];
            }
        }
    }
}
