/* lowvox CPU kernels: the hot spots of decoding on a CPU (one token at a time, of one
 * sequence or of a batch), and the vocoder's convolutions in int8.
 *
 * Compiled on the user's machine by lowvox/runtime/kernels/build.py (-O3 -march=native
 * -fopenmp) and called through ctypes; torch's own kernels are used wherever this library
 * cannot be built. Every function takes plain contiguous float32 activations and weights
 * of one of two kinds: int8 with a float32 scale per output row (W_INT8), or bfloat16
 * (W_BF16, raw 16-bit patterns, no scales); the block also takes float32 weights as
 * GPT-2 stores them, [in, out] (W_F32_IN_OUT).
 *
 * lv_linear: y[m, n] = (x[m, k] . w[n, k]) * scale[n] + bias[n], with int8 or bf16
 *   weights and float32 activations. Decoding streams every weight once per token, so the
 *   kernel is shaped for memory: each thread walks a contiguous band of rows (four at a
 *   time, one pass over memory whatever m is), prefetching ahead, and widens the weights
 *   in registers. bf16 weights meet float32 activations. int8 weights meet quantised
 *   activations where the CPU has integer dot products (LV_ACT_BITS): int8 ones with a
 *   float32 scale per 128 values on AVX-512 VNNI (vpdpbusd: one instruction per 64 weight
 *   bytes, so decoding runs at memory speed) and AVX2 (vpmaddubsw); int16 ones per 256
 *   values on CPUs with AMX, whose tiles take that form for several rows at once.
 *   Elsewhere int8 weights are widened to float32 and meet float32 activations.
 *   From AMX_MIN_ROWS rows (batched steps, prompts) on CPUs with AMX, the tiles take over
 *   (amx_rows, amx_rows_bf16): the same int16 activations for int8, a two-bf16 split of
 *   each float32 activation for bf16; the weights still stream once. Without AMX, on
 *   AVX-512 VNNI, int8 weights packed once as panels of 32 rows (lv_pack_panels, kind
 *   W_Q8P) are a matrix product with the same int8 activations broadcast against them, for
 *   any number of rows (panel_rows); unpacked int8 linears of PANEL_MIN_ROWS rows or more
 *   repack their weights per call (panels_q8).
 * lv_attend_prompt: a prompt's causal attention, its keys/values written into the cache,
 *   token by token as lv_attend_one computes a decode step's; lv_gelu_tanh: the blocks'
 *   GELU over a prompt's activations. Both, and the decode blocks' attention and GELU,
 *   are vectorised on AVX-512 and AVX2 (exp by one polynomial on 16 or 8 lanes).
 * lv_blocks_decode: the transformer blocks of a decode step (one token of one sequence, or
 *   of each of m sequences, each at its own position) in one call: no Python or framework
 *   work between their steps, every weight read once.
 * lv_attend_one: a decode step's attention: the new key/value written into the cache and
 *   one query per head attending over every cached position (no mask needed).
 * lv_conv_q8: a HiFi-GAN convolution (any dilation) with int8 weights on AVX-512 VNNI,
 *   each time step of its input quantised to int8 at its own scale (see there).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LV_ISA 2
#if defined(__AVX512VNNI__)
#define LV_VNNI 1
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LV_ISA 1
#else
#define LV_ISA 0
#endif

#ifndef LV_VNNI
#define LV_VNNI 0
#endif
/* AVX-VNNI (Intel Core since Alder Lake, Xeons since Sapphire Rapids): vpdpbusd on 256-bit
 * vectors, for the AVX2 path's int8 products (q8_products). */
#if LV_ISA == 1 && defined(__AVXVNNI__)
#define LV_AVX_VNNI 1
#else
#define LV_AVX_VNNI 0
#endif

/* AMX tiles (int8 and bf16), for several activation rows at once (batched decode steps,
 * prompts). */
#if LV_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && \
    defined(__AVX512BF16__) && defined(__linux__)
#define LV_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LV_AMX 0
#endif

#define ROWS 4    /* weight rows per block: four streams from memory at once */
#define XTILE 4   /* activation rows per pass over a block (ROWS * XTILE accumulators) */
/* Prefetch distance in bytes along each weight row: bf16 rows (twice int8's bytes) stream
 * ~15% faster from further ahead (30 layers of full-size bf16 linears, one row: 36.2 ->
 * 31.2 ms at 8192); int8 gains nothing past 2048. */
#define AHEAD(kind) ((kind) == W_BF16 ? 8192 : 2048)
/* Two choices that measured opposite ways on AMD and Intel CPUs; build.py defines LV_AMD
 * on AMD ones (`lv_amd_tuning`).
 * ONCE_HINT, the prefetch hint for weights a call reads once (a decode step's rows): on AMD
 * non-temporal, so that the stream of weights does not push out of the caches what stays
 * hot from one decode step to the next (the KV cache, activations, the step's Python and
 * torch code; see panel_rows for what that saves on Zen 4). On Intel the plain hint: a
 * non-temporal one made a full-size int8 decode step of one row 1.8x slower (16.2 -> 29.0
 * ms, panels, a 2-core Xeon with AMX built without it).
 * BF16_ROW_BY_ROW: a bf16 decode step of one row reads its weight rows one after another
 * (block_tile): faster on Zen 4 (30 blocks on one core 61 -> 46 ms), slower on that Xeon
 * (full-size bf16 step 32.0 -> 41.5 ms) than four rows interleaved. */
#ifndef LV_AMD
#define LV_AMD 0
#endif
#define ONCE_HINT (LV_AMD ? _MM_HINT_NTA : _MM_HINT_T0)
#define BF16_ROW_BY_ROW LV_AMD

#define LV_INLINE static inline __attribute__((always_inline))

/* Weight kinds. Every function taking `kind` is inlined with it constant, so each kind
 * gets its own loop with no test inside. */
#define W_INT8 0
#define W_BF16 1
#define W_F32_IN_OUT 2 /* lv_blocks_decode only */
/* int8 weights stored as panels (lv_pack_panels; builds with lv_int8_panels only): every
 * number of rows, a decode step's one as a prompt's many, is a product of packed panels. */
#define W_Q8P 3
#define PANEL 32 /* weight rows per packed panel: two zmm of outputs */
#define WBYTES(kind) ((kind) == W_BF16 ? 2 : 1)

/* KV cache kinds (attention): float32, or bfloat16 (half the bytes a decode step reads). */
#define KV_F32 0
#define KV_BF16 1

/* How int8 weights meet their activations (lv_activation_bits):
 *  8: int8 activations with a float32 scale per Q8CHUNK values (AVX-512 VNNI builds without
 *     AMX: vpdpbusd, 64 products per instruction; AVX2: vpmaddubsw + vpmaddwd). Decoding
 *     streams every weight once per token; with one instruction per 64 weight bytes it is
 *     limited by memory, not by widening the weights.
 * 16: int16 activations with a scale per QCHUNK values (AVX-512 VNNI builds with AMX,
 *     whose tiles take the same form for several rows at once: vpdpwssd).
 * 32: float32 activations (portable C; AVX-512 without VNNI). */
#if LV_ISA == 2 && LV_VNNI && !LV_AMX
#define LV_ACT_BITS 8
#elif LV_ISA == 1
#define LV_ACT_BITS 8
#elif LV_VNNI
#define LV_ACT_BITS 16
#else
#define LV_ACT_BITS 32
#endif
#define USE_Q16(kind) (LV_ACT_BITS == 16 && (kind) == W_INT8)
#define USE_Q8(kind) (LV_ACT_BITS == 8 && ((kind) == W_INT8 || (kind) == W_Q8P))
#define QCHUNK 256 /* int16 activation values sharing one scale */
#define QTILE 2    /* activation rows per pass in the int16 path (its registers allow two) */
#define QLEN(k) (((k) + 31) / 32 * 32)            /* int16 values per row, zero-padded */
#define QCHUNKS(k) (((k) + QCHUNK - 1) / QCHUNK)  /* scales per row */
#define Q8CHUNK 128 /* int8 activation values sharing one scale (a multiple of 64) */
/* Activation rows per pass over a weight row in the int8 path: a float32 total each. */
#if LV_ISA == 2
#define Q8TILE 8
#else
#define Q8TILE 4
#endif
#ifndef Q8_AHEAD
#define Q8_AHEAD 2048
#endif
#define Q8LEN(k) (((k) + 63) / 64 * 64)             /* int8 values per row, zero-padded */
#define Q8CHUNKS(k) (((k) + Q8CHUNK - 1) / Q8CHUNK) /* scales per row */
/* Per row: bytes of its quantised values, and scales. */
#define QROW_BYTES(k) (LV_ACT_BITS == 8 ? Q8LEN(k) : 2 * QLEN(k))
#define QSCALES(k) (LV_ACT_BITS == 8 ? Q8CHUNKS(k) : QCHUNKS(k))

/* A linear layer's input rows: float32 x [m, k]; (USE_Q16) their int16 form
 * q [m, QLEN(k)] with a scale per QCHUNK values, sx [m, QCHUNKS(k)]: x ~ q * sx, and
 * where the AMX path serves them, that form packed as its tiles (else NULL); (USE_Q8)
 * their int8 form q8 [m, Q8LEN(k)] with a scale per Q8CHUNK values, sx [m, Q8CHUNKS(k)],
 * and per row what 128 times its values add up to at their scales, shift [m]: vpdpbusd
 * takes the weights as unsigned bytes, w + 128, and the shift takes the 128 back out. */
typedef struct {
    const float *x;
    const int16_t *q;
    const float *sx;
    int64_t k;
    const int8_t *tiles;
    const int8_t *q8;
    const float *shift;
} acts_t;

/* Which code path this build took: 2 AVX-512, 1 AVX2+FMA, 0 portable C. */
int lv_isa(void) { return LV_ISA; }

/* Whether the AVX2 path multiplies int8 with AVX-VNNI's vpdpbusd (LV_AVX_VNNI). */
int lv_avx_vnni(void) { return LV_AVX_VNNI; }

/* Whether this build takes the choices measured faster on AMD CPUs (LV_AMD, above). */
int lv_amd_tuning(void) { return LV_AMD; }

/* The bits of the activations int8 weights meet: 8, 16 or 32 (float32), see LV_ACT_BITS. */
int lv_activation_bits(void) { return LV_ACT_BITS; }

/* Activation values sharing one scale in the int8 and int16 forms (0: float32). */
int lv_activation_chunk(void) { return LV_ACT_BITS == 8 ? Q8CHUNK : LV_ACT_BITS == 16 ? QCHUNK : 0; }

/* Whether linears of AMX_MIN_ROWS rows or more run on the AMX tiles (see amx_rows):
 * built in, allowed by Linux (which hands the 8 KB tile state to a process only when it
 * asks) and not switched off. */
static int amx_on = 0;

/* Ask for (want > 0) or give up (want == 0) the AMX path, or only ask whether it is on
 * (want < 0); returns whether it is now on. */
int lv_amx_enable(int want) {
#if LV_AMX
    if (want > 0 && !amx_on)
        amx_on = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                         18 /* XFEATURE_XTILEDATA */) == 0;
    if (want == 0) amx_on = 0;
#else
    (void)want;
#endif
    return amx_on;
}

#define AMX_MIN_ROWS 3 /* two rows still run faster on the vector units */

/* Whether y [m, n] = x w^T of this kind and shape runs on the AMX tiles. */
static int amx_serves(int kind, int64_t m, int64_t k, int64_t n) {
    return LV_AMX && amx_on && (kind == W_INT8 || kind == W_BF16) && m >= AMX_MIN_ROWS &&
           k % 64 == 0 && n % 16 == 0;
}

/* Element j of a weight row as float32. */
LV_INLINE float wscalar(const int kind, const void *row, int64_t j) {
    if (kind == W_BF16) {
        union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t *)row)[j] << 16};
        return v.f;
    }
    return (float)((const int8_t *)row)[j];
}

#if LV_ISA == 2
/* 16 weights of a row from element j as float32 (the masked form: the first ones only). */
LV_INLINE __m512 wload16(const int kind, const void *row, int64_t j) {
    if (kind == W_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + j))), 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)row + j))));
}

LV_INLINE __m512 wload16_masked(const int kind, const void *row, int64_t j, __mmask16 mask) {
    if (kind == W_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)row + j)), 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, (const int8_t *)row + j)));
}

