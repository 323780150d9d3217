/* Decode-sized float32 GEMM (1-8 rows; up to 256 over few inputs, attention's scores), with the
 * bits OpenBLAS gives those rows in a prefill, reading the weight once; and attention's softmax
 * product (softmax_rows_product).
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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn real_sgemm = NULL;
static int enabled = 0;
static int k_block = 0;  /* OpenBLAS's sgemm K block (GEMM_Q) */
static int k_unroll = 1; /* how it rounds a split block */
static long calls_taken = 0, calls_passed = 0, shapes_refused = 0, packed_products = 0;
static long helper_halves = 0, halves_taken_back = 0; /* who computed a split product's 2nd half */
static long softmax_products = 0;

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

/* STEP(R, r) for the rows of a product in groups of four from r = 0, then the one to three
 * left: R is a constant at every call, so each inlined specialization keeps its 2R FMA chains in
 * registers. */
#define BY_FOUR_ROWS(m, STEP)                  \
  do {                                         \
    int r_ = 0;                                \
    for (; r_ + 4 <= (m); r_ += 4) STEP(4, r_); \
    switch ((m)-r_) {                          \
      case 3: STEP(3, r_); break;              \
      case 2: STEP(2, r_); break;              \
      case 1: STEP(1, r_); break;              \
      default: break;                          \
    }                                          \
  } while (0)

/* Rows j..j+7 of b (n x k, leading dim ldb), inputs k0 .. k0+len-1, transposed into t[len][8]:
 * lane l of t[kk] is b[j+l][k0+kk], so one vector load gives eight outputs' weights for one input.
 * Rows past n read as zeros (their outputs are computed and dropped). */
