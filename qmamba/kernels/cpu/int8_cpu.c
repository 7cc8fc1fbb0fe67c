/* Integer kernels for qmamba's quantized decode on CPUs: the GEMMs of the quantized linears and
 * the DSQ state step of the integer cache. One source, compiled once per instruction set into
 * its own shared object (qmamba/kernels/cpu_native.py picks one at run time from the CPU's
 * features); every build computes the same bits:
 *
 *   QM_ISA_AVX512VNNI  -mavx512f -mavx512bw -mavx512vl -mavx512vnni (+ AVX2, FMA, F16C)
 *                      int8 dot products with vpdpbusd on 64 bytes
 *   QM_ISA_AVXVNNI     -mavxvnni (+ AVX2, FMA, F16C): vpdpbusd on 32 bytes (VEX encoding)
 *   QM_ISA_AVX2        -mavx2 -mfma -mf16c: vpmaddubsw + vpmaddwd
 *   QM_ISA_PORTABLE    no intrinsics (any CPU, any architecture): plain C loops
 *
 * Integer sums are exact on every path, so only their float epilogues could differ; those are
 * written once, over the 8-lane float helpers `f8_*` below: AVX intrinsics on x86 builds, loops
 * over 8 lanes on the portable build that do the same operation per lane in the same order (the
 * fused multiply-adds are fmaf, correctly rounded like vfmadd; the horizontal sums add the lanes
 * in the AVX order). Built with -ffp-contract=off: no fused multiply-add the source does not
 * write.
 *
 * i8_linear:  out[m, n] = sx[m] * sum_g sw[n, g] * (sum_{k in g} x[m, k] * w[n, k]) + bias[n]
 *             int8 activations x int8 weights, exact integer accumulation per group of `gs`
 *             input columns (gs = K: one scale per output channel), scales applied after.
 *             AVX2 uses the idiom |x| (unsigned) x sign(x)*w (signed) -> vpmaddubsw (pairs,
 *             int16; no saturation since |codes| <= 127) -> vpmaddwd (int32), as llama.cpp's
 *             Q8_0 dot product does; vpsignb cannot negate a weight of -128 (it stays -128, so a
 *             product with a negative activation gets the wrong sign). The VNNI paths add 128 to
 *             the activations instead (x ^ 0x80 is x + 128 as an unsigned byte), multiply them
 *             with the signed weights in vpdpbusd (four products summed into each int32 lane)
 *             and subtract the compensation 128 * sum_k w[n, k] of the group: `wsum` (N, G)
 *             int32 holds sum_k w per row and group, precomputed once per weight by the caller,
 *             or NULL to have it summed here. qmamba's symmetric codes never hold -128 and
 *             loading refuses a checkpoint that does (linear.py), so every path agrees.
 *             Bound: activations are in [-127, 127] (i8_linear_f32 clamps there), so one
 *             product is at most 127 * 127 = 16129 in magnitude (255 * 127 = 32385 biased), a
 *             vpmaddubsw pair 32258 (no int16 saturation), and the int32 lanes wrap harmlessly
 *             (two's complement) as long as the total fits in int32: 32385 K < 2^31 for
 *             K <= 66,311. Columns are therefore summed in int32 over chunks of at most CHUNK
 *             (65536) and the chunks in int64, so any K is exact.
 * f32i8_linear: out[m, n] = s[n] * sum_k x[m, k] * w[n, k]   (float activations, int8 weights;
 *             the 8-bit lm_head, whose input is not quantized)
 *
 * Rows of w (output channels) are split across threads, four at a time, so each block of four
 * weight rows is read from memory once for all M activation rows (decode is memory-bound).
 * Shapes: x (M, K), w (N, K) row-major; sw (N, G) with G = K / gs; out (M, N).
 */
#if !defined(QM_ISA_AVX512VNNI) && !defined(QM_ISA_AVXVNNI) && !defined(QM_ISA_AVX2) && !defined(QM_ISA_PORTABLE)
#error "define one of QM_ISA_AVX512VNNI, QM_ISA_AVXVNNI, QM_ISA_AVX2, QM_ISA_PORTABLE"
#endif
#ifndef QM_ISA_PORTABLE
#define QM_X86 1
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

#if defined(QM_ISA_AVX512VNNI)
#define QM_ISA_NAME "avx512vnni"
#elif defined(QM_ISA_AVXVNNI)
#define QM_ISA_NAME "avxvnni"
#elif defined(QM_ISA_AVX2)
#define QM_ISA_NAME "avx2"
#else
#define QM_ISA_NAME "portable"
#endif

/* which build this is: the loader checks it against the file it meant to load */
const char *qmamba_isa(void) { return QM_ISA_NAME; }

/* ------------------------------------------------------------------ 8-lane float helpers */
#ifdef QM_X86
typedef __m256 f8;
#define f8_zero() _mm256_setzero_ps()
#define f8_set1(v) _mm256_set1_ps(v)
#define f8_load(p) _mm256_loadu_ps(p)
#define f8_store(p, v) _mm256_storeu_ps(p, v)
#define f8_add(a, b) _mm256_add_ps(a, b)
#define f8_mul(a, b) _mm256_mul_ps(a, b)
#define f8_div(a, b) _mm256_div_ps(a, b)
#define f8_max(a, b) _mm256_max_ps(a, b)                 /* a > b ? a : b, lane by lane */
#define f8_min(a, b) _mm256_min_ps(a, b)                 /* a < b ? a : b */
#define f8_abs(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define f8_fmadd(a, b, c) _mm256_fmadd_ps(a, b, c)       /* a * b + c, one rounding */
#define f8_fnmadd(a, b, c) _mm256_fnmadd_ps(a, b, c)     /* -(a * b) + c, one rounding */
#define f8_floor(a) _mm256_floor_ps(a)
#define f8_round(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* 8 int8 -> 8 floats */
#define f8_from_i8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
/* 2^m for integer-valued m (truncated to int32), built in the exponent field */
#define f8_pow2(m) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(m), \
                                                                           _mm256_set1_epi32(127)), 23))

