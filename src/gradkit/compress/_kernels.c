/* Fused CPU kernels for gradkit.compress: one pass over memory where the torch path needs several.
 *
 * Compiled on first use by gradkit/compress/_native.py (gcc/cc, -O3, no implicit FP contraction: a
 * multiply-add is fused exactly where the torch path's addcmul fuses it, so that results match bit for
 * bit) and called through ctypes on raw
 * float32/uint8 buffers. Every function works on a range [begin, end) of groups or samples so that the
 * caller can split work across threads (ctypes releases the GIL). The pure-PyTorch code in _quant.py
 * and _blpa.py computes the same results and stays the reference; tests hold these kernels to it.
 *
 * Code layout (as _quant._pack_codes): 8/bits codes per byte, code k of a byte in bits [bits*k, bits*(k+1)).
 *
 * Memory safety: every entry point validates its scalar arguments (bits, group size, element and
 * sample counts, the [begin, end) range, the mode) before touching memory and returns 0 or a negative
 * GK_E* code, which _native.py turns into an exception. Buffer lengths cannot be seen from a pointer:
 * _native.py checks every tensor's dtype, contiguity and length against what the call will touch.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Largest quantisation group (and BLPA chunk) held on the stack; _native.py passes -DMAX_GROUP from its
 * MAX_GROUP and checks gk_max_group() after loading, so the two cannot drift apart. */
#ifndef MAX_GROUP
#define MAX_GROUP 4096
#endif

/* Error codes (gk_ranges also returns 1, 0 and -1: float16 ranges, float32 ranges, no _Float16). */
#define GK_EBITS (-2)   /* bits not 2, 4 or 8 */
#define GK_EGROUP (-3)  /* group size not a multiple of 8 in [8, MAX_GROUP] */
#define GK_ECOUNT (-4)  /* negative or overflowing element / sample / channel count */
#define GK_ERANGE (-5)  /* [begin, end) not inside [0, groups or samples] */
#define GK_EMODE (-6)   /* rounding mode not 0..2, or mode 2 without noise */
#define GK_ENULL (-7)   /* a needed buffer is NULL */
#define GK_ELAYOUT (-8) /* a plane's codes do not fill whole bytes (hw * bits % 8 != 0) */

int gk_max_group(void) { return MAX_GROUP; }

static int check_bits(int bits) { return bits == 2 || bits == 4 || bits == 8 ? 0 : GK_EBITS; }

/* Group size gs and element count n; on success *groups = ceil(n / gs). */
static int check_groups(int64_t n, int64_t gs, int64_t g0, int64_t g1, int64_t *groups) {
    if (gs < 8 || gs > MAX_GROUP || gs % 8) return GK_EGROUP;
    if (n < 0 || n > INT64_MAX - gs) return GK_ECOUNT;
    *groups = (n + gs - 1) / gs;
    if (g0 < 0 || g1 < g0 || g1 > *groups) return GK_ERANGE;
    return 0;
}

/* NCHW layout: c_count channels of hw elements, samples [n0, n1); the element count must fit int64. */
static int check_planes(int64_t n0, int64_t n1, int64_t c_count, int64_t hw, int bits) {
    if (c_count < 0 || hw < 0) return GK_ECOUNT;
    if (n0 < 0 || n1 < n0) return GK_ERANGE;
    if (c_count > 0 && hw > 0 && (n1 > INT64_MAX / 8 / c_count / hw)) return GK_ECOUNT;
    if (bits && (hw * bits) % 8) return GK_ELAYOUT;
    return 0;
}
/* Reductions may be reordered so that they vectorise (sums and extremes; torch reorders its own too). */
#if defined(__GNUC__) && !defined(__clang__)
#define REORDERABLE __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math", \
                                            "finite-math-only")))
#else
#define REORDERABLE
#endif

static inline void store_codes(const uint8_t *codes, int64_t count, int bits, uint8_t *out) {
    if (bits == 8) {
        memcpy(out, codes, (size_t)count);
    } else if (bits == 4) {
        for (int64_t j = 0; j < count / 2; j++)
            out[j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << 4));
    } else {
        for (int64_t j = 0; j < count / 4; j++)
            out[j] = (uint8_t)(codes[4 * j] | (codes[4 * j + 1] << 2) | (codes[4 * j + 2] << 4) |
                               (codes[4 * j + 3] << 6));
    }
}