static const float zero_row[1024];
static void transpose_tile(const float *b, int ldb, int j, int n, int k0, int len, float *t) {
  const float *row[8];
  for (int l = 0; l < 8; l++) row[l] = j + l < n ? b + (size_t)(j + l) * ldb + k0 : zero_row;
  int kk = 0;
  for (; kk + 8 <= len; kk += 8) { /* an 8 x 8 block: the usual unpack/shuffle/permute transpose */
    __m256 r0 = _mm256_loadu_ps(row[0] + kk), r1 = _mm256_loadu_ps(row[1] + kk);
    __m256 r2 = _mm256_loadu_ps(row[2] + kk), r3 = _mm256_loadu_ps(row[3] + kk);
    __m256 r4 = _mm256_loadu_ps(row[4] + kk), r5 = _mm256_loadu_ps(row[5] + kk);
    __m256 r6 = _mm256_loadu_ps(row[6] + kk), r7 = _mm256_loadu_ps(row[7] + kk);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    float *out = t + (size_t)kk * 8;
    _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(out + 32, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(out + 40, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(out + 48, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(out + 56, _mm256_permute2f128_ps(s3, s7, 0x31));
  }
  for (; kk < len; kk++)
    for (int l = 0; l < 8; l++) t[(size_t)kk * 8 + l] = row[l][kk];
}

/* Rows r0 .. r0+R-1 of the tile pair at t (two transposed tiles, 16 outputs per input), one K
 * block: 2R independent FMA chains, each output lane its own chain over the block. */
static inline __attribute__((always_inline)) void tile_rows(const int R, int r0, int k0, int len,
                                                            const float *a, int lda,
                                                            const float *t0, const float *t1,
                                                            __m256 *o_lo, __m256 *o_hi) {
  __m256 s_lo[4], s_hi[4];
  for (int i = 0; i < R; i++) s_lo[i] = s_hi[i] = _mm256_setzero_ps();
  for (int kk = 0; kk < len; kk++) {
    __m256 w_lo = _mm256_loadu_ps(t0 + (size_t)kk * 8), w_hi = _mm256_loadu_ps(t1 + (size_t)kk * 8);
    for (int i = 0; i < R; i++) {
      __m256 x = _mm256_broadcast_ss(a + (size_t)(r0 + i) * lda + k0 + kk);
      s_lo[i] = _mm256_fmadd_ps(w_lo, x, s_lo[i]);
      s_hi[i] = _mm256_fmadd_ps(w_hi, x, s_hi[i]);
    }
  }
  for (int i = 0; i < R; i++)
    o_lo[r0 + i] = _mm256_add_ps(o_lo[r0 + i], s_lo[i]),
    o_hi[r0 + i] = _mm256_add_ps(o_hi[r0 + i], s_hi[i]);
}

/* c[r][j] for r < m, j in [j0, j1) (j0 a multiple of 16) = row r of a times row j of b (n x k,
 * leading dim ldb), for a b read as it is (no packed copy: attention's keys, a weight that was
 * not packed). Each output is one FMA chain over each K block, the block sums added in order
 * (OpenBLAS's ordinary order): the chains run eight outputs to a vector over b's rows transposed
 * sixteen at a time in L1, so b is read once for every TILE_ROWS rows of a. */
#define TILE_ROWS 64
#define MAX_K_BLOCK 1024 /* the largest K block a probe can find (_BLOCKS in skinny_gemm.py) */
static void tile_block(int m, int j0, int j1, int n, int k, const float *a, int lda,
                       const float *b, int ldb, float *c, int ldc);
static void rows_block(int m, int j0, int j1, int n, int k, const float *a, int lda,
                       const float *b, int ldb, float *c, int ldc) {
  for (int r = 0; r < m; r += TILE_ROWS)
    tile_block(m - r < TILE_ROWS ? m - r : TILE_ROWS, j0, j1, n, k, a + (size_t)r * lda, lda, b,
               ldb, c + (size_t)r * ldc, ldc);
}
static void tile_block(int m, int j0, int j1, int n, int k, const float *a, int lda,
                       const float *b, int ldb, float *c, int ldc) {
  float t[2 * MAX_K_BLOCK * 8] __attribute__((aligned(32)));
  __m256 o_lo[TILE_ROWS], o_hi[TILE_ROWS];
  for (int j = j0; j < j1; j += 16) {
    for (int r = 0; r < m; r++) o_lo[r] = o_hi[r] = _mm256_setzero_ps();
    for (int k0 = 0; k0 < k;) {
      int len = next_block(k - k0);
      transpose_tile(b, ldb, j, n, k0, len, t);
      transpose_tile(b, ldb, j + 8, n, k0, len, t + (size_t)len * 8);
      const float *t1 = t + (size_t)len * 8;
#define TILE_STEP(R, r) tile_rows(R, r, k0, len, a, lda, t, t1, o_lo, o_hi)
      BY_FOUR_ROWS(m, TILE_STEP);
#undef TILE_STEP
      k0 += len;
    }
    int width = n - j < 16 ? n - j : 16;
    for (int r = 0; r < m; r++) {
      float *out = c + (size_t)r * ldc + j;
      if (width == 16) {
        _mm256_storeu_ps(out, o_lo[r]), _mm256_storeu_ps(out + 8, o_hi[r]);
      } else { /* the last outputs: the padding lanes are dropped */
        float tmp[16];
        _mm256_storeu_ps(tmp, o_lo[r]), _mm256_storeu_ps(tmp + 8, o_hi[r]);
        memcpy(out, tmp, sizeof(float) * (size_t)width);
      }
    }
  }
}

/* Registered weights, packed for the one-row product. Row-major, the kernel above transposes
 * every tile of the weight before its FMAs (its first form, scalar chains over eight weight rows,
 * read ~10 GB/s here); packed as blocks of 16 output rows with
 * their k values interleaved ([n/16][k][16]), one vector load and one vector FMA per k serve 16
 * outputs and the product streams at memory speed (~30 GB/s per thread measured on the AMD EPYC
 * of these machines). Each output lane is still one FMA chain over k restarted at each K block,
 * with the block sums added in order: the same operations as rows_block, so the same bits.
 * A packed copy is a second copy of the weight (the prefill's OpenBLAS reads the original); the
 * caller (ragcache/skinny_gemm.py) keeps the original alive while it is registered, so its address
 * cannot be reused by another array. Readers count themselves in `packed_users` before they read
 * an entry, so unregistering waits for none to hold it before freeing. */
#define PACKED 4096
struct screen; /* output_screen.c: a weight's int8 copy for greedy steps */
enum { COPY_F32 = 0, COPY_Q4 = 1 }; /* a copy's format: packed floats, or exact 4-bit codes */
typedef struct {
  const float *b;
  int n, k, ldb;
  int format;            /* COPY_F32 or COPY_Q4; set before `packed` is published */
  size_t bytes;          /* the copy's size */
  void *packed;          /* the copy; NULL: unregistered */
  struct screen *screen; /* NULL: none; only with a COPY_F32 copy, dropped with it */
} packed_t;
static packed_t packed_tab[PACKED];
static pthread_mutex_t packed_mu = PTHREAD_MUTEX_INITIALIZER;
static long packed_users = 0, packed_bytes = 0;

static unsigned packed_slot(const float *b) {
  /* Fibonacci hashing on all the address bits: large weights are page-aligned mmaps, whose low
   * bits are all zero. */
  return (unsigned)(((unsigned long long)(size_t)b * 0x9E3779B97F4A7C15ull) >> 52) % PACKED;
}

/* The entry for weight `b` (n x k, leading dim ldb), or NULL; the caller holds packed_users. */
static const packed_t *packed_entry(const float *b, int n, int k, int ldb) {
  unsigned h = packed_slot(b);
  for (int i = 0; i < PACKED; i++) {
    packed_t *e = &packed_tab[(h + i) % PACKED];
    const float *eb = __atomic_load_n(&e->b, __ATOMIC_ACQUIRE);
    if (eb == NULL) return NULL;
    if (eb == b) {
      void *pk = __atomic_load_n(&e->packed, __ATOMIC_SEQ_CST);
      /* The slot may have been taken for another weight since b was read (b unregistered, its
       * slot reused): that copy is the other weight's. */
      if (!pk || __atomic_load_n(&e->b, __ATOMIC_SEQ_CST) != b) return NULL;
      return (e->n == n && e->k == k && e->ldb == ldb) ? e : NULL;
    }
  }
  return NULL;
}

/* The copy of weight `b` (its format in *format), or NULL; the caller holds packed_users. */
static const void *packed_find(const float *b, int n, int k, int ldb, int *format) {
  const packed_t *e = packed_entry(b, n, k, ldb);
  const void *pk = e ? __atomic_load_n(&e->packed, __ATOMIC_SEQ_CST) : NULL;
  *format = pk ? e->format : COPY_F32;
  return pk;
}

static void screen_free(struct screen *s);
static long screen_size(const struct screen *s);

/* Whether `b` has a copy now: 0 none, 1 packed floats, 2 4-bit codes (a hint: compute() looks
 * again under packed_users). */
static int is_packed(const float *b, int n, int k, int ldb) {
  __atomic_add_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
  int format;
  int found = packed_find(b, n, k, ldb, &format) == NULL ? 0 : format == COPY_Q4 ? 2 : 1;
  __atomic_sub_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
  return found;
}

/* Input kk of a block of 16 outputs: its weights (w_lo, w_hi) times input kk of rows r0 ..
 * r0+R-1, one FMA into each row's two chains. packed_rows and q4_rows both run their chains
 * through this, so a weight read from either copy gives the same bits. */
static inline __attribute__((always_inline)) void fma_input(const int R, int r0, int kk,
                                                            const float *a, int lda, __m256 w_lo,
                                                            __m256 w_hi, __m256 *s_lo,
                                                            __m256 *s_hi) {
  for (int i = 0; i < R; i++) {
    __m256 x = _mm256_broadcast_ss(a + (size_t)(r0 + i) * lda + kk);
    s_lo[i] = _mm256_fmadd_ps(w_lo, x, s_lo[i]);
    s_hi[i] = _mm256_fmadd_ps(w_hi, x, s_hi[i]);
  }
}

/* Rows r0 .. r0+R-1 of c, the 16 outputs from column j: the last block's padding rows were
 * computed and are dropped here. */
static inline __attribute__((always_inline)) void store_rows(const int R, int r0, int j, int n,
                                                             const __m256 *o_lo,
                                                             const __m256 *o_hi, float *c,
                                                             int ldc) {
  for (int i = 0; i < R; i++) {
    float *out = c + (size_t)(r0 + i) * ldc + j;
    if (j + 16 <= n) {
      _mm256_storeu_ps(out, o_lo[i]), _mm256_storeu_ps(out + 8, o_hi[i]);
    } else {
      float tmp[16];
      _mm256_storeu_ps(tmp, o_lo[i]), _mm256_storeu_ps(tmp + 8, o_hi[i]);
      memcpy(out, tmp, sizeof(float) * (size_t)(n - j));
    }
  }
}

/* Rows r0 .. r0+R-1 of c over the packed block at `block` (16 outputs from column j), R <= 4 a
 * constant where it is inlined: the block's two vectors of each k serve all R rows, so a small
 * batch or a speculative verify reads the weight once, and 2R independent FMA chains keep the
 * FMA units busy. */
static inline __attribute__((always_inline)) void packed_rows(const int R, int r0, int j, int n,
                                                              int k, const float *a, int lda,
                                                              const float *block, float *c,
                                                              int ldc) {
  __m256 o_lo[4], o_hi[4], s_lo[4], s_hi[4];
  for (int i = 0; i < R; i++) o_lo[i] = o_hi[i] = _mm256_setzero_ps();
  const float *p = block;
  for (int k0 = 0; k0 < k;) {
    int len = next_block(k - k0);
    for (int i = 0; i < R; i++) s_lo[i] = s_hi[i] = _mm256_setzero_ps();
    for (int kk = k0; kk < k0 + len; kk++, p += 16) {
      __m256 w_lo = _mm256_load_ps(p), w_hi = _mm256_load_ps(p + 8);
      fma_input(R, r0, kk, a, lda, w_lo, w_hi, s_lo, s_hi);
    }
    for (int i = 0; i < R; i++) /* the K block's sums, added in order */
      o_lo[i] = _mm256_add_ps(o_lo[i], s_lo[i]), o_hi[i] = _mm256_add_ps(o_hi[i], s_hi[i]);
    k0 += len;
  }
  store_rows(R, r0, j, n, o_lo, o_hi, c, ldc);
}

/* c[r][j] for r < m and j in [j0, j1) (j0 a multiple of 16) from the packed weight, in
 * rows_block's order: each output lane is one FMA chain over each K block, the block sums added
 * in order. */
static void packed_block(int m, int j0, int j1, int n, int k, const float *a, int lda,
                         const float *pk, float *c, int ldc) {
  for (int j = j0; j < j1; j += 16) {
    const float *block = pk + (size_t)j * k;
#define PACKED_STEP(R, r) packed_rows(R, r, j, n, k, a, lda, block, c, ldc)
    BY_FOUR_ROWS(m, PACKED_STEP);
#undef PACKED_STEP
  }
}

/* Registered weights held as exact 4-bit codes (ragcache/q4_weights.py): a weight dequantized
 * from a GGUF's 4-bit blocks (Q4_1: w = d*q + m per 32 inputs of a row, in float32) is, value for
 * value, scale * q + offset for a 4-bit q and two floats per row and 32 inputs. Read as those
 * codes, a decode step streams ~0.75 bytes a weight instead of 4. Each weight is rebuilt in
 * registers by the same float32 multiply and add that made it (this file is compiled with
 * -ffp-contract=off, so they are not fused), so the FMA chains below get the very values the
 * float copy holds, in the same order: the same bits. The loader finds codes that rebuild every
 * weight exactly, and registering them checks that again here, in this file's arithmetic.
 * Layout: per block of 16 output rows, per 32 inputs: scale[16], offset[16] (floats), then for
 * each of the 32 inputs 8 bytes: byte i holds row i's code in its low nibble and row i+8's in its
 * high one. */
#define Q4_GROUP 32
#define Q4_GROUP_BYTES (16 * 4 * 2 + Q4_GROUP * 8)
static size_t q4_size(int n, int k) {
  return (size_t)((n + 15) / 16) * (size_t)(k / Q4_GROUP) * Q4_GROUP_BYTES;
}

/* One input's 16 weights rebuilt from its 8 bytes of codes and its group's scales and offsets:
 * a float multiply, then an add, as each weight was made. */
static inline __attribute__((always_inline)) void q4_weights(const uint8_t *codes, __m256 scale_lo,
                                                             __m256 scale_hi, __m256 offset_lo,
                                                             __m256 offset_hi, __m256 *w_lo,
                                                             __m256 *w_hi) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m128i v = _mm_loadl_epi64((const __m128i *)codes);
  __m128i q_lo = _mm_and_si128(v, nibble), q_hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
  *w_lo = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q_lo)), scale_lo),
                        offset_lo);
  *w_hi = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q_hi)), scale_hi),
                        offset_hi);
}