static inline float f8_hsum(__m256 v) {       /* ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)) */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

static inline float fp16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t f32_to_fp16(float v) { return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
#else
typedef struct { float v[8]; } f8;
#define F8_MAP(expr) do { for (int j_ = 0; j_ < 8; j_++) { expr; } } while (0)
static inline f8 f8_zero(void) { f8 r; F8_MAP(r.v[j_] = 0.0f); return r; }
static inline f8 f8_set1(float a) { f8 r; F8_MAP(r.v[j_] = a); return r; }
static inline f8 f8_load(const float *p) { f8 r; F8_MAP(r.v[j_] = p[j_]); return r; }
static inline void f8_store(float *p, f8 a) { F8_MAP(p[j_] = a.v[j_]); }
static inline f8 f8_add(f8 a, f8 b) { f8 r; F8_MAP(r.v[j_] = a.v[j_] + b.v[j_]); return r; }
static inline f8 f8_mul(f8 a, f8 b) { f8 r; F8_MAP(r.v[j_] = a.v[j_] * b.v[j_]); return r; }
static inline f8 f8_div(f8 a, f8 b) { f8 r; F8_MAP(r.v[j_] = a.v[j_] / b.v[j_]); return r; }
static inline f8 f8_max(f8 a, f8 b) { f8 r; F8_MAP(r.v[j_] = a.v[j_] > b.v[j_] ? a.v[j_] : b.v[j_]); return r; }
static inline f8 f8_min(f8 a, f8 b) { f8 r; F8_MAP(r.v[j_] = a.v[j_] < b.v[j_] ? a.v[j_] : b.v[j_]); return r; }
static inline f8 f8_abs(f8 a) { f8 r; F8_MAP(r.v[j_] = fabsf(a.v[j_])); return r; }
static inline f8 f8_fmadd(f8 a, f8 b, f8 c) { f8 r; F8_MAP(r.v[j_] = fmaf(a.v[j_], b.v[j_], c.v[j_])); return r; }
static inline f8 f8_fnmadd(f8 a, f8 b, f8 c) { f8 r; F8_MAP(r.v[j_] = fmaf(-a.v[j_], b.v[j_], c.v[j_])); return r; }
static inline f8 f8_floor(f8 a) { f8 r; F8_MAP(r.v[j_] = floorf(a.v[j_])); return r; }
static inline f8 f8_round(f8 a) { f8 r; F8_MAP(r.v[j_] = nearbyintf(a.v[j_])); return r; }
static inline f8 f8_from_i8(const void *p) { f8 r; F8_MAP(r.v[j_] = (float)((const int8_t *)p)[j_]); return r; }
static inline f8 f8_pow2(f8 m) {
    f8 r;
    F8_MAP(uint32_t e_ = (uint32_t)((int32_t)m.v[j_] + 127) << 23; memcpy(&r.v[j_], &e_, 4));
    return r;
}
static inline float f8_hsum(f8 a) {
    const float *v = a.v;
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

/* IEEE half <-> float as F16C converts them (round to nearest even; quiet NaNs) */
static inline float fp16_to_f32(uint16_t h) {
    const uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t u;
    if (e == 0x1f) u = s | 0x7f800000 | (m << 13) | (m ? 0x400000 : 0);
    else if (e) u = s | ((e + 112) << 23) | (m << 13);
    else {
        float f = (float)m * 5.9604644775390625e-08f;                  /* m * 2^-24, exact */
        memcpy(&u, &f, 4);
        u |= s;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_fp16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    const uint32_t s = (u >> 16) & 0x8000, a = u & 0x7fffffff;
    if (a > 0x7f800000) return (uint16_t)(s | 0x7e00 | ((a >> 13) & 0x3ff));       /* NaN */
    if (a >= 0x477ff000) return (uint16_t)(s | 0x7c00);                         /* >= 65520: inf */
    if (a >= 0x38800000) {                                                        /* normal */
        const uint32_t r = a - 0x38000000, rem = r & 0x1fff;
        uint32_t h = r >> 13;
        h += rem > 0x1000 || (rem == 0x1000 && (h & 1));
        return (uint16_t)(s | h);
    }
    if (a < 0x33000000) return (uint16_t)s;                                      /* < 2^-25: 0 */
    const uint32_t shift = 126 - (a >> 23), mant = (a & 0x7fffff) | 0x800000;    /* subnormal */
    const uint32_t half = 1u << (shift - 1), rem = mant & ((1u << shift) - 1);
    uint32_t h = mant >> shift;
    h += rem > half || (rem == half && (h & 1));
    return (uint16_t)(s | h);
}
#endif

static inline float fp16_round(float v) { return fp16_to_f32(f32_to_fp16(v)); }

/* ------------------------------------------------------------------ int8 dot products */
#ifndef QM_PF
#define QM_PF 2                              /* blocks of 4 weight rows prefetched ahead */
#endif
#define CHUNK 65536                          /* columns summed in int32 at most (see the bound above) */

#if defined(QM_ISA_AVX512VNNI) || defined(QM_ISA_AVXVNNI)
#define QM_VNNI 1
#endif

#ifdef QM_X86
static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
#endif

#if defined(QM_ISA_AVX512VNNI)
/* t[r] += sum_{k < len} (x[k] + 128) * w_r[k] for the nr <= 4 rows w_r = w + r K: 64 columns a
 * step, the last ragged step through masked loads (zero weights there add nothing) */
static inline void dot_rows(const int8_t *x, const int8_t *w, int64_t K, int64_t nr, int64_t len, int64_t *t,
                            const int8_t *pf) {
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t k = 0; k < len; k += 64) {
        const __mmask64 m = len - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (len - k)) - 1);
        const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, x + k), bias);
        if (pf)
            for (int64_t r = 0; r < nr; r++) _mm_prefetch((const char *)(pf + r * K + k), _MM_HINT_T0);
        for (int64_t r = 0; r < nr; r++)
            a[r] = _mm512_dpbusd_epi32(a[r], u, _mm512_maskz_loadu_epi8(m, w + r * K + k));
    }
    for (int64_t r = 0; r < nr; r++) t[r] += (int32_t)_mm512_reduce_add_epi32(a[r]);
}

/* sum_{k < len} w[k] (|sum| <= 127 * CHUNK fits int32) */
static inline int32_t sum_w(const int8_t *w, int64_t len) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i a = _mm512_setzero_si512();
    for (int64_t k = 0; k < len; k += 64) {
        const __mmask64 m = len - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (len - k)) - 1);
        a = _mm512_dpbusd_epi32(a, ones, _mm512_maskz_loadu_epi8(m, w + k));
    }
    return _mm512_reduce_add_epi32(a);
}
#elif defined(QM_ISA_AVXVNNI)
static inline void dot_rows(const int8_t *x, const int8_t *w, int64_t K, int64_t nr, int64_t len, int64_t *t,
                            const int8_t *pf) {
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {
        const __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(x + k)), bias);
        if (pf && !(k & 63))
            for (int64_t r = 0; r < nr; r++) _mm_prefetch((const char *)(pf + r * K + k), _MM_HINT_T0);
        for (int64_t r = 0; r < nr; r++)
            a[r] = _mm256_dpbusd_avx_epi32(a[r], u, _mm256_loadu_si256((const __m256i *)(w + r * K + k)));
    }
    for (int64_t r = 0; r < nr; r++) {
        int32_t s = hsum_i32(a[r]);
        for (int64_t j = k; j < len; j++) s += ((int32_t)x[j] + 128) * (int32_t)w[r * K + j];
        t[r] += s;
    }
}