static inline void load_codes(const uint8_t *in, int64_t count, int bits, uint8_t *codes) {
    if (bits == 8) {
        memcpy(codes, in, (size_t)count);
    } else if (bits == 4) {
        for (int64_t j = 0; j < count / 2; j++) {
            codes[2 * j] = in[j] & 15;
            codes[2 * j + 1] = in[j] >> 4;
        }
    } else {
        for (int64_t j = 0; j < count / 4; j++) {
            codes[4 * j] = in[j] & 3;
            codes[4 * j + 1] = (in[j] >> 2) & 3;
            codes[4 * j + 2] = (in[j] >> 4) & 3;
            codes[4 * j + 3] = in[j] >> 6;
        }
    }
}

/* splitmix64 (Steele et al. 2014): a counter-based stream, so every group draws its own noise and the
 * result does not depend on how groups are split across threads. */
static inline uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* ---- generic path: per-group quantisation (_quant.py) ------------------------------------------- */

/* Per-group minimum and maximum of x[0:n], groups of gs; the last group may be partial. */
REORDERABLE int gk_minmax(const float *x, int64_t n, int64_t gs, int64_t g0, int64_t g1, float *lo, float *hi) {
    int64_t groups;
    int err = check_groups(n, gs, g0, g1, &groups);
    if (err) return err;
    if (g1 > g0 && (!x || !lo || !hi)) return GK_ENULL;
    for (int64_t g = g0; g < g1; g++) {
        const float *p = x + g * gs;
        int64_t m = (g + 1) * gs <= n ? gs : n - g * gs;
        float a = p[0], b = p[0];
        for (int64_t i = 0; i < m; i++) {
            a = p[i] < a ? p[i] : a;
            b = p[i] > b ? p[i] : b;
        }
        lo[g] = a;
        hi[g] = b;
    }
    return 0;
}

/* Stored ranges from the groups' minima/maxima, as _quant._ranges_from: lo = min(mn, 0); positives of
 * a non-negative group (lo == 0) spread over levels - 1 steps. With try_half, lo and step are rounded
 * outward to float16 (lo down, step up); if every group fits (finite, step 0 or normal) they are written
 * to lo16/step16 and 1 is returned, else float32 ranges go to step32 and 0 is returned. lo32 always
 * holds the lo that codes are computed against (the float16 value widened, when stored as float16) and
 * inv SAFETY/step (0 for a constant group). -1: no _Float16 in this compiler. */
#ifdef __FLT16_MAX__
static inline uint16_t half_bits(_Float16 h) { uint16_t b; memcpy(&b, &h, 2); return b; }
static inline _Float16 half_from_bits(uint16_t b) { _Float16 h; memcpy(&h, &b, 2); return h; }

static inline _Float16 half_down(_Float16 h) {  /* nextafter(h, -inf) */
    uint16_t b = half_bits(h);
    if ((b & 0x7fff) == 0) return half_from_bits(0x8001);
    return half_from_bits(b & 0x8000 ? b + 1 : b - 1);
}

static inline _Float16 half_up(_Float16 h) {  /* nextafter(h, +inf) */
    uint16_t b = half_bits(h);
    if ((b & 0x7fff) == 0) return half_from_bits(0x0001);
    return half_from_bits(b & 0x8000 ? b - 1 : b + 1);
}

int gk_ranges(const float *mn, const float *mx, int64_t groups, int bits, int try_half, float safety,
              float *lo32, float *step32, void *lo16_out, void *step16_out, float *inv) {
    _Float16 *lo16 = lo16_out, *step16 = step16_out;
    if (check_bits(bits)) return GK_EBITS;
    if (groups < 0) return GK_ECOUNT;
    if (groups > 0 && (!mn || !mx || !lo32 || !step32 || !lo16 || !step16 || !inv)) return GK_ENULL;
    const float top = (float)((1 << bits) - 1);
    int fits = try_half;
    for (int64_t g = 0; g < groups && fits; g++) {
        const float lo = mn[g] < 0.0f ? mn[g] : 0.0f;
        const float levels = lo == 0.0f ? top - 1.0f : top;
        _Float16 l = (_Float16)lo;
        if ((float)l > lo) l = half_down(l);
        const float step = (mx[g] - (float)l) / levels;
        _Float16 st = (_Float16)step;
        if ((float)st < step) st = half_up(st);
        const float lf = (float)l, sf = (float)st;
        if (!isfinite(lf) || !isfinite(sf) || !(sf == 0.0f || sf >= 0x1p-14f)) fits = 0;
        lo16[g] = l;
        step16[g] = st;
        lo32[g] = lf;
        inv[g] = sf > 0.0f ? (1.0f / sf) * safety : 0.0f; /* torch's scalar / tensor: reciprocal, then times */
    }
    if (fits) return 1;
    for (int64_t g = 0; g < groups; g++) {
        const float lo = mn[g] < 0.0f ? mn[g] : 0.0f;
        const float levels = lo == 0.0f ? top - 1.0f : top;
        const float step = (mx[g] - lo) / levels;
        lo32[g] = lo;
        step32[g] = step;
        inv[g] = step > 0.0f ? (1.0f / (step > FLT_MIN ? step : FLT_MIN)) * safety : 0.0f;
    }
    return 0;
}
#else
int gk_ranges(const float *mn, const float *mx, int64_t groups, int bits, int try_half, float safety,
              float *lo32, float *step32, void *lo16_out, void *step16_out, float *inv) {
    if (check_bits(bits)) return GK_EBITS;
    if (groups < 0) return GK_ECOUNT;
    return -1;
}
#endif

