/* Fused CPU kernels for lightseg's inference and training in channels_last_3d (see native.py for why).
 *
 * Every map is one sample's (voxels x channels) floats, channels fastest. Loops run on OpenMP,
 * which resolves to the runtime PyTorch has already loaded, so the kernels share its threads
 * (and their count) instead of competing with them. Built with -O3 -march=native -ffast-math
 * -fno-associative-math: reassociation would split the conv's running sums into partial sums
 * that no longer fit the registers (1.3x slower, measured). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLOCK 64          /* voxels summed in float before their sum joins the double total */
#define PARALLEL 16384    /* voxels below which one thread is faster than waking the others */

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

static inline f32x8 load8(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, f32x8 v) { memcpy(p, &v, sizeof v); }

/* e^x to 2 ulp in float (Cody-Waite reduction by ln 2, Cephes' degree-5 polynomial, the power of
 * two through the exponent bits). Inline, so GCC vectorises the loops that call it: glibc's
 * vector expf is a function call costing more than the rest of a SiLU pass. */
static inline float fast_exp(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f); /* e^x stays a normal float */
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

static inline float silu(float y) { return y / (1.0f + fast_exp(-y)); }

/* Per-channel terms repeated ROW times (dst: ROW * c floats), so that loops over ROW voxels run over
 * ROW * c consecutive floats without a channel index and vectorise whatever c is (a loop over c
 * channels per voxel leaves vector lanes empty for c = 4 and pays a remainder for others). */
#define ROW 16
static void repeat_row(const float *restrict src, int64_t c, float *restrict dst) {
    for (int64_t k = 0; k < ROW * c; k++) dst[k] = src[k % c];
}

/* z = s + t * (d - s) for maps s and d of c channels and a one-channel map t (LightMedSeg's Eq. (9),
 * the texture-guided blend of an encoder stage's detail and smooth paths), and z's channel sums
 * added to sums[c], in one pass instead of a difference, a product, a sum and a mean. */
void texture_blend(const float *restrict s, const float *restrict d, const float *restrict t, int64_t c,
                   int64_t voxels, float *restrict z, double *restrict sums) {
#pragma omp parallel for schedule(static) reduction(+ : sums[:c]) if (voxels > PARALLEL)
    for (int64_t v0 = 0; v0 < voxels; v0 += BLOCK) {
        int64_t n = v0 + BLOCK < voxels ? BLOCK : voxels - v0;
        float block_sum[c];
        for (int64_t j = 0; j < c; j++) block_sum[j] = 0.0f;
        for (int64_t v = v0; v < v0 + n; v++)
            for (int64_t j = 0; j < c; j++) {
                float out = s[v * c + j] + t[v] * (d[v * c + j] - s[v * c + j]);
                z[v * c + j] = out;
                block_sum[j] += out;
            }
        for (int64_t j = 0; j < c; j++) sums[j] += block_sum[j];
    }
}

/* A group norm as a per-channel affine, scale = weight / sqrt(var + eps) and shift = bias - mean *
 * scale, for n samples of c channels in `groups` groups, from the channels' float64 sums and sums
 * of squares over `voxels` voxels; weight and bias (c floats) may be NULL. The group moments in
 * float64, the affine in float as PyTorch's ops computed it before. Why: in tensor ops this was
 * about 20 small operations per norm, 23 norms per LightMedSeg forward. */
void group_scale_shift(const double *restrict sums, const double *restrict squares, int64_t n, int64_t c,
                       int64_t groups, int64_t voxels, const float *restrict weight, const float *restrict bias,
                       double eps, float *restrict scale, float *restrict shift) {
    int64_t per = c / groups;
    double count = (double)voxels * per;
    for (int64_t i = 0; i < n; i++)
        for (int64_t g = 0; g < groups; g++) {
            double total = 0, square = 0;
            for (int64_t j = g * per; j < (g + 1) * per; j++) total += sums[i * c + j], square += squares[i * c + j];
            double mean = total / count, var = square / count - mean * mean;
            float m = (float)mean, v = (float)(var > 0 ? var : 0), inv = 1.0f / sqrtf(v + (float)eps);
            for (int64_t j = g * per; j < (g + 1) * per; j++) {
                float k = weight ? inv * weight[j] : inv;
                scale[i * c + j] = k;
                shift[i * c + j] = bias ? bias[j] - m * k : -m * k;
            }
        }
}

/* x = silu(x * scale + shift) in place, per channel: a normalisation's affine and its SiLU in
 * one pass instead of two. */
void affine_silu(float *restrict x, const float *restrict scale, const float *restrict shift, int64_t c,
                 int64_t voxels) {
    int64_t n = ROW * c, rows = voxels / ROW;
    float s[n], t[n];
    repeat_row(scale, c, s);
    repeat_row(shift, c, t);
#pragma omp parallel for schedule(static) if (voxels > PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        float *restrict p = x + r * n;
        for (int64_t k = 0; k < n; k++) p[k] = silu(p[k] * s[k] + t[k]);
    }
    for (int64_t k = rows * n; k < voxels * c; k++) x[k] = silu(x[k] * scale[k % c] + shift[k % c]);
}

/* One block of n <= BLOCK voxels of gated_silu_sum3 from voxel v0, its channel sums added to
 * ysum. Inlined with c a constant for 8 and 16 channels (LightMedSeg's two finest decoder
 * stages): the channel loop is then whole vectors with no remainder, 1.3x faster at 1x8x128^3. */
static inline __attribute__((always_inline)) void gated_block(
    const float *restrict logits, const float *restrict a, const float *restrict b, const float *restrict d,
    const float *restrict scale, const float *restrict shift, float *restrict y, int64_t c, int64_t v0, int64_t n,
    double *restrict ysum) {
    float block_sum[c], w0[BLOCK], w1[BLOCK], w2[BLOCK];
    const float *restrict l = logits + 3 * v0;
    for (int64_t v = 0; v < n; v++) { /* the block's gate weights first: a loop GCC vectorises */
        float top = fmaxf(l[3 * v], fmaxf(l[3 * v + 1], l[3 * v + 2]));
        float e0 = fast_exp(l[3 * v] - top), e1 = fast_exp(l[3 * v + 1] - top), e2 = fast_exp(l[3 * v + 2] - top);
        float inv = 1.0f / (e0 + e1 + e2);
        w0[v] = e0 * inv, w1[v] = e1 * inv, w2[v] = e2 * inv;
    }
    for (int64_t j = 0; j < c; j++) block_sum[j] = 0.0f;
    for (int64_t v = 0; v < n; v++) {
        int64_t o = (v0 + v) * c;
        for (int64_t j = 0; j < c; j++) {
            float ya = a[o + j] * scale[j] + shift[j];
            float yb = b[o + j] * scale[c + j] + shift[c + j];
            float yd = d[o + j] * scale[2 * c + j] + shift[2 * c + j];
            float out = w0[v] * silu(ya) + w1[v] * silu(yb) + w2[v] * silu(yd);
            y[o + j] = out;
            block_sum[j] += out;
        }
    }
    for (int64_t j = 0; j < c; j++) ysum[j] += block_sum[j];
}

/* y = sum_k softmax(logits)_k * silu(branch_k * scale_k + shift_k) over three branches of c
 * channels each (logits: 3 per voxel; scale and shift: 3 x c, a norm's affine per branch), and
 * y's per-channel sums added to ysum[c]: three norms' affines and SiLUs, a gate's softmax,
 * weighting and sum, and the channel means the next squeeze-excitation needs, in one pass. */
void gated_silu_sum3(const float *restrict logits, const float *restrict a, const float *restrict b,
                     const float *restrict d, const float *restrict scale, const float *restrict shift,
                     float *restrict y, int64_t c, int64_t voxels, double *restrict ysum) {
#pragma omp parallel for schedule(static) reduction(+ : ysum[:c]) if (voxels > PARALLEL)
    for (int64_t v0 = 0; v0 < voxels; v0 += BLOCK) {
        int64_t n = v0 + BLOCK < voxels ? BLOCK : voxels - v0;
        switch (c) {
        case 8: gated_block(logits, a, b, d, scale, shift, y, 8, v0, n, ysum); break;
        case 16: gated_block(logits, a, b, d, scale, shift, y, 16, v0, n, ysum); break;
        default: gated_block(logits, a, b, d, scale, shift, y, c, v0, n, ysum);
        }
    }
}

/* Source index pair and weight of the second for output index o of a x2 trilinear upsampling
 * with align_corners=False (PyTorch's rule: source o/2 - 1/4, clamped to the edges). */
static inline void half_source(int64_t o, int64_t n, int64_t *i0, int64_t *i1, float *w1) {
    int64_t i = o / 2;
    if (o % 2) { /* 0.75 x[i] + 0.25 x[i + 1] */
        *i0 = i, *i1 = i + 1 < n ? i + 1 : n - 1, *w1 = 0.25f;
    } else { /* 0.25 x[i - 1] + 0.75 x[i] */
        *i0 = i > 0 ? i - 1 : 0, *i1 = i, *w1 = i > 0 ? 0.75f : 0.0f;
    }
}

/* The position ramp's step along an axis of n voxels: index / (n - 1), LightMedSeg's Eq. (14). */
static inline float ramp_step(int64_t n) { return 1.0f / (n > 1 ? n - 1 : 1); }

/* The skip's rows (sw voxels of cs channels, at half of the fine size) that fine row (d, h) reads,
 * blended over depth and height with x2 trilinear weights (half_source), into blend. */
static void skip_rows_blended(const float *restrict skip, int64_t cs, int64_t d, int64_t h, int64_t sd, int64_t sh,
                              int64_t sw, float *restrict blend) {
    int64_t d0, d1, h0, h1;
    float wd, wh;
    half_source(d, sd, &d0, &d1, &wd);
    half_source(h, sh, &h0, &h1, &wh);
    const float *rows[4] = {skip + (d0 * sh + h0) * sw * cs, skip + (d0 * sh + h1) * sw * cs,
                            skip + (d1 * sh + h0) * sw * cs, skip + (d1 * sh + h1) * sw * cs};
    float k[4] = {(1 - wd) * (1 - wh), (1 - wd) * wh, wd * (1 - wh), wd * wh};
    for (int64_t i = 0; i < sw * cs; i++)
        blend[i] = k[0] * rows[0][i] + k[1] * rows[1][i] + k[2] * rows[2][i] + k[3] * rows[3][i];
}

/* decoder_input_row's case of whole vectors (cu and cs multiples of 8, at most 64) with the skip at
 * half size: the same sums in the same order per channel, on vectors of 8 channels instead of one
 * float at a time (the scalar row took 33 cycles a voxel for 16 channels). */
static void decoder_input_row8(const float *u_row, int64_t cu, const float *restrict skip, int64_t cs, int64_t d,
                               int64_t h, int64_t sd, int64_t sh, int64_t sw, int64_t width, float g0, float step_w,
                               const float *restrict offset, const float *restrict slope, float *f_row,
                               float *restrict row_sum) {
    int64_t c = cu + cs, nu = cu / 8, ns = cs / 8;
    f32x8 sum[16] = {{0}}, off8[8], slope8[8];
    for (int64_t k = 0; offset && k < nu; k++) off8[k] = load8(offset + 8 * k), slope8[k] = load8(slope + 8 * k);
    for (int64_t w = 0; w < width; w++) {
        float *pf = f_row + w * c; /* not restrict: pu is pf where u is already in place */
        const float *pu = u_row ? u_row + w * cu : pf;
        float g = g0 + w * step_w;
        for (int64_t k = 0; k < nu; k++) {
            f32x8 v = load8(pu + 8 * k);
            if (offset) v = v + off8[k] + slope8[k] * g;
            store8(pf + 8 * k, v);
            sum[k] += v;
        }
    }
    float blend[sw * cs]; /* the four source rows blended over depth and height */
    skip_rows_blended(skip, cs, d, h, sd, sh, sw, blend);
    for (int64_t w = 0; w < width; w++) {
        int64_t w0, w1;
        float ww;
        half_source(w, sw, &w0, &w1, &ww);
        for (int64_t k = 0; k < ns; k++) {
            f32x8 v = (1 - ww) * load8(blend + w0 * cs + 8 * k) + ww * load8(blend + w1 * cs + 8 * k);
            store8(f_row + w * c + cu + 8 * k, v);
            sum[nu + k] += v;
        }
    }
    for (int64_t k = 0; k < nu + ns; k++)
        for (int l = 0; l < 8; l++) row_sum[8 * k + l] += sum[k][l];
}