static inline int32_t sum_w(const int8_t *w, int64_t len) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256i a = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) a = _mm256_dpbusd_avx_epi32(a, ones, _mm256_loadu_si256((const __m256i *)(w + k)));
    int32_t s = hsum_i32(a);
    for (; k < len; k++) s += w[k];
    return s;
}
#elif defined(QM_ISA_AVX2)
/* t[r] += sum_{k < len} x[k] * w_r[k] (no bias: the sign idiom needs no compensation) */
static inline void dot_rows(const int8_t *x, const int8_t *w, int64_t K, int64_t nr, int64_t len, int64_t *t,
                            const int8_t *pf) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {                /* one x load, nr chains */
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
        const __m256i ax = _mm256_sign_epi8(xv, xv);
        if (pf && !(k & 63))
            for (int64_t r = 0; r < nr; r++) _mm_prefetch((const char *)(pf + r * K + k), _MM_HINT_T0);
        for (int64_t r = 0; r < nr; r++)
            a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ax,
                       _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(w + r * K + k)), xv)), ones));
    }
    for (int64_t r = 0; r < nr; r++) {
        int32_t s = hsum_i32(a[r]);
        for (int64_t j = k; j < len; j++) s += (int32_t)x[j] * (int32_t)w[r * K + j];
        t[r] += s;
    }
}
#else
static inline void dot_rows(const int8_t *x, const int8_t *w, int64_t K, int64_t nr, int64_t len, int64_t *t,
                            const int8_t *pf) {
    (void)pf;
    for (int64_t r = 0; r < nr; r++) {
        const int8_t *wr = w + r * K;
        int32_t s = 0;
        for (int64_t k = 0; k < len; k++) s += (int32_t)x[k] * (int32_t)wr[k];
        t[r] += s;
    }
}
#endif

/* The rows of i8_linear, shared out over the threads of the enclosing parallel region (one
 * thread when there is none). With `resid` (M, N), out is not written: resid += the product. */
static void i8_linear_rows(int64_t M, int64_t N, int64_t K, const int8_t *x, const float *sx,
                           const int8_t *w, const int32_t *wsum, const float *sw, int64_t gs, const float *bias,
                           float *out, float *resid) {
    const int64_t G = K / gs;                /* the caller checks that gs divides K */
#ifndef QM_VNNI
    (void)wsum;
#endif
    #pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int64_t nr = N - n0 < 4 ? N - n0 : 4;
        /* the rows QM_PF blocks ahead are prefetched while these are summed (first activation
           row only): one core alone does not keep enough cache misses in flight to stream the
           weights at full speed */
        const int8_t *pf = n0 + 4 * QM_PF + 4 <= N ? w + (n0 + 4 * QM_PF) * K : NULL;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = x + m * K;
            float y[4] = {0, 0, 0, 0};
            for (int64_t g = 0; g < G; g++) {
                int64_t t[4] = {0, 0, 0, 0};
                for (int64_t c0 = 0; c0 < gs; c0 += CHUNK) {
                    const int64_t len = gs - c0 < CHUNK ? gs - c0 : CHUNK;
                    const int8_t *w0 = w + n0 * K + g * gs + c0;
                    const int8_t *p = m == 0 && pf ? pf + g * gs + c0 : NULL;
                    if (nr == 4) dot_rows(xm + g * gs + c0, w0, K, 4, len, t, p);   /* unrolled: 4 chains */
                    else dot_rows(xm + g * gs + c0, w0, K, nr, len, t, p);
#ifdef QM_VNNI
                    if (!wsum)
                        for (int64_t r = 0; r < nr; r++) t[r] -= 128 * (int64_t)sum_w(w0 + r * K, len);
#endif
                }
#ifdef QM_VNNI
                if (wsum)
                    for (int64_t r = 0; r < nr; r++) t[r] -= 128 * (int64_t)wsum[(n0 + r) * G + g];
#endif
                for (int64_t r = 0; r < nr; r++) y[r] += sw[(n0 + r) * G + g] * (float)t[r];
            }
            for (int64_t r = 0; r < nr; r++) {
                const float v = sx[m] * y[r] + (bias ? bias[n0 + r] : 0.0f);
                if (resid) resid[m * N + n0 + r] = resid[m * N + n0 + r] + v;
                else out[m * N + n0 + r] = v;
            }
        }
    }
}

void i8_linear(int64_t M, int64_t N, int64_t K, const int8_t *x, const float *sx,
               const int8_t *w, const int32_t *wsum, const float *sw, int64_t gs, const float *bias,
               float *out, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    i8_linear_rows(M, N, K, x, sx, w, wsum, sw, gs, bias, out, NULL);
}

/* wsum[n, g] = sum_{k in group g} w[n, k]: what the VNNI paths subtract (times 128) */
void i8_row_sums(int64_t N, int64_t K, const int8_t *w, int64_t gs, int32_t *wsum) {
    const int64_t G = K / gs;
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < G; g++) {
            int32_t s = 0;
            for (int64_t k = 0; k < gs; k++) s += w[n * K + g * gs + k];
            wsum[n * G + g] = s;
        }
}

/* Each row of x (M, K) quantized to int8 as PyTorch computes it,
 *   s_x = max(max_k |x[m, k]|, 1e-12) / 127 (dynamic, per row) or the static s_x,
 *   q_x = clamp(round(x / s_x), -127, 127)   (round half to even)
 * into qx (M, K), the scales used into sx (M,). */
static void quantize_rows(int64_t M, int64_t K, const float *x, float static_scale, int dynamic, int8_t *qx,
                          float *sx) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float s = static_scale;
        if (dynamic) {
            float amax = 0.0f;
            for (int64_t k = 0; k < K; k++) amax = fabsf(xm[k]) > amax ? fabsf(xm[k]) : amax;
            s = (amax < 1e-12f ? 1e-12f : amax) / 127.0f;
        }
        sx[m] = s;
        for (int64_t k = 0; k < K; k++) {
            float v = nearbyintf(xm[k] / s);
            v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
            qx[m * K + k] = (int8_t)v;
        }
    }
}

/* i8_linear on float activations: each row quantized to int8 first (quantize_rows), then the
 * integer product. sx_out (M,) receives the scales used. */
void i8_linear_f32(int64_t M, int64_t N, int64_t K, const float *x, float static_scale, int dynamic,
                   const int8_t *w, const int32_t *wsum, const float *sw, int64_t gs, const float *bias,
                   float *out, float *sx_out, int nthreads) {
    int8_t *qx = (int8_t *)malloc(M * K > 0 ? M * K : 1);
    quantize_rows(M, K, x, static_scale, dynamic, qx, sx_out);
    i8_linear(M, N, K, qx, sx_out, w, wsum, sw, gs, bias, out, nthreads);
    free(qx);
}

