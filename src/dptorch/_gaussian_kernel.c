/*
 * Gaussian draws for the CPU, written so that the compiler vectorises the whole loop.
 *
 * Why: torch's CPU generator (mt19937) is serial, ~4 ns a draw on this project's machine, and a
 * DP-SGD step draws one noise value per trainable coordinate: on a small model that is a third
 * of the step. Here LANES independent xoshiro256++ generators (Blackman and Vigna, "Scrambled
 * linear pseudorandom number generators", arXiv 1805.01407) advance side by side, so every
 * vector lane draws at once, and the Box-Muller transform is evaluated by branch-free series
 * instead of libm calls.
 *
 * Contract of fill(address, n, seed, std): n float32 values at address, a function of
 * (seed, n) alone, independent N(0, std^2) draws to float32 accuracy:
 *   - lane j's 256-bit state is the SplitMix64 stream started at seed, outputs 4j .. 4j+3;
 *   - step i of lane j gives one 64-bit word w; its low 32 bits a and high 32 bits b make a
 *     Box-Muller pair (r cos t, r sin t), r = std sqrt(-2 ln u), u = (floor(a / 2) + 1/2) 2^-31,
 *     t = 2 pi b 2^-32; the pair goes to out[2 LANES i + j] and out[2 LANES i + LANES + j];
 *   - the last, partial step is computed whole and cut to n.
 * Accuracy: every piece is evaluated in float32 with truncation errors below 4e-9 (derived in
 * the comments below), so each value is within a few float32 ulps of the exact transform of its
 * uniforms. u's smallest value, 2^-32, puts the tail cut at 6.66 std (torch's CPU sampler,
 * from 24-bit uniforms: 5.77). No floating-point contraction (-ffp-contract=off in setup.py):
 * the scalar and the vector builds give identical bits.
 *
 * Privacy: a fast statistical generator, not a cryptographic one, as torch's own is; secure
 * mode never comes here (dptorch.secure_random).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Lanes of generators advanced together: a multiple of any vector width, small enough that
 * the state (4 x LANES words) stays in registers and L1. */
#define LANES 16

static const double TWO_PI = 6.283185307179586476925286766559;
/* ln 2 = LN2_HIGH + LN2_LOW; LN2_HIGH has 8 significant bits, so e * LN2_HIGH is exact. */
static const float LN2_HIGH = 0.69140625f;
static const float LN2_LOW = 1.7409305599e-3f;
static const float SQRT_HALF = 0.70710678f;

/* ln x for x in (0, 1]: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s),
 * s = (m - 1) / (m + 1), |s| <= 0.1716, s^2 <= 0.02944. The series 2 sum s^(2j+1) / (2j+1)
 * cut after j = 4 leaves a relative error below 2 * 0.02944^5 / 11 < 4e-9, under float's
 * rounding (6e-8). */
static inline float log_unit(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int32_t e = (int32_t)(bits >> 23) - 127; /* x > 0 and normal: no sign bit, no subnormal */
    bits = (bits & 0x007FFFFFu) | 0x3F800000u; /* m in [1, 2) */
    float m;
    memcpy(&m, &bits, sizeof m);
    /* m above sqrt(2) moves down by a factor 2 (selects, which the compiler vectorises). */
    int32_t high = m > 1.41421356f;
    m = high ? 0.5f * m : m;
    e += high;
    float s = (m - 1.0f) / (m + 1.0f);
    float s2 = s * s;
    float p = 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    float fe = (float)e;
    return (2.0f * s * p + fe * LN2_LOW) + fe * LN2_HIGH;
}

/* sin and cos of 2 pi b 2^-32 for a 32-bit b. The top 2 bits choose the quadrant q and the
 * angle is measured from its middle ray, (2q + 1) pi / 4, so the series only ever see
 * |a| <= pi/4; cut after a^9/9! (sin) and a^10/10! (cos), their truncation errors are below
 * 0.786^11/11! < 1.8e-9 and 0.786^12/12! < 1.2e-10. The ray's cos and sin are +-sqrt(1/2),
 * signs from q: no table lookup, so the loop stays vectorised. */
