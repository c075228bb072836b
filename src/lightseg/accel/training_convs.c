/* The weight gradient of a depthwise 3D conv (stride 1, odd kernel k, padding k / 2) on
 * channels_last_3d float32 maps: out[o * C + c] = sum_{n, voxel p} go[n, p, c] * x[n, p + o - k/2, c]
 * for each of the k^3 offsets o. Every (n, z, y) output row is a short float sum per offset and
 * channel, vectorised over the channels, its total added in double; rows are split over OpenMP
 * threads, each with its own double totals, summed at the end. See training_convs.py. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void dw_weight_grad(const float *x, const float *go, int64_t n, int64_t d, int64_t h, int64_t w, int64_t c,
                    int64_t k, double *out) {
    const int64_t taps = k * k * k, pad = k / 2, rows = n * d * h;
    memset(out, 0, sizeof(double) * taps * c);
#pragma omp parallel
    {
        double *total = calloc(taps * c, sizeof(double));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t b = r / (d * h), z = (r / h) % d, y = r % h;
            const float *g = go + r * w * c;
            for (int64_t a = 0; a < k; a++) {
                const int64_t zz = z + a - pad;
                if (zz < 0 || zz >= d) continue;
                for (int64_t e = 0; e < k; e++) {
                    const int64_t yy = y + e - pad;
                    if (yy < 0 || yy >= h) continue;
                    const float *in = x + ((b * d + zz) * h + yy) * w * c;
                    for (int64_t f = 0; f < k; f++) {
                        const int64_t shift = f - pad;
                        const int64_t lo = shift < 0 ? -shift : 0, hi = shift > 0 ? w - shift : w;
                        double *t = total + ((a * k + e) * k + f) * c;
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
                }
            }
        }
#pragma omp critical
        for (int64_t i = 0; i < taps * c; i++) out[i] += total[i];
        free(total);
    }
}
