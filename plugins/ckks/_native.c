/* Hoisted rotations for the ckks plugin, on SEAL's own ciphertext and key buffers.
 *
 * SEAL's public API rotates one ciphertext by one step at a time: every rotation inverse-
 * transforms the second part, splits it into one digit per prime, and forward-transforms
 * every digit into every prime (L*L number-theoretic transforms at L primes) before the
 * key-switching products. Rotations of one ciphertext by several steps (the baby steps of a
 * convolution or of a diagonal product) can share that split: a Galois automorphism acts
 * on the transformed digits as a permutation of their coefficients, so each further step
 * only costs the products with its key and the division by the special prime (2L + 2
 * transforms). This file is that arithmetic. Python (native.py) owns every buffer, checks
 * every size, and calls these functions with addresses; none of them allocates more than
 * a per-call scratch buffer, and all of them run without the GIL.
 *
 * Conventions (SEAL 4's, checked against SEAL by native.py's self-test and by the tests):
 *  - a limb is n residues modulo one prime q < 2^60 (SEAL's largest), in SEAL's NTT order: the forward
 *    transform is Cooley-Tukey with the powers of the minimal primitive 2n-th root psi
 *    in bit-reversed order, roots[k] = psi^brev(k);
 *  - inverse roots: iroots[k] = psi^-brev(k);
 *  - shoup[k] = floor(w * 2^64 / q) for each constant w (Harvey's multiplication);
 *  - a Barrett ratio is floor(2^128 / q) as two words (lo, hi).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned __int128 u128;

/* coefficients per block of the product loops (two 128-bit sums each: 8 KB on the stack),
 * and most products (< 2^120 with primes < 2^60) summed before a reduction: 128 of them
 * plus a reduced value stay below 2^127 */
#define DOT_BLOCK 256
#define DOT_CHUNK 128

static inline uint64_t mul_shoup_lazy(uint64_t a, uint64_t w, uint64_t ws, uint64_t q)
{
    uint64_t qhat = (uint64_t)(((u128)a * ws) >> 64);
    return a * w - qhat * q; /* in [0, 2q) */
}

static inline uint64_t reduce128(u128 x, uint64_t q, uint64_t r0, uint64_t r1)
{
    uint64_t x0 = (uint64_t)x, x1 = (uint64_t)(x >> 64);
    uint64_t carry = (uint64_t)(((u128)x0 * r0) >> 64);
    u128 a = (u128)x0 * r1;
    u128 b = (u128)x1 * r0;
    u128 mid = (u128)(uint64_t)a + (uint64_t)b + carry;
    uint64_t qhat = x1 * r1 + (uint64_t)(a >> 64) + (uint64_t)(b >> 64) + (uint64_t)(mid >> 64);
    uint64_t r = x0 - qhat * q;
    while (r >= q)
        r -= q;
    return r;
}

static inline uint64_t reduce64(uint64_t x, uint64_t q, uint64_t r1)
{
    uint64_t qhat = (uint64_t)(((u128)x * r1) >> 64);
    uint64_t r = x - qhat * q;
    return r >= q ? r - q : r;
}

static void ntt_forward(uint64_t *a, size_t n, uint64_t q, const uint64_t *roots,
                        const uint64_t *shoup)
{
    uint64_t two_q = 2 * q;
    size_t gap = n >> 1;
    for (size_t m = 1; m < n; m <<= 1, gap >>= 1) {
        for (size_t i = 0; i < m; i++) {
            uint64_t w = roots[m + i], ws = shoup[m + i];
            uint64_t *x = a + 2 * i * gap, *y = x + gap;
            for (size_t j = 0; j < gap; j++) {
                uint64_t u = x[j];
                u = u >= two_q ? u - two_q : u;
                uint64_t v = mul_shoup_lazy(y[j], w, ws, q);
                x[j] = u + v;
                y[j] = u - v + two_q;
            }
        }
    }
    for (size_t j = 0; j < n; j++) {
        uint64_t u = a[j];
        u = u >= two_q ? u - two_q : u;
        a[j] = u >= q ? u - q : u;
    }
}

static void ntt_inverse(uint64_t *a, size_t n, uint64_t q, const uint64_t *iroots,
                        const uint64_t *ishoup, uint64_t ninv, uint64_t ninv_shoup)
{
    uint64_t two_q = 2 * q;
    size_t gap = 1;
    for (size_t m = n >> 1; m >= 1; m >>= 1, gap <<= 1) {
        for (size_t i = 0; i < m; i++) {
            uint64_t w = iroots[m + i], ws = ishoup[m + i];
            uint64_t *x = a + 2 * i * gap, *y = x + gap;
            for (size_t j = 0; j < gap; j++) {
                uint64_t u = x[j], v = y[j];
                uint64_t t = u + v;
                x[j] = t >= two_q ? t - two_q : t;
                y[j] = mul_shoup_lazy(u - v + two_q, w, ws, q);
            }
        }
    }
    for (size_t j = 0; j < n; j++) {
        uint64_t u = mul_shoup_lazy(a[j], ninv, ninv_shoup, q);
        a[j] = u >= q ? u - q : u;
    }
}