static inline void sincos_turn(uint32_t b, float *sin_out, float *cos_out) {
    uint32_t q = b >> 30;
    /* Offset within the quadrant, centred: 30 bits, so the int32 conversion is exact. */
    float a = ((float)(int32_t)(b & 0x3FFFFFFFu) - 536870912.0f) *
              (float)(TWO_PI / 4294967296.0);
    float a2 = a * a;
    float sa = 1.0f / 362880.0f; /* 1/9! */
    sa = sa * -a2 + 1.0f / 5040.0f;
    sa = sa * -a2 + 1.0f / 120.0f;
    sa = sa * -a2 + 1.0f / 6.0f;
    sa = sa * -a2 + 1.0f;
    sa = sa * a;
    float ca = 1.0f / 3628800.0f; /* 1/10! */
    ca = ca * -a2 + 1.0f / 40320.0f;
    ca = ca * -a2 + 1.0f / 720.0f;
    ca = ca * -a2 + 1.0f / 24.0f;
    ca = ca * -a2 + 0.5f;
    ca = ca * -a2 + 1.0f;
    /* Ray (2q + 1) pi / 4: cos is +sqrt(1/2) for q = 0, 3; sin is +sqrt(1/2) for q = 0, 1. */
    float rc = (q == 1 || q == 2) ? -SQRT_HALF : SQRT_HALF;
    float rs = (q >= 2) ? -SQRT_HALF : SQRT_HALF;
    *cos_out = ca * rc - sa * rs;
    *sin_out = sa * rc + ca * rs;
}

/* One Box-Muller pair from the word w: radius from its low half, angle from its high half.
 * u = (floor(a / 2) + 1/2) 2^-31 lies in (0, 1] (rounding to float can make it 1: radius 0);
 * the halving keeps the integer conversion signed, which AVX2 has. */
static inline void box_muller(uint64_t w, float std, float *x, float *y) {
    uint32_t a = (uint32_t)w, b = (uint32_t)(w >> 32);
    float u = ((float)(int32_t)(a >> 1) + 0.5f) * (1.0f / 2147483648.0f);
    float r2 = -2.0f * log_unit(u);
    float r = std * __builtin_sqrtf(r2 > 0.0f ? r2 : 0.0f);
    float s, c;
    sincos_turn(b, &s, &c);
    *x = r * c;
    *y = r * s;
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* SplitMix64 (Steele, Lea and Flood, OOPSLA 2014), the seeding its authors recommend. */
static inline uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

typedef struct {
    uint64_t s0[LANES], s1[LANES], s2[LANES], s3[LANES];
} lanes_t;

static void seed_lanes(lanes_t *g, uint64_t seed) {
    uint64_t sm = seed;
    for (int j = 0; j < LANES; j++) {
        g->s0[j] = splitmix64(&sm);
        g->s1[j] = splitmix64(&sm);
        g->s2[j] = splitmix64(&sm);
        g->s3[j] = splitmix64(&sm);
        /* An all-zero state would stay zero; SplitMix64 never gives four zeros in a row, but
         * the guard makes that a fact of this code rather than of its constants. */
        if ((g->s0[j] | g->s1[j] | g->s2[j] | g->s3[j]) == 0) g->s0[j] = 1;
    }
}

/* steps steps of every lane into out (2 LANES floats a step). Compiled for AVX-512
 * (x86-64-v4), AVX2 (v3) and the baseline; the loader picks the best at run time (gcc's
 * target_clones). The AVX-512 build has native 64-bit rotates for xoshiro and twice the
 * lanes a vector: 1.8x the AVX2 build's speed on this project's Zen 4 machine (0.44 against
 * 0.80 ms for 669,706 values on one thread), with the same bits (all three builds compared
 * value for value). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void fill_steps(lanes_t *g, float *out, uint64_t steps, float std) {
    uint64_t s0[LANES], s1[LANES], s2[LANES], s3[LANES];
    memcpy(s0, g->s0, sizeof s0);
    memcpy(s1, g->s1, sizeof s1);
    memcpy(s2, g->s2, sizeof s2);
    memcpy(s3, g->s3, sizeof s3);
    for (uint64_t i = 0; i < steps; i++) {
        float *row = out + 2 * LANES * i;
        for (int j = 0; j < LANES; j++) {
            /* xoshiro256++: output, then the state transition. */
            uint64_t w = rotl(s0[j] + s3[j], 23) + s0[j];
            uint64_t t = s1[j] << 17;
            s2[j] ^= s0[j];
            s3[j] ^= s1[j];
            s1[j] ^= s2[j];
            s0[j] ^= s3[j];
            s2[j] ^= t;
            s3[j] = rotl(s3[j], 45);
            box_muller(w, std, &row[j], &row[LANES + j]);
        }
    }
    memcpy(g->s0, s0, sizeof s0);
    memcpy(g->s1, s1, sizeof s1);
    memcpy(g->s2, s2, sizeof s2);
    memcpy(g->s3, s3, sizeof s3);
}