/* ------------------------------------------------------------------ float x int8 */
#ifdef QM_ISA_AVX512VNNI
/* 8 int8 of p and 8 of q -> 16 floats (p's in the low half) */
static inline __m512 pair_i8(const int8_t *p, const int8_t *q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)p),
                                                                      _mm_loadl_epi64((const __m128i *)q))));
}
/* 8 floats in both halves */
static inline __m512 dup8(const float *p) {
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}
static inline __m256 lo8(__m512 v) { return _mm512_castps512_ps256(v); }
static inline __m256 hi8(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
#endif

void f32i8_linear(int64_t M, int64_t N, int64_t K, const float *x, const int8_t *w, const float *s,
                  float *out, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        /* M > 1 (a prompt): each block of four weight rows is converted to float once, then
           dotted with every activation row */
        float *wf = M > 1 ? (float *)malloc(4 * K * sizeof(float)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            const int64_t nr = N - n0 < 4 ? N - n0 : 4;
#if defined(QM_X86) && !defined(QM_ISA_AVX512VNNI)
            if (M == 1 && n0 + 4 * QM_PF < N)      /* as in i8_linear_rows */
                for (int64_t k = 0; k < 4 * K; k += 64)
                    _mm_prefetch((const char *)(w + (n0 + 4 * QM_PF) * K + k), _MM_HINT_T0);
#endif
            if (nr < 4) {
                for (int64_t m = 0; m < M; m++)
                    for (int64_t r = 0; r < nr; r++) {
                        const int8_t *wr = w + (n0 + r) * K;
                        float y = 0;
                        for (int64_t k = 0; k < K; k++) y += x[m * K + k] * wr[k];
                        out[m * N + n0 + r] = s[n0 + r] * y;
                    }
                continue;
            }
            const int8_t *w0 = w + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
#ifdef QM_ISA_AVX512VNNI
            /* two rows per 16-lane vector (rows 0 and 1, then 2 and 3), each half the 8 lanes of
               the code below in the same order: half the instructions, the same bits */
            const int64_t K8 = K / 8 * 8;
            if (wf)
                for (int64_t k = 0; k < K8; k += 8) {
                    _mm512_storeu_ps(wf + 2 * k, pair_i8(w0 + k, w1 + k));
                    _mm512_storeu_ps(wf + 2 * K8 + 2 * k, pair_i8(w2 + k, w3 + k));
                }
            for (int64_t m0 = 0; wf && m0 < M; m0 += 4) {   /* 4 activation rows at once: 8 chains */
                const int64_t mm = M - m0 < 4 ? M - m0 : 4;
                __m512 a[4][2];
                for (int64_t j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm512_setzero_ps();
                for (int64_t k = 0; k < K8; k += 8) {
                    const __m512 f01 = _mm512_loadu_ps(wf + 2 * k), f23 = _mm512_loadu_ps(wf + 2 * K8 + 2 * k);
                    for (int64_t j = 0; j < mm; j++) {
                        const __m512 xv = dup8(x + (m0 + j) * K + k);
                        a[j][0] = _mm512_fmadd_ps(xv, f01, a[j][0]);
                        a[j][1] = _mm512_fmadd_ps(xv, f23, a[j][1]);
                    }
                }
                for (int64_t j = 0; j < mm; j++) {
                    const float *xm = x + (m0 + j) * K;
                    float y0 = f8_hsum(lo8(a[j][0])), y1 = f8_hsum(hi8(a[j][0]));
                    float y2 = f8_hsum(lo8(a[j][1])), y3 = f8_hsum(hi8(a[j][1]));
                    for (int64_t k = K8; k < K; k++) {
                        y0 += xm[k] * w0[k]; y1 += xm[k] * w1[k]; y2 += xm[k] * w2[k]; y3 += xm[k] * w3[k];
                    }
                    float *o = out + (m0 + j) * N + n0;
                    o[0] = s[n0] * y0; o[1] = s[n0 + 1] * y1; o[2] = s[n0 + 2] * y2; o[3] = s[n0 + 3] * y3;
                }
            }
            for (int64_t m = 0; !wf && m < M; m++) {
                const float *xm = x + m * K;
                __m512 a01 = _mm512_setzero_ps(), a23 = a01;
                for (int64_t k = 0; k < K8; k += 8) {       /* one activation row (M = 1) */
                    const __m512 xv = dup8(xm + k);
                    if (n0 + 4 * QM_PF + 4 <= N && !(k & 63)) {     /* as in i8_linear_rows */
                        const int8_t *pf = w + (n0 + 4 * QM_PF) * K + k;
                        for (int64_t r = 0; r < 4; r++) _mm_prefetch((const char *)(pf + r * K), _MM_HINT_T0);
                    }
                    a01 = _mm512_fmadd_ps(xv, pair_i8(w0 + k, w1 + k), a01);
                    a23 = _mm512_fmadd_ps(xv, pair_i8(w2 + k, w3 + k), a23);
                }
                float y0 = f8_hsum(lo8(a01)), y1 = f8_hsum(hi8(a01)), y2 = f8_hsum(lo8(a23)), y3 = f8_hsum(hi8(a23));
                for (int64_t k = K8; k < K; k++) {
                    y0 += xm[k] * w0[k]; y1 += xm[k] * w1[k]; y2 += xm[k] * w2[k]; y3 += xm[k] * w3[k];
                }
                out[m * N + n0] = s[n0] * y0;         out[m * N + n0 + 1] = s[n0 + 1] * y1;
                out[m * N + n0 + 2] = s[n0 + 2] * y2; out[m * N + n0 + 3] = s[n0 + 3] * y3;
            }
            continue;
#endif
            if (wf) {
                for (int64_t k = 0; k < 4 * K; k++) wf[k] = (float)w0[k];
            }
            for (int64_t m = 0; m < M; m++) {
                const float *xm = x + m * K;
                f8 a0 = f8_zero(), a1 = a0, a2 = a0, a3 = a0;
                int64_t k = 0;
                if (wf) {
                    const float *f0 = wf, *f1 = wf + K, *f2 = wf + 2 * K, *f3 = wf + 3 * K;
                    for (; k + 8 <= K; k += 8) {
                        f8 xv = f8_load(xm + k);
                        a0 = f8_fmadd(xv, f8_load(f0 + k), a0);
                        a1 = f8_fmadd(xv, f8_load(f1 + k), a1);
                        a2 = f8_fmadd(xv, f8_load(f2 + k), a2);
                        a3 = f8_fmadd(xv, f8_load(f3 + k), a3);
                    }
                } else {
                    for (; k + 8 <= K; k += 8) {
                        f8 xv = f8_load(xm + k);
                        a0 = f8_fmadd(xv, f8_from_i8(w0 + k), a0);
                        a1 = f8_fmadd(xv, f8_from_i8(w1 + k), a1);
                        a2 = f8_fmadd(xv, f8_from_i8(w2 + k), a2);
                        a3 = f8_fmadd(xv, f8_from_i8(w3 + k), a3);
                    }
                }
                float y0 = f8_hsum(a0), y1 = f8_hsum(a1), y2 = f8_hsum(a2), y3 = f8_hsum(a3);
                for (; k < K; k++) {
                    y0 += xm[k] * w0[k]; y1 += xm[k] * w1[k]; y2 += xm[k] * w2[k]; y3 += xm[k] * w3[k];
                }
                out[m * N + n0] = s[n0] * y0;         out[m * N + n0 + 1] = s[n0 + 1] * y1;
                out[m * N + n0 + 2] = s[n0 + 2] * y2; out[m * N + n0 + 3] = s[n0 + 3] * y3;
            }
        }
        free(wf);
    }
}

/* ------------------------------------------------------------------ exp */
/* exp of 8 floats (Cephes' expf as in avx_mathfun: exp(x) = 2^m exp(r), |r| <= ln2/2, a degree-5
 * polynomial; relative error under 2e-7, like the vectorised exp PyTorch itself uses). Inputs
 * below -87.3 give about 2^-126 (not 0): a decay that small leaves nothing of the state either way. */
static inline f8 exp8(f8 x) {
    x = f8_min(f8_max(x, f8_set1(-87.3365447505531f)), f8_set1(88.3762626647949f));
    f8 m = f8_floor(f8_fmadd(x, f8_set1(1.44269504088896341f), f8_set1(0.5f)));
    x = f8_fnmadd(m, f8_set1(0.693359375f), x);
    x = f8_fnmadd(m, f8_set1(-2.12194440e-4f), x);
    f8 y = f8_set1(1.9875691500E-4f);
    y = f8_fmadd(y, x, f8_set1(1.3981999507E-3f));
    y = f8_fmadd(y, x, f8_set1(8.3334519073E-3f));
    y = f8_fmadd(y, x, f8_set1(4.1665795894E-2f));
    y = f8_fmadd(y, x, f8_set1(1.6666665459E-1f));
    y = f8_fmadd(y, x, f8_set1(5.0000001201E-1f));
    y = f8_fmadd(y, f8_mul(x, x), f8_add(x, f8_set1(1.0f)));
    return f8_mul(y, f8_pow2(m));
}

/* y = exp(x) over n floats with `exp8` (scalar expf for the tail): what the state kernel
 * computes for per-state decays, exported so the tests can measure its error. */
void exp_f32(int64_t n, const float *x, float *y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) f8_store(y + i, exp8(f8_load(x + i)));
    for (; i < n; i++) y[i] = expf(x[i]);
}

