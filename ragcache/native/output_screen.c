/* The greedy token of a decode step without reading the whole output layer: included by
 * skinny_gemm.c (it uses the packed copies, the helper thread and packed_rows).
 *
 * Why: a greedy step needs only the argmax of its logits, yet the output layer is the largest
 * weight a step reads (Gemma 3 270M: 671 MB of its 1.07 GB, a 262,144-word vocabulary), and on
 * this machine a decode step is bound by reading weights. Here a step reads an 8-bit copy of the
 * output weight (a quarter of the bytes) to score every word, with a proven bound on how far each score
 * can be from the logit the full product would give; only the 16-word blocks that can hold the
 * argmax are then computed exactly, from the packed copy by the same code as the full product
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
  float *scale; /* per word */
  float *bound; /* per word: bound_i above */
  int n, k;
} screen_t;

static long screened_products = 0, screen_fallbacks = 0, screen_blocks = 0;

static long screen_size(const screen_t *s) {
  return (long)((size_t)(s->n + 15) / 16 * 16 * (size_t)s->k * sizeof(int8_t) +
                2 * (size_t)s->n * sizeof(float));
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
  s->scale = malloc(sizeof(float) * (size_t)n);
  s->bound = malloc(sizeof(float) * (size_t)n);
  if (!s->q || !s->scale || !s->bound) {
    screen_free(s);
    return NULL;
  }
  memset(s->q, 0, (size_t)blocks * 16 * k * sizeof(int8_t));
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

/* Screen scores of words j0 .. j1-1 (j0 a multiple of 16) for row a, into w->scores, and the
 * largest lower bound among them into w->lowest[0] (the caller's half) or [1] (the helper's). */
static void screen_job(const job_t *w) {
  const screen_t *s = w->screen;
  const int k = s->k;
  double lowest = -INFINITY;
  for (int j = w->j0; j < w->j1; j += 16) {
    const int8_t *p = s->q + (size_t)j * k;
    /* Four chains (even and odd inputs, low and high eight words): their order is free, the
     * bound covers any. */
    __m256 e_lo = _mm256_setzero_ps(), e_hi = e_lo, o_lo = e_lo, o_hi = e_lo;
#define SCREEN_FMA(row, x, lo, hi)                                                         \
  do {                                                                                     \
    lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(row)), x, lo);            \
    hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(row, 8))), \
                         x, hi);                                                           \
  } while (0)
    int kk = 0;
    for (; kk + 2 <= k; kk += 2, p += 32) {
      __m128i w0 = _mm_load_si128((const __m128i *)p), w1 = _mm_load_si128((const __m128i *)(p + 16));
      __m256 x0 = _mm256_broadcast_ss(w->a + kk), x1 = _mm256_broadcast_ss(w->a + kk + 1);
      SCREEN_FMA(w0, x0, e_lo, e_hi);
      SCREEN_FMA(w1, x1, o_lo, o_hi);
    }
    if (kk < k) {
      __m128i w0 = _mm_load_si128((const __m128i *)p);
      __m256 x0 = _mm256_broadcast_ss(w->a + kk);
      SCREEN_FMA(w0, x0, e_lo, e_hi);
    }
#undef SCREEN_FMA
    float sums[16];
    _mm256_storeu_ps(sums, _mm256_add_ps(e_lo, o_lo));
    _mm256_storeu_ps(sums + 8, _mm256_add_ps(e_hi, o_hi));
    int last = j + 16 < s->n ? j + 16 : s->n;
    for (int i = j; i < last; i++) {
      double score = (double)sums[i - j] * (double)s->scale[i];
      w->scores[i] = score;
      double low = score - w->h_norm * (double)s->bound[i];
      if (low > lowest) lowest = low; /* a score that is not finite: the caller gives up */
    }
  }
  w->lowest[w->j0 == 0 ? 0 : 1] = lowest;
}

/* Why a screened step was not taken: the caller then computes the full product. */
static int screen_gives_up(void) {
  __atomic_add_fetch(&screen_fallbacks, 1, __ATOMIC_RELAXED);
  return 0;
}

/* c (1 x n) for row a against weight b with its screen: the exact logits of the blocks that can
 * hold the argmax, -inf elsewhere. 0: not proven (c's contents are then undefined). */
static int screened_row(const screen_t *s, const float *pk, int n, int k, const float *a,
                        float *c) {
  double h2 = 0.0;
  for (int kk = 0; kk < k; kk++) h2 += (double)a[kk] * a[kk];
  if (!isfinite(h2)) return screen_gives_up();
  int blocks = (n + 15) / 16, limit = blocks / 16 + 1, taken = 0;
  /* The scores, then the blocks taken (as ints). */
  double *scores = (double *)scratch_for((size_t)n * 2 + (size_t)limit + 1);
  if (!scores) return screen_gives_up();
  int *block_of = (int *)(scores + n);
  double lowest[2] = {-INFINITY, -INFINITY};
  job_t whole = {1, 0, n, n, k, k, k, n, a, NULL, NULL, NULL, 0, 0, s, scores, lowest,
                 sqrt(h2) * (1.0 + 1e-12)};
  run_split(whole, n < 4096 ? 0 : ((n / 2) + 15) / 16 * 16);
  double low = lowest[0] > lowest[1] ? lowest[0] : lowest[1];
  if (!isfinite(low)) return screen_gives_up();
  double margin = 1e-3 * (fabs(low) + 20.0);
  for (int j = 0; j < n; j++) {
    if (!isfinite(scores[j])) return screen_gives_up(); /* its float sum overflowed */
    if (scores[j] + whole.h_norm * (double)s->bound[j] < low - margin) continue;
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

/* A greedy step's output product (one row, weight b packed and screened): the screened row, or
 * the full product where it is not proven. 0: b has no screen (nothing written). */
static int screened_product(int n, int k, const float *a, const float *b, int ldb, float *c) {
  __atomic_add_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
  const packed_t *e = packed_entry(b, n, k, ldb);
  const float *pk = e ? __atomic_load_n(&e->packed, __ATOMIC_SEQ_CST) : NULL;
  /* Loaded once: a screen replaced meanwhile stays valid while packed_users is held. */
  const screen_t *s = pk ? __atomic_load_n(&e->screen, __ATOMIC_SEQ_CST) : NULL;
  if (!s) {
    __atomic_sub_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
    return 0;
  }
  if (!screened_row(s, pk, n, k, a, c)) compute(1, n, k, a, k, b, ldb, c, n);
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
    if (e->b == b && e->packed && e->n == n && e->k == k && e->ldb == ldb) found = e;
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