/* Codes of groups [g0, g1): q = (x - lo)*inv + shift + u truncated and clamped to [0, levels], where a
 * group with lo == 0 (non-negative) has shift 1 and gives code 0 to its zeros only (exact ReLU masks).
 * u is 0.5 (nearest, mode 0), (byte + 0.5)/256 from splitmix64 seeded by (seed, group) (mode 1), or
 * noise[] (mode 2). The operations and their order are those of _quant.pack_reference.
 * Elements past n (padding of the last group) repeat x[n-1], as _quant._groups does. */
int gk_pack(const float *x, int64_t n, int64_t gs, int64_t g0, int64_t g1, const float *lo,
            const float *inv, int bits, int mode, uint64_t seed, const float *noise, uint8_t *out) {
    int64_t groups;
    int err = check_groups(n, gs, g0, g1, &groups);
    if (err) return err;
    if (check_bits(bits)) return GK_EBITS;
    if (mode < 0 || mode > 2 || (mode == 2 && !noise && g1 > g0)) return GK_EMODE;
    if (g1 > g0 && (!x || !lo || !inv || !out)) return GK_ENULL;
    const float levels = (float)((1 << bits) - 1);
    const int64_t out_per_group = gs * bits / 8;
    uint8_t codes[MAX_GROUP];
    uint8_t rnd[MAX_GROUP];
    float buf[MAX_GROUP];
    for (int64_t g = g0; g < g1; g++) {
        const float *p = x + g * gs;
        int64_t m = (g + 1) * gs <= n ? gs : n - g * gs;
        const float *src = p;
        if (m < gs) {
            memcpy(buf, p, (size_t)m * sizeof(float));
            for (int64_t i = m; i < gs; i++) buf[i] = p[m - 1];
            src = buf;
        }
        const float l = lo[g], iv = inv[g];
        const int nonneg = l == 0.0f;
        if (mode == 1) {
            uint64_t state = seed ^ ((uint64_t)g * 0xD1B54A32D192ED03ULL);
            for (int64_t i = 0; i < gs; i += 8) {
                uint64_t r = splitmix64(&state);
                memcpy(rnd + i, &r, 8);
            }
        }
        const float shift = nonneg ? 1.0f : 0.0f;
        const float *u = noise ? noise + g * gs : 0;
        for (int64_t i = 0; i < gs; i++) {
            float q = (src[i] - l) * iv;
            q = q + shift;
            if (mode == 0) q = q + 0.5f;
            else if (mode == 1) q = q + ((float)rnd[i] * (1.0f / 256.0f) + 0.5f / 256.0f);
            else q = q + u[i];
            q = q < 0.0f ? 0.0f : (q > levels ? levels : q);
            uint8_t c = (uint8_t)q;
            codes[i] = (nonneg && !(src[i] > 0.0f)) ? 0 : c;
        }
        store_codes(codes, gs, bits, out + g * out_per_group);
    }
    return 0;
}

/* Decode groups [g0, g1) into out[0:n]: max(code * step + offset, floor), rounded as the torch path. */
int gk_unpack(const uint8_t *data, int64_t n, int64_t gs, int64_t g0, int64_t g1, int bits,
              const float *step, const float *offset, const float *floor_, float *out) {
    int64_t groups;
    int err = check_groups(n, gs, g0, g1, &groups);
    if (err) return err;
    if (check_bits(bits)) return GK_EBITS;
    if (g1 > g0 && (!data || !step || !offset || !floor_ || !out)) return GK_ENULL;
    const int64_t in_per_group = gs * bits / 8;
    uint8_t codes[MAX_GROUP];
    for (int64_t g = g0; g < g1; g++) {
        load_codes(data + g * in_per_group, gs, bits, codes);
        int64_t m = (g + 1) * gs <= n ? gs : n - g * gs;
        const float s = step[g], off = offset[g], fl = floor_[g];
        float *o = out + g * gs;
        for (int64_t i = 0; i < m; i++) {
            float v = (float)codes[i] * s;
            v = v + off;
            o[i] = v > fl ? v : fl;
        }
    }
    return 0;
}

