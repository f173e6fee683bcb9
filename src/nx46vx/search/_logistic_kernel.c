/* Fused weighted-logistic scan for nx46vx.search (CPU).
 *
 * One pass over the rows of a design matrix computes, for groups of 16
 * candidates that share their rows (one meta-neuron's bootstrap), the logits
 * z = phi . theta, the loss  w * (softplus(z) - y z)  and/or the gradient
 * phi^T [w * (sigmoid(z) - y)], without ever storing z: the forward product,
 * the transcendental functions and the backward product meet in registers and
 * L1.  Built at run time by nx46vx/search/native.py with the system C compiler
 * (-O3 -march=native); GCC/Clang vector extensions, no intrinsics (one empty
 * inline-asm register hint on x86-64), no libm.
 *
 * Determinism: rows are cut into fixed chunks; every (chunk, group) writes its
 * own partial sums and nx_reduce adds them in chunk order, so the result does
 * not depend on how many threads ran the chunks.
 */
#include <stdint.h>
#include <string.h>

#define KB 16   /* candidates per group: two vectors of 8 floats */
#define TR 60   /* rows per tile (their residuals stay in L1); a multiple of RB */
#define RB 6    /* rows advanced together in the forward product: 12 independent FMA chains */
#define JB 5    /* gradient rows accumulated together in the backward product: 10 chains (P = 20 has no remainder) */
#define MAXP 64 /* largest supported design width */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));