/* packed_rows over 4-bit codes: rows r0 .. r0+R-1 of c over the 16 outputs from column j. */
static inline __attribute__((always_inline)) void q4_rows(const int R, int r0, int j, int n,
                                                          int k, const float *a, int lda,
                                                          const uint8_t *block, float *c,
                                                          int ldc) {
  __m256 o_lo[4], o_hi[4], s_lo[4], s_hi[4];
  __m256 scale_lo = _mm256_setzero_ps(), scale_hi = scale_lo, offset_lo = scale_lo,
         offset_hi = scale_lo;
  const uint8_t *codes = block;
  for (int i = 0; i < R; i++) o_lo[i] = o_hi[i] = _mm256_setzero_ps();
  for (int k0 = 0; k0 < k;) {
    int len = next_block(k - k0);
    for (int i = 0; i < R; i++) s_lo[i] = s_hi[i] = _mm256_setzero_ps();
    for (int kk = k0; kk < k0 + len; kk++) {
      if (kk % Q4_GROUP == 0) { /* a new group; one a K block starts inside is loaded already */
        const uint8_t *group = block + (size_t)(kk / Q4_GROUP) * Q4_GROUP_BYTES;
        const float *f = (const float *)group;
        scale_lo = _mm256_load_ps(f), scale_hi = _mm256_load_ps(f + 8);
        offset_lo = _mm256_load_ps(f + 16), offset_hi = _mm256_load_ps(f + 24);
        codes = group + 128;
      }
      __m256 w_lo, w_hi;
      q4_weights(codes + (size_t)(kk % Q4_GROUP) * 8, scale_lo, scale_hi, offset_lo, offset_hi,
                 &w_lo, &w_hi);
      fma_input(R, r0, kk, a, lda, w_lo, w_hi, s_lo, s_hi);
    }
    for (int i = 0; i < R; i++) /* the K block's sums, added in order */
      o_lo[i] = _mm256_add_ps(o_lo[i], s_lo[i]), o_hi[i] = _mm256_add_ps(o_hi[i], s_hi[i]);
    k0 += len;
  }
  store_rows(R, r0, j, n, o_lo, o_hi, c, ldc);
}