/* One block: ROWS weight rows against `mt` (compile-time after inlining) activation rows. */
LV_INLINE void block_tile(const int kind, const int mt, const float *x, int64_t k,
                          const void *const wr[ROWS], __m512 acc[XTILE][ROWS]) {
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_setzero_ps();
    if (kind == W_BF16 && mt == 1 && BF16_ROW_BY_ROW) {
        /* bf16 rows one after the other, as int8 ones (row_dot_q8): one sequential stream,
         * which one Zen 4 core reads faster than four interleaved ones (BF16_ROW_BY_ROW).
         * Each sum runs in the same order either way, so the
         * results are the same; with more activation rows the interleaved order's
         * independent sums win (eight rows: 108 against 169 ms). Read once, the rows are
         * prefetched with ONCE_HINT (non-temporally: a full-size bf16 decode step of one
         * row 22.6 -> 20.3 ms on Zen 4). */
        for (int r = 0; r < ROWS; r++) {
            int64_t j = 0;
            for (; j + 16 <= k; j += 16) {
                if (((j * 2) & 63) == 0)
                    _mm_prefetch((const char *)wr[r] + j * 2 + AHEAD(W_BF16), ONCE_HINT);
                const __m512 wv = wload16(W_BF16, wr[r], j);
                for (int i = 0; i < mt; i++)
                    acc[i][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * k + j), wv, acc[i][r]);
            }
            if (j < k) {
                const __mmask16 mask = (__mmask16)((1u << (k - j)) - 1u);
                const __m512 wv = wload16_masked(W_BF16, wr[r], j, mask);
                for (int i = 0; i < mt; i++)
                    acc[i][r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + i * k + j), wv, acc[i][r]);
            }
        }
        return;
    }
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        if (((j * WBYTES(kind)) & 63) == 0)
            for (int r = 0; r < ROWS; r++)
                _mm_prefetch((const char *)wr[r] + j * WBYTES(kind) + AHEAD(kind), _MM_HINT_T0);
        __m512 wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = wload16(kind, wr[r], j);
        for (int i = 0; i < mt; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * k + j);
            for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
        }
    }
    if (j < k) {
        __mmask16 mask = (__mmask16)((1u << (k - j)) - 1u);
        __m512 wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = wload16_masked(kind, wr[r], j, mask);
        for (int i = 0; i < mt; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * k + j);
            for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
        }
    }
}

#if LV_ACT_BITS < 32
/* Mask of the first n (< 16 or more: all) of 16 lanes. */
LV_INLINE __mmask16 lanes16(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

/* The largest magnitude of x[0..len): a quantisation chunk's scale. */
static float chunk_top(const float *x, int64_t len) {
    __m512 top = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16)
        top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes16(len - j), x + j)));
    return _mm512_reduce_max_ps(top);
}
#endif

#if LV_ACT_BITS == 16
/* One block of int8 rows against `mt` rows of int16 activations: vpdpwssd sums pairs of
 * products into int32 lanes (16 products of at most 32768 * 127 per lane in a QCHUNK: no
 * overflow), and each chunk's sum joins the float32 total at its scale. */
LV_INLINE void block_tile_q16(const int mt, const acts_t *a, int64_t i0,
                              const void *const wr[ROWS], __m512 acc[XTILE][ROWS]) {
    const int64_t k = a->k, kq = QLEN(k), chunks = QCHUNKS(k);
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t j1 = (c + 1) * QCHUNK < k ? (c + 1) * QCHUNK : k;
        __m512i sum[XTILE][ROWS]; /* mt <= QTILE are used */
        for (int i = 0; i < mt; i++)
            for (int r = 0; r < ROWS; r++) sum[i][r] = _mm512_setzero_si512();
        for (int64_t j = c * QCHUNK; j < j1; j += 32) {
            if ((j & 63) == 0)
                for (int r = 0; r < ROWS; r++)
                    _mm_prefetch((const char *)wr[r] + j + AHEAD(W_INT8), _MM_HINT_T0);
            __m512i wv[ROWS];
            if (j + 32 <= j1) {
                for (int r = 0; r < ROWS; r++)
                    wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)((const int8_t *)wr[r] + j)));
            } else { /* the row's end: q is zero-padded, the weights must not be over-read */
                const __mmask32 mask = (__mmask32)((1ull << (j1 - j)) - 1ull);
                for (int r = 0; r < ROWS; r++)
                    wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, (const int8_t *)wr[r] + j));
            }
            for (int i = 0; i < mt; i++) {
                const __m512i xv = _mm512_loadu_si512(a->q + (i0 + i) * kq + j);
                for (int r = 0; r < ROWS; r++) sum[i][r] = _mm512_dpwssd_epi32(sum[i][r], xv, wv[r]);
            }
        }
        for (int i = 0; i < mt; i++) {
            const __m512 sc = _mm512_set1_ps(a->sx[(i0 + i) * chunks + c]);
            for (int r = 0; r < ROWS; r++)
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[i][r]), sc, acc[i][r]);
        }
    }
}

/* x -> (q, sx) for one row of k values (see acts_t): each QCHUNK's largest magnitude maps
 * to 32767, rounding to nearest; the padding after k is zero. */
static void quantize_row(const float *x, int64_t k, int16_t *q, float *sx) {
    for (int64_t c = 0; c * QCHUNK < k; c++) {
        const int64_t j0 = c * QCHUNK, len = k - j0 < QCHUNK ? k - j0 : QCHUNK;
        const float t = chunk_top(x + j0, len);
        sx[c] = t / 32767.0f;
        const __m512 inv = _mm512_set1_ps(t > 0.0f ? 32767.0f / t : 0.0f);
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 m = lanes16(len - j);
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j0 + j), inv));
            _mm256_mask_storeu_epi16(q + j0 + j, m, _mm512_cvtsepi32_epi16(v));
        }
    }
    for (int64_t j = k; j < QLEN(k); j++) q[j] = 0;
}
#endif

#if LV_ACT_BITS == 8
#if Q8CHUNK != 128
#error "row_dot_q8 reads a chunk as two 64-byte steps"
#endif
/* One int8 weight row against `mt` rows of int8 activations (rows i0.. of `a`): out[i] =
 * the dot product before the row's scale. vpdpbusd sums four products of (w + 128) and an
 * activation into each int32 lane (w ^ 0x80 is w + 128 as an unsigned byte), exactly (8
 * products of at most 255 * 127 per lane: inside float32's 2^24, so the conversion is
 * exact too); each chunk's sums join the float32 total at the chunk's scale, and the
 * row's shift takes the 128s back out.
 * A block's rows are read one after the other, so a thread's weights are one sequential
 * stream (rows are contiguous): interleaving four rows, as the float path does to share
 * activation loads, halves what one core reads per second (Zen 4: 7 against 14 GB/s), and
 * at one instruction per 64 bytes nothing needs sharing. */
LV_INLINE void row_dot_q8(const int mt, const acts_t *a, int64_t i0, const int8_t *row,
                          float out[Q8TILE]) {
    const int64_t k = a->k, kq = Q8LEN(k), chunks = Q8CHUNKS(k);
    const int8_t *xq = a->q8 + i0 * kq;
    const float *sx = a->sx + i0 * chunks;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[Q8TILE];
    for (int i = 0; i < mt; i++) acc[i] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c < k / Q8CHUNK; c++) { /* whole chunks: two steps of 64 */
        const int64_t j = c * Q8CHUNK;
        if (Q8_AHEAD) {
            _mm_prefetch((const char *)row + j + Q8_AHEAD, _MM_HINT_T0);
            _mm_prefetch((const char *)row + j + 64 + Q8_AHEAD, _MM_HINT_T0);
        }
        const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(row + j), flip);
        const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(row + j + 64), flip);
        for (int i = 0; i < mt; i++) {
            __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xq + i * kq + j));
            sum = _mm512_dpbusd_epi32(sum, w1, _mm512_loadu_si512(xq + i * kq + j + 64));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(sx[i * chunks + c]), acc[i]);
        }
    }
    if (c < chunks) { /* the row's end: q8 is zero-padded, the weights must not be over-read */
        __m512i sum[Q8TILE];
        for (int i = 0; i < mt; i++) sum[i] = _mm512_setzero_si512();
        for (int64_t j = c * Q8CHUNK; j < k; j += 64) {
            const __mmask64 mask = k - j >= 64 ? ~(__mmask64)0 : (__mmask64)((1ull << (k - j)) - 1ull);
            const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, row + j), flip);
            for (int i = 0; i < mt; i++)
                sum[i] = _mm512_dpbusd_epi32(sum[i], wv, _mm512_loadu_si512(xq + i * kq + j));
        }
        for (int i = 0; i < mt; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[i]), _mm512_set1_ps(sx[i * chunks + c]), acc[i]);
    }
    for (int i = 0; i < mt; i++) out[i] = _mm512_reduce_add_ps(acc[i]) + a->shift[i0 + i];
}

/* x -> (q8, sx, shift) for one row of k values (see acts_t): each Q8CHUNK's largest
 * magnitude maps to 127, rounding to nearest; the padding after k is zero. */
static void quantize_row8(const float *x, int64_t k, int8_t *q, float *sx, float *shift) {
    float minus = 0.0f;
    for (int64_t c = 0; c * Q8CHUNK < k; c++) {
        const int64_t j0 = c * Q8CHUNK, len = k - j0 < Q8CHUNK ? k - j0 : Q8CHUNK;
        const float t = chunk_top(x + j0, len);
        sx[c] = t / 127.0f;
        const __m512 inv = _mm512_set1_ps(t > 0.0f ? 127.0f / t : 0.0f);
        __m512i total = _mm512_setzero_si512();
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 m = lanes16(len - j);
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j0 + j), inv));
            _mm512_mask_cvtsepi32_storeu_epi8(q + j0 + j, m, v);
            total = _mm512_add_epi32(total, v);
        }
        minus += (float)(128 * _mm512_reduce_add_epi32(total)) * sx[c];
    }
    *shift = -minus;
    for (int64_t j = k; j < Q8LEN(k); j++) q[j] = 0;
}
#endif

#if LV_AMX
/* AMX: each tdpbssd multiplies a 16 x 64 int8 tile by a 64 x 16 one into 16 x 16 int32 sums
 * (16384 products), so many activation rows cost little more than one; weights are the
 * left tiles exactly as stored (16 rows of 64 bytes), activations the right ones. An int16
 * activation v is 256 hi + lo (hi = v >> 8 signed, lo = v & 255 unsigned): tdpbssd takes
 * the high bytes and tdpbsud the low ones into two sums, and 256 hi + lo is the exact sum
 * of the int16 products, as vpdpwssd makes it. */
#define TILE_BYTES 1024
#define AMX_STEPS(k) ((k) / 64) /* tiles of k per row group */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* Tiles 0, 1: the sums (16 weight rows x 16 activation rows, int32); 2: weights (16 rows x
 * 64 int8); 3, 4: high and low bytes of activations (16 quads of k x 16 rows x 4 bytes). */
static void amx_configure(void) {
    tilecfg_t c = {0};
    c.palette = 1;
    for (int t = 0; t < 5; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* Weight tiles to come, for 16 rows of `stride` bytes read a tile (64 bytes of each row) at
 * a time, at tile st of `steps`: the tile's strided reads leave the hardware prefetchers
 * behind. This block's rows a few tiles ahead go to L1; the next block (the next 16 rows,
 * contiguous) to L2, a sixteenth per tile. */
LV_INLINE void amx_prefetch(const char *wb, int64_t stride, int64_t st, int64_t steps) {
    for (int r = 0; r < 16; r++)
        _mm_prefetch(wb + 16 * stride + (st * 16 + r) * 64, _MM_HINT_T1);
    if (st + 4 < steps)
        for (int r = 0; r < 16; r++) _mm_prefetch(wb + r * stride + (st + 4) * 64, _MM_HINT_T0);
}

/* Bytes of m rows of k values packed for amx_rows: per group of 16 rows and per 64 values
 * of k, a tile of high and one of low bytes; then per group and QCHUNK the 16 rows' scales. */
static int64_t amx_pack_bytes(int64_t m, int64_t k) {
    const int64_t groups = (m + 15) / 16;
    return groups * AMX_STEPS(k) * 2 * TILE_BYTES + groups * QCHUNKS(k) * 16 * 4;
}

/* The tile pair at th (th + TILE_BYTES: the second) from 16 rows of 64 bytes each, hi and
 * lo: tile row j takes 4-byte word j of every row, a 16 x 16 transpose of words. */
static void amx_transpose_pair(const void *hi, const void *lo, int8_t *th) {
    const __m512i row0 = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16)); /* word 0 of each row, in words */
    for (int j = 0; j < 16; j++) {
        const __m512i idx = _mm512_add_epi32(row0, _mm512_set1_epi32(j));
        _mm512_store_si512(th + 64 * j, _mm512_i32gather_epi32(idx, hi, 4));
        _mm512_store_si512(th + TILE_BYTES + 64 * j, _mm512_i32gather_epi32(idx, lo, 4));
    }
}

/* Pack tiles [t0, t1) of the groups x AMX_STEPS(k) tile pairs of a's int16 rows (rows past
 * m are zero), with each group's scales alongside its first. Tile row j holds values
 * 4j..4j+3 of the 64 for each of the 16 rows: a 16 x 16 transpose of 4-byte words. */