/* One row (d, h) of decoder_input (below): f_row's cu + cs channels per voxel, their sums added to
 * row_sum. u_row holds u's row (cu channels per voxel), or is NULL where u's values are already in
 * f_row's first cu channels (up_decoder_input wrote them there). */
static void decoder_input_row(const float *u_row, int64_t cu, const float *restrict skip, int64_t cs,
                              int64_t half, int64_t d, int64_t h, int64_t depth, int64_t height, int64_t width,
                              const float *restrict offset, const float *restrict slope, float *f_row,
                              float *restrict row_sum) {
    int64_t c = cu + cs;
    float g0 = d * ramp_step(depth) + h * ramp_step(height), step_w = ramp_step(width);
    int64_t sd = half ? depth / 2 : depth, sh = half ? height / 2 : height, sw = half ? width / 2 : width;
    if (half && cu % 8 == 0 && cs % 8 == 0 && cu <= 64 && cs <= 64) {
        decoder_input_row8(u_row, cu, skip, cs, d, h, sd, sh, sw, width, g0, step_w, offset, slope, f_row, row_sum);
        return;
    }
    for (int64_t w = 0; w < width; w++) {
        float *pf = f_row + w * c; /* not restrict: pu is pf where u is already in place */
        const float *pu = u_row ? u_row + w * cu : pf;
        float g = g0 + w * step_w;
        for (int64_t j = 0; j < cu; j++) {
            float v = offset ? pu[j] + offset[j] + slope[j] * g : pu[j];
            pf[j] = v;
            row_sum[j] += v;
        }
    }
    if (!half) {
        const float *restrict row = skip + (d * height + h) * width * cs;
        for (int64_t w = 0; w < width; w++)
            for (int64_t j = 0; j < cs; j++) {
                f_row[w * c + cu + j] = row[w * cs + j];
                row_sum[cu + j] += row[w * cs + j];
            }
        return;
    }
    float blend[sw * cs]; /* the four source rows blended over depth and height */
    skip_rows_blended(skip, cs, d, h, sd, sh, sw, blend);
    for (int64_t w = 0; w < width; w++) {
        int64_t w0, w1;
        float ww;
        half_source(w, sw, &w0, &w1, &ww);
        float *restrict pf = f_row + w * c + cu;
        for (int64_t j = 0; j < cs; j++) {
            float v = (1 - ww) * blend[w0 * cs + j] + ww * blend[w1 * cs + j];
            pf[j] = v;
            row_sum[cu + j] += v;
        }
    }
}

/* LightMedSeg's decoder input, Eqs. (14)-(16): f = cat(u + offset + slope * g, skip) with the
 * position ramp g = d/(D-1) + h/(H-1) + w/(W-1), where skip is either at u's size or at half
 * of it (then upsampled x2, trilinear, as PyTorch's align_corners=False), and f's per-channel sums
 * added to sums[cu + cs]: the position bias, the resizing, the concatenation and the
 * squeeze-excitation's means in one pass instead of five. offset and slope may be NULL. */
void decoder_input(const float *restrict u, int64_t cu, const float *restrict skip, int64_t cs, int64_t half,
                   int64_t depth, int64_t height, int64_t width, const float *restrict offset,
                   const float *restrict slope, float *restrict f, double *restrict sums) {
    int64_t c = cu + cs;
#pragma omp parallel for schedule(static) collapse(2) reduction(+ : sums[:c])
    for (int64_t d = 0; d < depth; d++)
        for (int64_t h = 0; h < height; h++) {
            float row_sum[c];
            for (int64_t j = 0; j < c; j++) row_sum[j] = 0.0f;
            int64_t row = d * height + h;
            decoder_input_row(u + row * width * cu, cu, skip, cs, half, d, h, depth, height, width, offset, slope,
                              f + row * width * c, row_sum);
            for (int64_t j = 0; j < c; j++) sums[j] += row_sum[j];
        }
}

/* The fine indices that read coarse index i in a x2 trilinear upsampling of n (half_source's
 * rule) and their weights: up to four, returned as their count. */
static inline int half_targets(int64_t i, int64_t n, int64_t o[4], float w[4]) {
    int count = 0;
    if (i > 0) o[count] = 2 * i - 1, w[count++] = 0.25f;
    o[count] = 2 * i, w[count++] = i > 0 ? 0.75f : 1.0f;
    o[count] = 2 * i + 1, w[count++] = i + 1 < n ? 0.75f : 1.0f;
    if (i + 1 < n) o[count] = 2 * i + 2, w[count++] = 0.25f;
    return count;
}

/* decoder_input's backward: from f's gradient gf (cu + cs channels), u's gradient gu = gf[:cu], the
 * per-channel sums of gu and of gu * g (the offset's and the slope's gradients; g the position
 * ramp) added to sum_gu[cu] and sum_gu_ramp[cu], and skip's gradient gskip: gf[cu:], or where skip
 * was upsampled (half) its adjoint, each coarse row gathering its up to 4 x 4 fine rows, then along
 * the row. */
void decoder_input_grad(const float *restrict gf, int64_t cu, int64_t cs, int64_t half, int64_t depth,
                        int64_t height, int64_t width, float *restrict gu, float *restrict gskip,
                        double *restrict sum_gu, double *restrict sum_gu_ramp) {
    int64_t c = cu + cs;
    float step_d = ramp_step(depth), step_h = ramp_step(height), step_w = ramp_step(width);
#pragma omp parallel for schedule(static) collapse(2) reduction(+ : sum_gu[:cu], sum_gu_ramp[:cu])
    for (int64_t d = 0; d < depth; d++)
        for (int64_t h = 0; h < height; h++) {
            float row_sum[cu], row_ramp[cu];
            for (int64_t j = 0; j < cu; j++) row_sum[j] = row_ramp[j] = 0.0f;
            int64_t row = d * height + h;
            for (int64_t w = 0; w < width; w++) {
                const float *restrict pf = gf + (row * width + w) * c;
                float *restrict pu = gu + (row * width + w) * cu;
                float g = d * step_d + h * step_h + w * step_w;
                for (int64_t j = 0; j < cu; j++) {
                    pu[j] = pf[j];
                    row_sum[j] += pf[j];
                    row_ramp[j] += pf[j] * g;
                }
                if (!half)
                    for (int64_t j = 0; j < cs; j++) gskip[(row * width + w) * cs + j] = pf[cu + j];
            }
            for (int64_t j = 0; j < cu; j++) {
                sum_gu[j] += row_sum[j];
                sum_gu_ramp[j] += row_ramp[j];
            }
        }
    if (!half) return;
    int64_t sd = depth / 2, sh = height / 2, sw = width / 2;
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t zd = 0; zd < sd; zd++)
        for (int64_t zh = 0; zh < sh; zh++) {
            int64_t od[4], oh[4];
            float wd[4], wh[4];
            int nd = half_targets(zd, sd, od, wd), nh = half_targets(zh, sh, oh, wh);
            float blend[width * cs]; /* the fine rows blended over depth and height */
            for (int64_t i = 0; i < width * cs; i++) blend[i] = 0.0f;
            for (int a = 0; a < nd; a++)
                for (int b = 0; b < nh; b++) {
                    float k = wd[a] * wh[b];
                    const float *restrict pf = gf + (od[a] * height + oh[b]) * width * c + cu;
                    for (int64_t w = 0; w < width; w++)
                        for (int64_t j = 0; j < cs; j++) blend[w * cs + j] += k * pf[w * c + j];
                }
            float *restrict out = gskip + (zd * sh + zh) * sw * cs;
            for (int64_t zw = 0; zw < sw; zw++) {
                int64_t ow[4];
                float ww[4];
                int nw = half_targets(zw, sw, ow, ww);
                for (int64_t j = 0; j < cs; j++) {
                    float v = 0.0f;
                    for (int e = 0; e < nw; e++) v += ww[e] * blend[ow[e] * cs + j];
                    out[zw * cs + j] = v;
                }
            }
        }
}

/* Adds the per-channel sums and sums of squares of `voxels` voxels of c channels to tot[0..c) and
 * tot[c..2c): float sums over BLOCK voxels, totalled in double (as channel_dot_sums does). For
 * kernels that hand a norm the moments of a row they have just written, while it is in cache,
 * instead of another pass over the whole map. Where c divides 8 or 8 divides c (up to 64), whole
 * vectors are summed, lane l of vector a holding channel (8 a + l) mod c; otherwise per float. */
static void add_moments(const float *restrict x, int64_t voxels, int64_t c, double *restrict tot) {
    int64_t nv = c % 8 == 0 && c <= 64 ? c / 8 : 8 % c == 0 ? 1 : 0; /* vectors per group of channels */
    int64_t lane_channel[64];
    for (int64_t l = 0; l < 8 * nv; l++) lane_channel[l] = l % c;
    for (int64_t v0 = 0; v0 < voxels; v0 += BLOCK) {
        int64_t n = (v0 + BLOCK < voxels ? BLOCK : voxels - v0) * c, whole = nv ? n / (8 * nv) * 8 * nv : 0;
        const float *restrict p = x + v0 * c;
        f32x8 sum[8] = {{0}}, squares[8] = {{0}};
        for (int64_t k = 0; k < whole; k += 8 * nv)
            for (int64_t a = 0; a < nv; a++) {
                f32x8 v = load8(p + k + 8 * a);
                sum[a] += v;
                squares[a] += v * v;
            }
        for (int64_t a = 0; a < nv; a++)
            for (int l = 0; l < 8; l++) {
                int64_t j = lane_channel[8 * a + l];
                tot[j] += sum[a][l], tot[c + j] += squares[a][l];
            }
        for (int64_t k = whole, j = 0; k < n; k++, j = j + 1 == c ? 0 : j + 1) /* whole is a multiple of c */
            tot[j] += p[k], tot[c + j] += (double)p[k] * p[k];
    }
}

#define CONV_EDGE 8               /* zero floats before and after every transposed input row */

/* u[j] = floats j and j + 4 of the rows r[0..3], in row order: (r0[j], r1[j], r2[j], r3[j], r0[j + 4],
 * ..., r3[j + 4]), the first two shuffle stages of a transpose (transpose8x8, block_row). */
static inline void transpose4x8(const f32x8 r[4], f32x8 u[4]) {
    f32x8 t[4];
    for (int i = 0; i < 4; i += 2) {
        t[i] = __builtin_shuffle(r[i], r[i + 1], (i32x8){0, 8, 1, 9, 4, 12, 5, 13});
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], (i32x8){2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int k = 0; k < 2; k++) {
        u[2 * k] = __builtin_shuffle(t[k], t[k + 2], (i32x8){0, 1, 8, 9, 4, 5, 12, 13});
        u[2 * k + 1] = __builtin_shuffle(t[k], t[k + 2], (i32x8){2, 3, 10, 11, 6, 7, 14, 15});
    }
}

/* dst[j * dst_stride + i] = src[i * src_stride + j] for i, j < 8: an 8x8 block transposed in
 * registers (eight loads, 24 shuffles, eight stores) instead of 64 scalar copies. */