/* Products of more than four rows (a verify, a batch) rebuild each weight once per four rows.
 * Tried and dropped: rebuilding each block once into a float tile that packed_rows then reads
 * for every four rows. Over a 30720 x 576 weight it took 2.1-2.4 ms for 8 rows against 2.4-2.6
 * ms this way, and 2.3-2.6 ms for 5 rows against 2.0-2.2 (one row: 0.8 ms). */
static void q4_block(int m, int j0, int j1, int n, int k, const float *a, int lda,
                     const uint8_t *codes, float *c, int ldc) {
  for (int j = j0; j < j1; j += 16) {
    const uint8_t *block = codes + (size_t)(j / 16) * (size_t)(k / Q4_GROUP) * Q4_GROUP_BYTES;
#define Q4_STEP(R, r) q4_rows(R, r, j, n, k, a, lda, block, c, ldc)
    BY_FOUR_ROWS(m, Q4_STEP);
#undef Q4_STEP
  }
}

/* Attention's second product with its softmax, for decode steps, batches of them and speculative
 * verifies: c[r] = softmax(a[r]) times b, for scores a (m x k) and values b (k x n), the row's
 * exponentials summed in one chain in k order and the weighted values in one FMA chain per
 * output in k order, divided by the sum at the end. MLX's CPU softmax computes exp one element at
 * a time (~16 ns each here) and OpenBLAS then packs the values into a scratch copy on every call;
 * here the exp is eight wide and the values are read once. The order is the point as much as the
 * speed: a masked score (exp 0) adds nothing to either chain, so a row has the same bits whatever
 * masked keys stand before or after its own (a verify row against the draft's later keys, a
 * batch row behind left padding) and however many rows the call has. A decode step, a
 * speculative verify and a batched step then give a position the same attention output. */

/* exp(x) for x <= 0 (scores minus their row maximum), Cephes' expf as MLX's own: x = n ln2 + f,
 * exp(f) by a degree-5 polynomial, times 2^n. Below -87 (near the bottom of float's normal
 * range, and every masked score) it is exactly 0. A fixed sequence of operations: each element's bits depend on
 * its value alone. */
static inline __m256 exp_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.0f);
  __m256 zero_mask = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(low, x); /* a NaN score stays NaN (max_ps returns its second operand) */
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                              _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero_mask, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2)));
}

/* A growing scratch buffer per thread (the caller's and the helper's). */
static __thread float *scratch = NULL;
static __thread size_t scratch_floats = 0;
static float *scratch_for(size_t floats) {
  if (floats > scratch_floats) {
    free(scratch);
    scratch = aligned_alloc(32, (floats * sizeof(float) + 31) / 32 * 32);
    scratch_floats = scratch ? floats : 0;
  }
  return scratch;
}

/* Rows r0 .. r1-1 of c = softmax(a) b (see above), the sums taken in key order from key
 * `first` round to key first - 1: a sliding window's keys after it wrapped stand in a ring whose
 * oldest key is not the first (mlx-lm's RotatingKVCache), and summed from the oldest a decode
 * step's row has the bits the same position gets in a verify (whose keys are in temporal order).
 * 0: no memory for the exponentials. */
/* A key whose exponential is 0 is skipped, not multiplied: its value is never read (a masked
 * slot's contents do not matter). */