/* ------------------------------------------------------------------ state codes */
/* 16 signed 4-bit codes from 8 packed bytes (element 2i low nibble) -> two vectors of 8 floats */
static inline void unpack16(const uint8_t *p, f8 *lo8, f8 *hi8) {
#ifdef QM_X86
    const __m128i m = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    c = _mm_sub_epi8(_mm_xor_si128(c, eight), eight);                  /* sign-extend the nibbles */
    *lo8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
    *hi8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
#else
    int8_t c[16];
    for (int j = 0; j < 16; j++) {
        const int nib = (p[j >> 1] >> ((j & 1) * 4)) & 0xF;
        c[j] = (int8_t)(nib > 7 ? nib - 16 : nib);
    }
    *lo8 = f8_from_i8(c);
    *hi8 = f8_from_i8(c + 8);
#endif
}

/* two vectors of 8 integer-valued floats in [-8, 7] -> 8 packed bytes, or in [-128, 127] -> 16
 * int8 codes */
static inline void pack16(f8 a, f8 b, uint8_t *p, int packed) {
#ifdef QM_X86
    __m256i w = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
    w = _mm256_permute4x64_epi64(w, 0xD8);                               /* 16 int16 in order */
    __m128i c = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));  /* 16 int8 */
    if (!packed) {
        _mm_storeu_si128((__m128i *)p, c);
        return;
    }
    __m128i r = _mm_or_si128(_mm_and_si128(c, _mm_set1_epi16(0x000F)),
                             _mm_and_si128(_mm_srli_epi16(c, 4), _mm_set1_epi16(0x00F0)));
    _mm_storel_epi64((__m128i *)p, _mm_packus_epi16(r, r));
#else
    float q[16];
    f8_store(q, a);
    f8_store(q + 8, b);
    for (int j = 0; j < 16; j += 2) {
        const int32_t lo = (int32_t)q[j], hi = (int32_t)q[j + 1];
        if (packed) p[j >> 1] = (uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
        else { p[j] = (uint8_t)(int8_t)lo; p[j + 1] = (uint8_t)(int8_t)hi; }
    }
#endif
}

/* The exact quantized recurrence of a DSQ-quantized SSM state stored as integers, over l tokens
 * (l = 1: one decode step), round to nearest; for every token t:
 *
 *   h      = exp(dt_t A) h + dt_t x_t B_t            (update, float32; h read from the codes)
 *   s_c    = fp16(max_n |h / s_n| / qmax)  (dynamic) or the static s_c
 *   q      = clamp(round(h / s_n / s_c), -qmax, qmax)   (the write: what the cache stores)
 *   h      = q * s_c * s_n                           (what the next token reads)
 *   y_t    = sum_n h * C_t
 *
 * codes (b, d, ceil(n / per_byte)) uint8 with two 4-bit codes per byte (per_byte = 2: element
 * 2i in the low nibble) or four 2-bit codes (per_byte = 4: element 4i + j in bits 2j, 2j + 1),
 * or (b, d, n) int8 (per_byte = 1): read at the start, written with the last token's codes; scales
 * (b, d) float16 bits when dynamic (likewise); static_scale (d,); A (d, nA) with nA = 1 (Mamba2:
 * per head, repeated per channel) or n (Mamba1); x, dt, y (b, l, d); B, C (b, l, g, n) with
 * d / g channels per group. Each (sequence, channel) row runs all l tokens on one thread, its n
 * state values in a buffer. The per-channel state quantizer is this with s_n = 1. Products and
 * quotients are rounded as PyTorch's eager ops round them, one rounding per operation in the
 * eager order: no fused multiply-add, neither written here nor made by the compiler (this file
 * is built with -ffp-contract=off: gcc's default would fuse `dA * h + dtx * B` and the vector
 * mul/add pairs). So the codes and scales equal the eager cache's bit for bit given the same
 * exp(dt A), which is the only approximation here: per-state decays (nA = n) use `exp8` for
 * each full block of 8 and expf for the rest of the row, per-head decays (nA = 1) expf;
 * PyTorch's exp may differ in the last bit and move a value across a rounding boundary.
 * 8 lanes at a time where n % 16 == 0, scalar otherwise.
 */