static inline void transpose8x8(const float *src, int64_t src_stride, float *dst, int64_t dst_stride) {
    f32x8 r[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = load8(src + i * src_stride);
    transpose4x8(r, u);
    transpose4x8(r + 4, u + 4);
    for (int j = 0; j < 4; j++) { /* u[j] holds channels j and j + 4 of voxels 0-3, u[j + 4] of voxels 4-7 */
        store8(dst + j * dst_stride, __builtin_shuffle(u[j], u[j + 4], (i32x8){0, 1, 2, 3, 8, 9, 10, 11}));
        store8(dst + (j + 4) * dst_stride, __builtin_shuffle(u[j], u[j + 4], (i32x8){4, 5, 6, 7, 12, 13, 14, 15}));
    }
}

/* Two neighbouring floats, broadcast as a pair to all four 64-bit slots: one load, no shuffle. */
static inline f32x8 pair_broadcast(const float *p) {
    double pair;
    memcpy(&pair, p, sizeof pair);
    f64x4 b = {pair, pair, pair, pair};
    return (f32x8)b;
}

/* The first n <= 4 floats of v to out, in fixed-size copies the compiler turns into moves. */
static inline void put(float *out, f32x4 v, int64_t n) {
    switch (n) {
    case 4: memcpy(out, &v, 4 * sizeof(float)); break;
    case 3: memcpy(out, &v, 3 * sizeof(float)); break;
    case 2: memcpy(out, &v, 2 * sizeof(float)); break;
    default: memcpy(out, &v, sizeof(float));
    }
}

/* The narrow conv's vector (conv3x3x3_narrow): 16 floats with AVX-512, 8 with AVX2, holding all
 * `outs` outputs (4 or 8) of V = NARROW_FLOATS / outs neighbouring voxels, lane l output l / V of
 * voxel w + l % V. */
#ifdef __AVX512F__
typedef float narrow_vec __attribute__((vector_size(64)));
#else
typedef f32x8 narrow_vec;
#endif
typedef double narrow_f64 __attribute__((vector_size(sizeof(narrow_vec))));
#define NARROW_FLOATS ((int64_t)(sizeof(narrow_vec) / sizeof(float)))
/* Voxel groups per register block, one accumulator each: 16 where 32 vector registers hold them with
 * the taps (AVX-512), else 8 of the 16 (see conv3x3x3_narrow's "Register block"). */
#ifdef __AVX512F__
#define CONV_GROUPS 16
#else
#define CONV_GROUPS 8
#endif

/* The floats in a narrow_vec: 16 where the build has AVX-512 (native.narrow_outputs). */
int64_t narrow_floats(void) { return NARROW_FLOATS; }

/* The floats of v (<= 4 neighbouring voxels) at p broadcast to every output's slot: one load. */
static inline __attribute__((always_inline)) narrow_vec voxels_broadcast(const float *p, const int64_t v) {
#ifdef __AVX512F__
    if (v == 4) return (narrow_vec)_mm512_broadcast_f32x4(_mm_loadu_ps(p));
#endif
    if (v == 1) return (narrow_vec){0} + *p;
    double pair;
    memcpy(&pair, p, sizeof pair);
    return (narrow_vec)((narrow_f64){0} + pair);
}

/* An accumulator's outputs stored in its voxels' own rows of a map of `channels` channels, `out`
 * pointing at the first voxel's and `stride` floats between its voxels: n <= outs outputs (the
 * rest are padding), for the first `voxels`. */
static inline __attribute__((always_inline)) void store_group(narrow_vec a, const int64_t outs, float *out,
                                                              int64_t stride, int64_t n, int64_t voxels) {
    const int64_t V = NARROW_FLOATS / outs;
#pragma GCC unroll 4
    for (int64_t v = 0; v < V; v++) {
        if (v >= voxels) break;
        f32x8 o;
#pragma GCC unroll 8
        for (int64_t k = 0; k < outs; k++) o[k] = a[k * V + v];
        put(out + v * stride, (f32x4){o[0], o[1], o[2], o[3]}, n < 4 ? n : 4);
        if (outs == 8 && n > 4) put(out + v * stride + 4, (f32x4){o[4], o[5], o[6], o[7]}, n - 4);
    }
}

/* The floats of one channel's block in the ring (conv3x3x3_narrow): CONV_GROUPS + 2 groups of V. */
#define SPAN(V) ((CONV_GROUPS + 2) * (V))

/* One channel's row of a ring plane, src[i] = voxel i - 1 with zeros outside the map, rearranged
 * into its blocks: group g of block b holds voxels b * CONV_GROUPS * V - 1 + g + CONV_GROUPS * i
 * (i < V), the floats accumulator p's three taps read as its groups p, p + 1 and p + 2
 * (conv3x3x3_narrow), written at dst + b * stride. */
static inline __attribute__((always_inline)) void block_row(const float *src, int64_t blocks, const int64_t V,
                                                            float *dst, int64_t stride) {
    for (int64_t b = 0; b < blocks; b++, src += CONV_GROUPS * V, dst += stride) {
        for (int k = 0; k < CONV_GROUPS / 8 && V == 4; k++) { /* groups 8k .. 8k + 7: an 8x4 transpose */
            f32x8 r[4], u[4]; /* u[j]: groups 8k + j and 8k + j + 4 of the four voxels */
            for (int i = 0; i < 4; i++) r[i] = load8(src + 8 * k + CONV_GROUPS * i);
            transpose4x8(r, u);
            float *o = dst + 32 * k;
            for (int j = 0; j < 4; j += 2) {
                store8(o + 4 * j, __builtin_shuffle(u[j], u[j + 1], (i32x8){0, 1, 2, 3, 8, 9, 10, 11}));
                store8(o + 16 + 4 * j, __builtin_shuffle(u[j], u[j + 1], (i32x8){4, 5, 6, 7, 12, 13, 14, 15}));
            }
        }
        for (int k = 0; k < CONV_GROUPS / 8 && V == 2; k++) { /* groups 8k .. 8k + 7: two rows interleaved */
            f32x8 a = load8(src + 8 * k), c = load8(src + 8 * k + CONV_GROUPS);
            store8(dst + 16 * k, __builtin_shuffle(a, c, (i32x8){0, 8, 1, 9, 2, 10, 3, 11}));
            store8(dst + 16 * k + 8, __builtin_shuffle(a, c, (i32x8){4, 12, 5, 13, 6, 14, 7, 15}));
        }
        for (int64_t g = V == 4 || V == 2 ? CONV_GROUPS : 0; g < CONV_GROUPS + 2; g++)
            for (int64_t i = 0; i < V; i++) dst[g * V + i] = src[g + CONV_GROUPS * i];
    }
}

/* What every plane of a conv3x3x3_narrow call shares (see there): its input and maps, the sizes of
 * the ring's rows and planes, the weights as lanes and the 1x1 convs' output groups. */
struct narrow_job {
    const float *x;                   /* the input, channels_last */
    float *y;                         /* the conv's map */
    float *const *part_y;             /* the 1x1 convs' maps */
    int64_t c, depth, height, width;  /* the input's channels and sizes */
    int64_t blocks, line, row, plane; /* blocks per row; floats of a transposed channel row, a blocked
                                         row (all channels) and a blocked plane */
    int64_t groups, summed;           /* the 1x1 convs' output groups; channels whose moments are summed */
    const narrow_vec *w8, *side_w8, *side_b8;
    narrow_vec b8;
    const int64_t *group_part, *group_first, *group_count, *part_channels; /* per group: its part, its first
                                         channel there and its channel count; per part: channels */
};

/* One thread's buffers: the ring of three blocked planes and the plane each slot holds, one h's
 * transposed rows, a block's staged outputs and its share of the moments (NULL when not summed). */
struct narrow_scratch {
    float *ring, *lines, *stage;
    int64_t held[3];
    double *mine;
};

/* Puts planes d - 1 .. d + 1 into the ring where it does not hold them: each row transposed from
 * channels_last (eight voxels by eight channels at a time), then blocked (block_row). */
static inline __attribute__((always_inline)) void fill_ring(const int64_t outs, const struct narrow_job *job,
                                                            int64_t d, struct narrow_scratch *s) {
    const int64_t V = NARROW_FLOATS / outs, span = SPAN(V), c = job->c, width = job->width, line = job->line;
    for (int64_t p = d > 0 ? d - 1 : 0; p <= d + 1 && p < job->depth; p++) {
        if (s->held[p % 3] == p) continue;
        const float *src = job->x + p * job->height * width * c;
        for (int64_t h = 0; h < job->height; h++) {
            for (int64_t w0 = 0; w0 < width; w0 += 8) { /* eight voxels per channel at a time */
                int64_t n = width - w0 < 8 ? width - w0 : 8, j = 0;
                const float *v = src + (h * width + w0) * c;
                float *t = s->lines + CONV_EDGE + w0; /* the zeros around each row are never written */
                for (; n == 8 && j + 8 <= c; j += 8) transpose8x8(v + j, c, t + j * line, line);
                for (; j < c; j++)
                    for (int64_t i = 0; i < n; i++) t[j * line + i] = v[i * c + j];
            }
            float *blocked = s->ring + p % 3 * job->plane + h * job->row;
            for (int64_t j = 0; j < c; j++)
                block_row(s->lines + j * line + CONV_EDGE - 1, job->blocks, V, blocked + j * span, c * span);
        }
        s->held[p % 3] = p;
    }
}

/* Everything conv3x3x3_narrow computes for output row (d, h) (see there). */
static inline __attribute__((always_inline)) void narrow_row(const int64_t outs, const struct narrow_job *job,
                                                             const float *ring, int64_t d, int64_t h, float *stage) {
    const int64_t V = NARROW_FLOATS / outs, block = V * CONV_GROUPS, span = SPAN(V);
    const int64_t c = job->c, depth = job->depth, height = job->height, width = job->width, row = job->row;
    const int64_t plane = job->plane, groups = job->groups, *group_part = job->group_part;
    const narrow_vec *w8 = job->w8, *side_w8 = job->side_w8, *side_b8 = job->side_b8, b8 = job->b8;
    for (int64_t w0 = 0, b = 0; w0 < width; w0 += block, b++) {
        int64_t voxel = (d * height + h) * width + w0, n = width - w0 < block ? width - w0 : block; /* voxels */
        int64_t used = n < CONV_GROUPS ? n : CONV_GROUPS, lanes[CONV_GROUPS]; /* accumulators; voxels of each */
        for (int64_t p = 0; p < used; p++) lanes[p] = (n - p + CONV_GROUPS - 1) / CONV_GROUPS;
        narrow_vec acc[CONV_GROUPS];
        for (int p = 0; p < CONV_GROUPS; p++) acc[p] = b8;
        for (int64_t kd = 0; kd < 3; kd++) {
            if (d + kd - 1 < 0 || d + kd - 1 >= depth) continue;
            const float *t = ring + (d + kd - 1) % 3 * plane + b * c * span;
            for (int64_t kh = 0; kh < 3; kh++) {
                if (h + kh - 1 < 0 || h + kh - 1 >= height) continue;
                const float *in = t + (h + kh - 1) * row;
                const narrow_vec *wk = w8 + (kd * 3 + kh) * c * 3;
                for (int64_t j = 0; j < c; j++) { /* see "Register block" below */
                    const float *r = in + j * span;
                    narrow_vec tap0 = wk[j * 3], tap1 = wk[j * 3 + 1], tap2 = wk[j * 3 + 2];
#pragma GCC unroll 18
                    for (int g = 0; g < CONV_GROUPS + 2; g++) {
                        narrow_vec v = voxels_broadcast(r + V * g, V);
                        if (g < CONV_GROUPS) acc[g] += tap0 * v;
                        if (g >= 1 && g <= CONV_GROUPS) acc[g - 1] += tap1 * v;
                        if (g >= 2) acc[g - 2] += tap2 * v;
                    }
                }
            }
        }
        for (int64_t p = 0; p < used; p++) store_group(acc[p], outs, stage + p * outs, CONV_GROUPS * outs, outs, lanes[p]);
        memcpy(job->y + voxel * outs, stage, n * outs * sizeof(float));
        const float *in = ring + d % 3 * plane + b * c * span + h * row + V; /* the centre row's group 1 */
        for (int64_t q = 0; q < groups; q++) {
            for (int p = 0; p < CONV_GROUPS; p++) acc[p] = side_b8[q];
            for (int64_t j = 0; j < c; j++) {
                narrow_vec wv = side_w8[j * groups + q];
                for (int p = 0; p < CONV_GROUPS; p++) acc[p] += wv * voxels_broadcast(in + j * span + V * p, V);
            }
            int64_t k = group_part[q], channels = job->part_channels[k];
            for (int64_t p = 0; p < used; p++)
                store_group(acc[p], outs, stage + p * channels + job->group_first[q], CONV_GROUPS * channels,
                            job->group_count[q], lanes[p]);
            if (q + 1 == groups || group_part[q + 1] != k) /* the part's block is whole: one copy in order */
                memcpy(job->part_y[k] + voxel * channels, stage, n * channels * sizeof(float));
        }
    }
}

/* Output plane d of conv3x3x3_narrow, `outs` a constant so that V is one in every loop. */
static inline __attribute__((always_inline)) void narrow_plane(const int64_t outs, const struct narrow_job *job,
                                                               int64_t d, struct narrow_scratch *s) {
    fill_ring(outs, job, d, s);
    for (int64_t h = 0; h < job->height; h++) {
        narrow_row(outs, job, s->ring, d, h, s->stage);
        if (s->mine && job->summed) /* the row, still in cache */
            add_moments(job->part_y[0] + (d * job->height + h) * job->width * job->summed, job->width, job->summed,
                        s->mine);
    }
}

/* y = conv3x3x3(x) + bias with `outs` (4 or 8) output channels, zero padding 1, stride 1, for x of
 * c channels (weight: outs x c x 27, PyTorch's order; bias may be NULL), and optionally 1x1 convs
 * of the same x riding along: `parts` maps part_y[k] of part_channels[k] channels, whose weights
 * and biases are the consecutive rows of side_weight (rows x c) and side_bias. Where `moments`
 * is not NULL, the first part's channel sums and sums of squares are added to it (its R sums,
 * then its R squares: the part a norm reads next). Returns 0, or -1 when out of memory.
 *
 * Why: oneDNN computes output channels in blocks of one vector (8 floats on AVX2, 16 on
 * AVX-512), so 4 outputs cost it as much as 8 on AVX2, and 8 as much as 16 on AVX-512. Here a
 * vector (narrow_vec) holds the outputs of V voxels: with 4 outputs on AVX2 the weights as
 * (o0, o0, o1, o1, ..., o3, o3) times two voxels' inputs broadcast to all four slots with one load,
 * so every lane is useful and nothing is shuffled (with AVX-512, 4 voxels of 4 outputs or 2 of 8).
 * The 1x1 convs read the same inputs, in groups of `outs` outputs, so they cost only their
 * multiply-adds (a 16 -> 3 1x1 conv on oneDNN reads the whole map again for 48 multiply-adds a
 * voxel).
 *
 * Register block: CONV_GROUPS accumulators p, lanes of p holding voxels w0 + p + CONV_GROUPS * i
 * (i < V). Tap kw of accumulator p then reads the voxels of p + kw - 1, the same as tap 0 of
 * accumulator p + kw: a row's 3 x CONV_GROUPS multiply-adds need only CONV_GROUPS + 2 distinct
 * broadcasts, each loaded once (block_row stores every such group as V adjacent floats). Each
 * thread blocks the input planes it reads (d - 1 .. d + 1, a ring of three) that way, as (h, block,
 * channel, group) with zero edges, so the taps of a block read memory in order. On the AVX-512 Xeon
 * (1x16x128^3 -> 4, 2 threads) voxels side by side in a vector (three loads a group, rows of a
 * channel 576 bytes apart) ran 42 ms, this layout 34.5 ms with 8 accumulators and 30 ms with 16;
 * the AVX2 build of it on that machine 46-49 ms against 50-53 before. Each accumulator's sum is
 * one chain of dependent multiply-adds (4-5 cycles each), so a block needs as many accumulators as
 * the core starts multiply-adds in that time, and with 16 registers (AVX2) 8 is the most that fit
 * beside the three taps and an input.
 *
 * Outputs: an accumulator's voxels lie CONV_GROUPS apart, so a block's results are first stored in a
 * small per-thread `stage` and then copied to each map in order. Stored straight into the maps,
 * each part's cache lines were written piecewise by several groups and accumulators: the 1x1
 * convs riding along (8 + 3 channels) added 13.0 ms instead of 9.7 now (1x16x128^3, 2 threads), a
 * 12-channel part 24.8 ms instead of 9.2. */
int conv3x3x3_narrow(const float *restrict x, int64_t c, int64_t depth, int64_t height, int64_t width, int64_t outs,
                     const float *restrict weight, const float *restrict bias, float *restrict y, int64_t parts,
                     const int64_t *restrict part_channels, const float *restrict side_weight,
                     const float *restrict side_bias, float *const *restrict part_y, double *restrict moments) {
    const int64_t V = NARROW_FLOATS / outs, block = V * CONV_GROUPS, blocks = (width + block - 1) / block;
    int64_t line = blocks * block + 2 * CONV_EDGE; /* floats of a channel's row before it is blocked */
    int64_t row = blocks * c * SPAN(V), plane = height * row, groups = 0;
    int64_t widest = 0; /* the most channels of a part */
    for (int64_t k = 0; k < parts; k++) {
        groups += (part_channels[k] + outs - 1) / outs; /* a part starts a group */
        widest = part_channels[k] > widest ? part_channels[k] : widest;
    }
    /* weights as (kd, kh, c, kw) -> lanes; the sides' as (c, group) -> the same */
    narrow_vec *w8 = aligned_alloc(sizeof(narrow_vec), sizeof(narrow_vec) * (27 * c + groups * (c + 1)));
    int64_t *group_part = malloc(sizeof(int64_t) * 3 * (groups + 1)), *group_first = group_part + groups + 1;
    int64_t *group_count = group_first + groups + 1;
    if (!w8 || !group_part) {
        free(w8);
        free(group_part);
        return -1;
    }
    narrow_vec *side_w8 = w8 + 27 * c, *side_b8 = side_w8 + groups * c, b8 = {0};
    for (int64_t j = 0; j < c; j++)
        for (int64_t k = 0; k < 27; k++)
            for (int64_t l = 0; l < NARROW_FLOATS; l++) w8[(k / 3 * c + j) * 3 + k % 3][l] = weight[(l / V * c + j) * 27 + k];
    for (int64_t l = 0; bias && l < NARROW_FLOATS; l++) b8[l] = bias[l / V];
    for (int64_t k = 0, q = 0, rows = 0; k < parts; rows += part_channels[k++])
        for (int64_t first = 0; first < part_channels[k]; first += outs, q++) {
            group_part[q] = k, group_first[q] = first;
            group_count[q] = part_channels[k] - first < outs ? part_channels[k] - first : outs;
            for (int64_t l = 0; l < NARROW_FLOATS; l++) {
                int64_t o = l / V, used = o < group_count[q];
                for (int64_t j = 0; j < c; j++) side_w8[j * groups + q][l] = used ? side_weight[(rows + first + o) * c + j] : 0.0f;
                side_b8[q][l] = used ? side_bias[rows + first + o] : 0.0f;
            }
        }
    const struct narrow_job job = {
        .x = x, .y = y, .part_y = part_y, .c = c, .depth = depth, .height = height, .width = width, .blocks = blocks,
        .line = line, .row = row, .plane = plane, .groups = groups, .summed = parts > 0 ? part_channels[0] : 0,
        .w8 = w8, .side_w8 = side_w8, .side_b8 = side_b8, .b8 = b8, .group_part = group_part,
        .group_first = group_first, .group_count = group_count, .part_channels = part_channels,
    };
    int failed = 0;
#pragma omp parallel firstprivate(job) reduction(| : failed)
    {
        struct narrow_scratch s = {
            .ring = malloc(3 * plane * sizeof(float)),
            .lines = calloc(c * line, sizeof(float)), /* one h's rows, zero edges */
            .stage = malloc(block * (widest > outs ? widest : outs) * sizeof(float)), /* a block of one map's outputs */
            .held = {-1, -1, -1},
            .mine = moments ? calloc(2 * job.summed + 1, sizeof(double)) : NULL,
        };
        failed = s.ring == NULL || s.lines == NULL || s.stage == NULL || (moments && !s.mine);
#pragma omp for schedule(static)
        for (int64_t d = 0; d < depth; d++) {
            if (failed) continue;
            if (outs == 8)
                narrow_plane(8, &job, d, &s);
            else
                narrow_plane(4, &job, d, &s);
        }
        if (s.mine && !failed)
#pragma omp critical
            for (int64_t k = 0; k < 2 * job.summed; k++) moments[k] += s.mine[k];
        free(s.mine);
        free(s.stage);
        free(s.lines);
        free(s.ring);
    }
    free(w8);
    free(group_part);
    return failed ? -1 : 0;
}

#define UP_BLOCK 6 /* input voxels per register block of up_conv_x2: 12 output voxels, 12 accumulators */

/* The outputs 2 m0 .. 2 (m0 + n) - 1 of one output row of up_conv_x2 (n = UP_BLOCK, or 1 for a
 * row's last voxels), output channels 8 q .. 8 q + 7, from the input rows it reads (rows[r], each
 * with its taps' weights taps[r]: kw = 0, 1, 2 times c inputs times `chunks` vectors). Along w,
 * output 2m takes tap 1 of input m, and output 2m + 1 tap 2 of input m and tap 0 of input m + 1
 * (`next`: that input row's voxel m0 + n, or zeros past the row's end). `stride`: floats per
 * output voxel. */
static inline __attribute__((always_inline)) void up_block(const float *const rows[4], const f32x8 *const taps[4],
                                                           int nrows, const float *const next[4], int64_t c,
                                                           int64_t chunks, int64_t q, int64_t m0, const int n,
                                                           f32x8 b8, float *out, int64_t stride) {
    f32x8 even[UP_BLOCK], odd[UP_BLOCK];
    for (int p = 0; p < n; p++) even[p] = odd[p] = b8;
    for (int r = 0; r < nrows; r++) {
        const float *in = rows[r] + m0 * c;
        const f32x8 *w = taps[r] + q;
        for (int64_t j = 0; j < c; j++) {
            f32x8 w0 = w[j * chunks], w1 = w[(c + j) * chunks], w2 = w[(2 * c + j) * chunks];
            for (int p = 0; p < n; p++) {
                f32x8 v = {0};
                v += in[p * c + j]; /* broadcast */
                even[p] += w1 * v;
                if (p > 0) odd[p - 1] += w0 * v;
                odd[p] += w2 * v;
            }
            f32x8 v = {0};
            v += next[r][j];
            odd[n - 1] += w0 * v;
        }
    }
    for (int p = 0; p < n; p++) {
        store8(out + (2 * (m0 + p)) * stride + 8 * q, even[p]);
        store8(out + (2 * (m0 + p) + 1) * stride + 8 * q, odd[p]);
    }
}

/* The transposed conv's weights (c x co x 27, PyTorch's order) as (kd, kh, kw, input, chunk) -> 8
 * outputs, for up_row; NULL when out of memory. */
static f32x8 *up_weights(const float *weight, int64_t c, int64_t co) {
    int64_t chunks = co / 8;
    f32x8 *w8 = aligned_alloc(32, sizeof(f32x8) * 27 * c * chunks);
    if (w8)
        for (int64_t t = 0; t < 27; t++)
            for (int64_t j = 0; j < c; j++)
                for (int64_t o = 0; o < co; o++) w8[(t * c + j) * chunks + o / 8][o % 8] = weight[(j * co + o) * 27 + t];
    return w8;
}

/* Output row (od, oh) of up_conv_x2 (below): 2 width voxels of co outputs at out, `stride` floats
 * apart; zeros: c zero floats (the input past a row's end). */
static void up_row(const float *restrict x, int64_t c, int64_t depth, int64_t height, int64_t width,
                   const f32x8 *w8, const float *bias, int64_t co, const float *zeros, int64_t od, int64_t oh,
                   float *out, int64_t stride) {
    int64_t chunks = co / 8;
    /* per axis the (input, tap) pairs of this output: 2i <- (i, 1); 2i + 1 <- (i, 2), (i + 1, 0) */
    int64_t di[2], dk[2], hi[2], hk[2], nd = 0, nh = 0;
    if (od % 2 == 0) di[nd] = od / 2, dk[nd++] = 1;
    else {
        di[nd] = od / 2, dk[nd++] = 2;
        if (od / 2 + 1 < depth) di[nd] = od / 2 + 1, dk[nd++] = 0;
    }
    if (oh % 2 == 0) hi[nh] = oh / 2, hk[nh++] = 1;
    else {
        hi[nh] = oh / 2, hk[nh++] = 2;
        if (oh / 2 + 1 < height) hi[nh] = oh / 2 + 1, hk[nh++] = 0;
    }
    const float *rows[4], *next[4];
    const f32x8 *taps[4];
    int nrows = 0;
    for (int64_t a = 0; a < nd; a++)
        for (int64_t b = 0; b < nh; b++, nrows++) {
            rows[nrows] = x + (di[a] * height + hi[b]) * width * c;
            taps[nrows] = w8 + (dk[a] * 9 + hk[b] * 3) * c * chunks;
        }
    for (int64_t q = 0; q < chunks; q++) {
        f32x8 b8 = {0};
        if (bias) b8 = load8(bias + 8 * q);
        int64_t m0 = 0;
        for (; m0 + UP_BLOCK <= width; m0 += UP_BLOCK) {
            for (int r = 0; r < nrows; r++) next[r] = m0 + UP_BLOCK < width ? rows[r] + (m0 + UP_BLOCK) * c : zeros;
            up_block(rows, taps, nrows, next, c, chunks, q, m0, UP_BLOCK, b8, out, stride);
        }
        for (; m0 < width; m0++) {
            for (int r = 0; r < nrows; r++) next[r] = m0 + 1 < width ? rows[r] + (m0 + 1) * c : zeros;
            up_block(rows, taps, nrows, next, c, chunks, q, m0, 1, b8, out, stride);
        }
    }
}

/* y = conv_transpose3d(x, weight, bias, stride 2, padding 1, output_padding 1): x (depth, height,
 * width, c) to y (2 depth, 2 height, 2 width, co) in channels_last order, weight c x co x 27
 * (PyTorch's order), co a multiple of 8, bias co floats or NULL. Returns 0, or -1 when out of memory.
 *
 * Why: oneDNN ran LightMedSeg's last upsampling (1x16x64^3 -> 8 channels at 128^3) at a third of
 * the core's multiply-add rate (26 ms of a 470 ms forward, 2 threads). Per axis an output takes one
 * tap (even outputs) or two (odd), so every output row is a sum over at most 4 input rows; a vector
 * holds 8 output channels of one voxel, each input value is broadcast once and serves an even and
 * an odd output, and 12 accumulators keep the multiply-add chains in flight: 13.5 ms against
 * oneDNN's 25.3 (1.87x; 32 -> 16 channels at 64^3 1.20x; for 32 or 64 outputs oneDNN's own
 * kernel is as fast or faster, so lightseg.accel.layers sends only 8 and 16 here). */
int up_conv_x2(const float *restrict x, int64_t c, int64_t depth, int64_t height, int64_t width,
               const float *restrict weight, const float *restrict bias, int64_t co, float *restrict y) {
    f32x8 *w8 = up_weights(weight, c, co);
    float *zeros = calloc(c, sizeof(float));
    if (!w8 || !zeros) {
        free(w8);
        free(zeros);
        return -1;
    }
#pragma omp parallel for schedule(static) collapse(2) if (depth * height * width > PARALLEL / 8)
    for (int64_t od = 0; od < 2 * depth; od++)
        for (int64_t oh = 0; oh < 2 * height; oh++)
            up_row(x, c, depth, height, width, w8, bias, co, zeros, od, oh, y + (od * 2 * height + oh) * 2 * width * co, co);
    free(w8);
    free(zeros);
    return 0;
}

/* LightMedSeg's decoder input with its upsampling, Eqs. (14)-(16): u = up_conv_x2(x, weight, bias)
 * (co outputs) written straight into the first co channels of f, then f completed as
 * decoder_input does (position bias, the skip of cs channels at u's size or half of it, the channel
 * sums added to sums[co + cs]), row by row while the row is in cache. Returns 0, or -1 when out of
 * memory.
 *
 * Why: apart, the upsampling writes u (64 MB at 1x8x128^3) and the decoder input reads it back. */
int up_decoder_input(const float *restrict x, int64_t c, int64_t depth, int64_t height, int64_t width,
                     const float *restrict weight, const float *restrict bias, int64_t co,
                     const float *restrict skip, int64_t cs, int64_t half, const float *restrict offset,
                     const float *restrict slope, float *restrict f, double *restrict sums) {
    int64_t cf = co + cs;
    f32x8 *w8 = up_weights(weight, c, co);
    float *zeros = calloc(c, sizeof(float));
    if (!w8 || !zeros) {
        free(w8);
        free(zeros);
        return -1;
    }
#pragma omp parallel for schedule(static) collapse(2) reduction(+ : sums[:cf])
    for (int64_t od = 0; od < 2 * depth; od++)
        for (int64_t oh = 0; oh < 2 * height; oh++) {
            float *f_row = f + (od * 2 * height + oh) * 2 * width * cf, row_sum[cf];
            for (int64_t j = 0; j < cf; j++) row_sum[j] = 0.0f;
            up_row(x, c, depth, height, width, w8, bias, co, zeros, od, oh, f_row, cf);
            decoder_input_row(NULL, co, skip, cs, half, od, oh, 2 * depth, 2 * height, 2 * width, offset, slope, f_row,
                              row_sum);
            for (int64_t j = 0; j < cf; j++) sums[j] += row_sum[j];
        }
    free(w8);
    free(zeros);
    return 0;
}

#define POINT_BLOCK 8 /* voxels per register block of pointwise_conv */

/* y = the 1x1 conv of x (voxels x c, channels_last) by weight (co x c, PyTorch's order) plus bias
 * (co floats or NULL), co <= 8: a vector holds one voxel's outputs, each input broadcast once,
 * POINT_BLOCK voxels per register block so the multiply-add chains overlap. Returns 0, or -1 when
 * out of memory.
 *
 * Why: oneDNN computes outputs in blocks of 8, so fewer cost it as much, and reads maps of few
 * channels slowly: LightMedSeg's head (1x8x128^3 -> 4 channels) took it 9.3 ms on 2 threads, the
 * kernel 6.9; the LSPM's 1 -> 2 channel conv at 64^3 3.2 and 0.4 ms. With 8 or more outputs
 * oneDNN is as fast or faster (lightseg.accel.layers.takes_pointwise_kernel). */
int pointwise_conv(const float *restrict x, int64_t c, int64_t voxels, const float *restrict weight,
                   const float *restrict bias, int64_t co, float *restrict y) {
    f32x8 *w8 = aligned_alloc(32, sizeof(f32x8) * (c + 1)), b8 = {0};
    if (!w8) return -1;
    memset(w8, 0, sizeof(f32x8) * c);
    for (int64_t o = 0; o < co; o++) {
        for (int64_t j = 0; j < c; j++) w8[j][o] = weight[o * c + j];
        if (bias) b8[o] = bias[o];
    }
#pragma omp parallel for schedule(static) if (voxels * (c + co) > 8 * PARALLEL)
    for (int64_t v0 = 0; v0 < voxels; v0 += POINT_BLOCK) {
        int64_t n = voxels - v0 < POINT_BLOCK ? voxels - v0 : POINT_BLOCK;
        f32x8 acc[POINT_BLOCK];
        for (int p = 0; p < POINT_BLOCK; p++) acc[p] = b8;
        for (int64_t j = 0; j < c; j++)
            for (int p = 0; p < POINT_BLOCK; p++) {
                f32x8 v = {0};
                v += x[(v0 + (p < n ? p : 0)) * c + j]; /* broadcast; a short block repeats its first voxel */
                acc[p] += w8[j] * v;
            }
        for (int64_t p = 0; p < n; p++) {
            float *o = y + (v0 + p) * co;
            if (co == 8) store8(o, acc[p]);
            else {
                put(o, (f32x4){acc[p][0], acc[p][1], acc[p][2], acc[p][3]}, co < 4 ? co : 4);
                if (co > 4) put(o + 4, (f32x4){acc[p][4], acc[p][5], acc[p][6], acc[p][7]}, co - 4);
            }
        }
    }
    free(w8);
    return 0;
}

#define DOWN_BLOCK 8 /* output voxels per register block of down_conv_x2: 8 accumulators */

/* One input of down_block as a vector: broadcast, or where `paired` the two neighbouring channels
 * at p as pairs (p[0], p[1], p[0], p[1], ...). */
static inline __attribute__((always_inline)) f32x8 down_input(const float *p, const int paired) {
    if (paired) return pair_broadcast(p);
    f32x8 v = {0};
    return v + *p;
}

/* The outputs m0 .. m0 + n - 1 of one output row of down_conv_x2 (n = DOWN_BLOCK, or 1 for a
 * row's last voxels), from the input rows it reads (rows[r], each with its taps' weights taps[r]:
 * kw = 0, 1, 2 times the inputs). Along w, output m reads inputs 2m - 1, 2m and 2m + 1, so input
 * 2m + 1 serves tap 2 of output m and tap 0 of output m + 1: each input is broadcast once.
 * `right`: whether input 2 (m0 + n) - 1 exists (it does not for an odd row's last output).
 * `paired` (at most 4 outputs, c even): each input is a pair of channels and lanes 2o and 2o + 1
 * hold output o's sums over the pair's first and second channel, added at the end, so that all 8
 * lanes work instead of 4. */
static inline __attribute__((always_inline)) void down_block(const float *const rows[9], const f32x8 *const taps[9],
                                                             int nrows, int64_t c, int64_t m0, const int n, int right,
                                                             f32x8 b8, float *out, int64_t co, const int paired) {
    int64_t inputs = paired ? c / 2 : c;
    f32x8 acc[DOWN_BLOCK];
    for (int p = 0; p < n; p++) acc[p] = b8;
    for (int r = 0; r < nrows; r++) {
        const f32x8 *w = taps[r];
        for (int64_t j = 0; j < inputs; j++) {
            const float *in = rows[r] + 2 * m0 * c + (paired ? 2 * j : j);
            f32x8 w0 = w[j], w1 = w[inputs + j], w2 = w[2 * inputs + j], left = {0};
            if (m0 > 0) left = down_input(in - c, paired); /* input 2 m0 - 1 */
            for (int p = 0; p < n; p++) {
                f32x8 centre = down_input(in + 2 * p * c, paired), next = {0};
                if (p < n - 1 || right) next = down_input(in + (2 * p + 1) * c, paired);
                acc[p] += w0 * left + w1 * centre + w2 * next;
                left = next;
            }
        }
    }
    for (int p = 0; p < n; p++) {
        float *o = out + (m0 + p) * co;
        if (paired)
            for (int64_t k = 0; k < co; k++) o[k] = acc[p][2 * k] + acc[p][2 * k + 1];
        else if (co == 8) store8(o, acc[p]);
        else
            for (int64_t k = 0; k < co; k++) o[k] = acc[p][k];
    }
}

/* y = conv3d(x, weight, bias, stride 2, padding 1) for a 3x3x3 kernel: x (depth, height, width, c)
 * to y ((depth + 1) / 2, (height + 1) / 2, (width + 1) / 2, co) in channels_last order, weight
 * co x c x 27 (PyTorch's order), co <= 8, bias co floats or NULL. Returns 0, or -1 when out of memory.
 *
 * Why: oneDNN computes output channels in blocks of 8 and reads few input channels poorly:
 * LightMedSeg's two convs on the raw 1x4x128^3 input (the stem's 4 -> 4 and the anchor detector's
 * 4 -> 8, both stride 2) took it 8.3 and 8.7 ms on 2 threads for 0.34 GMAC together. Here a
 * vector holds one output voxel's channels (with at most 4 outputs, split over the two channels of
 * an input pair: down_block), each input value is broadcast once per tap row and serves two
 * outputs, and 8 output voxels per register block keep the multiply-add chains in flight. */
int down_conv_x2(const float *restrict x, int64_t c, int64_t depth, int64_t height, int64_t width,
                 const float *restrict weight, const float *restrict bias, int64_t co, float *restrict y) {
    int64_t od_n = (depth + 1) / 2, oh_n = (height + 1) / 2, ow_n = (width + 1) / 2, whole = width / 2;
    int paired = co <= 4 && c % 2 == 0, per = paired ? 2 : 1; /* input channels per input (down_block) */
    f32x8 *w8 = aligned_alloc(32, sizeof(f32x8) * 27 * c);
    if (!w8) return -1;
    memset(w8, 0, sizeof(f32x8) * 27 * c);
    for (int64_t t = 0; t < 27; t++) /* (kd, kh, kw, input) -> the co outputs, or their pair lanes */
        for (int64_t j = 0; j < c; j++)
            for (int64_t o = 0; o < co; o++) w8[t * (c / per) + j / per][paired ? 2 * o + j % 2 : o] = weight[(o * c + j) * 27 + t];
    f32x8 b8 = {0};
    for (int64_t o = 0; bias && o < co; o++) b8[paired ? 2 * o : o] = bias[o];
#pragma omp parallel for schedule(static) collapse(2) if (od_n * oh_n * ow_n > PARALLEL / 8)
    for (int64_t od = 0; od < od_n; od++)
        for (int64_t oh = 0; oh < oh_n; oh++) {
            const float *rows[9];
            const f32x8 *taps[9];
            int nrows = 0;
            for (int64_t kd = 0; kd < 3; kd++)
                for (int64_t kh = 0; kh < 3; kh++) {
                    int64_t d = 2 * od - 1 + kd, h = 2 * oh - 1 + kh;
                    if (d < 0 || d >= depth || h < 0 || h >= height) continue;
                    rows[nrows] = x + (d * height + h) * width * c;
                    taps[nrows++] = w8 + (kd * 9 + kh * 3) * (c / per);
                }
            float *out = y + (od * oh_n + oh) * ow_n * co;
            int64_t m0 = 0;
            for (; m0 + DOWN_BLOCK <= whole; m0 += DOWN_BLOCK)
                if (paired) down_block(rows, taps, nrows, c, m0, DOWN_BLOCK, 1, b8, out, co, 1);
                else down_block(rows, taps, nrows, c, m0, DOWN_BLOCK, 1, b8, out, co, 0);
            for (; m0 < ow_n; m0++)
                if (paired) down_block(rows, taps, nrows, c, m0, 1, m0 < whole, b8, out, co, 1);
                else down_block(rows, taps, nrows, c, m0, 1, m0 < whole, b8, out, co, 0);
        }
    free(w8);
    return 0;
}

/* An empty statement that claims to change v, so the compiler keeps v in a vector register
 * instead of reloading it from memory at every use (GCC did so for the depthwise taps' weights:
 * two loads per multiply-add). x86 only; elsewhere nothing. */
#if defined(__x86_64__) || defined(__i386__)
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif

#define TAP_BLOCK 64 /* floats per register block of the depthwise kernels: 8 vectors */

/* The depthwise 3x3x3 taps of one register block: the TAP_BLOCK floats of c channels per voxel
 * from voxel w0, whose input rows (kd, kh) start at rows[kd * 3 + kh] one voxel before w0 (NULL
 * where the row lies outside the map). w8: per tap, nv vectors that the block's lanes repeat.
 *
 * Vector a of tap kw reads the row at float kw * c + 8 a, so taps share inputs: for c = 16 the
 * 24 multiply-adds of a row read 12 distinct vectors. Loads, not multiply-adds, set the pace here
 * (about one 32-byte load per cycle measured on Zen 2, against two multiply-adds), so where the
 * row's weights fit in registers (nv <= 2) every distinct input is loaded once and serves all its
 * taps: 1.47x on the taps alone (c = 16, in L1); for wider c the weights would not fit. */
static inline __attribute__((always_inline)) void depthwise_taps(f32x8 acc[8], const float *const rows[9],
                                                                 const f32x8 *w8, int64_t c, const int nv) {
    for (int r = 0; r < 9; r++) {
        if (!rows[r]) continue;
        if (nv <= 2) {
            f32x8 w[3][2];
            for (int kw = 0; kw < 3; kw++)
                for (int i = 0; i < nv; i++) {
                    w[kw][i] = w8[(r * 3 + kw) * nv + i];
                    KEEP_IN_REGISTER(w[kw][i]);
                }
#pragma GCC unroll 64
            for (int o = 0; o <= 2 * c + 56; o += 4) { /* every float offset some tap's vector starts at */
                int used = 0;
#pragma GCC unroll 3
                for (int kw = 0; kw < 3; kw++)
                    used |= o >= kw * c && (o - kw * c) % 8 == 0 && (o - kw * c) / 8 < 8;
                if (!used) continue;
                f32x8 v;
                memcpy(&v, rows[r] + o, sizeof v);
                KEEP_IN_REGISTER(v); /* else GCC folds the load into each multiply-add again */
#pragma GCC unroll 3
                for (int kw = 0; kw < 3; kw++) {
                    int a = (o - kw * c) / 8;
                    if (o >= kw * c && (o - kw * c) % 8 == 0 && a < 8) acc[a] += w[kw][a % nv] * v;
                }
            }
            continue;
        }
        for (int kw = 0; kw < 3; kw++) {
            f32x8 wk[8];
            for (int i = 0; i < nv; i++) {
                wk[i] = w8[(r * 3 + kw) * nv + i];
                if (nv <= 4) KEEP_IN_REGISTER(wk[i]);
            }
            for (int a = 0; a < 8; a++) {
                f32x8 v;
                memcpy(&v, rows[r] + kw * c + 8 * a, sizeof v);
                acc[a] += wk[a % nv] * v;
            }
        }
    }
}

enum { GHOST, PAIRS, SUM };

/* PAIRS' output of one register block (grouped_pairs3), o at voxel w0's outputs: channel pairs
 * summed. Vector a holds channels 8a mod c .. + 7 of voxel 8a / c, so vectors 2k and 2k + 1 hold
 * the block's outputs 8k .. 8k + 7 (from voxel 16k / c; for c = 8 the second four are the next
 * voxel's). bias8: the bias repeated over 8 floats at least, or NULL. */
static inline __attribute__((always_inline)) void store_pairs(const f32x8 acc[8], float *o, int64_t w0, int64_t width,
                                                              const float *bias8, const int64_t c) {
    for (int64_t k = 0; k < 4 && w0 + 16 * k / c < width; k++) {
        f32x8 a = acc[2 * k], b = acc[2 * k + 1];
        f32x8 sum = __builtin_shuffle(a, b, (i32x8){0, 2, 4, 6, 8, 10, 12, 14}) +
                    __builtin_shuffle(a, b, (i32x8){1, 3, 5, 7, 9, 11, 13, 15});
        if (bias8) sum += load8(bias8 + 8 * k % (c / 2));
        if (c == 8 && w0 + 2 * k + 1 == width)
            put(o + 8 * k, (f32x4){sum[0], sum[1], sum[2], sum[3]}, 4);
        else
            store8(o + 8 * k, sum);
    }
}

/* SUM's output of one register block (grouped_sum3), o at voxel w0's output: each voxel's c
 * channels summed (its c / 8 vectors, then across the lanes), plus bias (NULL: none). */
static inline __attribute__((always_inline)) void store_sum(const f32x8 acc[8], float *o, int64_t w0, int64_t width,
                                                            const float *bias, const int64_t c) {
    const int64_t nv = c / 8;
    for (int64_t k = 0; k < 8 / nv && w0 + k < width; k++) {
        f32x8 v = acc[k * nv];
        for (int64_t i = 1; i < nv; i++) v += acc[k * nv + i];
        f32x4 half = (f32x4){v[0], v[1], v[2], v[3]} + (f32x4){v[4], v[5], v[6], v[7]};
        o[k] = (half[0] + half[2]) + (half[1] + half[3]) + (bias ? bias[0] : 0.0f);
    }
}

/* GHOST's output of one register block for c >= 8 (ghost_expand), o at voxel w0's 2c outputs:
 * vector a holds channels 8a mod c .. + 7 of voxel 8a / c, written after that voxel's c input
 * channels, which are copied from x (at voxel w0's) first: cat(p, taps). */
static inline __attribute__((always_inline)) void store_ghost(const f32x8 acc[8], const float *x, float *o, int64_t w0,
                                                              int64_t width, const int64_t c) {
    for (int64_t a = 0; a < 8 && w0 + 8 * a / c < width; a++) {
        int64_t voxel = 8 * a / c, j = 8 * a % c;
        store8(o + voxel * 2 * c + j, load8(x + voxel * c + j));
        store8(o + voxel * 2 * c + c + j, acc[a]);
    }
}

/* One register block of depthwise_rows for c >= 8 channels: the taps (nv = c / 8 vectors a tap),
 * then the mode's output; bias8: PAIRS' repeated bias, bias: SUM's. */
static inline __attribute__((always_inline)) void block_outputs(f32x8 acc[8], const float *const block[9],
                                                                const f32x8 *w8, const float *x, float *out,
                                                                int64_t voxel, int64_t w0, int64_t width,
                                                                const float *bias8, const float *bias, int mode,
                                                                const int64_t c) {
    depthwise_taps(acc, block, w8, c, c / 8);
    if (mode == PAIRS) store_pairs(acc, out + voxel * (c / 2), w0, width, bias8, c);
    else if (mode == SUM) store_sum(acc, out + voxel, w0, width, bias, c);
    else store_ghost(acc, x + voxel * c, out + voxel * 2 * c, w0, width, c);
}

/* Shared by ghost_expand (mode GHOST), grouped_pairs3 (mode PAIRS) and grouped_sum3 (mode SUM):
 * every register
 * block's depthwise taps, read straight from x where they stay inside the row, else from a
 * zero-padded copy of the block's reach; then the mode's output (see those kernels and
 * grouped_sum3), and where
 * `moments` is not NULL the output's channel sums and sums of squares added to it (add_moments). */
static void depthwise_rows(const float *restrict x, int64_t c, int64_t depth, int64_t height, int64_t width,
                           const f32x8 *w8, const float *bias, float *restrict out, int mode,
                           double *restrict moments) {
    int64_t per_block = TAP_BLOCK / c, reach = TAP_BLOCK + 2 * c, oc = mode == GHOST ? 2 * c : mode == SUM ? 1 : c / 2;
    double none[1] = {0}, *tot = moments ? moments : none;
    float bias8[32]; /* PAIRS' bias over 8 floats at least: repeated where c / 2 = 4 */
    for (int64_t k = 0; bias && mode == PAIRS && k < 32; k++) bias8[k] = bias[k % (c / 2)];
    const float *b8 = bias && mode == PAIRS ? bias8 : NULL;
    int64_t n_tot = moments ? 2 * oc : 1;
#pragma omp parallel for schedule(static) collapse(2) reduction(+ : tot[:n_tot]) if (depth * height * width > PARALLEL)
    for (int64_t d = 0; d < depth; d++)
        for (int64_t h = 0; h < height; h++) {
            const float *rows[9], *block[9];
            float edge[9 * (TAP_BLOCK + 2 * 64)];
            for (int r = 0; r < 9; r++) {
                int64_t dd = d + r / 3 - 1, hh = h + r % 3 - 1;
                rows[r] = dd < 0 || dd >= depth || hh < 0 || hh >= height ? NULL : x + (dd * height + hh) * width * c;
            }
            for (int64_t w0 = 0; w0 < width; w0 += per_block) {
                int inside = w0 > 0 && w0 + per_block < width;
                for (int r = 0; r < 9; r++) {
                    if (!rows[r] || inside) {
                        block[r] = rows[r] ? rows[r] + (w0 - 1) * c : NULL;
                        continue;
                    }
                    float *e = edge + r * reach; /* voxels w0 - 1 .. w0 + per_block, zero outside */
                    int64_t first = w0 > 0 ? w0 - 1 : 0, end = w0 + per_block < width ? w0 + per_block + 1 : width;
                    memset(e, 0, reach * sizeof(float));
                    memcpy(e + (first - w0 + 1) * c, rows[r] + first * c, (end - first) * c * sizeof(float));
                    block[r] = e;
                }
                f32x8 acc[8] = {{0}};
                int64_t voxel = (d * height + h) * width + w0;
                switch (c) { /* constants keep the block in registers, the taps' offsets in the code
                              * and integer divisions out of the output's loop */
                case 4: depthwise_taps(acc, block, w8, 4, 1); break;
                case 8: block_outputs(acc, block, w8, x, out, voxel, w0, width, b8, bias, mode, 8); break;
                case 16: block_outputs(acc, block, w8, x, out, voxel, w0, width, b8, bias, mode, 16); break;
                case 32: block_outputs(acc, block, w8, x, out, voxel, w0, width, b8, bias, mode, 32); break;
                default: block_outputs(acc, block, w8, x, out, voxel, w0, width, b8, bias, mode, 64);
                }
                if (mode == GHOST && c == 4) { /* cat(p, taps) per voxel: the 4 channels of 2 voxels per vector */
                    for (int64_t a = 0; a < 8 && w0 + 2 * a < width; a++) {
                        float *o = out + (voxel + 2 * a) * 8;
                        const float *centre = x + (voxel + 2 * a) * 4;
                        memcpy(o, centre, 4 * sizeof(float));
                        put(o + 4, (f32x4){acc[a][0], acc[a][1], acc[a][2], acc[a][3]}, 4);
                        if (w0 + 2 * a + 1 == width) break;
                        memcpy(o + 8, centre + 4, 4 * sizeof(float));
                        put(o + 12, (f32x4){acc[a][4], acc[a][5], acc[a][6], acc[a][7]}, 4);
                    }
                }
            }
            if (moments) add_moments(out + (d * height + h) * width * oc, width, oc, tot);
        }
}

/* Depthwise weights (c x 27, PyTorch's order) as 27 x nv vectors, lane i holding channel i mod c. */
static f32x8 *tap_weights(const float *weight, int64_t c, int64_t nv) {
    f32x8 *w8 = aligned_alloc(32, sizeof(f32x8) * 27 * nv);
    if (w8)
        for (int64_t k = 0; k < 27; k++)
            for (int64_t i = 0; i < 8 * nv; i++) w8[k * nv + i / 8][i % 8] = weight[i % c * 27 + k];
    return w8;
}

/* g = cat(p, depthwise3x3x3(p)) for a map p of c = 4, 8, 16 or 32 channels (weight: c x 27, PyTorch's
 * order; zero padding 1, no bias): a ghost conv's primary half and the cheap half made from it, in
 * one pass, and g's moments added to `moments` where it is not NULL (depthwise_rows). Returns 0,
 * or -1 when out of memory.
 *
 * Why: oneDNN's depthwise conv and the concatenation after it are two passes over the maps
 * (8.7 and 7 ms at 1x4x128^3 -> 8 channels, 2 threads). Here a vector holds 8 channels of a voxel
 * (for c = 4: the 4 channels of 2 neighbouring voxels, which channels_last stores side by side), so
 * every tap is one load and one multiply-add with all lanes useful, and both halves are written at
 * once. */
int ghost_expand(const float *restrict p, int64_t c, int64_t depth, int64_t height, int64_t width,
                 const float *restrict weight, float *restrict g, double *restrict moments) {
    f32x8 *w8 = tap_weights(weight, c, c < 8 ? 1 : c / 8);
    if (!w8) return -1;
    depthwise_rows(p, c, depth, height, width, w8, NULL, g, GHOST, moments);
    free(w8);
    return 0;
}

/* y = the grouped 3x3x3 conv of x with two input channels per group (c = 8, 16, 32 or 64; zero
 * padding 1): depthwise taps (weight: c x 27, PyTorch's order) with each channel pair summed, plus
 * bias (c / 2, may be NULL), and y's moments added to `moments` where it is not NULL
 * (depthwise_rows). Returns 0, or -1 when out of memory.
 *
 * Why: oneDNN runs such grouped convs slowly, so PyTorch's path is a depthwise conv writing all c
 * channels and a sum of its strided halves (21 and 7 ms at 1x16x128^3 -> 8 channels, 2 threads);
 * here the taps run on whole vectors of channels (as in ghost_expand) and the pairs are summed
 * in registers, so only the c / 2 outputs are written. */
int grouped_pairs3(const float *restrict x, int64_t c, int64_t depth, int64_t height, int64_t width,
                   const float *restrict weight, const float *restrict bias, float *restrict y,
                   double *restrict moments) {
    f32x8 *w8 = tap_weights(weight, c, c / 8);
    if (!w8) return -1;
    depthwise_rows(x, c, depth, height, width, w8, bias, y, PAIRS, moments);
    free(w8);
    return 0;
}

/* y = the dense 3x3x3 conv of x with one output (c = 8, 16, 32 or 64 inputs; zero padding 1) as
 * depthwise taps (weight: c x 27, PyTorch's order) summed over the channels in registers, plus bias
 * (one float, may be NULL). Returns 0, or -1 when out of memory.
 *
 * Why: oneDNN computes a single output as a block of 8, so PyTorch's path is a depthwise conv
 * writing all c channels and a sum over them in another pass (3.4 and 1.1 ms for LightMedSeg's
 * LSPM gate, 1x16x64^3, 2 threads). */
int grouped_sum3(const float *restrict x, int64_t c, int64_t depth, int64_t height, int64_t width,
                 const float *restrict weight, const float *restrict bias, float *restrict y) {
    f32x8 *w8 = tap_weights(weight, c, c / 8);
    if (!w8) return -1;
    depthwise_rows(x, c, depth, height, width, w8, bias, y, SUM, NULL);
    free(w8);
    return 0;
}

/* The sums behind a stride-1 3D conv's weight gradient (odd kernel k, padding k / 2) on
 * channels_last_3d float32 maps, shared by the depthwise and the dense kernel below: for every
 * (n, z, y) output row of go (cout channels) and every input row x (cin channels) a kernel offset
 * (a, e) reaches inside the map, row_sum adds the sums of go times that row shifted by each of the k
 * offsets f to the per_tap double totals of taps (a, e, 0..k-1). Rows are split over OpenMP threads,
 * each with its own totals, summed into out at the end. Returns -1 when a thread's totals cannot
 * be allocated. */
typedef void (*row_sum_fn)(const float *g, const float *in, int64_t w, int64_t k, int64_t cin, int64_t cout,
                           int64_t per_tap, double *t);

static inline __attribute__((always_inline)) int weight_grad_sums(
    const float *x, const float *go, int64_t n, int64_t d, int64_t h, int64_t w, int64_t cin, int64_t cout,
    int64_t k, int64_t per_tap, row_sum_fn row_sum, double *out) {
    const int64_t taps = k * k * k, pad = k / 2, rows = n * d * h;
    int failed = 0;
    memset(out, 0, sizeof(double) * taps * per_tap);
#pragma omp parallel
    {
        double *total = calloc(taps * per_tap, sizeof(double));
        if (total == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (total == NULL) continue;
            const int64_t b = r / (d * h), z = (r / h) % d, y = r % h;
            const float *g = go + r * w * cout;
            for (int64_t a = 0; a < k; a++) {
                const int64_t zz = z + a - pad;
                if (zz < 0 || zz >= d) continue;
                for (int64_t e = 0; e < k; e++) {
                    const int64_t yy = y + e - pad;
                    if (yy < 0 || yy >= h) continue;
                    const float *in = x + ((b * d + zz) * h + yy) * w * cin;
                    row_sum(g, in, w, k, cin, cout, per_tap, total + (a * k + e) * k * per_tap);
                }
            }
        }
#pragma omp critical
        if (total != NULL)
            for (int64_t i = 0; i < taps * per_tap; i++) out[i] += total[i];
        free(total);
    }
    return failed ? -1 : 0;
}

/* One row and offset of a depthwise conv's weight gradient: per channel, short float sums,
 * vectorised over 8 (then 4) channels. */
static inline __attribute__((always_inline)) void depthwise_tap_sum(const float *g, const float *in, int64_t lo,
                                                                     int64_t hi, int64_t shift, int64_t c,
                                                                     double *t) {
    int64_t ch0 = 0;
    for (; ch0 + 8 <= c; ch0 += 8) { /* 8 channels: one AVX2 register of sums */
        float s[8] = {0};
        for (int64_t i = lo; i < hi; i++) {
            const float *gi = g + i * c + ch0, *xi = in + (i + shift) * c + ch0;
            for (int j = 0; j < 8; j++) s[j] += gi[j] * xi[j];
        }
        for (int j = 0; j < 8; j++) t[ch0 + j] += s[j];
    }
    for (; ch0 + 4 <= c; ch0 += 4) { /* 4 channels (a ghost conv's cheap half) */
        float s[4] = {0};
        for (int64_t i = lo; i < hi; i++) {
            const float *gi = g + i * c + ch0, *xi = in + (i + shift) * c + ch0;
            for (int j = 0; j < 4; j++) s[j] += gi[j] * xi[j];
        }
        for (int j = 0; j < 4; j++) t[ch0 + j] += s[j];
    }
    for (int64_t ch = ch0; ch < c; ch++) {
        float s = 0.0f;
        for (int64_t i = lo; i < hi; i++) s += g[i * c + ch] * in[(i + shift) * c + ch];
        t[ch] += s;
    }
}

static inline __attribute__((always_inline)) void depthwise_row_sum(const float *g, const float *in, int64_t w,
                                                                     int64_t k, int64_t c, int64_t unused,
                                                                     int64_t per_tap, double *t) {
    (void)unused;
    for (int64_t f = 0; f < k; f++) {
        const int64_t shift = f - k / 2;
        depthwise_tap_sum(g, in, shift < 0 ? -shift : 0, shift > 0 ? w - shift : w, shift, c, t + f * per_tap);
    }
}

/* One input row of a 3x3x3 dense conv's weight gradient, all three horizontal offsets at once: 4
 * output x 8 input channels x 3 offsets of float sums in the 16 vector registers, so each input
 * vector loaded serves 12 multiply-adds (one tap at a time: 4, and the loads bound the loop). */
static inline __attribute__((always_inline)) void dense_row3(const float *g, const float *in, int64_t w, int64_t cin,
                                                             int64_t cout, int64_t per_tap, double *t) {
    for (int64_t q0 = 0; q0 < cout; q0 += 4)
        for (int64_t i0 = 0; i0 < cin; i0 += 8) {
            f32x8 s[3][4] = {{{0}}};
            for (int64_t v = 0; v < w; v++) { /* output voxel v reads inputs v - 1, v, v + 1 */
                const f32x8 zero = {0};
                f32x8 xl = v > 0 ? load8(in + (v - 1) * cin + i0) : zero, xc = load8(in + v * cin + i0),
                      xr = v + 1 < w ? load8(in + (v + 1) * cin + i0) : zero;
                const float *gv = g + v * cout + q0;
                for (int q = 0; q < 4; q++) {
                    s[0][q] += gv[q] * xl;
                    s[1][q] += gv[q] * xc;
                    s[2][q] += gv[q] * xr;
                }
            }
            for (int f = 0; f < 3; f++)
                for (int q = 0; q < 4; q++)
                    for (int j = 0; j < 8; j++) t[f * per_tap + (q0 + q) * cin + i0 + j] += s[f][q][j];
        }
}

/* One row and offset of a dense conv's weight gradient: 4 output x 8 input channels of float sums
 * in registers at a time (cin a multiple of 8, cout of 4); k = 3 through dense_row3. */
static inline __attribute__((always_inline)) void dense_row_sum(const float *g, const float *in, int64_t w,
                                                                 int64_t k, int64_t cin, int64_t cout,
                                                                 int64_t per_tap, double *t) {
    if (k == 3) {
        dense_row3(g, in, w, cin, cout, per_tap, t);
        return;
    }
    for (int64_t f = 0; f < k; f++) {
        const int64_t shift = f - k / 2, lo = shift < 0 ? -shift : 0, hi = shift > 0 ? w - shift : w;
        for (int64_t q0 = 0; q0 < cout; q0 += 4)
            for (int64_t i0 = 0; i0 < cin; i0 += 8) {
                float s[4][8] = {{0}};
                for (int64_t v = lo; v < hi; v++) {
                    const float *gv = g + v * cout + q0, *xv = in + (v + shift) * cin + i0;
                    for (int q = 0; q < 4; q++)
                        for (int j = 0; j < 8; j++) s[q][j] += gv[q] * xv[j];
                }
                for (int q = 0; q < 4; q++)
                    for (int j = 0; j < 8; j++) t[f * per_tap + (q0 + q) * cin + i0 + j] += s[q][j];
            }
    }
}

/* The weight gradient of a depthwise 3D conv (stride 1, odd kernel k, padding k / 2) on
 * channels_last_3d float32 maps, for training (lightseg.accel.training_convs):
 * out[o * C + c] = sum_{n, voxel p} go[n, p, c] * x[n, p + o - k/2, c] for each of the k^3 offsets o. */
int dw_weight_grad(const float *x, const float *go, int64_t n, int64_t d, int64_t h, int64_t w, int64_t c,
                   int64_t k, double *out) {
    return weight_grad_sums(x, go, n, d, h, w, c, c, k, c, depthwise_row_sum, out);
}

/* The weight gradient of a dense 3D conv (stride 1, odd kernel k, padding k / 2, one group) on
 * channels_last_3d float32 maps, for training, where cin is a multiple of 8 and cout of 4:
 * out[(o * cout + q) * cin + i] = sum_{n, voxel p} go[n, p, q] * x[n, p + o - k/2, i]. */
int conv_weight_grad(const float *x, const float *go, int64_t n, int64_t d, int64_t h, int64_t w, int64_t cin,
                     int64_t cout, int64_t k, double *out) {
    return weight_grad_sums(x, go, n, d, h, w, cin, cout, k, cout * cin, dense_row_sum, out);
}

/* A group norm's affine and the SiLU after it in training (accel.training_norms): the forward into a
 * new map, and the backward's two passes, which recompute z = x * scale + shift and SiLU's slope
 * s (1 + z (1 - s)), s = sigmoid(z), instead of reading a saved normalised map. Rows of ROW voxels
 * as in affine_silu. */
void affine_silu_to(const float *restrict x, const float *restrict scale, const float *restrict shift, int64_t c,
                    int64_t voxels, float *restrict y) {
    int64_t n = ROW * c, rows = voxels / ROW;
    float s[n], t[n];
    repeat_row(scale, c, s);
    repeat_row(shift, c, t);
#pragma omp parallel for schedule(static) if (voxels > PARALLEL)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = r * n; k < (r + 1) * n; k++) y[k] = silu(x[k] * s[k - r * n] + t[k - r * n]);
    for (int64_t k = rows * n; k < voxels * c; k++) y[k] = silu(x[k] * scale[k % c] + shift[k % c]);
}

static inline float silu_slope(float z) {
    float s = 1.0f / (1.0f + fast_exp(-z));
    return s * (1.0f + z * (1.0f - s));
}

#define SUM_ROWS 16 /* rows of ROW voxels each vector lane sums in float before the double totals */

/* g = dy * silu_slope(x * scale + shift), the gradient at the norm's output, written to g, and its
 * per-channel sums and those of g * x added to sum_g[c] and sum_gx[c] (float over SUM_ROWS values
 * per vector lane, double across). */
void affine_silu_grad(const float *restrict dy, const float *restrict x, const float *restrict scale,
                      const float *restrict shift, int64_t c, int64_t voxels, float *restrict g,
                      double *restrict sum_g, double *restrict sum_gx) {
    int64_t n = ROW * c, rows = voxels / ROW;
    float s[n], t[n];
    repeat_row(scale, c, s);
    repeat_row(shift, c, t);
#pragma omp parallel for schedule(static) reduction(+ : sum_g[:c], sum_gx[:c]) if (voxels > PARALLEL)
    for (int64_t r0 = 0; r0 < rows; r0 += SUM_ROWS) {
        float acc_g[n], acc_gx[n];
        for (int64_t k = 0; k < n; k++) acc_g[k] = acc_gx[k] = 0.0f;
        for (int64_t r = r0; r < r0 + SUM_ROWS && r < rows; r++) {
            const float *restrict d = dy + r * n, *restrict p = x + r * n;
            float *restrict q = g + r * n;
            for (int64_t k = 0; k < n; k++) {
                float gk = d[k] * silu_slope(p[k] * s[k] + t[k]);
                q[k] = gk;
                acc_g[k] += gk;
                acc_gx[k] += gk * p[k];
            }
        }
        for (int64_t k = 0; k < n; k++) {
            sum_g[k % c] += acc_g[k];
            sum_gx[k % c] += acc_gx[k];
        }
    }
    for (int64_t k = rows * n; k < voxels * c; k++) {
        g[k] = dy[k] * silu_slope(x[k] * scale[k % c] + shift[k % c]);
        sum_g[k % c] += g[k];
        sum_gx[k % c] += g[k] * x[k];
    }
}

/* g = a * g + b * x + offset in place, per channel: a group norm's input gradient from the gradient
 * at its output g once the per-group terms are known. */
void channel_axpby_(float *restrict g, const float *restrict x, const float *restrict a, const float *restrict b,
                    const float *restrict offset, int64_t c, int64_t voxels) {
    int64_t n = ROW * c, rows = voxels / ROW;
    float ra[n], rb[n], ro[n];
    repeat_row(a, c, ra);
    repeat_row(b, c, rb);
    repeat_row(offset, c, ro);
#pragma omp parallel for schedule(static) if (voxels > PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        float *restrict q = g + r * n;
        const float *restrict p = x + r * n;
        for (int64_t k = 0; k < n; k++) q[k] = ra[k] * q[k] + rb[k] * p[k] + ro[k];
    }
    for (int64_t k = rows * n; k < voxels * c; k++) g[k] = a[k % c] * g[k] + b[k % c] * x[k] + offset[k % c];
}

