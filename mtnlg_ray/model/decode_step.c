/* One KV-cached decode step of a GPT on a CPU, fused into one call (model/native_step.py builds
 * and loads this file). B rows each feed one token; every row has its own cache row and length.
 *
 * A decode step reads every weight once and does little arithmetic, so its time is the weights
 * streamed from memory plus whatever runs between the products. Here the whole step is one OpenMP
 * parallel region: each product is split by output rows over the threads (AVX2 FMA kernels that
 * keep a few weight rows and a few batch rows in registers), small work (LayerNorm, embedding)
 * runs on one thread, and threads meet at a barrier only where a result is needed by all.
 *
 * Shapes: d = n_heads * head_dim, x and h (B, d), qkv (B, 3d) as [q | k | v] with head h at
 * h*head_dim, u (B, d_mlp), logits (B, V). Caches k, v (n_layers, slots, n_heads, max_len,
 * head_dim) contiguous float32. Products: float32 (out, in) row-major, or int8 (out, in) with one
 * float32 scale per output row (W ~= scale[o] * Q[o, :]; activations stay float32).
 * Requires in % 8 == 0 and head_dim % 8 == 0 (checked by the loader).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>

enum { F32_ROWS = 0, I8_ROWS = 1 };

typedef struct {
    const void *w;       /* weights, see the kinds above */
    const float *scale;  /* (out,) int8 scales, else NULL */
    const float *bias;   /* (out,) or NULL */
    int64_t out, in;
    int64_t kind;
} Mat;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b; /* biases may be NULL */
    Mat qkv, proj, up, down;
    int64_t cache_layer; /* the block's index in the cache */
} Layer;

typedef struct {
    int64_t n_layers, d, n_heads, head_dim, d_mlp, vocab, max_pos; /* max_pos: positions the model has */
    double eps;
    const float *tok_emb; int64_t emb_s0, emb_s1; /* element (t, i) at t*s0 + i*s1 */
    const float *pos_emb;                         /* (max_seq_len, d) or NULL */
    const float *rope_cos, *rope_sin;             /* (max_seq_len, head_dim/2) or NULL */
    const float *lnf_w, *lnf_b;
    Mat head;
    const Layer *layers;
} Model;

typedef struct { /* the KV cache the step reads and writes */
    float *k, *v;
    int64_t *lengths; /* (slots,) tokens cached per row */
    int64_t slots, max_len;
} Cache;

/* ---- vector math ---- */

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* exp(x) for 8 floats, Cephes' polynomial: relative error ~1e-7 on [-87, 88] */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* tanh GELU as x * sigmoid(2u), u = C (x + K x^3) (gpt.gelu_tanh) */
static void gelu(float *y, int64_t n) {
    const __m256 c2 = _mm256_set1_ps(2 * 0.7978845608028654f), k = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(y + i);
        __m256 two_u = _mm256_mul_ps(_mm256_mul_ps(c2, x), _mm256_fmadd_ps(_mm256_mul_ps(k, x), x, one));
        __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), two_u))));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(x, s));
    }
    for (; i < n; i++) {
        float x = y[i], two_u = 2 * 0.7978845608028654f * (x + 0.044715f * x * x * x);
        y[i] = x / (1.0f + expf(-two_u));
    }
}

static void layer_norm(const float *x, float *y, int64_t B, int64_t d, const float *w, const float *b, double eps) {
    for (int64_t r = 0; r < B; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        double mean = 0, var = 0;
        for (int64_t i = 0; i < d; i++) mean += xr[i];
        mean /= d;
        for (int64_t i = 0; i < d; i++) var += (xr[i] - mean) * (xr[i] - mean);
        float inv = (float)(1.0 / sqrt(var / d + eps)), m = (float)mean;
        for (int64_t i = 0; i < d; i++) yr[i] = (xr[i] - m) * inv * w[i] + (b ? b[i] : 0.0f);
    }
}

/* ---- products ---- */

static inline __m256 load8(const void *w, int I8, int64_t off) {
    if (I8) {
        __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + off));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    }
    return _mm256_loadu_ps((const float *)w + off);
}

/* row-major kinds: dots[r][b] = W[o + r] . X[b] for R weight rows and NB batch rows, in registers.
 * A batch row's 8 floats are loaded right before their R FMAs, so R x NB accumulators + R weights +
 * one x fit the 16 ymm registers up to 2 x 6 (a 5- or 6-row step is one pass over the weights, not
 * a 4-row pass plus a 1- or 2-row one whose few accumulator chains wait on FMA latency). */