/* ---- faithful path: BatchNorm -> ReLU -> Conv units (_blpa.py) ------------------------------------ *
 * x is NCHW float32 with hw = H*W; samples [n0, n1). Per-channel parameters are float32 arrays of C. */

/* Shifted per-channel sums for the batch statistics: s1 += sum(x - shift), s2 += sum((x - shift)^2),
 * in double, into the caller's (per-thread) accumulators. */
REORDERABLE int gk_moments(const float *x, int64_t n0, int64_t n1, int64_t c_count, int64_t hw, const float *shift,
                           double *s1, double *s2) {
    int err = check_planes(n0, n1, c_count, hw, 0);
    if (err) return err;
    if (n1 > n0 && c_count > 0 && (!x || !shift || !s1 || !s2)) return GK_ENULL;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t c = 0; c < c_count; c++) {
            const float *p = x + (n * c_count + c) * hw;
            const float sh = shift[c];
            double a = 0.0, b = 0.0;
            for (int64_t i = 0; i < hw; i++) {
                double d = (double)(p[i] - sh);
                a += d;
                b += d * d;
            }
            s1[c] += a;
            s2[c] += b;
        }
    return 0;
}

/* v of m packed codes, in bin units relative to the ReLU threshold: the bin centre code - centre, and for
 * a channel whose threshold code ct lies below (ct < 1) or above (ct > levels) the window the reserved
 * end code just across the threshold (see _blpa._fix_outside_values). The rare fix-up runs separately
 * so that the main loop vectorises. */
static inline void load_values(const uint8_t *packed, int64_t m, int bits, float centre, float ct, float *v) {
    const int levels = (1 << bits) - 1;
    const int low = ct < 1.0f, high = ct > (float)levels;
    uint8_t codes[MAX_GROUP];
    load_codes(packed, m, bits, codes);
    for (int64_t i = 0; i < m; i++) v[i] = (float)codes[i] - centre;
    if (low | high)
        for (int64_t i = 0; i < m; i++) {
            if (low && codes[i] == 0) v[i] = -0.5f;
            if (high && codes[i] == levels) v[i] = 0.5f;
        }
}

/* Forward: v = b_v + x*a_v; y = max(shift_y + v*scale_y, 0); code = clamp(ceil(v) + offset, 0, levels)
 * with the end-code rule for channels whose threshold lies outside the window. Writes y and packed codes. */
int gk_blpa_encode(const float *x, int64_t n0, int64_t n1, int64_t c_count, int64_t hw, const float *a_v,
                   const float *b_v, const float *scale_y, const float *shift_y, const float *offset,
                   const float *c_t, int bits, float *y, uint8_t *packed) {
    if (check_bits(bits)) return GK_EBITS;
    int err = check_planes(n0, n1, c_count, hw, bits);
    if (err) return err;
    if (n1 > n0 && c_count > 0 &&
        (!x || !a_v || !b_v || !scale_y || !shift_y || !offset || !c_t || !y || !packed)) return GK_ENULL;
    const int levels = (1 << bits) - 1;
    const float top = (float)levels;
    uint8_t codes[MAX_GROUP];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t c = 0; c < c_count; c++) {
            const int64_t base = (n * c_count + c) * hw;
            const float a = a_v[c], b = b_v[c], sy = scale_y[c], hy = shift_y[c], off = offset[c];
            const int low = c_t[c] < 1.0f, high = c_t[c] > top;
            for (int64_t i0 = 0; i0 < hw; i0 += MAX_GROUP) {
                const int64_t m = hw - i0 < MAX_GROUP ? hw - i0 : MAX_GROUP;
                const float *p = x + base + i0;
                float *q = y + base + i0;
                for (int64_t i = 0; i < m; i++) {
                    float v = fmaf(p[i], a, b);
                    float t = fmaf(v, sy, hy);
                    q[i] = t > 0.0f ? t : 0.0f;
                    float k = ceilf(v) + off;
                    k = k < 0.0f ? 0.0f : (k > top ? top : k);
                    uint8_t code = (uint8_t)k;
                    if (low) code = v > 0.0f ? (code < 1 ? 1 : code) : 0;
                    if (high) code = v > 0.0f ? (uint8_t)levels : (code > levels - 1 ? levels - 1 : code);
                    codes[i] = code;
                }
                store_codes(codes, m, bits, packed + (base + i0) * bits / 8);
            }
        }
    return 0;
}