static void amx_pack(const acts_t *a, int64_t m, int8_t *tiles, int64_t t0, int64_t t1) {
    const int64_t k = a->k, kq = QLEN(k), steps = AMX_STEPS(k), chunks = QCHUNKS(k);
    const int64_t groups = (m + 15) / 16;
    float *sxt = (float *)(tiles + groups * steps * 2 * TILE_BYTES);
    int8_t hi[16][64] __attribute__((aligned(64))), lo[16][64] __attribute__((aligned(64)));
    for (int64_t t = t0; t < t1; t++) {
        const int64_t g = t / steps, st = t % steps;
        for (int i = 0; i < 16; i++) {
            const int64_t row = g * 16 + i;
            if (row >= m) {
                _mm512_store_si512(hi[i], _mm512_setzero_si512());
                _mm512_store_si512(lo[i], _mm512_setzero_si512());
                continue;
            }
            const int16_t *v = a->q + row * kq + st * 64;
            for (int h = 0; h < 2; h++) {
                const __m512i x = _mm512_loadu_si512(v + 32 * h);
                _mm256_store_si256((__m256i *)(hi[i] + 32 * h),
                                   _mm512_cvtepi16_epi8(_mm512_srai_epi16(x, 8)));
                _mm256_store_si256((__m256i *)(lo[i] + 32 * h), _mm512_cvtepi16_epi8(x));
            }
        }
        amx_transpose_pair(hi, lo, tiles + 2 * t * TILE_BYTES);
        if (st == 0)
            for (int64_t c = 0; c < chunks; c++)
                for (int i = 0; i < 16; i++)
                    sxt[(g * chunks + c) * 16 + i] = g * 16 + i < m ? a->sx[(g * 16 + i) * chunks + c] : 0.0f;
    }
}

/* Outputs [r0, r1) (multiples of 16) of y [m, n] = x w^T * scale + bias for int8 weights
 * [n, k] (k a multiple of 64) and m activation rows packed by amx_pack. Per 16 weight rows
 * and group of 16 activation rows, each QCHUNK of k is summed exactly in int32 and joins
 * the float32 total at its scale, as in block_tile_q16. */
static void amx_rows(const int8_t *w, int64_t k, const float *scale, const float *bias,
                     float *y, int64_t n, int64_t m, const int8_t *tiles, int64_t r0,
                     int64_t r1) {
    const int64_t steps = AMX_STEPS(k), chunks = QCHUNKS(k), groups = (m + 15) / 16;
    const float *sxt = (const float *)(tiles + groups * steps * 2 * TILE_BYTES);
    int32_t hi[16][16] __attribute__((aligned(64))), lo[16][16] __attribute__((aligned(64)));
    float out[16][16] __attribute__((aligned(64)));
    amx_configure();
    for (int64_t n0 = r0; n0 < r1; n0 += 16) {
        const int8_t *wb = w + n0 * k;
        for (int64_t g = 0; g < groups; g++) {
            const int8_t *tg = tiles + g * steps * 2 * TILE_BYTES;
            __m512 acc[16];
            for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t s0 = c * (QCHUNK / 64);
                const int64_t s1 = s0 + QCHUNK / 64 < steps ? s0 + QCHUNK / 64 : steps;
                _tile_zero(0);
                _tile_zero(1);
                for (int64_t st = s0; st < s1; st++) {
                    if (g == 0) amx_prefetch((const char *)wb, k, st, steps);
                    _tile_loadd(2, wb + st * 64, k);
                    _tile_loadd(3, tg + 2 * st * TILE_BYTES, 64);
                    _tile_loadd(4, tg + (2 * st + 1) * TILE_BYTES, 64);
                    _tile_dpbssd(0, 2, 3);
                    _tile_dpbsud(1, 2, 4);
                }
                _tile_stored(0, hi, 64);
                _tile_stored(1, lo, 64);
                const __m512 sc = _mm512_loadu_ps(sxt + (g * chunks + c) * 16);
                for (int r = 0; r < 16; r++) {
                    const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(hi[r]), 8),
                                                       _mm512_load_si512(lo[r]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), sc, acc[r]);
                }
            }
            for (int r = 0; r < 16; r++) _mm512_store_ps(out[r], acc[r]);
            const int64_t rows = m - g * 16 < 16 ? m - g * 16 : 16;
            for (int64_t i = 0; i < rows; i++)
                for (int r = 0; r < 16; r++)
                    y[(g * 16 + i) * n + n0 + r] =
                        out[r][i] * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
    _tile_release();
}

/* bf16 weights on the tiles: tdpbf16ps multiplies 16 weight rows x 32 bf16 by 32 x 16
 * activations, summing in float32. Activations stay float32-exact to ~1e-5: each value x
 * is split into bf16 hi = bf16(x) and lo = bf16(x - hi), two products into two sums. */
#define AMX_BF16_STEPS(k) ((k) / 32) /* tiles of k per row group */

static int64_t amx_bf16_pack_bytes(int64_t m, int64_t k) {
    return (m + 15) / 16 * AMX_BF16_STEPS(k) * 2 * TILE_BYTES;
}

/* 16 float32 -> bf16 (round to nearest even) and back, for the split. */
LV_INLINE __m512 bf16_widen(__m256bh h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

/* Pack tiles [t0, t1) of the groups x AMX_BF16_STEPS(k) tile pairs (hi, lo) of float32 rows
 * x [m, k] (rows past m are zero). Tile row j holds values 2j, 2j + 1 of the 32 for each of
 * the 16 rows: a 16 x 16 transpose of 4-byte pairs. */
static void amx_pack_bf16(const float *x, int64_t m, int64_t k, int8_t *tiles, int64_t t0,
                          int64_t t1) {
    const int64_t steps = AMX_BF16_STEPS(k);
    __m256bh hi[16][2] __attribute__((aligned(64))), lo[16][2] __attribute__((aligned(64)));
    for (int64_t t = t0; t < t1; t++) {
        const int64_t g = t / steps, st = t % steps;
        for (int i = 0; i < 16; i++) {
            const int64_t row = g * 16 + i;
            for (int h = 0; h < 2; h++) {
                const __m512 v = row < m ? _mm512_loadu_ps(x + row * k + st * 32 + 16 * h)
                                         : _mm512_setzero_ps();
                hi[i][h] = _mm512_cvtneps_pbh(v);
                lo[i][h] = _mm512_cvtneps_pbh(_mm512_sub_ps(v, bf16_widen(hi[i][h])));
            }
        }
        amx_transpose_pair(hi, lo, tiles + 2 * t * TILE_BYTES);
    }
}

/* Outputs [r0, r1) (multiples of 16) of y [m, n] = x w^T + bias for bf16 weights [n, k] (k a
 * multiple of 64) and m activation rows packed by amx_pack_bf16. */
static void amx_rows_bf16(const uint16_t *w, int64_t k, const float *bias, float *y, int64_t n,
                          int64_t m, const int8_t *tiles, int64_t r0, int64_t r1) {
    const int64_t steps = AMX_BF16_STEPS(k), groups = (m + 15) / 16, stride = 2 * k;
    float hi[16][16] __attribute__((aligned(64))), lo[16][16] __attribute__((aligned(64)));
    amx_configure();
    for (int64_t n0 = r0; n0 < r1; n0 += 16) {
        const char *wb = (const char *)(w + n0 * k);
        for (int64_t g = 0; g < groups; g++) {
            const int8_t *tg = tiles + g * steps * 2 * TILE_BYTES;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t st = 0; st < steps; st++) {
                if (g == 0) amx_prefetch(wb, stride, st, steps);
                _tile_loadd(2, wb + st * 64, stride);
                _tile_loadd(3, tg + 2 * st * TILE_BYTES, 64);
                _tile_loadd(4, tg + (2 * st + 1) * TILE_BYTES, 64);
                _tile_dpbf16ps(0, 2, 3);
                _tile_dpbf16ps(1, 2, 4);
            }
            _tile_stored(0, hi, 64);
            _tile_stored(1, lo, 64);
            const int64_t rows = m - g * 16 < 16 ? m - g * 16 : 16;
            for (int64_t i = 0; i < rows; i++)
                for (int r = 0; r < 16; r++)
                    y[(g * 16 + i) * n + n0 + r] =
                        hi[r][i] + lo[r][i] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
    _tile_release();
}
#endif

LV_INLINE void block_rows(const int kind, const int mt, const acts_t *a, int64_t i0,
                          const void *const wr[ROWS], int rows, const float *scale,
                          const float *bias, float *y, int64_t n) {
    __m512 acc[XTILE][ROWS];
#if LV_ACT_BITS == 16
    if (USE_Q16(kind))
        block_tile_q16(mt, a, i0, wr, acc);
    else
#endif
        block_tile(kind, mt, a->x + i0 * a->k, a->k, wr, acc);
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < rows; r++)
            y[i * n + r] = _mm512_reduce_add_ps(acc[i][r]) * (scale ? scale[r] : 1.0f) +
                           (bias ? bias[r] : 0.0f);
}

#elif LV_ISA == 1
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 weights of a row from element j. */
LV_INLINE __m256 wload8(const int kind, const void *row, int64_t j) {
    if (kind == W_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + j))), 16));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + j))));
}

/* x -> (q8, sx, shift) for one row of k values, as the AVX-512 quantize_row8 makes them
 * (the shift is used with AVX-VNNI only: vpmaddubsw takes signed activations). */
static void quantize_row8(const float *x, int64_t k, int8_t *q, float *sx, float *shift) {
    float minus = 0.0f;
    const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t c = 0; c * Q8CHUNK < k; c++) {
        const int64_t j0 = c * Q8CHUNK, len = k - j0 < Q8CHUNK ? k - j0 : Q8CHUNK;
        __m256 top = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= len; j += 8)
            top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(x + j0 + j), no_sign));
        __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
        t4 = _mm_max_ss(t4, _mm_movehdup_ps(t4));
        float t = _mm_cvtss_f32(t4);
        for (; j < len; j++) t = fabsf(x[j0 + j]) > t ? fabsf(x[j0 + j]) : t;
        sx[c] = t / 127.0f;
        const float f = t > 0.0f ? 127.0f / t : 0.0f;
        const __m256 inv = _mm256_set1_ps(f);
        int32_t total = 0;
        for (j = 0; j + 8 <= len; j += 8) {
            const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j0 + j), inv));
            const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64((__m128i *)(q + j0 + j), _mm_packs_epi16(v16, v16));
            const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            total += _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
        }
        for (; j < len; j++) { /* as cvtps: nearest, ties to even */
            const int32_t v = (int32_t)nearbyintf(x[j0 + j] * f);
            q[j0 + j] = (int8_t)v;
            total += v;
        }
        minus += (float)(128 * total) * sx[c];
    }
    *shift = -minus;
    for (int64_t j = k; j < Q8LEN(k); j++) q[j] = 0;
}

/* 32 weights wv (from element j of a row) against `mt` rows of int8 activations, into
 * their int32 sums. With AVX-VNNI, as the AVX-512 row_dot_q8: vpdpbusd sums four products
 * of w + 128 (w ^ 0x80 as an unsigned byte) and the activation into each int32 lane, one
 * instruction where vpmaddubsw takes four, and the row's shift takes the 128s back out
 * (row_dot_q8). Else vpmaddubsw multiplies |w| by the activation carrying w's sign (both
 * within [-127, 127], so the pair sums, at most 2 * 127 * 127, never saturate int16),
 * vpmaddwd sums those pairs into int32 lanes. Either way the int32 sums are exact. */
LV_INLINE void q8_products(const int mt, const int8_t *xq, int64_t kq, int64_t j, __m256i wv,
                           __m256i sum[Q8TILE]) {
#if LV_AVX_VNNI
    const __m256i wu = _mm256_xor_si256(wv, _mm256_set1_epi8((char)0x80));
    for (int i = 0; i < mt; i++)
        sum[i] = _mm256_dpbusd_avx_epi32(sum[i], wu, _mm256_loadu_si256((const __m256i *)(xq + i * kq + j)));
#else
    const __m256i mag = _mm256_abs_epi8(wv), ones = _mm256_set1_epi16(1);
    for (int i = 0; i < mt; i++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + i * kq + j));
        const __m256i pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(xv, wv));
        sum[i] = _mm256_add_epi32(sum[i], _mm256_madd_epi16(pairs, ones));
    }
#endif
}

/* One int8 weight row against `mt` rows of int8 activations (rows i0.. of `a`), as the
 * AVX-512 row_dot_q8: each chunk's int32 sums join the float32 total at its scale. Rows
 * are read one after the other (one sequential stream). Whole chunks run a loop of fixed
 * length with no test for the row's end, prefetching once per 64 bytes: on a 2-core AVX2
 * EPYC (Zen 1), ~20% more weight bytes per second than testing each 32 bytes (40
 * full-size 4096 x 1024 layers, one row: 16.3 -> 20.1 GB/s; 8 and 140 rows: 25 -> 29
 * GMAC/s). */