/* A gate's per-voxel softmax over k logits and the weighted sum of k maps of c channels with it, in
 * training (accel.training_lightmedseg): y = sum_i w_i * maps[i], w = softmax(logits), k <= MAX_MAPS
 * and c a multiple of 8, in one pass where eager PyTorch makes a softmax, k products and k - 1 sums.
 * The weights are computed for BLOCK voxels at a time, vectorised over the voxels. */
#define MAX_MAPS 8
static void softmax_block(const float *restrict logits, int64_t k, int64_t n, float w[][BLOCK]) {
    float top[BLOCK], total[BLOCK];
    for (int64_t b = 0; b < n; b++) top[b] = logits[b * k], total[b] = 0.0f;
    for (int64_t i = 1; i < k; i++)
        for (int64_t b = 0; b < n; b++) top[b] = fmaxf(top[b], logits[b * k + i]);
    for (int64_t i = 0; i < k; i++)
        for (int64_t b = 0; b < n; b++) total[b] += w[i][b] = fast_exp(logits[b * k + i] - top[b]);
    for (int64_t b = 0; b < n; b++) total[b] = 1.0f / total[b];
    for (int64_t i = 0; i < k; i++)
        for (int64_t b = 0; b < n; b++) w[i][b] *= total[b];
}

void softmax_weighted_sum(const float *restrict logits, const float *const *maps, int64_t k, int64_t c,
                          int64_t voxels, float *restrict y) {
#pragma omp parallel for schedule(static) if (voxels > PARALLEL)
    for (int64_t v0 = 0; v0 < voxels; v0 += BLOCK) {
        float w[MAX_MAPS][BLOCK];
        int64_t n = v0 + BLOCK < voxels ? BLOCK : voxels - v0;
        softmax_block(logits + v0 * k, k, n, w);
        for (int64_t b = 0; b < n; b++)
            for (int64_t j = (v0 + b) * c; j < (v0 + b + 1) * c; j += 8) {
                f32x8 acc = w[0][b] * load8(maps[0] + j);
                for (int64_t i = 1; i < k; i++) acc += w[i][b] * load8(maps[i] + j);
                store8(y + j, acc);
            }
    }
}

