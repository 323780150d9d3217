/* Decode-sized float32 GEMM (1-8 rows), with the bits OpenBLAS gives those rows in a prefill,
 * reading the weight once.
 *
 * Why: MLX's CPU backend calls cblas_sgemm for every matmul. For the few rows of a decode step,
 * OpenBLAS 0.3.21 either packs the whole weight into a scratch buffer on every call and then runs
 * its kernel over the copy (measured: 2.5-6x slower than a matrix-vector product), or, in builds
 * with small-matrix kernels (SkylakeX: m*n*k <= 100^3 and, for this layout, m*n <= 1200), sums in
 * another order than its ordinary path. Either way the same row computed in a decode step and
 * inside a prefill or a speculative verify could differ in the last bits, and cached, speculative
 * and cold greedy runs could pick different tokens. This kernel computes each output element the
 * way OpenBLAS's ordinary sgemm kernel does: one FMA chain over k, restarted at each of sgemm's K
 * blocks, the block sums added into C in order. So a row of C has the same bits whether it was
 * computed alone, in a batch of 8 or inside a 512-row prefill. The loader
 * (ragcache/skinny_gemm.py) finds sgemm's K block on this machine by probing against a product
 * tall enough for OpenBLAS's ordinary path; every new (n, k) shape is then checked against that
 * reference on its first call, and a shape that differs in any bit is computed through the padded
 * reference from then on (right bits, slower).
 *
 * It is exported as cblas_sgemm, so libmlx binds to it when this library is loaded RTLD_GLOBAL
 * before mlx.core; every call it does not take goes to the real OpenBLAS cblas_sgemm.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn real_sgemm = NULL;
static int enabled = 0;
static int k_block = 0;  /* OpenBLAS's sgemm K block (GEMM_Q) */
static int k_unroll = 1; /* how it rounds a split block */
static long calls_taken = 0, calls_passed = 0, shapes_refused = 0;

/* OpenBLAS's K partition (driver/level3/level3.c): blocks of GEMM_Q, except that a remainder
 * between Q and 2Q is split in two halves rounded up to the unroll. */
static int next_block(int remaining) {
  if (remaining >= 2 * k_block) return k_block;
  if (remaining > k_block) {
    int half = (remaining + 1) / 2;
    return ((half + k_unroll - 1) / k_unroll) * k_unroll;
  }
  return remaining;
}

/* c[r][j] for r < m, j in [j0, j1) (multiples of 8) = row r of a times row j of b (n x k,
 * leading dim ldb): eight output columns at a time, each its own FMA chain over k. The eight rows
 * of b (8 x k floats) stay in L1 while every row of a passes over them, so b is read once. */
static void rows_block(int m, int j0, int j1, int k, const float *a, int lda, const float *b,
                       int ldb, float *c, int ldc) {
  for (int j = j0; j < j1; j += 8) {
    const float *p0 = b + (size_t)j * ldb, *p1 = p0 + ldb, *p2 = p1 + ldb, *p3 = p2 + ldb;
    const float *p4 = p3 + ldb, *p5 = p4 + ldb, *p6 = p5 + ldb, *p7 = p6 + ldb;
    for (int r = 0; r < m; r++) {
      const float *x_row = a + (size_t)r * lda;
      float o0 = 0, o1 = 0, o2 = 0, o3 = 0, o4 = 0, o5 = 0, o6 = 0, o7 = 0;
      for (int k0 = 0; k0 < k;) {
        int len = next_block(k - k0);
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
        for (int kk = k0; kk < k0 + len; kk++) {
          float x = x_row[kk];
          s0 = fmaf(p0[kk], x, s0), s1 = fmaf(p1[kk], x, s1), s2 = fmaf(p2[kk], x, s2);
          s3 = fmaf(p3[kk], x, s3), s4 = fmaf(p4[kk], x, s4), s5 = fmaf(p5[kk], x, s5);
          s6 = fmaf(p6[kk], x, s6), s7 = fmaf(p7[kk], x, s7);
        }
        o0 += s0, o1 += s1, o2 += s2, o3 += s3, o4 += s4, o5 += s5, o6 += s6, o7 += s7;
        k0 += len;
      }
      float *out = c + (size_t)r * ldc + j;
      out[0] = o0, out[1] = o1, out[2] = o2, out[3] = o3;
      out[4] = o4, out[5] = o5, out[6] = o6, out[7] = o7;
    }
  }
}

/* Two threads: the calling thread takes the first half of the output, a helper the second. The
 * helper spins briefly for the next call (a decode step's matmuls come back to back), then sleeps.
 * One caller at a time uses the helper; a concurrent caller computes alone. */
typedef struct {
  int m, j0, j1, k, lda, ldb, ldc;
  const float *a, *b;
  float *c;
} job_t;
static pthread_t helper;
static int threads = 1, helper_started = 0;
static pthread_mutex_t helper_owner = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static job_t job;
static int job_ready = 0, job_done = 1;