/* Backward, step 1: the conv input y = max(shift_y + v*scale_y, 0) from the codes. */
int gk_blpa_decode(const uint8_t *packed, int64_t n0, int64_t n1, int64_t c_count, int64_t hw,
                   const float *centre, const float *c_t, const float *scale_y, const float *shift_y,
                   int bits, float *y) {
    if (check_bits(bits)) return GK_EBITS;
    int err = check_planes(n0, n1, c_count, hw, bits);
    if (err) return err;
    if (n1 > n0 && c_count > 0 && (!packed || !centre || !c_t || !scale_y || !shift_y || !y)) return GK_ENULL;
    float v[MAX_GROUP];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t c = 0; c < c_count; c++) {
            const int64_t base = (n * c_count + c) * hw;
            const float sy = scale_y[c], hy = shift_y[c];
            for (int64_t i0 = 0; i0 < hw; i0 += MAX_GROUP) {
                const int64_t m = hw - i0 < MAX_GROUP ? hw - i0 : MAX_GROUP;
                load_values(packed + (base + i0) * bits / 8, m, bits, centre[c], c_t[c], v);
                float *q = y + base + i0;
                for (int64_t i = 0; i < m; i++) {
                    float t = fmaf(v[i], sy, hy);
                    q[i] = t > 0.0f ? t : 0.0f;
                }
            }
        }
    return 0;
}

/* Backward, step 2: g *= (y > 0) in place (the exact ReLU mask); sum_g += sum(g), sum_gv += sum(g*v). */
REORDERABLE int gk_blpa_mask_sums(float *g, const float *y, const uint8_t *packed, int64_t n0, int64_t n1,
                                  int64_t c_count, int64_t hw, const float *centre, const float *c_t, int bits,
                                  double *sum_g, double *sum_gv) {
    if (check_bits(bits)) return GK_EBITS;
    int err = check_planes(n0, n1, c_count, hw, bits);
    if (err) return err;
    if (n1 > n0 && c_count > 0 && (!g || !y || !packed || !centre || !c_t || !sum_g || !sum_gv)) return GK_ENULL;
    float v[MAX_GROUP];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t c = 0; c < c_count; c++) {
            const int64_t base = (n * c_count + c) * hw;
            double a = 0.0, b = 0.0;
            for (int64_t i0 = 0; i0 < hw; i0 += MAX_GROUP) {
                const int64_t m = hw - i0 < MAX_GROUP ? hw - i0 : MAX_GROUP;
                load_values(packed + (base + i0) * bits / 8, m, bits, centre[c], c_t[c], v);
                float *q = g + base + i0;
                const float *r = y + base + i0;
                for (int64_t i = 0; i < m; i++) {
                    float gz = r[i] > 0.0f ? q[i] : 0.0f;
                    q[i] = gz;
                    a += (double)gz;
                    b += (double)(gz * v[i]);
                }
            }
            sum_g[c] += a;
            sum_gv[c] += b;
        }
    return 0;
}

/* Backward, step 3 (batch statistics): g = (g - m_g - x̂*m_gx) * k in place, x̂ = xt + v*xs. */
int gk_blpa_grad_input(float *g, const uint8_t *packed, int64_t n0, int64_t n1, int64_t c_count,
                       int64_t hw, const float *centre, const float *c_t, const float *xs,
                       const float *xt, const float *m_g, const float *m_gx, const float *k, int bits) {
    if (check_bits(bits)) return GK_EBITS;
    int err = check_planes(n0, n1, c_count, hw, bits);
    if (err) return err;
    if (n1 > n0 && c_count > 0 && (!g || !packed || !centre || !c_t || !xs || !xt || !m_g || !m_gx || !k))
        return GK_ENULL;
    float v[MAX_GROUP];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t c = 0; c < c_count; c++) {
            const int64_t base = (n * c_count + c) * hw;
            const float s = xs[c], t = xt[c], mg = m_g[c], mgx = m_gx[c], kk = k[c];
            for (int64_t i0 = 0; i0 < hw; i0 += MAX_GROUP) {
                const int64_t m = hw - i0 < MAX_GROUP ? hw - i0 : MAX_GROUP;
                load_values(packed + (base + i0) * bits / 8, m, bits, centre[c], c_t[c], v);
                float *q = g + base + i0;
                for (int64_t i = 0; i < m; i++) {
                    float xhat = fmaf(v[i], s, t);
                    q[i] = ((q[i] - mg) - xhat * mgx) * kk;
                }
            }
        }
    return 0;
}
