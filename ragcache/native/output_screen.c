/* The greedy token of a decode step without reading the whole output layer: included by
 * skinny_gemm.c (it uses the packed copies, the helper thread and packed_rows).
 *
 * Why: a greedy step needs only the argmax of its logits, yet the output layer is the largest
 * weight a step reads (Gemma 3 270M: 671 MB of its 1.07 GB, a 262,144-word vocabulary), and on
 * this machine a decode step is bound by reading weights. Here a greedy step (each of its rows:
 * up to 8, a batch or a short speculative verify) reads an 8-bit copy of the output weight (a
 * quarter of the bytes) to score every word, with a proven bound on how far each score can be
 * from the logit the full product would give; only the 16-word blocks that can hold the argmax
 * are then computed exactly, from the packed copy by the same code as the full product
 * (packed_rows), so their logits have the full product's bits. Every other logit is returned as
 * -inf: provably below the largest by a margin no rounding of `logits - logsumexp(logits)` can
 * close, so the argmax (mlx-lm's greedy rule, taken on log-probabilities) is the token the full
 * product would give. Where the margin is not proven (two top logits within a few ulps, too many
 * blocks near the top, a non-finite input), the step computes the full product instead.
 *
 * The bound, for one row h (k inputs) and word i (weights e_i, 8-bit copy q_i times scale_i):
 *   the full product's logit c_i = fl(h . e_i) is within G |h| |e_i| of h . e_i (any order of
 *     k products and sums; G = gamma(4k) = 4ku / (1 - 4ku), u = 2^-24, generous for the blocked
 *     FMA chains);
 *   h . e_i is within |h| R_i of h . (scale_i q_i), R_i = |e_i - scale_i q_i|;
 *   the score s_i = fl(sum h_j q_ij) * scale_i (the product in double: exact) is within
 *     G |h| (|e_i| + R_i) of h . (scale_i q_i).
 * So |c_i - s_i| <= |h| bound_i with bound_i = R_i + G (2 |e_i| + R_i), computed once per word in
 * double and rounded up. With lowest = max_i (s_i - |h| bound_i), a word whose s_i + |h| bound_i
 * is below lowest - margin has a logit below the largest by more than `margin`. */

typedef struct screen {
  int8_t *q;     /* [block of 16 words][k][16], as the packed copy's layout */
  float *scale; /* per word, 16-word blocks padded: scale 0 */
  float *bound; /* per word: bound_i above; padding +inf (a lower bound of -inf, never taken) */
  int n, k;
} screen_t;

#define SCREEN_ROWS 8 /* rows a screened product takes: decode batches, short verifies */
static long screened_products = 0, screen_fallbacks = 0, screen_blocks = 0; /* rows, blocks */

static long screen_size(const screen_t *s) {
  size_t words = (size_t)(s->n + 15) / 16 * 16; /* blocks of 16, padded */
  return (long)(words * (size_t)s->k * sizeof(int8_t) + 2 * words * sizeof(float));
}

static void screen_free(screen_t *s) {
  if (!s) return;
  free(s->q), free(s->scale), free(s->bound), free(s);
}

static double screen_gamma(int k) {
  double ku = 4.0 * k * ldexp(1.0, -24);
  return ku / (1.0 - ku);
}

/* The 8-bit copy of weight b (n x k, leading dim ldb) and its bounds; NULL: no memory, or a
 * weight that is not finite. */