static inline void dsq_row(int64_t row, int64_t l, int64_t d, int64_t n, int64_t g, int64_t nA, uint8_t *codes,
                           uint16_t *scales, const float *x, const float *dt, const float *A, const float *B,
                           const float *C, const float *s_n, const float *static_scale, int dynamic,
                           int per_byte, float qmax, float *y) {
    const int64_t per_group = d / g;
    const int64_t row_bytes = (n + per_byte - 1) / per_byte;
    const int packed = per_byte == 2;
    const int vec = n % 16 == 0, vec_io = vec && per_byte < 4;          /* 2-bit codes: scalar read/write */
    {
        const int64_t bi = row / d, c = row % d, gi = c / per_group;
        uint8_t *cr = codes + row * row_bytes;
        const float *Ar = A + c * nA;
        float h[n], q[n], dA[nA];
        float s = dynamic ? fp16_to_f32(scales[row]) : static_scale[c];
        int64_t k0 = 0;
        if (vec_io) {                                                       /* read */
            const f8 vs = f8_set1(s);
            for (int64_t k = 0; k < n; k += 16) {
                f8 v[2];
                if (packed) unpack16(cr + k / 2, &v[0], &v[1]);
                else {
                    v[0] = f8_from_i8(cr + k);
                    v[1] = f8_from_i8(cr + k + 8);
                }
                f8_store(h + k, f8_mul(f8_mul(v[0], vs), f8_load(s_n + k)));
                f8_store(h + k + 8, f8_mul(f8_mul(v[1], vs), f8_load(s_n + k + 8)));
            }
            k0 = n;
        }
        for (int64_t k = k0; k < n; k++) {
            int32_t v;
            if (per_byte == 4) {
                int32_t crumb = (cr[k >> 2] >> ((k & 3) * 2)) & 0x3;
                v = crumb > 1 ? crumb - 4 : crumb;
            } else if (packed) {
                int32_t nib = (cr[k >> 1] >> ((k & 1) * 4)) & 0xF;
                v = nib > 7 ? nib - 16 : nib;
            } else {
                v = (int8_t)cr[k];
            }
            h[k] = ((float)v * s) * s_n[k];
        }
        for (int64_t t = 0; t < l; t++) {
            const int64_t i = (bi * l + t) * d + c;                         /* x, dt, y */
            const float *Bt = B + ((bi * l + t) * g + gi) * n, *Ct = C + ((bi * l + t) * g + gi) * n;
            const float dtc = dt[i], dtx = dt[i] * x[i];
            int64_t ka = 0;
            for (const f8 vdt = f8_set1(dtc); ka + 8 <= nA; ka += 8)     /* per-state A (Mamba1) */
                f8_store(dA + ka, exp8(f8_mul(vdt, f8_load(Ar + ka))));
            for (; ka < nA; ka++) dA[ka] = expf(dtc * Ar[ka]);
            float amax = 0.0f;
            k0 = 0;
            if (vec) {
                const f8 vdtx = f8_set1(dtx);
                f8 vmax = f8_zero();
#ifdef QM_ISA_AVX512VNNI
                /* 16 lanes: the same operation on every element; the lane maxima fold to 8 (max is
                   exact, so the order does not matter for finite values) */
                const __m512 vdtx16 = _mm512_set1_ps(dtx);
                __m512 vmax16 = _mm512_setzero_ps();
                for (int64_t k = 0; k < n; k += 16) {
                    const __m512 da = nA == 1 ? _mm512_set1_ps(dA[0]) : _mm512_loadu_ps(dA + k);
                    __m512 hk = _mm512_add_ps(_mm512_mul_ps(da, _mm512_loadu_ps(h + k)),
                                              _mm512_mul_ps(vdtx16, _mm512_loadu_ps(Bt + k)));
                    hk = _mm512_div_ps(hk, _mm512_loadu_ps(s_n + k));
                    _mm512_storeu_ps(h + k, hk);
                    vmax16 = _mm512_max_ps(vmax16, _mm512_abs_ps(hk));
                }
                vmax = f8_max(lo8(vmax16), hi8(vmax16));
                (void)vdtx;
#else
                for (int64_t k = 0; k < n; k += 8) {          /* h keeps h / s_n: one division */
                    const f8 da = nA == 1 ? f8_set1(dA[0]) : f8_load(dA + k);
                    f8 hk = f8_add(f8_mul(da, f8_load(h + k)), f8_mul(vdtx, f8_load(Bt + k)));
                    hk = f8_div(hk, f8_load(s_n + k));
                    f8_store(h + k, hk);
                    vmax = f8_max(vmax, f8_abs(hk));
                }
#endif
                float m8[8];
                f8_store(m8, vmax);
                for (int j = 0; j < 8; j++) amax = m8[j] > amax ? m8[j] : amax;
                k0 = n;
            }
            for (int64_t k = k0; k < n; k++) {
                const float hk = dA[nA == 1 ? 0 : k] * h[k] + dtx * Bt[k];
                h[k] = hk;
                const float v = fabsf(hk / s_n[k]);
                amax = v > amax ? v : amax;
            }
            if (dynamic) {
                float sc = amax / qmax;
                sc = sc < 5.9604644775390625e-08f ? 5.9604644775390625e-08f : (sc > 65504.0f ? 65504.0f : sc);
                s = fp16_round(sc);
            }
            float acc = 0.0f;
            k0 = 0;
            if (vec) {
                const f8 vs = f8_set1(s), hi = f8_set1(qmax), lo = f8_set1(-qmax);
                f8 vacc = f8_zero();
#ifdef QM_ISA_AVX512VNNI
                /* 16 lanes, the products added into the 8 accumulators in the 8-lane order */
                const __m512 vs16 = _mm512_set1_ps(s), hi16 = _mm512_set1_ps(qmax), lo16 = _mm512_set1_ps(-qmax);
                for (int64_t k = 0; k < n; k += 16) {
                    __m512 v = _mm512_div_ps(_mm512_loadu_ps(h + k), vs16);
                    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    v = _mm512_min_ps(_mm512_max_ps(v, lo16), hi16);
                    _mm512_storeu_ps(q + k, v);
                    const __m512 hk = _mm512_mul_ps(_mm512_mul_ps(v, vs16), _mm512_loadu_ps(s_n + k));
                    _mm512_storeu_ps(h + k, hk);
                    const __m512 p = _mm512_mul_ps(hk, _mm512_loadu_ps(Ct + k));
                    vacc = f8_add(vacc, lo8(p));
                    vacc = f8_add(vacc, hi8(p));
                }
                (void)hi; (void)lo;
#else
                for (int64_t k = 0; k < n; k += 8) {
                    const f8 sn = f8_load(s_n + k);
                    f8 v = f8_div(f8_load(h + k), vs);
                    v = f8_round(v);
                    v = f8_min(f8_max(v, lo), hi);
                    f8_store(q + k, v);
                    const f8 hk = f8_mul(f8_mul(v, vs), sn);
                    f8_store(h + k, hk);
                    vacc = f8_add(vacc, f8_mul(hk, f8_load(Ct + k)));
                }
#endif
                acc = f8_hsum(vacc);
                k0 = n;
            }
            for (int64_t k = k0; k < n; k++) {
                float v = nearbyintf((h[k] / s_n[k]) / s);
                v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
                q[k] = v;
                h[k] = (v * s) * s_n[k];
                acc += h[k] * Ct[k];
            }
            y[i] = acc;
        }
        if (l > 0) {                                                        /* write */
            if (dynamic) scales[row] = f32_to_fp16(s);
            k0 = 0;
            if (vec_io) {
                for (int64_t k = 0; k < n; k += 16)
                    pack16(f8_load(q + k), f8_load(q + k + 8), packed ? cr + k / 2 : cr + k, packed);
                k0 = n;
            }
            for (int64_t k = k0; k < n; k++) {
                const int32_t qi = (int32_t)q[k];
                if (per_byte == 4) {
                    const int sh = (int)(k & 3) * 2;
                    cr[k >> 2] = (uint8_t)((cr[k >> 2] & ~(0x3 << sh)) | ((qi & 0x3) << sh));
                } else if (packed) {
                    if (k & 1) cr[k >> 1] = (uint8_t)((cr[k >> 1] & 0x0F) | ((qi & 0xF) << 4));
                    else cr[k >> 1] = (uint8_t)((cr[k >> 1] & 0xF0) | (qi & 0xF));
                } else {
                    cr[k] = (uint8_t)(int8_t)qi;
                }
            }
        }
    }
}

/* one sequence-channel row (`dsq_row`) per iteration, the rows shared out over the threads */
void dsq_scan(int64_t b, int64_t l, int64_t d, int64_t n, int64_t g, int64_t nA, uint8_t *codes,
              uint16_t *scales, const float *x, const float *dt, const float *A, const float *B,
              const float *C, const float *s_n, const float *static_scale, int dynamic, int per_byte,
              float qmax, float *y, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t row = 0; row < b * d; row++)
        dsq_row(row, l, d, n, g, nA, codes, scales, x, dt, A, B, C, s_n, static_scale, dynamic, per_byte, qmax, y);
}