static void *helper_main(void *unused) {
  (void)unused;
  for (;;) {
    int spins = 0;
    while (!__atomic_load_n(&job_ready, __ATOMIC_ACQUIRE)) {
      if (++spins < 20000) {
        _mm_pause();
        continue;
      }
      pthread_mutex_lock(&mu);
      while (!__atomic_load_n(&job_ready, __ATOMIC_ACQUIRE)) pthread_cond_wait(&cv, &mu);
      pthread_mutex_unlock(&mu);
    }
    __atomic_store_n(&job_ready, 0, __ATOMIC_RELAXED);
    rows_block(job.m, job.j0, job.j1, job.k, job.a, job.lda, job.b, job.ldb, job.c, job.ldc);
    __atomic_store_n(&job_done, 1, __ATOMIC_RELEASE);
  }
  return NULL;
}

/* A forked child has no helper thread (fork copies only the calling thread): start afresh. */
static void after_fork_in_child(void) {
  helper_started = 0;
  job_ready = 0;
  job_done = 1;
  pthread_mutex_init(&helper_owner, NULL);
  pthread_mutex_init(&mu, NULL);
  pthread_cond_init(&cv, NULL);
}

static int ensure_helper(void) {
  static int atfork_set = 0;
  if (!atfork_set) atfork_set = pthread_atfork(NULL, NULL, after_fork_in_child) == 0;
  if (!helper_started) helper_started = pthread_create(&helper, NULL, helper_main, NULL) == 0;
  return helper_started;
}

static void compute(int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                    float *c, int ldc) {
  if (threads < 2 || n < 256 || pthread_mutex_trylock(&helper_owner) != 0) {
    rows_block(m, 0, n, k, a, lda, b, ldb, c, ldc);
    return;
  }
  if (!ensure_helper()) {
    pthread_mutex_unlock(&helper_owner);
    rows_block(m, 0, n, k, a, lda, b, ldb, c, ldc);
    return;
  }
  int half = ((n / 2) + 7) / 8 * 8;
  job = (job_t){m, half, n, k, lda, ldb, ldc, a, b, c};
  __atomic_store_n(&job_done, 0, __ATOMIC_RELAXED);
  pthread_mutex_lock(&mu);
  __atomic_store_n(&job_ready, 1, __ATOMIC_RELEASE);
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
  rows_block(m, 0, half, k, a, lda, b, ldb, c, ldc);
  while (!__atomic_load_n(&job_done, __ATOMIC_ACQUIRE)) _mm_pause();
  pthread_mutex_unlock(&helper_owner);
}

/* The bits a row gets inside a prefill: OpenBLAS's sgemm over enough rows that it takes its
 * ordinary (packed) path. OpenBLAS builds with small-matrix kernels (SkylakeX in 0.3.21) send
 * products with m*n*k <= 100^3 (and, for this layout, m*n <= 1200) to a kernel that sums in
 * another order, so a one-row product there differs from the same row inside a 16-row one. The
 * m rows of a are repeated down a taller scratch product and the first m rows of it kept. */
static int reference_rows(int m, int n, int k) {
  long rows = 16;
  long by_size = 1000000L / ((long)n * k) + 1, by_area = 1200L / n + 1;
  if (by_size > rows) rows = by_size;
  if (by_area > rows) rows = by_area;
  if (rows < m) rows = m;
  return (int)rows;
}

static int canonical(int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                     float *c, int ldc) {
  int rows = reference_rows(m, n, k);
  float *tall_a = malloc(sizeof(float) * (size_t)rows * k);
  float *tall_c = malloc(sizeof(float) * (size_t)rows * n);
  if (!tall_a || !tall_c) {
    free(tall_a), free(tall_c);
    return 0;
  }
  for (int r = 0; r < rows; r++) memcpy(tall_a + (size_t)r * k, a + (size_t)(r % m) * lda,
                                        sizeof(float) * (size_t)k);
  real_sgemm(RowMajor, NoTrans, Trans, rows, n, k, 1.0f, tall_a, k, b, ldb, 0.0f, tall_c, n);
  for (int r = 0; r < m; r++)
    memcpy(c + (size_t)r * ldc, tall_c + (size_t)r * n, sizeof(float) * (size_t)n);
  free(tall_a), free(tall_c);
  return 1;
}

/* Shapes seen, with the verdict of their first call: 1 same bits as the reference, 2 not. A
 * shape is k with n's residue mod 64: the order of every sum depends on k alone, and the residue
 * covers OpenBLAS's edge tiles, while attention's products (n = the context, one more each step)
 * do not fill the table. */
#define SHAPES 1024
static struct {
  int n, k, verdict;
} shapes[SHAPES];
static pthread_mutex_t shapes_mu = PTHREAD_MUTEX_INITIALIZER;

static int verdict_for(int n, int k) {
  n &= 63;
  unsigned h = ((unsigned)n * 2654435761u) ^ ((unsigned)k * 40503u);
  for (int i = 0; i < SHAPES; i++) {
    int s = (h + i) % SHAPES;
    int v = __atomic_load_n(&shapes[s].verdict, __ATOMIC_ACQUIRE);
    if (v == 0) return 0;
    if (shapes[s].n == n && shapes[s].k == k) return v;
  }
  return 2; /* table full: stay with OpenBLAS */
}