static screen_t *screen_build(const float *b, int n, int k, int ldb) {
  screen_t *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  int blocks = (n + 15) / 16;
  s->n = n, s->k = k;
  s->q = aligned_alloc(64, ((size_t)blocks * 16 * k * sizeof(int8_t) + 63) / 64 * 64);
  s->scale = aligned_alloc(64, sizeof(float) * (size_t)blocks * 16);
  s->bound = aligned_alloc(64, sizeof(float) * (size_t)blocks * 16);
  if (!s->q || !s->scale || !s->bound) {
    screen_free(s);
    return NULL;
  }
  memset(s->q, 0, (size_t)blocks * 16 * k * sizeof(int8_t));
  for (int i = n; i < blocks * 16; i++) s->scale[i] = 0.0f, s->bound[i] = INFINITY;
  double g = screen_gamma(k);
  for (int i = 0; i < n; i++) {
    const float *row = b + (size_t)i * ldb;
    float most = 0.0f;
    for (int kk = 0; kk < k; kk++) {
      if (!isfinite(row[kk])) {
        screen_free(s);
        return NULL;
      }
      float x = fabsf(row[kk]);
      if (x > most) most = x;
    }
    float scale = most / 127.0f;
    double norm2 = 0.0, err2 = 0.0;
    int8_t *dst = s->q + ((size_t)(i / 16) * k) * 16 + i % 16;
    for (int kk = 0; kk < k; kk++) {
      long v = scale > 0.0f ? lrint((double)row[kk] / scale) : 0;
      if (v > 127) v = 127;
      if (v < -127) v = -127;
      dst[(size_t)kk * 16] = (int8_t)v;
      double d = (double)row[kk] - (double)v * (double)scale;
      norm2 += (double)row[kk] * row[kk], err2 += d * d;
    }
    double norm = sqrt(norm2) * (1.0 + 1e-12), err = sqrt(err2) * (1.0 + 1e-12);
    s->scale[i] = scale;
    s->bound[i] = nextafterf((float)((err + g * (2.0 * norm + err)) * (1.0 + 1e-9)), INFINITY);
  }
  return s;
}

/* Screen scores of words j .. j+15 for rows r0 .. r0+R-1 (R <= 4 a constant where inlined):
 * the block's int8 weights are converted once for all R rows. One row gets four chains (even and
 * odd inputs) to keep the FMA units busy, more rows two each; their order is free, the bound
 * covers any. */
static inline __attribute__((always_inline)) void screen_rows(const int R, int r0, int j,
                                                              const job_t *w, double *lowest) {
  const screen_t *s = w->screen;
  const int k = s->k;
  const int8_t *p = s->q + (size_t)j * k;
  __m256 lo[4][2], hi[4][2];
  for (int r = 0; r < R; r++)
    for (int t = 0; t < 2; t++) lo[r][t] = hi[r][t] = _mm256_setzero_ps();
#define SCREEN_INPUT(kk, t)                                                                  \
  do {                                                                                       \
    __m128i q = _mm_load_si128((const __m128i *)p);                                          \
    __m256 w_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));                               \
    __m256 w_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));            \
    for (int r = 0; r < R; r++) {                                                            \
      __m256 x = _mm256_broadcast_ss(w->a + (size_t)(r0 + r) * w->lda + (kk));               \
      lo[r][t] = _mm256_fmadd_ps(w_lo, x, lo[r][t]);                                         \
      hi[r][t] = _mm256_fmadd_ps(w_hi, x, hi[r][t]);                                         \
    }                                                                                        \
    p += 16;                                                                                 \
  } while (0)
  int kk = 0;
  if (R == 1)
    for (; kk + 2 <= k; kk += 2) {
      SCREEN_INPUT(kk, 0);
      SCREEN_INPUT(kk + 1, 1);
    }
  for (; kk < k; kk++) SCREEN_INPUT(kk, 0);
#undef SCREEN_INPUT
  /* Each word's upper bound (score + |h| bound) into the row's scores, the largest lower bound
   * (score - |h| bound) into lowest; a score that is not finite makes lowest +inf (the caller
   * gives up on that row). The scores' product with the scale is exact in double, the bound's
   * rounding there is covered by its slack. */
  for (int r = 0; r < R; r++) {
    __m256 sum[2] = {_mm256_add_ps(lo[r][0], lo[r][1]), _mm256_add_ps(hi[r][0], hi[r][1])};
    __m256 bad = _mm256_or_ps(_mm256_cmp_ps(_mm256_sub_ps(sum[0], sum[0]), sum[0], _CMP_UNORD_Q),
                              _mm256_cmp_ps(_mm256_sub_ps(sum[1], sum[1]), sum[1], _CMP_UNORD_Q));
    if (_mm256_movemask_ps(bad)) {
      lowest[r0 + r] = INFINITY;
      continue;
    }
    double *upper = w->scores + (size_t)(r0 + r) * ((s->n + 15) / 16 * 16) + j;
    __m256d h_norm = _mm256_set1_pd(w->h_norms[r0 + r]), most = _mm256_set1_pd(-INFINITY);
    for (int g = 0; g < 4; g++) { /* 4 words at a time; the last block's padding is written too */
      __m128 part =
          g % 2 ? _mm256_extractf128_ps(sum[g / 2], 1) : _mm256_castps256_ps128(sum[g / 2]);
      __m256d score = _mm256_mul_pd(_mm256_cvtps_pd(part),
                                    _mm256_cvtps_pd(_mm_load_ps(s->scale + j + 4 * g)));
      __m256d reach = _mm256_mul_pd(h_norm, _mm256_cvtps_pd(_mm_load_ps(s->bound + j + 4 * g)));
      _mm256_store_pd(upper + 4 * g, _mm256_add_pd(score, reach));
      most = _mm256_max_pd(most, _mm256_sub_pd(score, reach));
    }
    double lows[4];
    _mm256_storeu_pd(lows, most);
    for (int g = 0; g < 4; g++)
      if (lows[g] > lowest[r0 + r]) lowest[r0 + r] = lows[g];
  }
}