LV_INLINE void row_dot_q8(const int mt, const acts_t *a, int64_t i0, const int8_t *row,
                          float out[Q8TILE]) {
    const int64_t k = a->k, kq = Q8LEN(k), chunks = Q8CHUNKS(k);
    const int8_t *xq = a->q8 + i0 * kq;
    const float *sx = a->sx + i0 * chunks;
    __m256 acc[Q8TILE];
    for (int i = 0; i < mt; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t j0 = c * Q8CHUNK;
        __m256i sum[Q8TILE];
        for (int i = 0; i < mt; i++) sum[i] = _mm256_setzero_si256();
        if (j0 + Q8CHUNK <= k) {
            for (int64_t j = j0; j < j0 + Q8CHUNK; j += 64) {
                _mm_prefetch((const char *)row + j + AHEAD(W_INT8), _MM_HINT_T0);
                q8_products(mt, xq, kq, j, _mm256_loadu_si256((const __m256i *)(row + j)), sum);
                q8_products(mt, xq, kq, j + 32, _mm256_loadu_si256((const __m256i *)(row + j + 32)), sum);
            }
        } else { /* the row's end: q8 is zero-padded, the weights must not be over-read */
            for (int64_t j = j0; j < k; j += 32) {
                int8_t tail[32] = {0};
                memcpy(tail, row + j, (size_t)(k - j < 32 ? k - j : 32));
                q8_products(mt, xq, kq, j, _mm256_loadu_si256((const __m256i *)tail), sum);
            }
        }
        for (int i = 0; i < mt; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i]), _mm256_set1_ps(sx[i * chunks + c]), acc[i]);
    }
    for (int i = 0; i < mt; i++) out[i] = hsum256(acc[i]) + (LV_AVX_VNNI ? a->shift[i0 + i] : 0.0f);
}

LV_INLINE void block_rows(const int kind, const int mt, const acts_t *a, int64_t i0,
                          const void *const wr[ROWS], int rows, const float *scale,
                          const float *bias, float *y, int64_t n) {
    const int64_t k = a->k;
    const float *x = a->x + i0 * k;
    __m256 acc[XTILE][ROWS];
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        if (((j * WBYTES(kind)) & 63) == 0)
            for (int r = 0; r < ROWS; r++)
                _mm_prefetch((const char *)wr[r] + j * WBYTES(kind) + AHEAD(kind), _MM_HINT_T0);
        __m256 wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = wload8(kind, wr[r], j);
        for (int i = 0; i < mt; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * k + j);
            for (int r = 0; r < ROWS; r++) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
        }
    }
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < rows; r++) {
            float s = hsum256(acc[i][r]);
            for (int64_t t = j; t < k; t++) s += x[i * k + t] * wscalar(kind, wr[r], t);
            y[i * n + r] = s * (scale ? scale[r] : 1.0f) + (bias ? bias[r] : 0.0f);
        }
}

#else
LV_INLINE void block_rows(const int kind, const int mt, const acts_t *a, int64_t i0,
                          const void *const wr[ROWS], int rows, const float *scale,
                          const float *bias, float *y, int64_t n) {
    const int64_t k = a->k;
    const float *x = a->x + i0 * k;
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < rows; r++) {
            float s = 0.0f;
            for (int64_t t = 0; t < k; t++) s += x[i * k + t] * wscalar(kind, wr[r], t);
            y[i * n + r] = s * (scale ? scale[r] : 1.0f) + (bias ? bias[r] : 0.0f);
        }
}
#endif

#if LV_ACT_BITS == 8
/* Output r of y [m, n] for activation rows [i0, i0 + mt). */
LV_INLINE void row_q8(const int mt, const acts_t *a, int64_t i0, const int8_t *row, float scale,
                      float bias, float *y, int64_t n) {
    float out[Q8TILE];
    row_dot_q8(mt, a, i0, row, out);
    for (int i = 0; i < mt; i++) y[(i0 + i) * n] = out[i] * scale + bias;
}

/* Outputs [r0, r1) of y [m, n] = x w^T * scale + bias for the m activation rows of `a`
 * (their int8 form ready): weight row after weight row (one sequential stream), each
 * meeting every activation row, Q8TILE at a time, while in L1. */
static void rows_band_q8(const acts_t *a, int64_t m, const int8_t *w, const float *scale,
                         const float *bias, float *y, int64_t n, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *row = w + r * a->k;
        const float b = bias ? bias[r] : 0.0f;
        for (int64_t i0 = 0; i0 < m; i0 += Q8TILE) {
            switch (m - i0 < Q8TILE ? (int)(m - i0) : Q8TILE) {
            case 1: row_q8(1, a, i0, row, scale[r], b, y + r, n); break;
            case 2: row_q8(2, a, i0, row, scale[r], b, y + r, n); break;
            case 3: row_q8(3, a, i0, row, scale[r], b, y + r, n); break;
#if Q8TILE > 4
            case 4: row_q8(4, a, i0, row, scale[r], b, y + r, n); break;
            case 5: row_q8(5, a, i0, row, scale[r], b, y + r, n); break;
            case 6: row_q8(6, a, i0, row, scale[r], b, y + r, n); break;
            case 7: row_q8(7, a, i0, row, scale[r], b, y + r, n); break;
#endif
            default: row_q8(Q8TILE, a, i0, row, scale[r], b, y + r, n); break;
            }
        }
    }
}
#endif

#if LV_ISA == 2 && LV_ACT_BITS == 8
/* Many rows (a prompt's prefill) on AVX-512 VNNI without AMX: a matrix product rather than
 * a weight stream. Reading each weight row against every activation row (row_dot_q8)
 * spends a horizontal sum per pair; instead PANEL weight rows at a time are repacked
 * ("panel": four consecutive bytes of each row side by side, [k / 4][PANEL][4], as
 * w + 128) so that one vpdpbusd multiplies four activations of one row, broadcast, with
 * four weights of each of 16 rows, and PANEL_ROWS x PANEL outputs stay in registers
 * (~2x the bf16 matmul this replaced on Zen 4, which also had to widen the weights first).
 * The numbers are the same sums as row_dot_q8's (each chunk's exact int32 sum at its
 * scale, the row's shift after), in another order. */
#define PANEL_ROWS 6  /* activation rows per tile: 12 int32 + 12 float32 accumulators */
#ifndef PANEL_AHEAD
#define PANEL_AHEAD 2048
#endif
#define PANEL_MIN_ROWS 16 /* below this the weight stream (rows_band_q8) is as fast */
#define PANEL_SERVES(kind, m) ((kind) == W_INT8 && (m) >= PANEL_MIN_ROWS)

/* A thread's panel buffer, PANEL * Q8LEN(k) bytes, kept for its next call. */
static uint8_t *panel_buffer(int64_t k) {
    static _Thread_local uint8_t *buf = NULL;
    static _Thread_local int64_t have = 0;
    const int64_t need = PANEL * Q8LEN(k);
    if (need > have) {
        free(buf);
        buf = (uint8_t *)aligned_alloc(64, (size_t)need);
        have = buf ? need : 0;
    }
    return buf;
}

/* r[l] (16 lanes of 32 bits each) -> r[g] lane l = old r[l] lane g: a 16 x 16 transpose. */
LV_INLINE void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

/* Weight rows [r0, r0 + PANEL) of w [n, k] as a panel (rows past n repeat row n - 1; bytes
 * past k are w = 0, meeting the zero padding of q8): 64 bytes of 16 rows at a time, each
 * row read in order (prefetched ahead), transposed as 16 x 16 groups of four bytes. */
static void pack_panel(const int8_t *w, int64_t n, int64_t k, int64_t r0, uint8_t *p) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int v = 0; v < PANEL / 16; v++) {
        const int8_t *rows[16];
        for (int l = 0; l < 16; l++)
            rows[l] = w + (r0 + v * 16 + l < n ? r0 + v * 16 + l : n - 1) * k;
        for (int64_t j = 0; j < k; j += 64) {
            const __mmask64 mask = k - j >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - j)) - 1);
            __m512i r[16];
            for (int l = 0; l < 16; l++) {
                if (j + 512 < k) _mm_prefetch((const char *)rows[l] + j + 512, _MM_HINT_T0);
                r[l] = _mm512_maskz_loadu_epi8(mask, rows[l] + j);
            }
            transpose16(r);
            for (int g = 0; g < 16; g++) /* groups j / 4 + g */
                _mm512_store_si512(p + ((j / 4 + g) * PANEL + v * 16) * 4, _mm512_xor_si512(r[g], flip));
        }
    }
}

/* Rows [i0, i0 + mt) of y, outputs [r0, r0 + cols) (cols <= PANEL), from a packed panel. */
LV_INLINE void panel_tile(const int mt, const acts_t *a, int64_t i0, const uint8_t *p,
                          const float *scale, const float *bias, float *y, int64_t n,
                          int64_t r0, int64_t cols, const int once) {
    const int64_t kq = Q8LEN(a->k), chunks = Q8CHUNKS(a->k);
    const int8_t *xq = a->q8 + i0 * kq;
    const float *sx = a->sx + i0 * chunks;
    __m512 f[PANEL_ROWS][2];
    for (int i = 0; i < mt; i++) f[i][0] = f[i][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        __m512i s[PANEL_ROWS][2];
        for (int i = 0; i < mt; i++) s[i][0] = s[i][1] = _mm512_setzero_si512();
        const int64_t g1 = (c + 1) * Q8CHUNK < kq ? (c + 1) * Q8CHUNK / 4 : kq / 4;
        for (int64_t g = c * Q8CHUNK / 4; g < g1; g++) {
            const char *ahead = (const char *)p + g * PANEL * 4 + PANEL_AHEAD;
            if (once) { /* see panel_rows (the hint must be a constant) */
                _mm_prefetch(ahead, ONCE_HINT);
                _mm_prefetch(ahead + 64, ONCE_HINT);
            } else {
                _mm_prefetch(ahead, _MM_HINT_T0);
                _mm_prefetch(ahead + 64, _MM_HINT_T0);
            }
            const __m512i w0 = _mm512_load_si512(p + g * PANEL * 4);
            const __m512i w1 = _mm512_load_si512(p + g * PANEL * 4 + 64);
            for (int i = 0; i < mt; i++) {
                int32_t four;
                memcpy(&four, xq + i * kq + 4 * g, 4);
                const __m512i x4 = _mm512_set1_epi32(four);
                s[i][0] = _mm512_dpbusd_epi32(s[i][0], w0, x4);
                s[i][1] = _mm512_dpbusd_epi32(s[i][1], w1, x4);
            }
        }
        for (int i = 0; i < mt; i++) {
            const __m512 sc = _mm512_set1_ps(sx[i * chunks + c]);
            f[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][0]), sc, f[i][0]);
            f[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][1]), sc, f[i][1]);
        }
    }
    for (int h = 0; h < 2 && cols > 16 * h; h++) {
        const __mmask16 mask = lanes16(cols - 16 * h);
        const __m512 ws = _mm512_maskz_loadu_ps(mask, scale + r0 + 16 * h);
        const __m512 wb = bias ? _mm512_maskz_loadu_ps(mask, bias + r0 + 16 * h) : _mm512_setzero_ps();
        for (int i = 0; i < mt; i++) {
            const __m512 dot = _mm512_add_ps(f[i][h], _mm512_set1_ps(a->shift[i0 + i]));
            _mm512_mask_storeu_ps(y + (i0 + i) * n + r0 + 16 * h, mask, _mm512_fmadd_ps(dot, ws, wb));
        }
    }
}

/* This thread's panels of y [m, n] = x w^T * scale + bias (the rows' int8 form ready). */
static void panels_q8(const acts_t *a, int64_t m, const int8_t *w, const float *scale,
                      const float *bias, float *y, int64_t n) {
    uint8_t *p = panel_buffer(a->k);
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < n; r0 += PANEL) {
        const int64_t cols = n - r0 < PANEL ? n - r0 : PANEL;
        if (!p) { /* no memory for the panel: the weight stream, these rows */
            rows_band_q8(a, m, w, scale, bias, y, n, r0, r0 + cols);
            continue;
        }
        pack_panel(w, n, a->k, r0, p);
        for (int64_t i0 = 0; i0 < m; i0 += PANEL_ROWS) {
            switch (m - i0 < PANEL_ROWS ? (int)(m - i0) : PANEL_ROWS) {
            case 1: panel_tile(1, a, i0, p, scale, bias, y, n, r0, cols, 0); break;
            case 2: panel_tile(2, a, i0, p, scale, bias, y, n, r0, cols, 0); break;
            case 3: panel_tile(3, a, i0, p, scale, bias, y, n, r0, cols, 0); break;
            case 4: panel_tile(4, a, i0, p, scale, bias, y, n, r0, cols, 0); break;
            case 5: panel_tile(5, a, i0, p, scale, bias, y, n, r0, cols, 0); break;
            default: panel_tile(PANEL_ROWS, a, i0, p, scale, bias, y, n, r0, cols, 0); break;
            }
        }
    }
}
/* Outputs [r0, r1) (r0 a multiple of PANEL) of y [m, n] from weights already packed as
 * panels (W_Q8P): each panel, streamed once, meets every activation row, PANEL_ROWS at a
 * time, while in L2. One row (a decode step) reads 128 weight bytes per two vpdpbusd and
 * no horizontal sums: it streams the weights faster than rows_band_q8.
 * Where one tile takes every row (m <= PANEL_ROWS: decode steps), each panel byte is read
 * once: on AMD it is prefetched non-temporally (ONCE_HINT), so that the weight stream
 * (0.38 GB a step for the full-size GPT) does not evict what stays hot between steps, the
 * KV cache, the activations and the step's Python and torch code (a decode step 9.7 ->
 * 8.4 ms on Zen 4: the blocks 8.4 -> 7.5 ms, the work between two steps 1.27 -> 0.75 ms). */