/* ------------------------------------------------------------------ Mamba2 decode step, fused */
/* Symmetric 8-bit fake quantization with a static per-tensor scale, as `fake_quant` computes it:
 * clamp(round(x / s), -127, 127) * s (three roundings, in this order). */
static inline float fq8(float x, float s) {
    float v = nearbyintf(x / s);
    v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
    return v * s;
}

/* One token of Mamba2's depthwise causal conv on its int8 conv state (codes of the static conv
 * input scale s), in place, as the eager step computes it (models/mixer.py: quant_conv,
 * conv_read, conv_step, conv_write):
 *
 *   u      = fq8(xbc, s)                              the quantized conv input
 *   window = [state * s, u]                           (w values per channel)
 *   out    = ((0 + window_0 wt_0) + window_1 wt_1) + ... (+ bias)   (PyTorch's order for w < 8)
 *   state  = clamp(round(window[1:] / s), -127, 127)
 *
 * xbc (b, cd) with row stride xs (a slice of in_proj's output), state (b, cd, w - 1) int8,
 * weight (cd, w), bias (cd) or NULL, out (b, cd). */
/* one channel of it: st (w - 1) int8 codes updated in place, x the new input; returns the output */
static inline float conv_channel(int8_t *st, const float *wt, const float *bias, int64_t w, float x, float s) {
    float win[w];
    for (int64_t k = 0; k < w - 1; k++) win[k] = (float)st[k] * s;
    win[w - 1] = fq8(x, s);
    float acc = 0.0f;
    for (int64_t k = 0; k < w; k++) acc = acc + win[k] * wt[k];
    for (int64_t k = 0; k < w - 1; k++) {
        float v = nearbyintf(win[k + 1] / s);
        st[k] = (int8_t)(v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v));
    }
    return bias ? acc + *bias : acc;
}

void mamba2_conv_step(int64_t b, int64_t cd, int64_t w, const float *xbc, int64_t xs, float s,
                      int8_t *state, const float *weight, const float *bias, float *out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (b * cd >= 65536)
    for (int64_t row = 0; row < b * cd; row++) {
        const int64_t bi = row / cd, c = row % cd;
        out[row] = conv_channel(state + row * (w - 1), weight + c * w, bias ? bias + c : NULL, w, xbc[bi * xs + c], s);
    }
}

/* The SSM part of one Mamba2 decode token after the conv's SiLU, as the eager step computes it
 * (models/mamba2.py `step`: quant_x, quant_B, quant_C, quant_dt, the state update, D x, quant_z):
 *
 *   x, B, C = fq8 of the conv output's three parts (scales sx, sB, sC); dt = fq8(dt, sdt)
 *   y       = dsq_scan of one token (x, dt per channel: each head's repeated over its headdim)
 *   y       = y + D x;   zq = fq8(z, sz)
 *
 * xbc (b, cd = d + 2 g n) contiguous; dt (b, h) after softplus (and the dt limit); z (b, d) with
 * row stride zs; A (d, 1); D (d); codes, scales, s_n, s_c, dynamic, per_byte, qmax as dsq_scan;
 * y, zq (b, d). Scratch: the quantized x, dt, B, C (what dsq_scan reads). */
void mamba2_ssm_step(int64_t b, int64_t d, int64_t n, int64_t g, int64_t headdim, const float *xbc,
                     const float *dt, const float *z, int64_t zs, float sx, float sB, float sC, float sdt,
                     float sz, const float *A, const float *D, uint8_t *codes, uint16_t *scales,
                     const float *s_n, const float *s_c, int dynamic, int per_byte, float qmax,
                     float *y, float *zq, float *scratch, int nthreads) {
    const int64_t cd = d + 2 * g * n, h = d / headdim;
    float *xq = scratch, *dtq = xq + b * d, *Bq = dtq + b * d, *Cq = Bq + b * g * n;
    for (int64_t bi = 0; bi < b; bi++) {
        const float *r = xbc + bi * cd;
        for (int64_t c = 0; c < d; c++) xq[bi * d + c] = fq8(r[c], sx);
        for (int64_t k = 0; k < g * n; k++) {
            Bq[bi * g * n + k] = fq8(r[d + k], sB);
            Cq[bi * g * n + k] = fq8(r[d + g * n + k], sC);
        }
        for (int64_t hh = 0; hh < h; hh++) {
            const float v = fq8(dt[bi * h + hh], sdt);
            for (int64_t p = 0; p < headdim; p++) dtq[bi * d + hh * headdim + p] = v;
        }
    }
    dsq_scan(b, 1, d, n, g, 1, codes, scales, xq, dtq, A, Bq, Cq, s_n, s_c, dynamic, per_byte, qmax, y,
             nthreads);
    for (int64_t bi = 0; bi < b; bi++)
        for (int64_t c = 0; c < d; c++) {
            const int64_t i = bi * d + c;
            y[i] = y[i] + D[c] * xq[i];
            zq[i] = fq8(z[bi * zs + c], sz);
        }
}

/* ------------------------------------------------------------------ Mamba2 model step, whole */
/* Float64 evaluation of the functions whose float32 results depend on a library's exp and on
 * a reduction's order: in integer execution the model computes them in float64 and rounds once
 * to float32 (qmamba/models/layers.py), so any two correct implementations agree in float32
 * unless a value falls within about 2^-52 (relative) of a float32 rounding boundary. */
static inline double silu_d(double x) { return x / (1.0 + exp(-x)); }
static inline double softplus_d(double x) { return x > 20.0 ? x : log1p(exp(x)); }

/* out[i] = w[i] * f32(x[i] * r), r = 1 / sqrt(sum_i x[i]^2 / k + eps) in float64 */
static inline void rms_norm_d(int64_t k, const float *x, const float *w, double eps, float *out) {
    double ss = 0.0;
    for (int64_t i = 0; i < k; i++) ss += (double)x[i] * (double)x[i];
    const double r = 1.0 / sqrt(ss / (double)k + eps);
    for (int64_t i = 0; i < k; i++) out[i] = w[i] * (float)((double)x[i] * r);
}

/* One Mamba2 block of the quantized model in integer execution (W8A8, static 8-bit quantizers
 * at the SSM inputs, an int8 conv state, an integer SSM state), as `Block.step` computes it:
 *
 *   u    = RMSNorm(hidden)                          (float64, rounded once)
 *   zxbcdt = i8_linear(quant(u), in_proj)           z (d), xBC (cd = d + 2 g n), dt (h)
 *   xBC  = silu(conv_step(fq8(xBC, s_conv), conv state))  (float64 SiLU)
 *   x, B, C = fq8 of xBC's parts; dt = fq8(clamp(softplus(dt + dt_bias)), sdt)
 *   y    = dsq_row of one token + D x;  zq = fq8(z, sz)
 *   y    = GatedRMSNorm(y, zq)                      (y silu(zq), float64, per group)
 *   hidden = hidden + i8_linear(quant(y), out_proj)
 *
 * The fields mirror qmamba/quant/native_decode.py's ctypes Structure field for field;
 * `qm_mamba2_layer_size` lets the loader check that both agree. */