static int softmax_rows_product(int r0, int r1, int n, int k, int first, const float *a, int lda,
                                const float *b, int ldb, float *c, int ldc) {
  size_t padded = ((size_t)k + 7) / 8 * 8;
  float *e = scratch_for(padded);
  if (!e) return 0;
  for (int r = r0; r < r1; r++) {
    const float *row = a + (size_t)r * lda;
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    int kk = 0;
    for (; kk + 8 <= k; kk += 8) top8 = _mm256_max_ps(_mm256_loadu_ps(row + kk), top8);
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, top8);
    for (int l = 0; l < 8; l++) top = lanes[l] > top ? lanes[l] : top;
    for (; kk < k; kk++) top = row[kk] > top ? row[kk] : top;
    __m256 shift = _mm256_set1_ps(top);
    for (kk = 0; kk < k; kk += 8) {
      __m256 x;
      if (kk + 8 <= k) x = _mm256_loadu_ps(row + kk);
      else { /* the last inputs, padded with scores that give exp 0 */
        float tail[8];
        for (int l = 0; l < 8; l++) tail[l] = kk + l < k ? row[kk + l] : -INFINITY;
        x = _mm256_loadu_ps(tail);
      }
      _mm256_store_ps(e + kk, exp_nonpositive(_mm256_sub_ps(x, shift)));
    }
    /* The keys in order: [first, k) then [0, first). */
    const int from[2] = {first, 0}, to[2] = {k, first};
    float sum = 0.0f;
    for (int part = 0; part < 2; part++)
      for (kk = from[part]; kk < to[part]; kk++) sum += e[kk];
    float *out = c + (size_t)r * ldc;
    int j = 0;
    __m256 s = _mm256_set1_ps(sum);
    for (; j + 64 <= n; j += 64) { /* eight vectors of outputs: eight independent chains */
      __m256 o[8];
      for (int v = 0; v < 8; v++) o[v] = _mm256_setzero_ps();
      for (int part = 0; part < 2; part++)
        for (kk = from[part]; kk < to[part]; kk++) {
          if (e[kk] == 0.0f) continue;
          __m256 x = _mm256_broadcast_ss(e + kk);
          const float *values = b + (size_t)kk * ldb + j;
          for (int v = 0; v < 8; v++)
            o[v] = _mm256_fmadd_ps(_mm256_loadu_ps(values + 8 * v), x, o[v]);
        }
      for (int v = 0; v < 8; v++) _mm256_storeu_ps(out + j + 8 * v, _mm256_div_ps(o[v], s));
    }
    for (; j + 8 <= n; j += 8) {
      __m256 o = _mm256_setzero_ps();
      for (int part = 0; part < 2; part++)
        for (kk = from[part]; kk < to[part]; kk++)
          if (e[kk] != 0.0f)
            o = _mm256_fmadd_ps(_mm256_loadu_ps(b + (size_t)kk * ldb + j),
                                _mm256_broadcast_ss(e + kk), o);
      _mm256_storeu_ps(out + j, _mm256_div_ps(o, s));
    }
    for (; j < n; j++) { /* the same chain, one output at a time */
      float o = 0.0f;
      for (int part = 0; part < 2; part++)
        for (kk = from[part]; kk < to[part]; kk++)
          if (e[kk] != 0.0f) o = fmaf(b[(size_t)kk * ldb + j], e[kk], o);
      out[j] = o / sum;
    }
  }
  return 1;
}

static void ensure_atfork(void);

static size_t packed_size(int n, int k) { return (size_t)((n + 15) / 16) * 16 * (size_t)k; }

static int install_copy(const float *b, int n, int k, int ldb, void *pk, int format,
                        size_t bytes);

/* Packs weight `b` (n x k, leading dim ldb) for one-row products, copying its current contents
 * (a registration of an address seen before replaces the old copy: the address may now hold
 * another array). 0: done, 1: no memory, 2: table full. */
int skinny_gemm_pack(const float *b, int n, int k, int ldb) {
  int blocks = (n + 15) / 16;
  size_t floats = packed_size(n, k);
  ensure_atfork(); /* a forked child must not wait for the parent's readers */
  float *pk = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
  if (!pk) return 1;
  for (int jb = 0; jb < blocks; jb++)
    for (int kk = 0; kk < k; kk++)
      for (int l = 0; l < 16; l++) {
        int j = jb * 16 + l;
        pk[((size_t)jb * k + kk) * 16 + l] = j < n ? b[(size_t)j * ldb + kk] : 0.0f;
      }
  return install_copy(b, n, k, ldb, pk, COPY_F32, floats * sizeof(float));
}

/* Whether the codes (layout above) rebuild every value of b, bit for bit, with q4_rows's
 * arithmetic: a float multiply, then an add (scalar here, the same IEEE operations). Checked on
 * registration so that nothing the loader computed in numpy (its rounding, a denormal mode) is
 * trusted blindly: a weight that does not rebuild keeps being read from its float copy. */
static int q4_rebuilds(const float *b, int n, int k, int ldb, const uint8_t *codes) {
  for (int j = 0; j < n; j++) {
    const uint8_t *block = codes + (size_t)(j / 16) * (size_t)(k / Q4_GROUP) * Q4_GROUP_BYTES;
    int lane = j % 16;
    for (int kk = 0; kk < k; kk++) {
      const uint8_t *group = block + (size_t)(kk / Q4_GROUP) * Q4_GROUP_BYTES;
      float scale, offset;
      memcpy(&scale, group + 4 * lane, sizeof scale);
      memcpy(&offset, group + 64 + 4 * lane, sizeof offset);
      uint8_t byte = group[128 + (kk % Q4_GROUP) * 8 + lane % 8];
      float q = (float)(lane < 8 ? byte & 0x0F : byte >> 4);
      float product = q * scale;
      float w = product + offset;
      if (memcmp(&w, b + (size_t)j * ldb + kk, sizeof w) != 0) return 0;
    }
  }
  return 1;
}

/* Registers weight `b` (n x k, leading dim ldb) as the 4-bit codes `codes` (q4_size(n, k) bytes
 * in the layout above, copied; k a multiple of Q4_GROUP). Replaces any earlier copy of b.
 * 0: done, 1: no memory, 2: table full, 3: k is not a multiple of Q4_GROUP, 4: the codes do not
 * rebuild b bit for bit (nothing registered). */
int skinny_gemm_pack_q4(const float *b, int n, int k, int ldb, const uint8_t *codes) {
  if (k % Q4_GROUP != 0 || k <= 0 || n <= 0) return 3;
  if (!q4_rebuilds(b, n, k, ldb, codes)) return 4;
  size_t bytes = q4_size(n, k);
  ensure_atfork();
  uint8_t *copy = aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!copy) return 1;
  memcpy(copy, codes, bytes);
  return install_copy(b, n, k, ldb, copy, COPY_Q4, bytes);
}