static void panel_rows(const acts_t *a, int64_t m, const uint8_t *w, const float *scale,
                       const float *bias, float *y, int64_t n, int64_t r0, int64_t r1) {
    const int once = m <= PANEL_ROWS;
    for (int64_t p0 = r0; p0 < r1; p0 += PANEL) {
        const uint8_t *p = w + p0 * Q8LEN(a->k);
        const int64_t cols = n - p0 < PANEL ? n - p0 : PANEL;
        for (int64_t i0 = 0; i0 < m; i0 += PANEL_ROWS) {
            switch (m - i0 < PANEL_ROWS ? (int)(m - i0) : PANEL_ROWS) {
            case 1: panel_tile(1, a, i0, p, scale, bias, y, n, p0, cols, once); break;
            case 2: panel_tile(2, a, i0, p, scale, bias, y, n, p0, cols, once); break;
            case 3: panel_tile(3, a, i0, p, scale, bias, y, n, p0, cols, once); break;
            case 4: panel_tile(4, a, i0, p, scale, bias, y, n, p0, cols, once); break;
            case 5: panel_tile(5, a, i0, p, scale, bias, y, n, p0, cols, once); break;
            default: panel_tile(PANEL_ROWS, a, i0, p, scale, bias, y, n, p0, cols, once); break;
            }
        }
    }
}
#else
#define PANEL_SERVES(kind, m) 0
#endif

int lv_int8_panels(void) { return LV_ISA == 2 && LV_ACT_BITS == 8; }

/* Bytes of int8 weights [n, k] packed as panels (W_Q8P): whole panels of Q8LEN(k) bytes
 * per row. */
int64_t lv_panel_bytes(int64_t n, int64_t k) { return (n + PANEL - 1) / PANEL * PANEL * Q8LEN(k); }

/* w [n, k] int8 -> out (lv_panel_bytes(n, k)) as W_Q8P weights; nothing on builds without
 * lv_int8_panels. */
void lv_pack_panels(const int8_t *w, int64_t n, int64_t k, uint8_t *out, int nthreads) {
#if LV_ISA == 2 && LV_ACT_BITS == 8
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r0 = 0; r0 < n; r0 += PANEL) pack_panel(w, n, k, r0, out + r0 * Q8LEN(k));
#else
    (void)w; (void)n; (void)k; (void)out; (void)nthreads;
#endif
}

/* Outputs [r0, r1) (r0 a multiple of ROWS) of y [m, n] = x w^T * scale + bias for the m
 * activation rows of `a` (their quantised form ready, on int8 kinds): one pass over those
 * weight rows, ROWS at a time, each block meeting every activation row while in L1. */
LV_INLINE void rows_band(const int kind, const acts_t *a, int64_t m, const void *w,
                         const float *scale, const float *bias, float *y, int64_t n,
                         int64_t r0, int64_t r1) {
#if LV_AMX
    if (a->tiles) {
        if (kind == W_INT8)
            amx_rows((const int8_t *)w, a->k, scale, bias, y, n, m, a->tiles, r0, r1);
        else
            amx_rows_bf16((const uint16_t *)w, a->k, bias, y, n, m, a->tiles, r0, r1);
        return;
    }
#endif
#if LV_ISA == 2 && LV_ACT_BITS == 8
    if (kind == W_Q8P) {
        panel_rows(a, m, (const uint8_t *)w, scale, bias, y, n, r0, r1);
        return;
    }
#endif
#if LV_ACT_BITS == 8
    if (USE_Q8(kind)) {
        rows_band_q8(a, m, (const int8_t *)w, scale, bias, y, n, r0, r1);
        return;
    }
#endif
    const int64_t stride = a->k * WBYTES(kind); /* bytes per weight row */
    const int tile = USE_Q16(kind) ? QTILE : XTILE;
    for (int64_t r = r0; r < r1; r += ROWS) {
        const int rows = (int)(r1 - r < ROWS ? r1 - r : ROWS);
        /* A short last block repeats its first row rather than read past the weights. */
        const void *wr[ROWS];
        for (int i = 0; i < ROWS; i++) wr[i] = (const char *)w + (r + (i < rows ? i : 0)) * stride;
        const float *sb = scale ? scale + r : NULL;
        const float *bb = bias ? bias + r : NULL;
        for (int64_t i0 = 0; i0 < m; i0 += tile) {
            float *yi = y + i0 * n + r;
            switch (m - i0 < tile ? (int)(m - i0) : tile) {
            case 1: block_rows(kind, 1, a, i0, wr, rows, sb, bb, yi, n); break;
            case 2: block_rows(kind, 2, a, i0, wr, rows, sb, bb, yi, n); break;
            case 3: block_rows(kind, 3, a, i0, wr, rows, sb, bb, yi, n); break;
            default: block_rows(kind, XTILE, a, i0, wr, rows, sb, bb, yi, n); break;
            }
        }
    }
}

/* This thread's share [*b0, *b1) of `count` items, in contiguous bands. */
static void my_band(int64_t count, int64_t *b0, int64_t *b1) {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int64_t t = 0, nt = 1;
#endif
    const int64_t chunk = (count + nt - 1) / nt;
    *b0 = t * chunk < count ? t * chunk : count;
    *b1 = *b0 + chunk < count ? *b0 + chunk : count;
}

/* This thread's band of the n outputs of a linear: [*r0, *r1), in whole blocks of ROWS
 * rows, or of 16 where the AMX path serves it. */
static void my_rows(int64_t n, int unit, int64_t *r0, int64_t *r1) {
    int64_t b0, b1;
    my_band((n + unit - 1) / unit, &b0, &b1);
    *r0 = b0 * unit;
    *r1 = b1 * unit < n ? b1 * unit : n;
}

#define UNIT(kind, m, k, n) ((kind) == W_Q8P ? PANEL : amx_serves(kind, m, k, n) ? 16 : ROWS)

/* Scratch for m rows of k activations as a linear of this kind takes them, in int16
 * units. int8 weights: the rows' quantised form (QROW_BYTES(k) per row), their scales
 * (QSCALES(k) floats per row) and, in the int8 form, their shifts (a float per row); on AMX
 * builds, for either kind, the rows packed as tiles after those (64-byte aligned). */
int64_t lv_linear_scratch(int kind, int64_t m, int64_t k) {
    const int64_t quantised =
        USE_Q16(kind) || USE_Q8(kind)
            ? m * (QROW_BYTES(k) / 2 + 2 * QSCALES(k) + (USE_Q8(kind) ? 2 : 0))
            : 0;
#if LV_AMX
    if (k % 64 == 0 && kind != W_F32_IN_OUT)
        return quantised +
               (64 + (kind == W_INT8 ? amx_pack_bytes(m, k) : amx_bf16_pack_bytes(m, k))) / 2;
#endif
    return quantised;
}

/* The scratch's parts (see lv_linear_scratch). */
static float *scratch_scales(int16_t *q, int64_t m, int64_t k) {
    return (float *)((int8_t *)q + m * QROW_BYTES(k));
}

static float *scratch_shifts(int16_t *q, int64_t m, int64_t k) {
    return scratch_scales(q, m, k) + m * QSCALES(k);
}

static int8_t *scratch_tiles(int kind, int16_t *q, int64_t m, int64_t k) {
    const uintptr_t end =
        kind == W_INT8 ? (uintptr_t)(scratch_scales(q, m, k) + m * QSCALES(k)) : (uintptr_t)q;
    return (int8_t *)((end + 63) & ~(uintptr_t)63);
}

/* m activation rows x [m, k] as a linear of this kind reads them, with their quantised
 * form (once quantize_rows has made it) in the scratch q. */
static acts_t acts_in(const float *x, int64_t m, int64_t k, int16_t *q) {
    const acts_t a = {x, q, scratch_scales(q, m, k), k, NULL, (const int8_t *)q,
                      scratch_shifts(q, m, k)};
    return a;
}

/* Rows [i0, i1) of a's activations in their quantised form, where this kind takes one. */
static void quantize_rows(int kind, const acts_t *a, int64_t i0, int64_t i1) {
    const int64_t k = a->k;
    for (int64_t i = i0; i < i1; i++) {
#if LV_ACT_BITS == 16
        if (USE_Q16(kind))
            quantize_row(a->x + i * k, k, (int16_t *)a->q + i * QLEN(k), (float *)a->sx + i * QCHUNKS(k));
#elif LV_ACT_BITS == 8
        if (USE_Q8(kind))
            quantize_row8(a->x + i * k, k, (int8_t *)a->q8 + i * Q8LEN(k), (float *)a->sx + i * Q8CHUNKS(k),
                          (float *)a->shift + i);
#else
        (void)kind, (void)k;
#endif
    }
}

/* y = x w^T * scale + bias; kind W_INT8 (scale required) or W_BF16 (scale NULL).
 * scratch: lv_linear_scratch(kind, m, k) int16 values. */
void lv_linear(int kind, const float *x, int64_t m, int64_t k, const void *w, const float *scale,
               const float *bias, float *y, int64_t n, int16_t *scratch, int nthreads) {
    const int amx = amx_serves(kind, m, k, n);
    acts_t a = acts_in(x, m, k, scratch);
    if (amx) a.tiles = scratch_tiles(kind, scratch, m, k);
#pragma omp parallel num_threads(nthreads)
    {
        int64_t r0, r1;
        my_rows(n, kind == W_Q8P ? PANEL : amx ? 16 : ROWS, &r0, &r1);
        if (kind == W_BF16) {
#if LV_AMX
            if (amx) {
                int64_t t0, t1;
                my_band((m + 15) / 16 * AMX_BF16_STEPS(k), &t0, &t1);
                amx_pack_bf16(x, m, k, (int8_t *)a.tiles, t0, t1);
#pragma omp barrier
            }
#endif
            rows_band(W_BF16, &a, m, w, NULL, bias, y, n, r0, r1);
        } else {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++) quantize_rows(W_INT8, &a, i, i + 1);
            /* the loop's end is a barrier: every row is ready */
            if (kind == W_Q8P) {
                rows_band(W_Q8P, &a, m, w, scale, bias, y, n, r0, r1);
            } else if (PANEL_SERVES(W_INT8, m)) {
#if LV_ISA == 2 && LV_ACT_BITS == 8
                panels_q8(&a, m, (const int8_t *)w, scale, bias, y, n);
#endif
            } else {
#if LV_AMX
                if (amx) {
                    int64_t t0, t1;
                    my_band((m + 15) / 16 * AMX_STEPS(k), &t0, &t1);
                    amx_pack(&a, m, (int8_t *)a.tiles, t0, t1);
#pragma omp barrier
                }
#endif
                rows_band(W_INT8, &a, m, w, scale, bias, y, n, r0, r1);
            }
        }
    }
}

/* lv_conv_q8: a vocoder convolution (stride 1, any dilation, unpadded) with int8 weights
 * on AVX-512 VNNI. y[t, o] = post(sum_j scale[o, j] sum_c x[t + j * dil, c] w[o, c, j]
 * + bias[o] + res[t, o]), x, res and y time-major ([T, C], what channels-last
 * `[1, C, 1, T]` tensors hold), float32 or bfloat16 (rounded to nearest even). Each input
 * time step is quantised to 8 bits with its own scale (the steps of a waveform differ by
 * orders of magnitude in loudness) as unsigned codes q around a zero point z: x ~ (q - z)
 * * scale. z = 128 is symmetric; a leaky ReLU's output (negatives a tenth of the
 * positives) takes ~1.8x finer steps around a low z. The weights come packed by the
 * caller as panels of CONV_PANEL output channels, [O / 32][taps][C / 4][32][4] int8, with
 * each output's scale per tap ([O / 32][taps][32] float32) and each panel's sum_c w per
 * tap and output ([O / 32][taps][32] int32): -z times it undoes the zero point. One
 * vpdpbusd multiplies four channels of one time step, broadcast, with those of 16 output
 * channels. A tile keeps CONV_ROWS x 32 outputs in registers: per tap, an int32 sum per
 * output joins the float32 total at that step's scale times the tap's weight scale. */
#if LV_ISA == 2 && LV_VNNI
#define LV_CONV_Q8 1
/* acc += u8 a . s8 b (vpdpbusd) in place: GCC 12 compiles the intrinsic on the tile's
 * accumulator array into two register copies per product (~2x the instructions). */