/* Its backward in one pass: grad_maps[i] = w_i * dy and grad_logits_i = w_i (t_i - sum_j w_j t_j)
 * with t_i = sum over the channels of dy * maps[i]. */
void softmax_weighted_sum_grad(const float *restrict logits, const float *const *maps, int64_t k, int64_t c,
                               int64_t voxels, const float *restrict dy, float *const *grad_maps,
                               float *restrict grad_logits) {
#pragma omp parallel for schedule(static) if (voxels > PARALLEL)
    for (int64_t v0 = 0; v0 < voxels; v0 += BLOCK) {
        float w[MAX_MAPS][BLOCK];
        int64_t n = v0 + BLOCK < voxels ? BLOCK : voxels - v0;
        softmax_block(logits + v0 * k, k, n, w);
        for (int64_t b = 0; b < n; b++) {
            int64_t v = v0 + b;
            float t[MAX_MAPS], mean = 0.0f;
            for (int64_t i = 0; i < k; i++) {
                f32x8 dot = {0};
                for (int64_t j = v * c; j < (v + 1) * c; j += 8) {
                    f32x8 d = load8(dy + j);
                    dot += d * load8(maps[i] + j);
                    store8(grad_maps[i] + j, w[i][b] * d);
                }
                t[i] = (dot[0] + dot[1]) + (dot[2] + dot[3]) + ((dot[4] + dot[5]) + (dot[6] + dot[7]));
                mean += w[i][b] * t[i];
            }
            for (int64_t i = 0; i < k; i++) grad_logits[v * k + i] = w[i][b] * (t[i] - mean);
        }
    }
}