/* Publishes `pk` (format, bytes) as b's copy, freeing any earlier one once no reader holds it.
 * Takes ownership of pk (freed on failure). */
static int install_copy(const float *b, int n, int k, int ldb, void *pk, int format,
                        size_t bytes) {
  pthread_mutex_lock(&packed_mu);
  /* b's own slot if it has one (up to the first empty slot, where a lookup stops), else the
   * first free one on the way: an unregistered entry's, or the empty one. */
  unsigned h = packed_slot(b);
  packed_t *own = NULL, *reuse = NULL;
  for (int i = 0; i < PACKED && own == NULL; i++) {
    packed_t *e = &packed_tab[(h + i) % PACKED];
    if (e->b == b) own = e;
    else if (e->b == NULL || e->packed == NULL) {
      if (reuse == NULL) reuse = e;
      if (e->b == NULL) break;
    }
  }
  packed_t *slot = own ? own : reuse;
  if (slot == NULL) {
    pthread_mutex_unlock(&packed_mu);
    free(pk);
    return 2;
  }
  if (slot->packed) { /* b registered before: readers may hold the old copy */
    void *old = slot->packed;
    __atomic_store_n(&slot->packed, NULL, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&packed_users, __ATOMIC_SEQ_CST) != 0) _mm_pause();
    packed_bytes -= (long)slot->bytes;
    free(old);
  }
  if (slot->screen) { /* no reader left (above, or the slot was free) */
    packed_bytes -= screen_size(slot->screen);
    screen_free(slot->screen);
    slot->screen = NULL;
  }
  /* Taking a free slot: readers check `packed` (NULL until the end) before n, k and ldb. */
  slot->n = n, slot->k = k, slot->ldb = ldb, slot->format = format, slot->bytes = bytes;
  __atomic_store_n(&slot->b, b, __ATOMIC_RELEASE);
  __atomic_store_n(&slot->packed, pk, __ATOMIC_SEQ_CST);
  packed_bytes += (long)bytes;
  pthread_mutex_unlock(&packed_mu);
  return 0;
}

/* Drops the packed copy of `b` once no product reads it; its slot stays (a tombstone). */
void skinny_gemm_unpack(const float *b) {
  pthread_mutex_lock(&packed_mu);
  unsigned h = packed_slot(b);
  for (int i = 0; i < PACKED; i++) {
    packed_t *e = &packed_tab[(h + i) % PACKED];
    if (e->b == NULL) break;
    if (e->b == b && e->packed) {
      void *old = e->packed;
      __atomic_store_n(&e->packed, NULL, __ATOMIC_SEQ_CST);
      while (__atomic_load_n(&packed_users, __ATOMIC_SEQ_CST) != 0) _mm_pause();
      packed_bytes -= (long)e->bytes;
      free(old);
      if (e->screen) {
        packed_bytes -= screen_size(e->screen);
        screen_free(e->screen);
        e->screen = NULL;
      }
      break;
    }
  }
  pthread_mutex_unlock(&packed_mu);
}

long skinny_gemm_packed_bytes(void) { return packed_bytes; }

/* Two threads: the calling thread takes the first half of the output, a helper the second. The
 * helper spins briefly for the next call (q, k and v, or gate and up, come back to back), then
 * sleeps. The spin is short on purpose: on two cores a spinning helper takes the core that MLX's
 * graph building and its non-matmul ops need. Measured on SmolLM2 decode at a 1000-token context
 * (engine tok/s, medians of 6): spinning 0.5 ms 21.6, 0.2 ms 21.7, 50 us 25.5, 5 us 25.8; Gemma 3
 * 270M 17.5 at 0.5 ms and 18.2 at 50 us. One caller at a time uses the helper; a concurrent
 * caller computes alone. */
#define HELPER_SPIN_NS 30000L
typedef struct {
  int m, j0, j1, n, k, lda, ldb, ldc;
  const float *a, *b;
  const void *pk; /* b's copy (packed floats, or 4-bit codes: pk_format), or NULL */
  int pk_format;
  float *c;
  int softmax; /* 1: rows j0 .. j1-1 of softmax(a) b, else columns j0 .. j1-1 of a b^T */
  int first;   /* softmax: the key its sums start from */
  const struct screen *screen; /* set: screen scores of columns j0 .. j1-1 (output_screen.c) */
  double *scores, *lowest;     /* screen: the scores, and each half's largest lower bounds */
  const double *h_norms;       /* screen: each row's norm */
} job_t;

static void screen_job(const job_t *w);

static void run_block(const job_t *w) {
  if (w->screen) {
    screen_job(w);
  } else if (w->softmax) {
    if (!softmax_rows_product(w->j0, w->j1, w->n, w->k, w->first, w->a, w->lda, w->b, w->ldb,
                              w->c, w->ldc))
      for (int r = w->j0; r < w->j1; r++) /* no memory for the exponentials: loud, not wrong */
        for (int j = 0; j < w->n; j++) w->c[(size_t)r * w->ldc + j] = NAN;
  } else if (w->pk && w->pk_format == COPY_Q4)
    q4_block(w->m, w->j0, w->j1, w->n, w->k, w->a, w->lda, w->pk, w->c, w->ldc);
  else if (w->pk)
    packed_block(w->m, w->j0, w->j1, w->n, w->k, w->a, w->lda, w->pk, w->c, w->ldc);
  else
    rows_block(w->m, w->j0, w->j1, w->n, w->k, w->a, w->lda, w->b, w->ldb, w->c, w->ldc);
}
static pthread_t helper;
static int threads = 1, helper_started = 0;
static pthread_mutex_t helper_owner = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static job_t job;
static int job_ready = 0, job_done = 1;