#define LV_DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))
#define CONV_PANEL 32
/* 5 rows x 2 halves: 10 int32 sums and 10 float32 totals, with the weights, the broadcast
 * activations and each tap's scales and zero-point terms, fit the 32 vector registers
 * (6 rows spilled: ~10% slower for 128 channels on Zen 4, as fast for 256). */
#define CONV_ROWS 5

/* 16 activations (float32, or bfloat16 if bf) from p. */
LV_INLINE __m512 conv_load(const int bf, const void *p) {
    if (bf)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps(p);
}

/* 16 activations to p (bfloat16: rounded to nearest even, as torch rounds). */
LV_INLINE void conv_store(const int bf, void *p, __m512 v) {
    if (!bf) {
        _mm512_storeu_ps(p, v);
        return;
    }
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

/* One time step of c channels (c a multiple of 16), after a leaky ReLU of `slope` if
 * lrelu -> codes q around zero point z (1..254) and its scale: the smallest that keeps
 * the largest value within 255 - z steps above z and the most negative within z below. */
LV_INLINE void conv_quantize_row(const int bf, const void *x, int64_t c, int lrelu, float slope,
                                 int z, uint8_t *q, float *sx) {
    const int64_t eb = bf ? 2 : 4; /* bytes per value */
    const __m512 sl = _mm512_set1_ps(slope);
    __m512 hi = _mm512_setzero_ps(), lo = _mm512_setzero_ps();
    for (int64_t j = 0; j < c; j += 16) {
        __m512 v = conv_load(bf, (const char *)x + j * eb);
        if (lrelu) v = _mm512_max_ps(v, _mm512_mul_ps(v, sl));
        hi = _mm512_max_ps(hi, v);
        lo = _mm512_min_ps(lo, v);
    }
    const float up = _mm512_reduce_max_ps(hi) / (float)(255 - z);
    const float down = -_mm512_reduce_min_ps(lo) / (float)z;
    const float step = up > down ? up : down;
    *sx = step;
    const __m512 inv = _mm512_set1_ps(step > 0.0f ? 1.0f / step : 0.0f);
    const __m512i zero = _mm512_set1_epi32(z);
    for (int64_t j = 0; j < c; j += 16) {
        __m512 v = conv_load(bf, (const char *)x + j * eb);
        if (lrelu) v = _mm512_max_ps(v, _mm512_mul_ps(v, sl));
        __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), zero);
        i = _mm512_min_epi32(_mm512_max_epi32(i, _mm512_setzero_si512()), _mm512_set1_epi32(255));
        _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtepi32_epi8(i));
    }
}

/* Output rows [t0, t0 + mt), channels [32 p, 32 p + 32), from the panel at `wp` (its
 * weight sums at `ws`, its scales at `scale`). */
LV_INLINE void conv_tile(const int bf, const int mt, const uint8_t *q, const float *sx, int64_t c,
                         int64_t taps, int64_t dil, const int8_t *wp, const int32_t *ws, int z,
                         int64_t t0, const float *scale, const float *bias, const void *res,
                         int lrelu, float slope, void *y, int64_t o) {
    const int64_t groups = c / 4, eb = bf ? 2 : 4;
    const __m512i minus_z = _mm512_set1_epi32(-z);
    __m512 f[CONV_ROWS][2];
    for (int i = 0; i < mt; i++) f[i][0] = f[i][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < taps; j++) {
        const int64_t tt = t0 + j * dil;
        const uint8_t *xr = q + tt * c;
        const int8_t *pw = wp + j * groups * CONV_PANEL * 4;
        const __m512i c0 = _mm512_mullo_epi32(_mm512_loadu_si512(ws + j * CONV_PANEL), minus_z);
        const __m512i c1 = _mm512_mullo_epi32(_mm512_loadu_si512(ws + j * CONV_PANEL + 16), minus_z);
        const __m512 k0 = _mm512_loadu_ps(scale + j * CONV_PANEL);
        const __m512 k1 = _mm512_loadu_ps(scale + j * CONV_PANEL + 16);
        __m512i s[CONV_ROWS][2];
        for (int i = 0; i < mt; i++) s[i][0] = c0, s[i][1] = c1;
        for (int64_t g = 0; g < groups; g++) {
            const __m512i w0 = _mm512_load_si512(pw + g * CONV_PANEL * 4);
            const __m512i w1 = _mm512_load_si512(pw + g * CONV_PANEL * 4 + 64);
            for (int i = 0; i < mt; i++) {
                int32_t four;
                memcpy(&four, xr + i * c + 4 * g, 4);
                const __m512i x4 = _mm512_set1_epi32(four);
                LV_DPBUSD(s[i][0], x4, w0);
                LV_DPBUSD(s[i][1], x4, w1);
            }
        }
        for (int i = 0; i < mt; i++) {
            const __m512 sc = _mm512_set1_ps(sx[tt + i]);
            f[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][0]), _mm512_mul_ps(sc, k0), f[i][0]);
            f[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][1]), _mm512_mul_ps(sc, k1), f[i][1]);
        }
    }
    const __m512 sl = _mm512_set1_ps(slope);
    for (int h = 0; h < 2; h++) {
        const __m512 wb = bias ? _mm512_loadu_ps(bias + 16 * h) : _mm512_setzero_ps();
        for (int i = 0; i < mt; i++) {
            const int64_t at = ((t0 + i) * o + 16 * h) * eb;
            __m512 v = _mm512_add_ps(f[i][h], wb);
            if (res) v = _mm512_add_ps(v, conv_load(bf, (const char *)res + at));
            if (lrelu) v = _mm512_max_ps(v, _mm512_mul_ps(v, sl)); /* slope in (0, 1) */
            conv_store(bf, (char *)y + at, v);
        }
    }
}
#else
#define LV_CONV_Q8 0
#define CONV_ROWS 5
#endif

int lv_conv_q8_serves(void) { return LV_CONV_Q8; }

/* Bytes of scratch lv_conv_q8 needs: each thread's input steps, quantised (c + 4 bytes
 * each: the values and their scale). */
int64_t lv_conv_q8_scratch(int64_t t_in, int64_t c, int64_t span, int nthreads) {
    return (t_in + (int64_t)nthreads * (span + CONV_ROWS)) * (c + 4);
}

/* See above. x [t_in, c] (c a multiple of 16), res NULL or [t_out, o] (may be y itself:
 * added in place), y [t_out, o], all float32 or all bfloat16 (bf16_io), with
 * t_out = t_in - (taps - 1) * dil; w, wsum and scale packed (o a multiple of 32), bias
 * [o] float32; zero: the codes' zero point (1..254); lrelu_in: the input's leaky ReLU of
 * slope_in applied as it is read; lrelu: y = max(y, slope * y) after the rest.
 *
 * Each thread takes a band of output steps and walks it in blocks: it quantises the input
 * steps a block needs (each once, just before) and runs every panel over the block while
 * those steps are in L1; the weights (every panel) stay in L2. Weights too big for that
 * run panel by panel over the whole band instead. */
LV_INLINE void conv_band(const int bf, const void *x, int64_t t_out, int64_t c, int lrelu_in,
                         float slope_in, int zero, const int8_t *w, const int32_t *wsum,
                         const float *scale, const float *bias, int64_t o, int64_t taps,
                         int64_t dil, const void *res, int lrelu, float slope, void *y,
                         uint8_t *scratch) {
#if LV_CONV_Q8
    const int64_t span = (taps - 1) * dil, eb = bf ? 2 : 4;
    int64_t block = ((24 * 1024) / c - span) / CONV_ROWS * CONV_ROWS;
    if (block < 4 * CONV_ROWS) block = 4 * CONV_ROWS;
    if (o * c * taps > 512 * 1024) block = t_out; /* the weights stream from L3 once */
#ifdef _OPENMP
    const int64_t me = omp_get_thread_num();
#else
    const int64_t me = 0;
#endif
    int64_t b0, b1;
    my_band((t_out + CONV_ROWS - 1) / CONV_ROWS, &b0, &b1);
    const int64_t r0 = b0 * CONV_ROWS, r1 = b1 * CONV_ROWS < t_out ? b1 * CONV_ROWS : t_out;
    /* this thread's input steps r0 .. r1 + span, from its own part of the scratch */
    const int64_t rows = r1 > r0 ? r1 - r0 + span : 0;
    uint8_t *q = scratch + (r0 + me * (span + CONV_ROWS)) * (c + 4);
    float *sx = (float *)(q + rows * c);
    const char *xb = (const char *)x + r0 * c * eb;
    char *yb = (char *)y + r0 * o * eb;
    const char *rb = res ? (const char *)res + r0 * o * eb : NULL;
    int64_t ready = 0; /* steps quantised so far (relative to r0) */
    for (int64_t k0 = 0; k0 < r1 - r0; k0 += block) {
        const int64_t k1 = k0 + block < r1 - r0 ? k0 + block : r1 - r0;
        for (; ready < k1 + span; ready++)
            conv_quantize_row(bf, xb + ready * c * eb, c, lrelu_in, slope_in, zero, q + ready * c,
                              sx + ready);
        for (int64_t p = 0; p < o / CONV_PANEL; p++) {
            const int8_t *wp = w + p * taps * c * CONV_PANEL;
            const int32_t *ws = wsum + p * taps * CONV_PANEL;
            const float *sp = scale + p * taps * CONV_PANEL;
            const int64_t ch = p * CONV_PANEL;
            const char *rp = rb ? rb + ch * eb : NULL;
            const float *bp = bias ? bias + ch : NULL;
            for (int64_t t0 = k0; t0 < k1; t0 += CONV_ROWS) {
                switch (k1 - t0 < CONV_ROWS ? (int)(k1 - t0) : CONV_ROWS) {
#define CONV_CASE(n) conv_tile(bf, n, q, sx, c, taps, dil, wp, ws, zero, t0, sp, bp, rp, lrelu, slope, yb + ch * eb, o)
                case 1: CONV_CASE(1); break;
                case 2: CONV_CASE(2); break;
                case 3: CONV_CASE(3); break;
                case 4: CONV_CASE(4); break;
                default: CONV_CASE(CONV_ROWS); break;
#undef CONV_CASE
                }
            }
        }
    }
#else
    (void)bf; (void)x; (void)t_out; (void)c; (void)lrelu_in; (void)slope_in; (void)zero;
    (void)w; (void)wsum; (void)scale; (void)bias; (void)o; (void)taps; (void)dil; (void)res;
    (void)lrelu; (void)slope; (void)y; (void)scratch;
#endif
}

void lv_conv_q8(const void *x, int64_t t_in, int64_t c, int bf16_io, int lrelu_in,
                float slope_in, int zero, const int8_t *w, const int32_t *wsum, const float *scale,
                const float *bias, int64_t o, int64_t taps, int64_t dil, const void *res,
                int lrelu, float slope, void *y, uint8_t *scratch, int nthreads) {
    const int64_t t_out = t_in - (taps - 1) * dil;
    if (t_out <= 0 || !LV_CONV_Q8) return;
#pragma omp parallel num_threads(nthreads)
    {
        if (bf16_io)
            conv_band(1, x, t_out, c, lrelu_in, slope_in, zero, w, wsum, scale, bias, o, taps, dil,
                      res, lrelu, slope, y, scratch);
        else
            conv_band(0, x, t_out, c, lrelu_in, slope_in, zero, w, wsum, scale, bias, o, taps, dil,
                      res, lrelu, slope, y, scratch);
    }
}

/* Attention weights for one head: p[j] = exp(s[j] - max) / sum, in place over len scores. */
#if LV_ISA == 2
/* exp(x) for x <= 0 (scores minus their maximum): 2^(x log2 e) split into 2^n * 2^f,
 * f in [-0.5, 0.5], 2^f by a degree-6 polynomial (relative error ~2e-7). */
LV_INLINE __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5353362e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6180676e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503406e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022652e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 16 cached values (a key's or a value's) from element j of a cache of this kind. */
LV_INLINE __m512 kvload16(const int kv, const void *c, int64_t j) {
    if (kv == KV_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)c + j))), 16));
    return _mm512_loadu_ps((const float *)c + j);
}