static void record(int n, int k, int verdict) {
  n &= 63;
  unsigned h = ((unsigned)n * 2654435761u) ^ ((unsigned)k * 40503u);
  pthread_mutex_lock(&shapes_mu);
  for (int i = 0; i < SHAPES; i++) {
    int s = (h + i) % SHAPES;
    if (shapes[s].verdict == 0) {
      shapes[s].n = n, shapes[s].k = k;
      __atomic_store_n(&shapes[s].verdict, verdict, __ATOMIC_RELEASE);
      break;
    }
    if (shapes[s].n == n && shapes[s].k == k) break;
  }
  pthread_mutex_unlock(&shapes_mu);
}

/* The calls decode, speculative verifies and small batches make: row-major C (m x n) = A (m x k)
 * * B^T with B stored n x k (an MLX Linear weight), one row, or up to MAX_ROWS rows in a small
 * product, alpha 1, beta 0. Anything else is OpenBLAS's. `reference_only` computes those calls through the padded OpenBLAS product
 * instead of this kernel (the bits this kernel must reproduce; for tests). */
#define MAX_ROWS 8
/* Products of 2-8 rows are taken only up to this size (m*n*k), where OpenBLAS may use its
 * small-matrix kernel; above it OpenBLAS's ordinary path has the reference bits itself and its
 * packed kernel is faster than this one's scalar FMA chains (a speculative verify of 8 rows over
 * every weight measured slower here). */
#define SMALL_PRODUCT 1000000L
static int reference_only = 0;

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  int verdict;
  if (!real_sgemm) real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm"); /* never bound */
  if (!(enabled && order == RowMajor && ta == NoTrans && tb == Trans && m >= 1 &&
        m <= MAX_ROWS && (m == 1 || (long)m * n * k <= SMALL_PRODUCT) && k > 0 && n >= 8 &&
        n % 8 == 0 && alpha == 1.0f && beta == 0.0f)) {
    __atomic_add_fetch(&calls_passed, 1, __ATOMIC_RELAXED);
    real_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  verdict = reference_only ? 2 : verdict_for(n, k);
  if (verdict == 2) { /* refused shape: the padded product gives the prefill's bits, slower */
    __atomic_add_fetch(&calls_passed, 1, __ATOMIC_RELAXED);
    if (!canonical(m, n, k, a, lda, b, ldb, c, ldc))
      real_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (verdict == 0) { /* first call of this shape: both ways, keep the reference, compare */
    float *mine = malloc(sizeof(float) * (size_t)m * n);
    if (!mine || !canonical(m, n, k, a, lda, b, ldb, c, ldc)) {
      free(mine);
      real_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
    compute(m, n, k, a, lda, b, ldb, mine, n);
    int same = 1;
    for (int r = 0; r < m && same; r++)
      same = memcmp(mine + (size_t)r * n, c + (size_t)r * ldc, sizeof(float) * (size_t)n) == 0;
    free(mine);
    record(n, k, same ? 1 : 2);
    if (!same) __atomic_add_fetch(&shapes_refused, 1, __ATOMIC_RELAXED);
    return;
  }
  __atomic_add_fetch(&calls_taken, 1, __ATOMIC_RELAXED);
  compute(m, n, k, a, lda, b, ldb, c, ldc);
}

/* Binds the real sgemm of the OpenBLAS at `path`. 0 on success. */
int skinny_gemm_bind(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!h) return 1;
  real_sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
  return real_sgemm ? 0 : 2;
}

/* K block and unroll to reproduce; `on` routes calls here; `n_threads` 2 uses a helper thread
 * (started on the first call that needs it, again in a forked child). */
void skinny_gemm_configure(int on, int q, int unroll, int n_threads) {
  k_block = q;
  k_unroll = unroll > 0 ? unroll : 1;
  threads = n_threads > 1 ? 2 : 1;
  enabled = on && real_sgemm != NULL && k_block > 0;
}

/* This kernel's m rows and the reference's for the same operands (for the loader's probe). */
void skinny_gemm_compute(int m, int n, int k, const float *a, const float *b, float *c) {
  compute(m, n, k, a, k, b, k, c, n);
}
int skinny_gemm_reference(int m, int n, int k, const float *a, const float *b, float *c) {
  return canonical(m, n, k, a, k, b, k, c, n);
}
/* OpenBLAS's own product, exactly as asked (m rows), bypassing this kernel. */
void skinny_gemm_openblas(int m, int n, int k, const float *a, const float *b, float *c) {
  real_sgemm(RowMajor, NoTrans, Trans, m, n, k, 1.0f, a, k, b, k, 0.0f, c, n);
}
void skinny_gemm_reference_only(int on) { reference_only = on; }

/* 0: calls taken, 1: calls passed to OpenBLAS, 2: shapes refused by their first-call check. */
long skinny_gemm_counter(int which) {
  return which == 0 ? calls_taken : which == 1 ? calls_passed : shapes_refused;
}