/* out = each of x's c channels repeated `times` times in a row, per voxel: the gradient a grouped
 * conv with one output per group hands its depthwise form (accel.training_convs), in one pass. */
void repeat_channels(const float *restrict x, int64_t c, int64_t times, int64_t voxels, float *restrict out) {
#pragma omp parallel for schedule(static) if (voxels > PARALLEL)
    for (int64_t v = 0; v < voxels; v++)
        for (int64_t j = 0; j < c; j++)
            for (int64_t r = 0; r < times; r++) out[(v * c + j) * times + r] = x[v * c + j];
}

/* Per-channel sums of dy and of dy * x, added to sum_dy[c] and sum_dyx[c]: float over blocks of 64
 * voxels, double across blocks, so a 128^3 map sums as accurately as a contiguous one. With x = dy
 * these are a norm's sums and sums of squares; with the output gradient, the two reductions a
 * group norm's backward needs, in one pass. */
void channel_dot_sums(const float *restrict dy, const float *restrict x, int64_t c, int64_t voxels,
                      double *restrict sum_dy, double *restrict sum_dyx) {
#pragma omp parallel for schedule(static) reduction(+ : sum_dy[:c], sum_dyx[:c]) if (voxels > PARALLEL)
    for (int64_t v0 = 0; v0 < voxels; v0 += BLOCK) {
        float block_dy[c], block_dyx[c];
        int64_t v1 = v0 + BLOCK < voxels ? v0 + BLOCK : voxels;
        for (int64_t j = 0; j < c; j++) block_dy[j] = block_dyx[j] = 0.0f;
        for (int64_t v = v0; v < v1; v++) {
            const float *restrict g = dy + v * c, *restrict p = x + v * c;
            for (int64_t j = 0; j < c; j++) {
                block_dy[j] += g[j];
                block_dyx[j] += g[j] * p[j];
            }
        }
        for (int64_t j = 0; j < c; j++) {
            sum_dy[j] += block_dy[j];
            sum_dyx[j] += block_dyx[j];
        }
    }
}

/* out = a * dy + b * x + shift with per-channel a, b and shift: a group norm's input gradient
 * once its per-group terms are known, in one pass. */
void channel_axpby(const float *restrict dy, const float *restrict x, const float *restrict a,
                   const float *restrict b, const float *restrict shift, int64_t c, int64_t voxels,
                   float *restrict out) {
#pragma omp parallel for schedule(static) if (voxels > PARALLEL)
    for (int64_t v = 0; v < voxels; v++)
        for (int64_t j = 0; j < c; j++) out[v * c + j] = a[j] * dy[v * c + j] + b[j] * x[v * c + j] + shift[j];
}