/* One head, dim a multiple of 16 (at most 256), over a cache of kind kv. */
LV_INLINE void attend_head(const int kv, const float *qh, const void *kh, const void *vh,
                           int64_t len, int64_t dim, float scale, float *p, float *oh) {
    const int nv = (int)(dim / 16);
    __m512 qv[16];
    for (int c = 0; c < nv; c++) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(qh + 16 * c), _mm512_set1_ps(scale));
    float top = -INFINITY;
    int64_t j = 0;
    for (; j + 4 <= len; j += 4) { /* four keys at once: independent FMA chains */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const int64_t k0 = j * dim;
        for (int c = 0; c < nv; c++) {
            a0 = _mm512_fmadd_ps(qv[c], kvload16(kv, kh, k0 + 16 * c), a0);
            a1 = _mm512_fmadd_ps(qv[c], kvload16(kv, kh, k0 + dim + 16 * c), a1);
            a2 = _mm512_fmadd_ps(qv[c], kvload16(kv, kh, k0 + 2 * dim + 16 * c), a2);
            a3 = _mm512_fmadd_ps(qv[c], kvload16(kv, kh, k0 + 3 * dim + 16 * c), a3);
        }
        p[j] = _mm512_reduce_add_ps(a0);
        p[j + 1] = _mm512_reduce_add_ps(a1);
        p[j + 2] = _mm512_reduce_add_ps(a2);
        p[j + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; j < len; j++) {
        __m512 a = _mm512_setzero_ps();
        for (int c = 0; c < nv; c++) a = _mm512_fmadd_ps(qv[c], kvload16(kv, kh, j * dim + 16 * c), a);
        p[j] = _mm512_reduce_add_ps(a);
    }
    for (j = 0; j < len; j++) top = p[j] > top ? p[j] : top;
    __m512 total = _mm512_setzero_ps();
    const __m512 tv = _mm512_set1_ps(top);
    for (j = 0; j + 16 <= len; j += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + j), tv));
        _mm512_storeu_ps(p + j, e);
        total = _mm512_add_ps(total, e);
    }
    if (j < len) {
        __mmask16 mask = (__mmask16)((1u << (len - j)) - 1u);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + j), tv));
        e = _mm512_maskz_mov_ps(mask, e);
        _mm512_mask_storeu_ps(p + j, mask, e);
        total = _mm512_add_ps(total, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(total);
    __m512 acc[16];
    for (int c = 0; c < nv; c++) acc[c] = _mm512_setzero_ps();
    for (j = 0; j < len; j++) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        for (int c = 0; c < nv; c++) acc[c] = _mm512_fmadd_ps(pj, kvload16(kv, vh, j * dim + 16 * c), acc[c]);
    }
    for (int c = 0; c < nv; c++) _mm512_storeu_ps(oh + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
}
#define LV_FAST_DIM(dim) ((dim) % 16 == 0 && (dim) <= 256)
#elif LV_ISA == 1
/* exp512's arithmetic on 8 lanes (x <= 87.3; 2^n built in the exponent bits, n >= -126). */
LV_INLINE __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.5353362e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3398874e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6180676e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5503406e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022652e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* 8 cached values (a key's or a value's) from element j of a cache of this kind. */
LV_INLINE __m256 kvload8(const int kv, const void *c, int64_t j) {
    if (kv == KV_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)c + j))), 16));
    return _mm256_loadu_ps((const float *)c + j);
}

/* The AVX-512 attend_head on 8 lanes: one head, dim a multiple of 8 (at most 256). */
LV_INLINE void attend_head(const int kv, const float *qh, const void *kh, const void *vh,
                           int64_t len, int64_t dim, float scale, float *p, float *oh) {
    const int nv = (int)(dim / 8);
    __m256 qv[32];
    for (int c = 0; c < nv; c++) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(qh + 8 * c), _mm256_set1_ps(scale));
    int64_t j = 0;
    for (; j + 4 <= len; j += 4) { /* four keys at once: independent FMA chains */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        const int64_t k0 = j * dim;
        for (int c = 0; c < nv; c++) {
            a0 = _mm256_fmadd_ps(qv[c], kvload8(kv, kh, k0 + 8 * c), a0);
            a1 = _mm256_fmadd_ps(qv[c], kvload8(kv, kh, k0 + dim + 8 * c), a1);
            a2 = _mm256_fmadd_ps(qv[c], kvload8(kv, kh, k0 + 2 * dim + 8 * c), a2);
            a3 = _mm256_fmadd_ps(qv[c], kvload8(kv, kh, k0 + 3 * dim + 8 * c), a3);
        }
        p[j] = hsum256(a0);
        p[j + 1] = hsum256(a1);
        p[j + 2] = hsum256(a2);
        p[j + 3] = hsum256(a3);
    }
    for (; j < len; j++) {
        __m256 a = _mm256_setzero_ps();
        for (int c = 0; c < nv; c++) a = _mm256_fmadd_ps(qv[c], kvload8(kv, kh, j * dim + 8 * c), a);
        p[j] = hsum256(a);
    }
    float top = -INFINITY;
    for (j = 0; j < len; j++) top = p[j] > top ? p[j] : top;
    __m256 total = _mm256_setzero_ps();
    const __m256 tv = _mm256_set1_ps(top);
    for (j = 0; j + 8 <= len; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), tv));
        _mm256_storeu_ps(p + j, e);
        total = _mm256_add_ps(total, e);
    }
    if (j < len) { /* the last len - j scores: masked lanes load 0 and count for nothing */
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(len - j)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(p + j, mask), tv));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(p + j, mask, e);
        total = _mm256_add_ps(total, e);
    }
    const float inv = 1.0f / hsum256(total);
    __m256 acc[32];
    for (int c = 0; c < nv; c++) acc[c] = _mm256_setzero_ps();
    for (j = 0; j < len; j++) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int c = 0; c < nv; c++) acc[c] = _mm256_fmadd_ps(pj, kvload8(kv, vh, j * dim + 8 * c), acc[c]);
    }
    for (int c = 0; c < nv; c++) _mm256_storeu_ps(oh + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}
#define LV_FAST_DIM(dim) ((dim) % 8 == 0 && (dim) <= 256)
#else
#define LV_FAST_DIM(dim) 0
static void attend_head(const int kv, const float *qh, const void *kh, const void *vh,
                        int64_t len, int64_t dim, float scale, float *p, float *oh) {
    (void)kv, (void)qh, (void)kh, (void)vh, (void)len, (void)dim, (void)scale, (void)p, (void)oh;
}
#endif

/* Cached value j (a key's or a value's element) of a cache of kind kv, as float32. */
LV_INLINE float kvscalar(const int kv, const void *c, int64_t j) {
    if (kv == KV_BF16) {
        union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t *)c)[j] << 16};
        return v.f;
    }
    return ((const float *)c)[j];
}

/* float32 -> bfloat16 bits, rounding to nearest even, as torch converts (no NaNs here). */
static inline uint16_t to_bf16(float x) {
    union { float f; uint32_t u; } v = {.f = x};
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

LV_INLINE void attend_head_portable(const int kv, const float *qh, const void *kh, const void *vh,
                                    int64_t len, int64_t dim, float scale, float *p, float *oh) {
    float top = -INFINITY;
    for (int64_t j = 0; j < len; j++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < dim; d++) s += qh[d] * kvscalar(kv, kh, j * dim + d);
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
        const float pj = p[j] / total;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) oh[d] += pj * kvscalar(kv, vh, j * dim + d);
    }
}

/* Heads of m rows shared among the threads of the enclosing parallel region: for row i
 * and head h, the new key/value (k_new/v_new + i * xs, [heads, dim]) go to position
 * positions[i] of that row's caches (`pos` for every row when positions is NULL), and its
 * query attends over positions 0..positions[i]: each row is a sequence of its own length
 * (continuous batching: rows join and leave at any step). Positions are clamped to
 * [0, pos]; pos < max_len. Caches [m, heads, max_len, dim] of kind kv (float32, or
 * bfloat16: half the bytes each step reads, the new key/value rounded to nearest even);
 * out [m, heads * dim]; p: this thread's scratch of pos + 1 floats. */
LV_INLINE void attend_rows_kv(const int kv, const float *q, const float *k_new,
                              const float *v_new, int64_t xs, int64_t m, void *keys, void *values,
                              const int64_t *positions, int64_t heads, int64_t pos,
                              int64_t max_len, int64_t dim, float scale, float *out, float *p) {
    const int64_t bytes = kv == KV_BF16 ? 2 : 4;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < m * heads; t++) {
        const int64_t i = t / heads, h = t % heads;
        char *kh = (char *)keys + t * max_len * dim * bytes; /* row i, head h */
        char *vh = (char *)values + t * max_len * dim * bytes;
        const float *qh = q + i * xs + h * dim;
        int64_t at = positions ? positions[i] : pos;
        at = at < 0 ? 0 : at > pos ? pos : at;
        for (int64_t d = 0; d < dim; d++) {
            const float kd = k_new[i * xs + h * dim + d], vd = v_new[i * xs + h * dim + d];
            if (kv == KV_BF16) {
                ((uint16_t *)kh)[at * dim + d] = to_bf16(kd);
                ((uint16_t *)vh)[at * dim + d] = to_bf16(vd);
            } else {
                ((float *)kh)[at * dim + d] = kd;
                ((float *)vh)[at * dim + d] = vd;
            }
        }
        float *oh = out + i * heads * dim + h * dim;
        if (LV_FAST_DIM(dim))
            attend_head(kv, qh, kh, vh, at + 1, dim, scale, p, oh);
        else
            attend_head_portable(kv, qh, kh, vh, at + 1, dim, scale, p, oh);
    }
}

static void attend_rows(int kv, const float *q, const float *k_new, const float *v_new,
                        int64_t xs, int64_t m, void *keys, void *values,
                        const int64_t *positions, int64_t heads, int64_t pos, int64_t max_len,
                        int64_t dim, float scale, float *out, float *p) {
    if (kv == KV_BF16)
        attend_rows_kv(KV_BF16, q, k_new, v_new, xs, m, keys, values, positions, heads, pos,
                       max_len, dim, scale, out, p);
    else
        attend_rows_kv(KV_F32, q, k_new, v_new, xs, m, keys, values, positions, heads, pos,
                       max_len, dim, scale, out, p);
}

static float *thread_scratch(float *scratch, int64_t each) {
#ifdef _OPENMP
    return scratch + (int64_t)omp_get_thread_num() * each;
#else
    (void)each;
    return scratch;
#endif
}

/* One decode step's attention, for every head h: write the new key and value (k_new[h],
 * v_new[h]: [heads, dim]) at position `pos` of the caches, then
 *   out[h] = softmax(q[h] . K[h, :pos + 1]^T * scale) V[h, :pos + 1].
 * Caches: [1, heads, max_len, dim] of kind kv (KV_F32, KV_BF16). scratch: nthreads *
 * (pos + 1) floats for the attention weights. */
void lv_attend_one(const float *q, const float *k_new, const float *v_new, void *keys,
                   void *values, int kv, int64_t heads, int64_t pos, int64_t dim,
                   int64_t max_len, float scale, float *out, float *scratch, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    attend_rows(kv, q, k_new, v_new, 0, 1, keys, values, NULL, heads, pos, max_len, dim, scale,
                out, thread_scratch(scratch, pos + 1));
}

/* A prompt's attention (one sequence, t tokens at positions start..start + t - 1): write
 * every token's key and value into the caches, then each token i of each head h attends
 * over positions 0..start + i (causal):
 *   out[i, h] = softmax(q[i, h] . K[h, :start + i + 1]^T * scale) V[h, :start + i + 1].
 * qkv [t, 3 * heads * dim]: each row's query, key and value (the attention's input
 * projection, unsplit); caches [1, heads, max_len, dim] of kind kv; out [t, heads * dim];
 * scratch: nthreads * (start + t) floats. The same arithmetic as a decode step's
 * (attend_head), token by token, so that the cache and the numbers do not depend on
 * whether positions came in a prompt or one at a time. */
void lv_attend_prompt(const float *qkv, void *keys, void *values, int kv, int64_t heads,
                      int64_t start, int64_t t, int64_t dim, int64_t max_len, float scale,
                      float *out, float *scratch, int nthreads) {
    const int64_t width = heads * dim, xs = 3 * width, bytes = kv == KV_BF16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < heads; h++) {
            char *kh = (char *)keys + h * max_len * dim * bytes;
            char *vh = (char *)values + h * max_len * dim * bytes;
            for (int64_t i = 0; i < t; i++) {
                const float *kd = qkv + i * xs + width + h * dim, *vd = kd + width;
                const int64_t at = (start + i) * dim;
                for (int64_t d = 0; d < dim; d++) {
                    if (kv == KV_BF16) {
                        ((uint16_t *)kh)[at + d] = to_bf16(kd[d]);
                        ((uint16_t *)vh)[at + d] = to_bf16(vd[d]);
                    } else {
                        ((float *)kh)[at + d] = kd[d];
                        ((float *)vh)[at + d] = vd[d];
                    }
                }
            }
        }
        /* the loop's end is a barrier: every key and value is in the cache */
        float *p = thread_scratch(scratch, start + t);
        /* later tokens attend over more positions: hand them out first, a few at a time */
#pragma omp for schedule(dynamic, 4)
        for (int64_t u = 0; u < t * heads; u++) {
            const int64_t i = t - 1 - u / heads, h = u % heads;
            const char *kh = (const char *)keys + h * max_len * dim * bytes;
            const char *vh = (const char *)values + h * max_len * dim * bytes;
            const float *qh = qkv + i * xs + h * dim;
            float *oh = out + i * width + h * dim;
            if (kv == KV_BF16) {
                if (LV_FAST_DIM(dim))
                    attend_head(KV_BF16, qh, kh, vh, start + i + 1, dim, scale, p, oh);
                else
                    attend_head_portable(KV_BF16, qh, kh, vh, start + i + 1, dim, scale, p, oh);
            } else {
                if (LV_FAST_DIM(dim))
                    attend_head(KV_F32, qh, kh, vh, start + i + 1, dim, scale, p, oh);
                else
                    attend_head_portable(KV_F32, qh, kh, vh, start + i + 1, dim, scale, p, oh);
            }
        }
    }
}