/* Upper bounds of words j0 .. j1-1 (j0 a multiple of 16) for every row, into w->scores (n
 * rounded up to 16 a row), and each row's largest lower bound among them into w->lowest: the
 * caller's half at [0, SCREEN_ROWS), the helper's at [SCREEN_ROWS, 2 SCREEN_ROWS). Rows past the
 * first four read the block again from cache, not memory. */
static void screen_job(const job_t *w) {
  double *lowest = w->lowest + (w->j0 == 0 ? 0 : SCREEN_ROWS);
  for (int r = 0; r < w->m; r++) lowest[r] = -INFINITY;
  for (int j = w->j0; j < w->j1; j += 16) {
#define SCREEN_STEP(R, r) screen_rows(R, r, j, w, lowest)
    BY_FOUR_ROWS(w->m, SCREEN_STEP);
#undef SCREEN_STEP
  }
}

/* Why a screened row was not taken: the caller then computes its full product. */
static int screen_gives_up(void) {
  __atomic_add_fetch(&screen_fallbacks, 1, __ATOMIC_RELAXED);
  return 0;
}

/* Row c of the product from its words' upper bounds: the exact logits of the blocks that can
 * hold the argmax, -inf elsewhere. 0: not proven (c's contents are then undefined). */
static int screened_row(const float *pk, int n, int k, const float *a, const double *upper,
                        double low, int *block_of, float *c) {
  int taken = 0, limit = (n + 15) / 16 / 16 + 1;
  if (!isfinite(low)) return screen_gives_up();
  double margin = 1e-3 * (fabs(low) + 20.0);
  for (int j = 0; j < n; j++) {
    if (upper[j] < low - margin) continue;
    if (taken > 0 && block_of[taken - 1] == j / 16) continue;
    if (taken == limit) return screen_gives_up();
    block_of[taken++] = j / 16;
    /* The block's 16 logits, as the full product computes them. */
    packed_rows(1, 0, j / 16 * 16, n, k, a, k, pk + (size_t)(j / 16) * 16 * k, c, n);
  }
  /* The largest exact logit and the largest below it: no rounding of `x - logsumexp(x)` (its
   * terms within |top| + 16 in magnitude, any vocabulary under 8.8M words) may merge them. */
  float top = -INFINITY, second = -INFINITY;
  for (int t = 0; t < taken; t++)
    for (int j = block_of[t] * 16; j < block_of[t] * 16 + 16 && j < n; j++) {
      if (c[j] > top) second = top, top = c[j];
      else if (c[j] < top && c[j] > second) second = c[j];
    }
  float reach = fabsf(top) + 16.0f, ulp = nextafterf(reach, INFINITY) - reach;
  if (!isfinite(top) || margin <= 8.0 * ulp || (isfinite(second) && top - second <= 4.0f * ulp))
    return screen_gives_up();
  for (int t = 0, j = 0; j < n; j += 16) { /* -inf outside the blocks taken */
    if (t < taken && block_of[t] == j / 16) {
      t++;
      continue;
    }
    for (int i = j; i < j + 16 && i < n; i++) c[i] = -INFINITY;
  }
  __atomic_add_fetch(&screened_products, 1, __ATOMIC_RELAXED);
  __atomic_add_fetch(&screen_blocks, taken, __ATOMIC_RELAXED);
  return 1;
}