enum { MAX_NB = 6 };
/* Tiles of several batch rows do several FMAs per weight byte, so the hardware prefetchers fall
 * behind their interleaved row streams: weights that come from memory rather than cache (a batch of
 * 8 on 6 x 384, 124M) streamed at 7-10 GB/s on one core against 18-19 GB/s for one batch row. Each
 * such tile prefetches the rows PREFETCH_ROWS further on: 1.2-1.25x the tokens/s of batch-8 decoding
 * in float32 (int8 rows, a quarter the bytes, gain nothing measurable). One batch row streams
 * without it (software prefetching slowed it). Prefetches past the last row are harmless (they never fault). */
enum { PREFETCH_ROWS = 4 };
static inline __attribute__((always_inline)) void rows_tile(const void *w, int I8, int64_t in, int64_t o,
                                                            const float *X, int64_t ldx, int R, int NB,
                                                            float dots[4][MAX_NB]) {
    __m256 acc[4][MAX_NB];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 6") for (int b = 0; b < NB; b++) acc[r][b] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; i += 8) {
        if (NB > 1 && (i & (I8 ? 63 : 15)) == 0) /* once per 64-byte line of each row PREFETCH_ROWS on */
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)w + ((o + r + PREFETCH_ROWS) * in + i) * (I8 ? 1 : 4), _MM_HINT_T0);
        __m256 wv[4];
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) wv[r] = load8(w, I8, (o + r) * in + i);
        _Pragma("GCC unroll 6") for (int b = 0; b < NB; b++) {
            __m256 xv = _mm256_loadu_ps(X + b * ldx + i);
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[r][b] = _mm256_fmadd_ps(wv[r], xv, acc[r][b]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 6") for (int b = 0; b < NB; b++) dots[r][b] = hsum(acc[r][b]);
}

#define TILE(I8, R, NB) case R * 10 + NB: rows_tile(m->w, I8, m->in, o, X, ldx, R, NB, dots); break;
#define TILES(I8) TILE(I8, 4, 1) TILE(I8, 4, 2) TILE(I8, 4, 3) TILE(I8, 4, 4) TILE(I8, 2, 1) TILE(I8, 2, 2) \
    TILE(I8, 2, 3) TILE(I8, 2, 4) TILE(I8, 2, 5) TILE(I8, 2, 6) TILE(I8, 1, 1) TILE(I8, 1, 2) TILE(I8, 1, 3) \
    TILE(I8, 1, 4) TILE(I8, 1, 5) TILE(I8, 1, 6)
/* R in {1, 2, 4} weight rows x NB batch rows (1..4 with 4 weight rows, 1..6 with 1 or 2), each its
 * own unrolled kernel */
static void rows_tile_any(const Mat *m, int64_t o, const float *X, int64_t ldx, int R, int NB,
                          float dots[4][MAX_NB]) {
    if (m->kind == I8_ROWS)
        switch (R * 10 + NB) { TILES(1) }
    else
        switch (R * 10 + NB) { TILES(0) }
}
#undef TILES
#undef TILE

/* one batch row against weight row o with 4 accumulators: the row is read as one sequential stream.
 * For one batch row and weight rows of at most SHORT_ROW_BYTES this streams faster than the
 * 4-row tiles, whose 4 interleaved streams of a row each the prefetchers follow less well (6 x 384
 * model, batch 1: 1.3-1.4x the steps per second in float32, 1.5x in int8); for longer rows the
 * tiles are as fast or faster. */
enum { SHORT_ROW_BYTES = 2048 };
static inline __attribute__((always_inline)) float row_dot(const void *w, int I8, int64_t in, int64_t o,
                                                           const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t base = o * in;
    int64_t i = 0;
    for (; i + 32 <= in; i += 32) {
        a0 = _mm256_fmadd_ps(load8(w, I8, base + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load8(w, I8, base + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w, I8, base + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w, I8, base + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i < in; i += 8) a0 = _mm256_fmadd_ps(load8(w, I8, base + i), _mm256_loadu_ps(x + i), a0);
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

enum { STORE = 0, ADD = 1, GELU = 2 }; /* Y = XW^T + b, Y += XW^T + b, Y = gelu(XW^T + b) */

/* bias, then GELU, over columns [lo, hi) of Y's B rows */
static void epilogue(const Mat *m, float *Y, int64_t ldy, int64_t B, int64_t lo, int64_t hi, int mode) {
    for (int64_t b = 0; b < B; b++) {
        float *y = Y + b * ldy;
        if (m->bias)
            for (int64_t o = lo; o < hi; o++) y[o] += m->bias[o];
        if (mode == GELU) gelu(y + lo, hi - lo);
    }
}

/* columns [lo, hi) of Y for X (B, in) with row stride ldx, Y with row stride ldy */
static void product(const Mat *m, const float *X, int64_t ldx, int64_t B, float *Y, int64_t ldy,
                    int64_t lo, int64_t hi, int mode) {
    if (lo >= hi) return;
    if (B == 1 && m->in * (m->kind == I8_ROWS ? 1 : 4) <= SHORT_ROW_BYTES) {
        for (int64_t o = lo; o < hi; o++) {
            float s = m->kind == I8_ROWS ? row_dot(m->w, 1, m->in, o, X) : row_dot(m->w, 0, m->in, o, X);
            if (m->scale) s *= m->scale[o];
            Y[o] = mode == ADD ? Y[o] + s : s;
        }
        epilogue(m, Y, ldy, B, lo, hi, mode);
        return;
    }
    /* weight tiles outermost: a tile is read from memory once and from cache for every batch tile */
    int R = B <= 2 ? 4 : 2; /* weight rows per tile: 4 streams for one row, registers for more */
    /* batch tiles as even as MAX_NB allows (7 rows: 4 + 3, not 6 + 1) */
    int64_t tiles = (B + MAX_NB - 1) / MAX_NB, per = (B + tiles - 1) / tiles;
    for (int64_t o = lo; o < hi;) {
        int r_n = hi - o < R ? (int)(hi - o) : R;
        if (r_n == 3) r_n = 2; /* tiles of 4, 2 or 1 rows */
        for (int64_t b0 = 0; b0 < B; b0 += per) {
            int nb = B - b0 < per ? (int)(B - b0) : (int)per;
            float dots[4][MAX_NB];
            rows_tile_any(m, o, X + b0 * ldx, ldx, r_n, nb, dots);
            for (int r = 0; r < r_n; r++)
                for (int b = 0; b < nb; b++) {
                    float s = m->scale ? dots[r][b] * m->scale[o + r] : dots[r][b];
                    float *y = Y + (b0 + b) * ldy + o + r;
                    if (mode == ADD) *y += s; else *y = s;
                }
        }
        o += r_n;
    }
    epilogue(m, Y, ldy, B, lo, hi, mode);
}

/* this thread's share [lo, hi) of n outputs, in multiples of `align` */
static void share(int64_t n, int64_t align, int64_t *lo, int64_t *hi) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t units = (n + align - 1) / align, per = units / nt, extra = units % nt;
    int64_t a = t * per + (t < extra ? t : extra), c = per + (t < extra);
    *lo = a * align < n ? a * align : n;
    *hi = (a + c) * align < n ? (a + c) * align : n;
}

static void parallel_product(const Mat *m, const float *X, int64_t ldx, int64_t B, float *Y, int64_t ldy, int mode) {
    int64_t lo, hi;
    share(m->out, 4, &lo, &hi);
    product(m, X, ldx, B, Y, ldy, lo, hi, mode);
}

/* ---- attention for one (token, head) ---- */

/* NeoX half-split rotation at `pos` (gpt.apply_rotary), or a copy without rotary positions */
static void rotate(const Model *m, const float *x, int64_t pos, float *y) {
    const int64_t hs = m->head_dim, half = hs / 2;
    if (!m->rope_cos) {
        for (int64_t i = 0; i < hs; i++) y[i] = x[i];
        return;
    }
    const float *cs = m->rope_cos + pos * half, *sn = m->rope_sin + pos * half;
    for (int64_t i = 0; i < half; i++) {
        y[i] = x[i] * cs[i] - x[i + half] * sn[i];
        y[i + half] = x[i + half] * cs[i] + x[i] * sn[i];
    }
}

static int64_t cache_base(const Model *m, const Cache *c, const Layer *L, int64_t row, int64_t h) {
    return (((L->cache_layer * c->slots + row) * m->n_heads + h) * c->max_len) * m->head_dim;
}

/* write the token's k (rotated) and v for head h at `pos` of cache row `row` */
static void write_kv(const Model *m, const Cache *c, const Layer *L, const float *qkv, int64_t row, int64_t pos,
                     int64_t h) {
    const int64_t d = m->d, hs = m->head_dim, base = cache_base(m, c, L, row, h) + pos * hs;
    rotate(m, qkv + d + h * hs, pos, c->k + base);
    for (int64_t i = 0; i < hs; i++) c->v[base + i] = qkv[2 * d + h * hs + i];
}

/* the token's head-h attention over positions 0..pos of its cache row (its own k, v written) */
static void attend(const Model *m, const Cache *c, const Layer *L, const float *qkv, int64_t row, int64_t pos,
                   int64_t h, float *out) {
    const int64_t hs = m->head_dim, base = cache_base(m, c, L, row, h);
    const float *K = c->k + base, *V = c->v + base;
    float q[hs];
    rotate(m, qkv + h * hs, pos, q);

    /* online softmax over chunks of 64 keys: running max mx, sum l, output acc (hs) */
    const float scale = 1.0f / sqrtf((float)hs);
    float acc[hs], sc[64], mx = -INFINITY, l = 0;
    for (int64_t i = 0; i < hs; i++) acc[i] = 0;
    for (int64_t j0 = 0; j0 <= pos; j0 += 64) {
        int64_t n = pos + 1 - j0 < 64 ? pos + 1 - j0 : 64;
        float cmax = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            const float *kj = K + (j0 + j) * hs;
            __m256 a = _mm256_setzero_ps();
            for (int64_t i = 0; i < hs; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kj + i), a);
            sc[j] = hsum(a) * scale;
            cmax = sc[j] > cmax ? sc[j] : cmax;
        }
        float nmx = cmax > mx ? cmax : mx, corr = expf(mx - nmx);
        int64_t j = 0;
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(sc + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), _mm256_set1_ps(nmx))));
        for (; j < n; j++) sc[j] = expf(sc[j] - nmx);
        l *= corr;
        for (int64_t i = 0; i < hs; i++) acc[i] *= corr;
        for (j = 0; j < n; j++) {
            const float *vj = V + (j0 + j) * hs;
            __m256 p = _mm256_set1_ps(sc[j]);
            l += sc[j];
            for (int64_t i = 0; i < hs; i += 8)
                _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(acc + i)));
        }
        mx = nmx;
    }
    for (int64_t i = 0; i < hs; i++) out[h * hs + i] = acc[i] / l;
}