/* y = LayerNorm(x) * w + b over n values (two-pass mean and variance, as torch). */
static void layer_norm(const float *x, const float *w, const float *b, float eps, float *y,
                       int64_t n) {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float inv = (float)(1.0 / sqrt(var / (double)n + (double)eps));
    const float mu = (float)mean;
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] - mu) * inv * w[i] + b[i];
}

/* GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), in place. */
static void gelu_tanh(float *x, int64_t n) {
    const float c = 0.7978845608028654f;
    int64_t i = 0;
#if LV_ISA == 2
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m512 u = _mm512_mul_ps(_mm512_set1_ps(c),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v),
                                                 _mm512_mul_ps(v, v), v));
        /* tanh(u) = 1 - 2 / (exp(2u) + 1); exp512 is accurate for |2u| up to ~87 */
        u = _mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(-40.0f)), _mm512_set1_ps(40.0f));
        __m512 e = exp512(_mm512_add_ps(u, u));
        __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                                 _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
        _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v),
                                              _mm512_add_ps(_mm512_set1_ps(1.0f), t)));
    }
#elif LV_ISA == 1
    for (; i + 8 <= n; i += 8) { /* as above, on 8 lanes */
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(_mm256_set1_ps(c),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v),
                                                 _mm256_mul_ps(v, v), v));
        u = _mm256_min_ps(_mm256_max_ps(u, _mm256_set1_ps(-40.0f)), _mm256_set1_ps(40.0f));
        __m256 e = exp256(_mm256_add_ps(u, u));
        __m256 t = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                                 _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v),
                                              _mm256_add_ps(_mm256_set1_ps(1.0f), t)));
    }
#endif
    for (; i < n; i++) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
    }
}

/* gelu_tanh over n values in place, shared among nthreads (a prompt's MLP). */
void lv_gelu_tanh(float *x, int64_t n, int nthreads) {
    const int64_t piece = 4096;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i += piece) gelu_tanh(x + i, n - i < piece ? n - i : piece);
}

/* Outputs [r0, r1) (r0 a multiple of UNIT) of y [m, n] = x w^T * scale + bias for m
 * activation rows, inside a block: each thread converts its own copy of the rows to int16
 * (USE_Q16 kinds) into q, and packs them for the AMX path where it serves, rather than
 * share one copy behind a barrier. */
LV_INLINE void linear_band(const int kind, const float *x, int64_t m, int64_t k, const void *w,
                           const float *scale, const float *bias, float *y, int64_t n,
                           int64_t r0, int64_t r1, int16_t *q) {
    acts_t a = acts_in(x, m, k, q);
    quantize_rows(kind, &a, 0, m);
#if LV_AMX
    if (amx_serves(kind, m, k, n)) {
        int8_t *tiles = scratch_tiles(kind, q, m, k);
        if (kind == W_INT8)
            amx_pack(&a, m, tiles, 0, (m + 15) / 16 * AMX_STEPS(k));
        else
            amx_pack_bf16(x, m, k, tiles, 0, (m + 15) / 16 * AMX_BF16_STEPS(k));
        a.tiles = tiles;
    }
#endif
    rows_band(kind, &a, m, w, scale, bias, y, n, r0, r1);
}

/* Outputs [r0, r1) of y [m, n] = x w + bias for float32 weights w [k, n] (GPT-2's layout)
 * and m activation rows: the rows' bands of y stay in cache while four weight rows at a
 * time stream past, each a contiguous run of r1 - r0 floats (explicit AVX-512: gcc's own
 * vectorisation of this loop used 256-bit vectors and ran no faster than torch). */
static void linear_band_in_out(const float *x, int64_t m, int64_t k, const float *w, int64_t n,
                               const float *bias, float *y, int64_t r0, int64_t r1) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t c = r0; c < r1; c++) y[i * n + c] = bias[c];
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
        const float *w0 = w + j * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        for (int64_t i = 0; i < m; i++) {
            const float *xi = x + i * k;
            float *yi = y + i * n;
            const float x0 = xi[j], x1 = xi[j + 1], x2 = xi[j + 2], x3 = xi[j + 3];
            int64_t c = r0;
#if LV_ISA == 2
            const __m512 v0 = _mm512_set1_ps(x0), v1 = _mm512_set1_ps(x1);
            const __m512 v2 = _mm512_set1_ps(x2), v3 = _mm512_set1_ps(x3);
            for (; c + 16 <= r1; c += 16) {
                __m512 acc = _mm512_loadu_ps(yi + c);
                acc = _mm512_fmadd_ps(v0, _mm512_loadu_ps(w0 + c), acc);
                acc = _mm512_fmadd_ps(v1, _mm512_loadu_ps(w1 + c), acc);
                acc = _mm512_fmadd_ps(v2, _mm512_loadu_ps(w2 + c), acc);
                acc = _mm512_fmadd_ps(v3, _mm512_loadu_ps(w3 + c), acc);
                _mm512_storeu_ps(yi + c, acc);
            }
#endif
            for (; c < r1; c++) yi[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c];
        }
    }
    for (; j < k; j++) {
        const float *wj = w + j * n;
        for (int64_t i = 0; i < m; i++) {
            const float xj = x[i * k + j];
            float *yi = y + i * n;
#pragma omp simd
            for (int64_t c = r0; c < r1; c++) yi[c] += xj * wj[c];
        }
    }
}

/* Outputs [r0, r1) of one of a block's linears for m rows, whatever the weights' kind. */
LV_INLINE void block_linear(const int kind, const float *x, int64_t m, int64_t k, const void *w,
                            const float *scale, const float *bias, float *y, int64_t n,
                            int64_t r0, int64_t r1, int16_t *q) {
    if (kind == W_F32_IN_OUT)
        linear_band_in_out(x, m, k, (const float *)w, n, bias, y, r0, r1);
    else
        linear_band(kind, x, m, k, w, scale, bias, y, n, r0, r1, q);
}

/* Each thread's share of lv_blocks_decode's work buffer for m rows, in floats (a multiple
 * of 16, so every share starts 64-byte aligned): its LayerNorm outputs [m, dim] and the
 * scratch of a linear's m inputs of up to 4 dim values (lv_linear_scratch). */
static int64_t block_thread_floats(int kind, int64_t m, int64_t dim) {
    const int64_t floats = m * dim + (lv_linear_scratch(kind, m, 4 * dim) + 1) / 2;
    return (floats + 15) / 16 * 16;
}

/* The floats lv_blocks_decode's `work` must hold for m rows. */
int64_t lv_block_work_floats(int kind, int64_t m, int64_t dim, int nthreads) {
    return 8 * m * dim + nthreads * block_thread_floats(kind, m, dim);
}

/* The residual add of y [m, dim] into x [m, dim] over this thread's columns [r0, r1). */
static void add_band(float *x, const float *y, int64_t m, int64_t dim, int64_t r0, int64_t r1) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t c = r0; c < r1; c++) x[i * dim + c] += y[i * dim + c];
}

/* One thread's part of a block (see lv_blocks_decode), inside its parallel region. */
LV_INLINE void block_body(const int kind, float *x, int64_t m, int64_t dim, int64_t heads,
                          const float *const ln[4], float eps, const void *const w[4],
                          const float *const s[4], const float *const b[4], int kv, void *keys,
                          void *values, const int64_t *positions, int64_t pos, int64_t max_len,
                          float *work, float *scratch) {
    const int64_t hd = dim / heads;
    float *qkv = work;              /* [m, 3 dim]; later the MLP's output [m, dim] */
    float *att = qkv + 3 * m * dim; /* [m, dim] */
    float *hidden = att + m * dim;  /* [m, 4 dim]; first the attention projection's output */
    float *own = thread_scratch(hidden + 4 * m * dim, block_thread_floats(kind, m, dim));
    float *h = own;                          /* [m, dim]: this thread's LayerNorm outputs */
    int16_t *q = (int16_t *)(own + m * dim); /* the int16 form of a linear's inputs */
    float *p = thread_scratch(scratch, pos + 1);
    int64_t r0, r1;
    for (int64_t i = 0; i < m; i++)
        layer_norm(x + i * dim, ln[0], ln[1], eps, h + i * dim, dim);
    my_rows(3 * dim, UNIT(kind, m, dim, 3 * dim), &r0, &r1);
    block_linear(kind, h, m, dim, w[0], s[0], b[0], qkv, 3 * dim, r0, r1, q);
#pragma omp barrier
    attend_rows(kv, qkv, qkv + dim, qkv + 2 * dim, 3 * dim, m, keys, values, positions, heads,
                pos, max_len, hd, 1.0f / sqrtf((float)hd), att, p); /* ends in a barrier */
    my_rows(dim, UNIT(kind, m, dim, dim), &r0, &r1);
    block_linear(kind, att, m, dim, w[1], s[1], b[1], hidden, dim, r0, r1, q);
    add_band(x, hidden, m, dim, r0, r1);
#pragma omp barrier
    for (int64_t i = 0; i < m; i++)
        layer_norm(x + i * dim, ln[2], ln[3], eps, h + i * dim, dim);
    my_rows(4 * dim, UNIT(kind, m, dim, 4 * dim), &r0, &r1);
    block_linear(kind, h, m, dim, w[2], s[2], b[2], hidden, 4 * dim, r0, r1, q);
    for (int64_t i = 0; i < m; i++) gelu_tanh(hidden + i * 4 * dim + r0, r1 - r0);
#pragma omp barrier
    my_rows(dim, UNIT(kind, m, 4 * dim, dim), &r0, &r1);
    block_linear(kind, hidden, m, 4 * dim, w[3], s[3], b[3], qkv, dim, r0, r1, q);
    add_band(x, qkv, m, dim, r0, r1);
}

/* `layers` pre-LN GPT-2 blocks in turn (a decoder stack, or one block) for one token of
 * each of m sequences, in place on their residual streams x [m, dim]; block l:
 *   x += c_proj(attention(c_attn(ln_1(x)))); x += mlp_proj(gelu(c_fc(ln_2(x))))
 * Per block, in tables indexed by l: its LayerNorms' weights and biases (ln[4 l + 0..3]:
 * ln_1 w, b, ln_2 w, b) and eps[l]; its linears, of one weight kind for the whole stack
 * (int8 or bf16 weights [out, in], float32 ones [in, out]; per-row scales for int8, NULL
 * otherwise; biases), in the order c_attn, attn c_proj, c_fc, mlp c_proj (w, s, b
 * [4 l + 0..3]); its caches keys[l], values[l] [m, heads, max_len, head dim], all of
 * kind kv (KV_F32, KV_BF16). Row i's
 * key/value is written at positions[i] and it attends over positions 0..positions[i]
 * (positions NULL: every row at `pos`; otherwise pos is their maximum).
 * One parallel region for the whole stack (no Python, no thread start-up between blocks)
 * and five barriers per block: every thread computes the (cheap) LayerNorms itself, and
 * applies GELU and the residual adds to its own band of columns. Few barriers matter when
 * another process competes for the cores: each one waits for the slowest thread. Each
 * weight is read once per call whatever m is.
 * work: lv_block_work_floats(kind, m, dim, nthreads) floats; scratch: nthreads * (pos + 1). */
void lv_blocks_decode(int kind, float *x, int64_t m, int64_t dim, int64_t heads, int64_t layers,
                      const float *const *ln, const float *eps, const void *const *w,
                      const float *const *s, const float *const *b, int kv, void *const *keys,
                      void *const *values, const int64_t *positions, int64_t pos,
                      int64_t max_len, float *work, float *scratch, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    for (int64_t l = 0; l < layers; l++) {
        if (kind == W_BF16)
            block_body(W_BF16, x, m, dim, heads, ln + 4 * l, eps[l], w + 4 * l, s + 4 * l,
                       b + 4 * l, kv, keys[l], values[l], positions, pos, max_len, work, scratch);
        else if (kind == W_F32_IN_OUT)
            block_body(W_F32_IN_OUT, x, m, dim, heads, ln + 4 * l, eps[l], w + 4 * l, s + 4 * l,
                       b + 4 * l, kv, keys[l], values[l], positions, pos, max_len, work, scratch);
#if LV_ISA == 2 && LV_ACT_BITS == 8
        else if (kind == W_Q8P)
            block_body(W_Q8P, x, m, dim, heads, ln + 4 * l, eps[l], w + 4 * l, s + 4 * l,
                       b + 4 * l, kv, keys[l], values[l], positions, pos, max_len, work, scratch);
#endif
        else
            block_body(W_INT8, x, m, dim, heads, ln + 4 * l, eps[l], w + 4 * l, s + 4 * l,
                       b + 4 * l, kv, keys[l], values[l], positions, pos, max_len, work, scratch);
#pragma omp barrier /* the fifth: the next block reads every row of x */
    }
}