static inline v8f sel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8f bcast(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

#define NV 4 /* vectors of logits (two rows) whose transcendental chains are interleaved: their temporaries fit the 16 registers */
_Static_assert(RB % (NV / 2) == 0, "the forward block's rows split into pairs");

/* Keep theta's two vectors of one column in registers for the RB rows (GCC otherwise folds them into
 * every FMA as a memory operand: two loads per row, which saturates the load ports). */
#if defined(__x86_64__)
#define IN_REGISTERS(a, b) __asm__("" : "+x"(a), "+x"(b))
#else
#define IN_REGISTERS(a, b) ((void)0)
#endif

/* exp(x) for x <= 0 on NV vectors, as 2^t with t = x log2(e) = k + f, k an integer and |f| <= 1/2: 2^f by
 * the degree-6 Chebyshev least-squares fit on [-1/2, 1/2] (numpy, monomial form; relative error ~1e-7 in
 * float32 Horner), 2^k added to its exponent bits.  The rounding of t costs |x| * 2^-24 relative, which the
 * logistic sums never see: e = exp(-|z|) only enters them absolutely.  k and t - k come from adding and
 * subtracting 1.5 * 2^23 (round to nearest): two additions, which leave the FMA ports to the polynomial.
 * Stage by stage over the NV vectors, so their dependent polynomial chains overlap. */
static inline void vexp_nonpos_n(v8f *restrict x)
{
    const v8f magic = bcast(12582912.0f);
    v8f f[NV], p[NV];
    v8i k[NV];
    for (int v = 0; v < NV; ++v) {
        const v8f t = sel(x[v] < -87.0f, bcast(-87.0f), x[v]) * 1.44269504088896341f;
        const v8f shifted = t + magic;
        k[v] = (v8i)shifted - (v8i)magic; /* round(t), exact for |t| < 2^22 */
        f[v] = t - (shifted - magic);
        p[v] = bcast(1.5469732e-04f);
    }
    for (int v = 0; v < NV; ++v) p[v] = p[v] * f[v] + 1.3400433e-03f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * f[v] + 9.6180253e-03f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * f[v] + 5.5503272e-02f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * f[v] + 2.4022651e-01f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * f[v] + 6.9314718e-01f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * f[v] + 1.0f;
    for (int v = 0; v < NV; ++v) x[v] = (v8f)((v8i)p[v] + (k[v] << 23));
}

/* log(1 + e) for 0 <= e <= 1 on NV vectors: e * g(e), with g the degree-8 Chebyshev least-squares fit of
 * log1p(e)/e on [0, 1] (numpy, in monomial form; relative error < 3e-7, no division and no exponent split). */
static inline void vlog1p_unit_n(const v8f *restrict e, v8f *restrict out)
{
    v8f p[NV];
    for (int v = 0; v < NV; ++v) p[v] = bcast(5.1859975946e-03f);
    for (int v = 0; v < NV; ++v) p[v] = p[v] * e[v] - 2.9210234740e-02f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * e[v] + 7.7540310364e-02f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * e[v] - 1.3583934088e-01f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * e[v] + 1.9055950831e-01f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * e[v] - 2.4825646905e-01f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * e[v] + 3.3316010357e-01f;
    for (int v = 0; v < NV; ++v) p[v] = p[v] * e[v] - 4.9999255871e-01f;
    for (int v = 0; v < NV; ++v) out[v] = (p[v] * e[v] + 9.9999992086e-01f) * e[v];
}

/* Rows rows[0..n) of phi (row-major, width P) with weights w[0..n); theta_t is P x KB.
 * loss (KB) is overwritten (with zeros unless with_loss); grad (P x KB) is accumulated when with_grad.
 * Always inlined with constant flags, so each combination is its own loop without branches. */
static inline __attribute__((always_inline)) void
scan_group(const float *restrict phi, const float *restrict y, int P, const int32_t *restrict rows, const float *restrict w, int64_t n,
           const float *restrict th, float *restrict grad, float *restrict loss, const int with_grad, const int with_loss)
{
    const float *xp[TR]; /* the tile's rows: the backward product reads them again where they lie (L1/L2) */
    v8f rs[TR][2];
    v8f lacc[2] = {bcast(0.0f), bcast(0.0f)};
    for (int64_t i0 = 0; i0 < n; i0 += TR) {
        const int nt = n - i0 < TR ? (int)(n - i0) : TR;
        const int ntp = (nt + RB - 1) / RB * RB;
        for (int t0 = 0; t0 < ntp; t0 += RB) {
            const float *x[RB];
            float wi[RB], yi[RB];
            for (int q = 0; q < RB; ++q) {
                const int t = t0 + q < nt ? t0 + q : nt - 1; /* the tail is padded with weight-0 copies */
                const int32_t r = rows[i0 + t];
                x[q] = phi + (int64_t)r * P;
                wi[q] = t0 + q < nt ? w[i0 + t] : 0.0f;
                yi[q] = y[r];
            }
            v8f z[RB][2];
            for (int q = 0; q < RB; ++q) {
                z[q][0] = z[q][1] = bcast(0.0f);
                xp[t0 + q] = x[q];
            }
            for (int j = 0; j < P; ++j) {
                v8f a = *(const v8fu *)(th + j * KB), b = *(const v8fu *)(th + j * KB + 8);
                IN_REGISTERS(a, b);
                for (int q = 0; q < RB; ++q) {
                    const v8f xj = bcast(x[q][j]); /* a broadcast load: no scalar copy, no shuffle */
                    z[q][0] += xj * a;
                    z[q][1] += xj * b;
                }
            }
            for (int q0 = 0; q0 < RB; q0 += NV / 2) {
                v8f zz[NV], e[NV], inv[NV], lg[NV];
                v8i pos[NV];
                for (int v = 0; v < NV; ++v) {
                    zz[v] = z[q0 + v / 2][v % 2];
                    pos[v] = zz[v] >= 0.0f;
                    e[v] = (v8f)((v8i)zz[v] | (v8i)bcast(-0.0f)); /* -|z| */
                }
                vexp_nonpos_n(e);                                               /* exp(-|z|) */
                for (int v = 0; v < NV; ++v) inv[v] = 1.0f / (1.0f + e[v]);     /* sigmoid(|z|), in [0.5, 1] */
                if (with_loss) vlog1p_unit_n(e, lg);
                for (int v = 0; v < NV; ++v) {
                    const int q = q0 + v / 2, h = v % 2;
                    const v8f s = sel(pos[v], inv[v], e[v] * inv[v]);          /* sigmoid(z) */
                    /* softplus(z) = max(z, 0) + log(1 + exp(-|z|)) */
                    if (with_loss) lacc[h] += wi[q] * (sel(pos[v], zz[v], bcast(0.0f)) + lg[v] - yi[q] * zz[v]);
                    rs[t0 + q][h] = wi[q] * (s - yi[q]);
                }
            }
        }
        if (!with_grad) continue;
        int j = 0;
        for (; j + JB <= P; j += JB) {
            v8f g[JB][2];
            for (int u = 0; u < JB; ++u) {
                g[u][0] = *(v8fu *)(grad + (j + u) * KB);
                g[u][1] = *(v8fu *)(grad + (j + u) * KB + 8);
            }
            for (int t = 0; t < ntp; ++t) {
                const v8f r0 = rs[t][0], r1 = rs[t][1];
                for (int u = 0; u < JB; ++u) {
                    const float xj = xp[t][j + u];
                    g[u][0] += xj * r0;
                    g[u][1] += xj * r1;
                }
            }
            for (int u = 0; u < JB; ++u) {
                *(v8fu *)(grad + (j + u) * KB) = g[u][0];
                *(v8fu *)(grad + (j + u) * KB + 8) = g[u][1];
            }
        }
        for (; j < P; ++j) {
            v8f g0 = *(v8fu *)(grad + j * KB), g1 = *(v8fu *)(grad + j * KB + 8);
            for (int t = 0; t < ntp; ++t) {
                const float xj = xp[t][j];
                g0 += xj * rs[t][0];
                g1 += xj * rs[t][1];
            }
            *(v8fu *)(grad + j * KB) = g0;
            *(v8fu *)(grad + j * KB + 8) = g1;
        }
    }
    *(v8fu *)loss = lacc[0];
    *(v8fu *)(loss + 8) = lacc[1];
}

#define NX_GRADIENT 1
#define NX_LOSS 2

int nx_kernel_version(void) { return 3; }
int nx_group_width(void) { return KB; }
int nx_max_width(void) { return MAXP; }

/* Chunks [c0, c1) of every group; what = NX_GRADIENT | NX_LOSS (or one of them; the loss when neither).
 * Group g uses the rows of its meta-neuron
 * group_meta[g]: rows[offsets[m * (n_chunks + 1) + c] .. offsets[... + c + 1]) with
 * weights w[same]; theta_t holds G blocks of P x KB.  Partial sums go to
 * grad_parts (n_chunks, G, P, KB) and loss_parts (n_chunks, G, KB). */
void nx_logistic_chunks(const float *phi, const float *y, int P,
                        const int32_t *rows, const float *w, const int64_t *offsets, int64_t n_chunks,
                        int n_groups, const int32_t *group_meta, const float *theta_t,
                        int64_t c0, int64_t c1, float *grad_parts, float *loss_parts, int what)
{
    const int with_grad = what & NX_GRADIENT;
    for (int64_t c = c0; c < c1; ++c) {
        for (int g = 0; g < n_groups; ++g) {
            const int64_t *off = offsets + (int64_t)group_meta[g] * (n_chunks + 1);
            float *gp = grad_parts + (c * n_groups + g) * (int64_t)P * KB;
            float *lp = loss_parts + (c * n_groups + g) * (int64_t)KB;
            if (with_grad) memset(gp, 0, sizeof(float) * P * KB);
            const int32_t *r = rows + off[c];
            const float *wc = w + off[c], *th = theta_t + (int64_t)g * P * KB;
            const int64_t n = off[c + 1] - off[c];
            switch (what & (NX_GRADIENT | NX_LOSS)) {
            case NX_GRADIENT | NX_LOSS: scan_group(phi, y, P, r, wc, n, th, gp, lp, 1, 1); break;
            case NX_GRADIENT: scan_group(phi, y, P, r, wc, n, th, gp, lp, 1, 0); break;
            default: scan_group(phi, y, P, r, wc, n, th, gp, lp, 0, 1); break;
            }
        }
    }
}

/* Sum the partials over chunks, in chunk order, in double: grad (G, P, KB), loss (G, KB). */
void nx_reduce(const float *grad_parts, const float *loss_parts, int64_t n_chunks, int n_groups, int P,
               double *grad, double *loss, int with_grad)
{
    const int64_t gsize = (int64_t)n_groups * P * KB, lsize = (int64_t)n_groups * KB;
    memset(loss, 0, sizeof(double) * lsize);
    if (with_grad) memset(grad, 0, sizeof(double) * gsize);
    for (int64_t c = 0; c < n_chunks; ++c) {
        for (int64_t i = 0; i < lsize; ++i) loss[i] += loss_parts[c * lsize + i];
        if (with_grad)
            for (int64_t i = 0; i < gsize; ++i) grad[i] += grad_parts[c * gsize + i];
    }
}