/* floats of workspace a step of B rows needs */
int64_t mt_workspace_floats(const Model *m, int64_t B) {
    return B * (3 * m->d + 3 * m->d + m->d_mlp);
}

/* ids (B, T): T new tokens for each of the cache rows `rows` (B,) (NULL: rows 0..B-1), each row
 * continuing at its own length; logits (B, T, V). The N = B T tokens are the rows of every product;
 * token t of row b sits at position length + t and attends to the row's positions up to its own.
 * Writes k, v of every token in every layer and advances the rows' lengths by T. Returns -1, or
 * (before doing anything) the first position the cache or the model has no room for. */
int64_t mt_decode_step(const Model *m, const Cache *c, const int64_t *ids, const int64_t *rows, int64_t B,
                       int64_t T, float *logits, float *work, int nthreads) {
    const int64_t N = B * T, d = m->d, H = m->n_heads;
    int64_t pos[N], row[N]; /* each token's position and cache row */
    for (int64_t n = 0; n < N; n++) {
        row[n] = rows ? rows[n / T] : n / T;
        pos[n] = c->lengths[row[n]] + n % T;
        if (pos[n] >= c->max_len || pos[n] >= m->max_pos) return pos[n];
    }
    float *x = work, *h = x + N * d, *att = h + N * d, *qkv = att + N * d, *u = qkv + 3 * N * d;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp single
        for (int64_t n = 0; n < N; n++) /* embedding (+ learned position) */
            for (int64_t i = 0; i < d; i++)
                x[n * d + i] = m->tok_emb[ids[n] * m->emb_s0 + i * m->emb_s1]
                               + (m->pos_emb ? m->pos_emb[pos[n] * d + i] : 0.0f);
        for (int64_t l = 0; l < m->n_layers; l++) {
            const Layer *L = m->layers + l;
            #pragma omp single
            layer_norm(x, h, N, d, L->ln1_w, L->ln1_b, m->eps);
            parallel_product(&L->qkv, h, d, N, qkv, 3 * d, STORE);
            #pragma omp barrier
            #pragma omp for schedule(static) /* every token's k, v first: a later token reads them */
            for (int64_t p = 0; p < N * H; p++)
                write_kv(m, c, L, qkv + (p / H) * 3 * d, row[p / H], pos[p / H], p % H);
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < N * H; p++)
                attend(m, c, L, qkv + (p / H) * 3 * d, row[p / H], pos[p / H], p % H, att + (p / H) * d);
            parallel_product(&L->proj, att, d, N, x, d, ADD);
            #pragma omp barrier
            #pragma omp single
            layer_norm(x, h, N, d, L->ln2_w, L->ln2_b, m->eps);
            parallel_product(&L->up, h, d, N, u, m->d_mlp, GELU);
            #pragma omp barrier
            parallel_product(&L->down, u, m->d_mlp, N, x, d, ADD);
            #pragma omp barrier
        }
        #pragma omp single
        layer_norm(x, h, N, d, m->lnf_w, m->lnf_b, m->eps);
        parallel_product(&m->head, h, d, N, logits, m->vocab, STORE);
    }
    for (int64_t b = 0; b < B; b++) c->lengths[rows ? rows[b] : b] += T;
    return -1;
}