static void fill_normal(float *out, uint64_t n, uint64_t seed, float std) {
    lanes_t g;
    seed_lanes(&g, seed);
    const uint64_t per_step = 2 * LANES;
    uint64_t whole = n / per_step;
    fill_steps(&g, out, whole, std);
    uint64_t rest = n - whole * per_step;
    if (rest) {
        float scratch[2 * LANES];
        fill_steps(&g, scratch, 1, std);
        memcpy(out + whole * per_step, scratch, (size_t)rest * sizeof(float));
    }
}

/* The arguments both entry points share; sets a Python error and returns 0 if one is bad. */
static int valid_target(unsigned long long address, unsigned long long n, double std,
                        const char *name) {
    if (address == 0 && n > 0) {
        PyErr_Format(PyExc_ValueError, "%s: address is 0", name);
        return 0;
    }
    if (!(std >= 0.0) || std > 3.0e38) {
        PyErr_Format(PyExc_ValueError, "%s: std must be a finite float32 >= 0", name);
        return 0;
    }
    return 1;
}

static PyObject *fill(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, n, seed;
    double std;
    if (!PyArg_ParseTuple(args, "KKKd", &address, &n, &seed, &std)) {
        return NULL;
    }
    if (!valid_target(address, n, std, "fill")) {
        return NULL;
    }
    float *out = (float *)(uintptr_t)address;
    Py_BEGIN_ALLOW_THREADS
    fill_normal(out, (uint64_t)n, (uint64_t)seed, (float)std);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* More chunks than this are refused: a step draws with at most a few threads. */
#define MAX_CHUNKS 256

/* fill_chunks(address, n, chunk, seeds, std): chunk i (values [i chunk, min(n, (i+1) chunk)))
 * is fill() of its length with seeds[i], so the result equals one fill() call per chunk.
 * Built with OpenMP, the chunks are drawn by one thread each, in the OpenMP runtime already
 * loaded: torch's own (the same libgomp.so.1, which the loader shares), whose threads are
 * awake after the step's matrix products. A pool of Python threads would compete with those
 * for the same cores instead (benchmarks/noise_sampler.py, 670k values on 2 cores right
 * after a matrix product: 0.73 ms here against 1.26 ms through Python threads and 1.28 ms on
 * one thread). */
static PyObject *fill_chunks(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, n, chunk;
    PyObject *seed_list;
    double std;
    if (!PyArg_ParseTuple(args, "KKKOd", &address, &n, &chunk, &seed_list, &std)) {
        return NULL;
    }
    if (!valid_target(address, n, std, "fill_chunks")) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(seed_list, "fill_chunks: seeds must be a sequence of ints");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    uint64_t seeds[MAX_CHUNKS];
    if (count < 1 || count > MAX_CHUNKS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "fill_chunks: between 1 and %d seeds, got %zd",
                     MAX_CHUNKS, count);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        seeds[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
    }
    Py_DECREF(seq);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (n == 0) {
        Py_RETURN_NONE;
    }
    /* Every value must belong to a chunk (count chunks of chunk values cover n), and no chunk
     * may be longer than n, which keeps i * chunk from overflowing. */
    unsigned long long needed = n / (unsigned long long)count + (n % (unsigned long long)count != 0);
    if (chunk < needed || chunk > n) {
        PyErr_Format(PyExc_ValueError,
                     "fill_chunks: %zd chunks of %llu values cannot split %llu values (chunk "
                     "must be between %llu and %llu)",
                     count, chunk, n, needed, n);
        return NULL;
    }
    float *out = (float *)(uintptr_t)address;
    const float std32 = (float)std;
    const int threads = (int)count;
    (void)threads; /* unused without OpenMP */
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t start = (uint64_t)i * chunk;
        if (start < n) {
            uint64_t length = n - start < chunk ? n - start : chunk;
            fill_normal(out + start, length, seeds[i], std32);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fill", fill, METH_VARARGS,
     "fill(address, n, seed, std): n float32 N(0, std^2) draws written at address, a function "
     "of (seed, n) alone. The GIL is released while drawing."},
    {"fill_chunks", fill_chunks, METH_VARARGS,
     "fill_chunks(address, n, chunk, seeds, std): chunk i of `chunk` values (the last one cut "
     "to n) is fill() of its length with seeds[i]; one OpenMP thread per chunk where built "
     "with OpenMP (see `openmp`). The GIL is released while drawing."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_gaussian_kernel",
    "xoshiro256++ lanes and a vectorised Box-Muller: float32 Gaussian draws for the CPU.", -1,
    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gaussian_kernel(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
#ifdef _OPENMP
    const long openmp = 1;
#else
    const long openmp = 0;
#endif
    /* Whether fill_chunks draws its chunks in parallel (built with OpenMP) or one by one. */
    if (PyModule_AddIntConstant(m, "openmp", openmp) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