static long monotonic_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *helper_main(void *unused) {
  (void)unused;
  for (;;) {
    long waited_from = -1;
    int spins = 0;
    while (!__atomic_load_n(&job_ready, __ATOMIC_ACQUIRE)) {
      _mm_pause();
      if (++spins % 32) continue; /* the clock every 32 pauses (~1 us) */
      long now = monotonic_ns();
      if (waited_from < 0) waited_from = now;
      if (now - waited_from < HELPER_SPIN_NS) continue;
      pthread_mutex_lock(&mu);
      while (!__atomic_load_n(&job_ready, __ATOMIC_ACQUIRE)) pthread_cond_wait(&cv, &mu);
      pthread_mutex_unlock(&mu);
    }
    int posted = 1;
    /* Taken unless the caller took it back (it finished its own half first and did this one). */
    if (!__atomic_compare_exchange_n(&job_ready, &posted, 0, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
      continue;
    run_block(&job);
    __atomic_add_fetch(&helper_halves, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&job_done, 1, __ATOMIC_RELEASE);
  }
  return NULL;
}

/* A forked child has no helper thread (fork copies only the calling thread): start afresh. */
static void after_fork_in_child(void) {
  helper_started = 0;
  job_ready = 0;
  job_done = 1;
  packed_users = 0; /* a product the parent was computing does not go on in the child */
  pthread_mutex_init(&packed_mu, NULL);
  pthread_mutex_init(&helper_owner, NULL);
  pthread_mutex_init(&mu, NULL);
  pthread_cond_init(&cv, NULL);
}

static void ensure_atfork(void) {
  static int atfork_set = 0;
  if (!atfork_set) atfork_set = pthread_atfork(NULL, NULL, after_fork_in_child) == 0;
}

static int ensure_helper(void) {
  ensure_atfork();
  if (!helper_started) helper_started = pthread_create(&helper, NULL, helper_main, NULL) == 0;
  return helper_started;
}

/* Runs `whole` with its range split at `half`: the caller computes [j0, half), the helper
 * [half, j1) unless the caller finishes first and takes that back. Alone when the helper is off
 * or in use. */
static void run_split(job_t whole, int half) {
  if (threads < 2 || half <= whole.j0 || half >= whole.j1 ||
      pthread_mutex_trylock(&helper_owner) != 0) {
    run_block(&whole);
    return;
  }
  if (!ensure_helper()) {
    pthread_mutex_unlock(&helper_owner);
    run_block(&whole);
    return;
  }
  job = whole;
  job.j0 = half;
  __atomic_store_n(&job_done, 0, __ATOMIC_RELAXED);
  pthread_mutex_lock(&mu);
  __atomic_store_n(&job_ready, 1, __ATOMIC_RELEASE);
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
  whole.j1 = half;
  run_block(&whole);
  int posted = 1;
  if (__atomic_compare_exchange_n(&job_ready, &posted, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    run_block(&job); /* the helper has not started it (asleep): do it here rather than wait */
    __atomic_add_fetch(&halves_taken_back, 1, __ATOMIC_RELAXED);
  } else
    while (!__atomic_load_n(&job_done, __ATOMIC_ACQUIRE)) _mm_pause();
  pthread_mutex_unlock(&helper_owner);
}

static void compute(int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                    float *c, int ldc) {
  __atomic_add_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
  int format;
  const void *pk = packed_find(b, n, k, ldb, &format);
  if (pk) __atomic_add_fetch(&packed_products, 1, __ATOMIC_RELAXED);
  job_t whole = {m, 0, n, n, k, lda, ldb, ldc, a, b, pk, format, c, 0, 0, NULL, NULL, NULL, NULL};
  /* Halves a multiple of 16: a packed block (or a tile pair) is not split. */
  run_split(whole, n < 256 ? 0 : ((n / 2) + 15) / 16 * 16);
  __atomic_sub_fetch(&packed_users, 1, __ATOMIC_SEQ_CST);
}

/* softmax(a) b for all m rows, the rows shared with the helper when there is enough work. */
static void softmax_product(int m, int n, int k, int first, const float *a, int lda,
                            const float *b, int ldb, float *c, int ldc) {
  __atomic_add_fetch(&softmax_products, 1, __ATOMIC_RELAXED);
  job_t whole = {m, 0, m, n, k, lda, ldb, ldc, a, b, NULL, COPY_F32, c, 1, first % k, NULL, NULL,
                 NULL, NULL};
  run_split(whole, (long)m * n * k < 32768L ? 0 : (m + 1) / 2);
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

#include "output_screen.c"

/* Shapes seen, with the verdict of their first call: 1 same bits as the reference, 2 not. A
 * shape is k with n's residue mod 64 and whether the weight is read packed (bit 6) or as 4-bit
 * codes (bit 7), so each path is checked on its own first call: the order of every sum depends
 * on k alone, and the residue covers OpenBLAS's edge tiles, while attention's products (n = the
 * context, one more each step) do not fill the table. */
#define SHAPES 1024
static struct {
  int n, k, verdict;
} shapes[SHAPES];
static pthread_mutex_t shapes_mu = PTHREAD_MUTEX_INITIALIZER;

static int verdict_for(int n, int k) {
  n &= 255;
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
  n &= 255;
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
 * product, alpha 1, beta 0; and products over at most SMALL_K inputs with up to ATTENTION_ROWS
 * rows, whose B is read as it is (attention's scores: queries times keys, k the head size, n the
 * context). Anything else is OpenBLAS's. `reference_only` computes those calls through the padded
 * OpenBLAS product instead of this kernel (the bits this kernel must reproduce; for tests).
 *
 * One more call is this library's own: an alpha among the NaNs SOFTMAX_ALPHA_BITS marks, with B
 * not transposed and beta 0, asks for softmax(A) B (softmax_rows_product), which ragcache's
 * attention requests through MLX's addmm. Nothing else passes such a NaN; if such a call ever
 * reached OpenBLAS its result would be NaN, not a silently different number. */
#define MAX_ROWS 8
#define SMALL_K 256
/* A verify's score rows: the query heads of one key head times the verified positions (Qwen2.5
 * 0.5B: 7 x 33), and OpenBLAS's small-matrix kernel (SkylakeX) would take such products at small
 * contexts in another order than a decode step's. */
#define ATTENTION_ROWS 256
/* Products of 2-8 rows are taken only up to this size (m*n*k), where OpenBLAS may use its
 * small-matrix kernel; above it OpenBLAS's ordinary path has the reference bits itself and its
 * packed kernel is faster than this one's row-major reads (a speculative verify of 8 rows over
 * every weight measured slower here, with the earlier scalar chains). A weight with a packed copy is taken at any size: its rows
 * are read once for all the product's rows (packed_rows). */
#define SMALL_PRODUCT 1000000L
/* A quiet NaN whose payload's top four bits are 1010; its low 18 bits carry the key the sums
 * start from (softmax_rows_product). */
#define SOFTMAX_ALPHA_BITS 0x7FE80000u
#define SOFTMAX_ALPHA_MASK 0xFFFC0000u
#define SOFTMAX_FIRST_LIMIT (1 << 18)
/* Another quiet NaN (payload top bits 1001, no low bits): a greedy step's output product, which
 * may return -inf for words that cannot be its argmax (output_screen.c). Every other route
 * computes it as alpha 1. */
#define SCREEN_ALPHA_BITS 0x7FE40000u
static int reference_only = 0;

/* The key a softmax call's sums start from, or -1: alpha does not ask for a softmax product. */
static int softmax_first(float alpha) {
  uint32_t bits;
  memcpy(&bits, &alpha, sizeof bits);
  return (bits & SOFTMAX_ALPHA_MASK) == SOFTMAX_ALPHA_BITS ? (int)(bits & ~SOFTMAX_ALPHA_MASK) : -1;
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  int verdict, packed = 0;
  if (!real_sgemm) real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm"); /* never bound */
  uint32_t alpha_bits;
  memcpy(&alpha_bits, &alpha, sizeof alpha_bits);
  if (alpha_bits == SCREEN_ALPHA_BITS) {
    alpha = 1.0f;
    /* Screened only where the full product would come from the packed copy with the
     * reference's bits (its shape's first call checked); else the ordinary route below. */
    if (enabled && !reference_only && order == RowMajor && ta == NoTrans && tb == Trans &&
        m >= 1 && m <= SCREEN_ROWS && beta == 0.0f && n % 8 == 0 && lda >= k && ldc >= n &&
        verdict_for((n & 63) | 64, k) == 1 && screened_product(m, n, k, a, lda, b, ldb, c, ldc)) {
      __atomic_add_fetch(&calls_taken, 1, __ATOMIC_RELAXED);
      return;
    }
  }
  int first = softmax_first(alpha);
  if (first >= 0 && order == RowMajor && ta == NoTrans && tb == NoTrans && beta == 0.0f &&
      m >= 1 && n >= 1 && k >= 1) {
    softmax_product(m, n, k, first, a, lda, b, ldb, c, ldc);
    return;
  }
  int product_shaped = enabled && order == RowMajor && ta == NoTrans && tb == Trans && m >= 1 &&
                       k > 0 && n >= 1 && alpha == 1.0f && beta == 0.0f;
  if (product_shaped && m <= MAX_ROWS && n % 8 == 0) packed = is_packed(b, n, k, ldb);
  int small_rows = m <= MAX_ROWS && (m == 1 || (long)m * n * k <= SMALL_PRODUCT || packed);
  int small_k = !packed && m <= ATTENTION_ROWS && k <= SMALL_K;
  if (!(product_shaped && (small_rows || small_k))) {
    __atomic_add_fetch(&calls_passed, 1, __ATOMIC_RELAXED);
    real_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  int shape = (n & 63) | (packed == 1 ? 64 : packed == 2 ? 128 : 0);
  verdict = reference_only ? 2 : verdict_for(shape, k);
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
    record(shape, k, same ? 1 : 2);
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
/* softmax(a) b for a (m x k) and b (k x n), its sums from key `first`, as attention's calls
 * get it. */
int skinny_gemm_softmax_product(int m, int n, int k, int first, const float *a, const float *b,
                                float *c) {
  if (m < 1 || n < 1 || k < 1 || first < 0 || first >= k) return 0;
  softmax_product(m, n, k, first, a, k, b, n, c, n);
  return 1;
}
/* The alpha that asks cblas_sgemm for softmax(A) B with its sums from key `first`
 * (0 <= first < skinny_gemm_softmax_first_limit()). */
float skinny_gemm_softmax_alpha(int first) {
  float alpha;
  uint32_t bits = SOFTMAX_ALPHA_BITS | (uint32_t)first;
  memcpy(&alpha, &bits, sizeof alpha);
  return alpha;
}
int skinny_gemm_softmax_first_limit(void) { return SOFTMAX_FIRST_LIMIT; }

/* The alpha that asks cblas_sgemm for a greedy step's screened output product. */
float skinny_gemm_screen_alpha(void) {
  float alpha;
  uint32_t bits = SCREEN_ALPHA_BITS;
  memcpy(&alpha, &bits, sizeof alpha);
  return alpha;
}

/* 0: calls taken, 1: calls passed to OpenBLAS, 2: shapes refused by their first-call check,
 * 3: products computed from a packed copy, 4: second halves the helper computed, 5: second
 * halves the caller took back from a helper that had not started them, 6: softmax products,
 * 7: screened output products, 8: screened products that computed the full product instead,
 * 9: 16-word blocks the screened products computed exactly. */
long skinny_gemm_counter(int which) {
  return which == 0   ? calls_taken
         : which == 1 ? calls_passed
         : which == 2 ? shapes_refused
         : which == 3 ? packed_products
         : which == 4 ? helper_halves
         : which == 5 ? halves_taken_back
         : which == 6 ? softmax_products
         : which == 7 ? screened_products
         : which == 8 ? screen_fallbacks
                      : screen_blocks;
}