typedef struct {
    int64_t D, d, n, g, headdim, w;       /* d_model, d_inner, d_state, groups, head size, conv width */
    const float *norm_w; double norm_eps;
    const int8_t *in_w; const int32_t *in_sums; const float *in_sw; int64_t in_gs; const float *in_bias;
    float in_sx; int32_t in_dynamic;
    const float *dt_bias; float dt_lo, dt_hi;
    float s_conv, sx, sB, sC, sdt, sz;
    int8_t *conv_state; const float *conv_w; const float *conv_b;
    const float *A; const float *Dskip;
    uint8_t *codes; uint16_t *scales; const float *s_n; const float *s_c;
    int32_t dynamic, per_byte; float qmax;
    const float *gnorm_w; int64_t group_size; double gnorm_eps;
    const int8_t *out_w; const int32_t *out_sums; const float *out_sw; int64_t out_gs; const float *out_bias;
    float out_sx; int32_t out_dynamic;
} qm_mamba2_layer;

int64_t qm_mamba2_layer_size(void) { return (int64_t)sizeof(qm_mamba2_layer); }

/* All `nl` layers for one token of b sequences: hidden (b, D) float32, the residual stream,
 * updated in place; every layer's conv state, codes and scales updated in place; `scratch`
 * (mamba2_model_step_scratch bytes, 8-byte aligned) is the caller's: no allocation per token,
 * which fragments the C heap. One parallel region for the whole token: the threads share out
 * the rows of the two products, the conv channels and the state rows; the norms run on one
 * thread. */
/* the scratch of one token: the largest layer's sizes (float parts, then the gate in double, then
 * the int8 activations); `mamba2_model_step_scratch` gives its size in bytes */
typedef struct { int64_t D, nin, d, gn; } qm_sizes;

static qm_sizes max_sizes(int64_t nl, const qm_mamba2_layer *layers) {
    qm_sizes m = {0, 0, 0, 0};
    for (int64_t i = 0; i < nl; i++) {
        const qm_mamba2_layer *L = &layers[i];
        const int64_t nin = 2 * L->d + 2 * L->g * L->n + L->d / L->headdim;
        m.D = L->D > m.D ? L->D : m.D;
        m.d = L->d > m.d ? L->d : m.d;
        m.gn = L->g * L->n > m.gn ? L->g * L->n : m.gn;
        m.nin = nin > m.nin ? nin : m.nin;
    }
    return m;
}

static int64_t scratch_floats(qm_sizes m, int64_t b) { return b * (m.D + m.nin + 3 * m.d + 2 * m.gn + 2); }

int64_t mamba2_model_step_scratch(int64_t nl, const qm_mamba2_layer *layers, int64_t b) {
    const qm_sizes m = max_sizes(nl, layers);
    const int64_t f = (scratch_floats(m, b) + 1) / 2 * 2;             /* doubles 8-byte aligned */
    return 4 * f + 8 * b * m.d + b * (m.D > m.d ? m.D : m.d);
}

void mamba2_model_step(int64_t nl, const qm_mamba2_layer *layers, int64_t b, float *hidden, void *scratch,
                       int nthreads) {
    const qm_sizes m = max_sizes(nl, layers);
    const int64_t D = m.D, nin = m.nin, d = m.d, gn = m.gn;
    float *u = (float *)scratch;
    float *zx = u + b * D, *xq = zx + b * nin, *dtq = xq + b * d, *y = dtq + b * d;
    float *Bq = y + b * d, *Cq = Bq + b * gn, *sx = Cq + b * gn;
    double *gate = (double *)(u + (scratch_floats(m, b) + 1) / 2 * 2);
    int8_t *q = (int8_t *)(gate + b * d);
    #pragma omp parallel num_threads(nthreads)
    for (int64_t li = 0; li < nl; li++) {
        const qm_mamba2_layer *L = &layers[li];
        const int64_t dl = L->d, n = L->n, g = L->g, gnl = g * n, cdl = dl + 2 * gnl;
        const int64_t h = dl / L->headdim, N = dl + cdl + h, w = L->w;
        #pragma omp single
        for (int64_t bi = 0; bi < b; bi++) {
            rms_norm_d(L->D, hidden + bi * L->D, L->norm_w, L->norm_eps, u + bi * L->D);
            quantize_rows(1, L->D, u + bi * L->D, L->in_sx, L->in_dynamic, q + bi * L->D, sx + bi);
        }
        i8_linear_rows(b, N, L->D, q, sx, L->in_w, L->in_sums, L->in_sw, L->in_gs, L->in_bias, zx, NULL);
        /* the conv channels (their SiLU and quantizer), then the heads' dt */
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < b * (cdl + h); it++) {
            const int64_t bi = it / (cdl + h), c = it % (cdl + h);
            const float *row = zx + bi * N;
            if (c >= cdl) {
                const int64_t hh = c - cdl;
                float v = (float)softplus_d((double)(row[dl + cdl + hh] + L->dt_bias[hh]));
                v = v < L->dt_lo ? L->dt_lo : (v > L->dt_hi ? L->dt_hi : v);
                v = fq8(v, L->sdt);
                for (int64_t p = 0; p < L->headdim; p++) dtq[bi * dl + hh * L->headdim + p] = v;
                continue;
            }
            const float acc = conv_channel(L->conv_state + (bi * cdl + c) * (w - 1), L->conv_w + c * w,
                                           L->conv_b ? L->conv_b + c : NULL, w, row[dl + c], L->s_conv);
            const float a = (float)silu_d((double)acc);
            if (c < dl) xq[bi * dl + c] = fq8(a, L->sx);
            else if (c < dl + gnl) Bq[bi * gnl + c - dl] = fq8(a, L->sB);
            else Cq[bi * gnl + c - dl - gnl] = fq8(a, L->sC);
        }
        /* the state rows, D x and the gate */
        #pragma omp for schedule(static)
        for (int64_t row = 0; row < b * dl; row++) {
            const int64_t bi = row / dl, c = row % dl;
            dsq_row(row, 1, dl, n, g, 1, L->codes, L->scales, xq, dtq, L->A, Bq, Cq, L->s_n, L->s_c, L->dynamic,
                    L->per_byte, L->qmax, y);
            y[row] = y[row] + L->Dskip[c] * xq[row];
            const float zq = fq8(zx[bi * N + c], L->sz);
            gate[row] = (double)y[row] * silu_d((double)zq);
        }
        #pragma omp single
        for (int64_t bi = 0; bi < b; bi++) {
            for (int64_t g0 = 0; g0 < dl; g0 += L->group_size) {
                const double *gr = gate + bi * dl + g0;
                double ss = 0.0;
                for (int64_t k = 0; k < L->group_size; k++) ss += gr[k] * gr[k];
                const double r = 1.0 / sqrt(ss / (double)L->group_size + L->gnorm_eps);
                for (int64_t k = 0; k < L->group_size; k++)
                    y[bi * dl + g0 + k] = L->gnorm_w[g0 + k] * (float)(gr[k] * r);
            }
            quantize_rows(1, dl, y + bi * dl, L->out_sx, L->out_dynamic, q + bi * dl, sx + bi);
        }
        i8_linear_rows(b, L->D, dl, q, sx, L->out_w, L->out_sums, L->out_sw, L->out_gs, L->out_bias, NULL, hidden);
    }
}