/* A prime's constants, as native.py lays them out in one uint64 array per prime:
 * [q, r0, r1, ninv, ninv_shoup, pad x3, roots(n), shoup(n), iroots(n), ishoup(n)]. */
#define TAB_HEAD 8
typedef struct {
    uint64_t q, r0, r1, ninv, ninv_shoup;
    const uint64_t *roots, *shoup, *iroots, *ishoup;
} prime_t;

static prime_t prime_at(const uint64_t *tab, size_t n)
{
    prime_t p;
    p.q = tab[0];
    p.r0 = tab[1];
    p.r1 = tab[2];
    p.ninv = tab[3];
    p.ninv_shoup = tab[4];
    p.roots = tab + TAB_HEAD;
    p.shoup = p.roots + n;
    p.iroots = p.shoup + n;
    p.ishoup = p.iroots + n;
    return p;
}

/* ntt(buf, n, table, inverse): transform one limb in place. */
static PyObject *py_ntt(PyObject *self, PyObject *args)
{
    unsigned long long buf, tab;
    Py_ssize_t n;
    int inverse;
    if (!PyArg_ParseTuple(args, "KnKp", &buf, &n, &tab, &inverse))
        return NULL;
    prime_t p = prime_at((const uint64_t *)tab, (size_t)n);
    Py_BEGIN_ALLOW_THREADS
    if (inverse)
        ntt_inverse((uint64_t *)buf, (size_t)n, p.q, p.iroots, p.ishoup, p.ninv, p.ninv_shoup);
    else
        ntt_forward((uint64_t *)buf, (size_t)n, p.q, p.roots, p.shoup);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* split(c1, L, n, tables, digits, first, last): the hoisted digits J in [first, last) of
 * a ciphertext's second part (two calls on disjoint ranges may run at once).
 *
 * c1: L limbs (NTT form) at the data primes q_0..q_{L-1}.
 * tables: L + 1 table addresses (the L data primes, then the special prime).
 * digits: L * (L + 1) limbs, digit J at prime I in limb J * (L + 1) + I: digit J (the
 * coefficients of c1 modulo q_J, in [0, q_J)) reduced modulo prime I and transformed. */
static PyObject *py_split(PyObject *self, PyObject *args)
{
    unsigned long long c1a, taba, outa;
    Py_ssize_t L, n, first, last;
    if (!PyArg_ParseTuple(args, "KnnKKnn", &c1a, &L, &n, &taba, &outa, &first, &last))
        return NULL;
    if (first < 0 || last > L || first > last) {
        PyErr_SetString(PyExc_ValueError, "split: digit range out of bounds");
        return NULL;
    }
    const uint64_t *c1 = (const uint64_t *)c1a;
    const uint64_t *const *tabs = (const uint64_t *const *)taba;
    uint64_t *out = (uint64_t *)outa;
    size_t N = (size_t)n, LL = (size_t)L;
    uint64_t *coef = malloc(N * sizeof(uint64_t));
    if (!coef)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (size_t J = (size_t)first; J < (size_t)last; J++) {
        prime_t pj = prime_at(tabs[J], N);
        memcpy(coef, c1 + J * N, N * sizeof(uint64_t));
        ntt_inverse(coef, N, pj.q, pj.iroots, pj.ishoup, pj.ninv, pj.ninv_shoup);
        for (size_t I = 0; I <= LL; I++) {
            uint64_t *dst = out + (J * (LL + 1) + I) * N;
            if (I == J) {
                memcpy(dst, c1 + J * N, N * sizeof(uint64_t));
                continue;
            }
            prime_t pi = prime_at(tabs[I], N);
            if (pj.q <= pi.q) {
                memcpy(dst, coef, N * sizeof(uint64_t));
            } else {
                for (size_t k = 0; k < N; k++)
                    dst[k] = reduce64(coef[k], pi.q, pi.r1);
            }
            ntt_forward(dst, N, pi.q, pi.roots, pi.shoup);
        }
    }
    Py_END_ALLOW_THREADS
    free(coef);
    Py_RETURN_NONE;
}

/* One Galois automorphism of a split ciphertext, key-switched back to the secret key, in
 * two phases that run on disjoint ranges side by side (native.py calls both):
 *
 * rotate_mac(digits, perm, L, n, tables, keys, key_limbs, key_special, acc, first, last):
 * the key products at primes I in [first, last) (I = L: the special prime), into acc (two
 * parts of L + 1 limbs, the tables' order).
 *   digits: py_split's output, read through perm (n uint32: out[i] = in[perm[i]], the
 *   automorphism in NTT order);
 *   keys: L addresses, key J's two parts, each key_limbs limbs of n (SEAL's layout of a
 *   PublicKey's ciphertext), of which limb I (I < L) and limb key_special are used;
 *   tables: L + 1 (the data primes, then the special prime).
 *
 * rotate_down(acc, c0, perm, L, n, tables, consts, out, part): part ``part`` of the result:
 * acc's part divided by the special prime P, plus (part 0) the permuted first part c0.
 *   consts: L pairs (P^-1 mod q_J, its Shoup factor), then L values (P/2 mod q_J);
 *   out: two parts of L limbs. */
static PyObject *py_rotate_mac(PyObject *self, PyObject *args)
{
    unsigned long long dga, perma, taba, keya, acca;
    Py_ssize_t L, n, key_limbs, key_special, first, last;
    if (!PyArg_ParseTuple(args, "KKnnKKnnKnn", &dga, &perma, &L, &n, &taba, &keya, &key_limbs,
                          &key_special, &acca, &first, &last))
        return NULL;
    if (first < 0 || last > L + 1 || first > last || key_special >= key_limbs
            || L >= key_limbs) {
        PyErr_SetString(PyExc_ValueError, "rotate_mac: prime range or key limbs out of bounds");
        return NULL;
    }
    const uint64_t *dg = (const uint64_t *)dga;
    const uint32_t *perm = (const uint32_t *)perma;
    const uint64_t *const *tabs = (const uint64_t *const *)taba;
    const uint64_t *const *keys = (const uint64_t *const *)keya;
    uint64_t *acc = (uint64_t *)acca;
    size_t N = (size_t)n, LL = (size_t)L, KL = (size_t)key_limbs;
    Py_BEGIN_ALLOW_THREADS
    u128 s0[DOT_BLOCK], s1[DOT_BLOCK];
    for (size_t I = (size_t)first; I < (size_t)last; I++) {
        prime_t pi = prime_at(tabs[I], N);
        size_t klimb = I == LL ? (size_t)key_special : I;
        uint64_t *a0 = acc + I * N, *a1 = acc + (LL + 1 + I) * N;
        for (size_t b = 0; b < N; b += DOT_BLOCK) {
            size_t w = b + DOT_BLOCK < N ? DOT_BLOCK : N - b;
            const uint32_t *pm = perm + b;
            memset(s0, 0, w * sizeof(u128));
            memset(s1, 0, w * sizeof(u128));
            for (size_t J = 0; J < LL; J++) {
                /* digit J at prime I, read through the automorphism */
                const uint64_t *d = dg + (J * (LL + 1) + I) * N;
                const uint64_t *k0 = keys[J] + klimb * N + b, *k1 = keys[J] + (KL + klimb) * N + b;
                for (size_t k = 0; k < w; k++) {
                    uint64_t v = d[pm[k]];
                    s0[k] += (u128)v * k0[k];
                    s1[k] += (u128)v * k1[k];
                }
            }
            for (size_t k = 0; k < w; k++) {
                a0[b + k] = reduce128(s0[k], pi.q, pi.r0, pi.r1);
                a1[b + k] = reduce128(s1[k], pi.q, pi.r0, pi.r1);
            }
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rotate_down(PyObject *self, PyObject *args)
{
    unsigned long long acca, c0a, perma, taba, consta, outa;
    Py_ssize_t L, n, part;
    if (!PyArg_ParseTuple(args, "KKKnnKKKn", &acca, &c0a, &perma, &L, &n, &taba, &consta,
                          &outa, &part))
        return NULL;
    if (part < 0 || part > 1) {
        PyErr_SetString(PyExc_ValueError, "rotate_down: part must be 0 or 1");
        return NULL;
    }
    uint64_t *acc = (uint64_t *)acca;
    const uint64_t *c0 = (const uint64_t *)c0a;
    const uint32_t *perm = (const uint32_t *)perma;
    const uint64_t *const *tabs = (const uint64_t *const *)taba;
    const uint64_t *consts = (const uint64_t *)consta;
    uint64_t *out = (uint64_t *)outa;
    size_t N = (size_t)n, LL = (size_t)L, P = (size_t)part;
    uint64_t *tmp = malloc(N * sizeof(uint64_t));
    if (!tmp)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    prime_t ps = prime_at(tabs[LL], N);
    uint64_t half = ps.q >> 1;
    uint64_t *last = acc + (P * (LL + 1) + LL) * N;
    ntt_inverse(last, N, ps.q, ps.iroots, ps.ishoup, ps.ninv, ps.ninv_shoup);
    for (size_t k = 0; k < N; k++) {
        uint64_t v = last[k] + half;
        last[k] = v >= ps.q ? v - ps.q : v;
    }
    for (size_t J = 0; J < LL; J++) {
        prime_t pj = prime_at(tabs[J], N);
        uint64_t q = pj.q, inv = consts[2 * J], invs = consts[2 * J + 1];
        uint64_t fix = consts[2 * LL + J];
        for (size_t k = 0; k < N; k++) {
            uint64_t v = reduce64(last[k], q, pj.r1);
            v = v >= fix ? v - fix : v + q - fix;
            tmp[k] = v;
        }
        ntt_forward(tmp, N, q, pj.roots, pj.shoup);
        const uint64_t *t = acc + (P * (LL + 1) + J) * N;
        uint64_t *o = out + (P * LL + J) * N;
        const uint64_t *c = c0 + J * N;
        for (size_t k = 0; k < N; k++) {
            uint64_t v = mul_shoup_lazy(t[k] + q - tmp[k], inv, invs, q);
            v = v >= q ? v - q : v;
            if (P == 0) {
                v += c[perm[k]];
                v = v >= q ? v - q : v;
            }
            o[k] = v;
        }
    }
    Py_END_ALLOW_THREADS
    free(tmp);
    Py_RETURN_NONE;
}

/* dots(outputs, counts, index, pts, cts, L, n, tables, outs): several sums of products
 * over one pool of ciphertexts, out[o] = sum_t pts[t] * cts[index[t]] over the terms of
 * output o (``counts[o]`` of them, in order). One pass over the coefficients: a block of
 * every pooled ciphertext stays in cache while all the outputs read it, and each
 * plaintext is read once. */
static PyObject *py_dots(PyObject *self, PyObject *args)
{
    unsigned long long cnta, idxa, pta, cta, taba, outa;
    Py_ssize_t outputs, L, n;
    if (!PyArg_ParseTuple(args, "nKKKKnnKK", &outputs, &cnta, &idxa, &pta, &cta, &L, &n, &taba,
                          &outa))
        return NULL;
    const int64_t *counts = (const int64_t *)cnta, *index = (const int64_t *)idxa;
    const uint64_t *const *pts = (const uint64_t *const *)pta;
    const uint64_t *const *cts = (const uint64_t *const *)cta;
    const uint64_t *const *tabs = (const uint64_t *const *)taba;
    uint64_t *const *outs = (uint64_t *const *)outa;
    size_t N = (size_t)n, LL = (size_t)L, O = (size_t)outputs;
    Py_BEGIN_ALLOW_THREADS
    u128 s0[DOT_BLOCK], s1[DOT_BLOCK];
    for (size_t j = 0; j < LL; j++) {
        prime_t p = prime_at(tabs[j], N);
        for (size_t b = 0; b < N; b += DOT_BLOCK) {
            size_t e = b + DOT_BLOCK < N ? b + DOT_BLOCK : N, w = e - b;
            size_t t0 = 0;
            for (size_t o = 0; o < O; o++) {
                memset(s0, 0, w * sizeof(u128));
                memset(s1, 0, w * sizeof(u128));
                for (size_t t = 0; t < (size_t)counts[o]; t++) {
                    if (t && t % DOT_CHUNK == 0) {
                        for (size_t k = 0; k < w; k++) {
                            s0[k] = reduce128(s0[k], p.q, p.r0, p.r1);
                            s1[k] = reduce128(s1[k], p.q, p.r0, p.r1);
                        }
                    }
                    const uint64_t *pt = pts[t0 + t] + j * N + b;
                    const uint64_t *c = cts[index[t0 + t]];
                    const uint64_t *c0 = c + j * N + b, *c1 = c + (LL + j) * N + b;
                    for (size_t k = 0; k < w; k++) {
                        uint64_t v = pt[k];
                        s0[k] += (u128)v * c0[k];
                        s1[k] += (u128)v * c1[k];
                    }
                }
                uint64_t *out = outs[o];
                for (size_t k = 0; k < w; k++) {
                    out[j * N + b + k] = reduce128(s0[k], p.q, p.r0, p.r1);
                    out[(LL + j) * N + b + k] = reduce128(s1[k], p.q, p.r0, p.r1);
                }
                t0 += (size_t)counts[o];
            }
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"ntt", py_ntt, METH_VARARGS, "Transform one limb in place (forward or inverse)."},
    {"split", py_split, METH_VARARGS, "The hoisted digits of a ciphertext's second part."},
    {"rotate_mac", py_rotate_mac, METH_VARARGS, "A rotation's key products at some primes."},
    {"rotate_down", py_rotate_down, METH_VARARGS, "A rotation's division by the special prime."},
    {"dots", py_dots, METH_VARARGS, "Several sums of products over one pool, in one pass."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                     "Hoisted rotations on SEAL's buffers (see native.py).", -1,
                                     methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