/* A greedy step's output product (m <= SCREEN_ROWS rows, weight b packed and screened): each
 * row screened, or its full product where that is not proven (a row has the same bits computed
 * alone or with others). 0: b has no screen (nothing written). */
static int screened_product(int m, int n, int k, const float *a, int lda, const float *b,
                            int ldb, float *c, int ldc) {
  __atomic_add_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
  const packed_t *e = packed_entry(b, n, k, ldb);
  const void *copy = e ? __atomic_load_n(&e->packed, __ATOMIC_SEQ_CST) : NULL;
  const float *pk = copy && e->format == COPY_F32 ? copy : NULL; /* only a float copy is screened */
  /* Loaded once: a screen replaced meanwhile stays valid while packed_users is held. */
  const screen_t *s = pk ? __atomic_load_n(&e->screen, __ATOMIC_SEQ_CST) : NULL;
  if (!s) {
    __atomic_sub_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
    return 0;
  }
  double h_norms[SCREEN_ROWS], lowest[2 * SCREEN_ROWS];
  int finite = 1;
  for (int r = 0; r < m; r++) {
    double h2 = 0.0;
    for (int kk = 0; kk < k; kk++) h2 += (double)a[(size_t)r * lda + kk] * a[(size_t)r * lda + kk];
    finite &= isfinite(h2);
    h_norms[r] = sqrt(h2) * (1.0 + 1e-12);
  }
  /* The upper bounds (n rounded up to 16 a row), then the blocks a row takes (as ints). */
  size_t stride = (size_t)(n + 15) / 16 * 16;
  double *scores = finite ? (double *)scratch_for(stride * 2 * m + n / 16 + 2) : NULL;
  if (!scores) {
    for (int r = 0; r < m; r++) screen_gives_up();
    compute(m, n, k, a, lda, b, ldb, c, ldc);
  } else {
    job_t whole = {m, 0, n, n, k, lda, k, n, a, NULL, NULL, COPY_F32, NULL, 0, 0, s, scores,
                   lowest, h_norms};
    for (int r = 0; r < m; r++) lowest[SCREEN_ROWS + r] = -INFINITY; /* a half not split off */
    run_split(whole, n < 4096 ? 0 : ((n / 2) + 15) / 16 * 16);
    int *block_of = (int *)(scores + stride * m);
    for (int r = 0; r < m; r++) {
      double low = lowest[r] > lowest[SCREEN_ROWS + r] ? lowest[r] : lowest[SCREEN_ROWS + r];
      const float *row = a + (size_t)r * lda;
      float *out = c + (size_t)r * ldc;
      if (!screened_row(pk, n, k, row, scores + stride * r, low, block_of, out))
        compute(1, n, k, row, lda, b, ldb, out, ldc);
    }
  }
  __atomic_sub_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
  return 1;
}

/* Builds the screen of packed weight `b` (n x k). 0: done, 1: no memory or a weight that is
 * not finite, 2: b is not packed. */
int skinny_gemm_screen(const float *b, int n, int k, int ldb) {
  screen_t *s = screen_build(b, n, k, ldb);
  if (!s) return 1;
  pthread_mutex_lock(&packed_mu);
  const packed_t *found = NULL;
  unsigned h = packed_slot(b);
  for (int i = 0; i < PACKED; i++) {
    const packed_t *e = &packed_tab[(h + i) % PACKED];
    if (e->b == NULL) break;
    if (e->b == b && e->packed && e->format == COPY_F32 && e->n == n && e->k == k &&
        e->ldb == ldb)
      found = e;
    if (e->b == b) break;
  }
  if (!found) {
    pthread_mutex_unlock(&packed_mu);
    screen_free(s);
    return 2;
  }
  packed_t *slot = (packed_t *)found;
  screen_t *old = slot->screen;
  if (old) { /* screened again: readers may hold the old one */
    __atomic_store_n(&slot->screen, NULL, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&packed_users, __ATOMIC_SEQ_CST) != 0) _mm_pause();
    packed_bytes -= screen_size(old);
    screen_free(old);
  }
  __atomic_store_n(&slot->screen, s, __ATOMIC_SEQ_CST);
  packed_bytes += screen_size(s);
  pthread_mutex_unlock(&packed_mu);
  return 0;
}
