/*
 * Secure mode's Box-Muller transform in float64, in one vectorised pass over the words.
 *
 * Why: dptorch.secure_random turns CSPRNG words into Gaussians with torch operations, eleven
 * passes over the draw (mask, offset, log, scale, sqrt, angle, cos, sin, two products). For
 * the benchmark MLP's 670k values that is ~3 ms of a ~10 ms step. Here each pair is computed
 * from its two words while they are in registers.
 *
 * Contract of transform(words, out, count, scale, threads), with pairs = ceil(count / 2) and
 * 2 pairs words: pair i takes the radius word words[i] and the angle word words[pairs + i];
 * with m1 and m2 their low 52 bits, u1 = (m1 + 1/2) 2^-52 and theta = 2 pi m2 2^-52,
 *     out[i] = r cos(theta),  out[pairs + i] = r sin(theta),  r = sqrt(-2 ln u1) scale,
 * the last sine dropped when count is odd: the function of the words that
 * dptorch.secure_random.normal_from_words_ computes with torch operations (both approximate
 * it to a few ulps; torch's angle is rounded once more). The words are only read. It returns how many radius
 * words have m1 = 0: their uniform lies in [0, 2^-52) and must be drawn deeper, which the
 * caller does by running the torch transform on the same words instead (probability 2^-52 a
 * pair).
 * Accuracy: every series below is cut where its truncation error is under 1e-18 relative, and
 * every reduction is exact or one rounding, so each value is within a few float64 ulps of the
 * exact transform of its uniforms (tests compare with the torch transform to 1e-14).
 * No floating-point contraction (-ffp-contract=off in setup.py): the vector and scalar builds
 * give the same bits. The two loops are compiled for AVX-512 (x86-64-v4), AVX2 (v3) and the
 * baseline, picked at load time (gcc's target_clones); on this project's Zen 4 machine the
 * AVX-512 build runs both about 1.9x faster than the AVX2 one (2^20 values on one thread:
 * transform 2.3 against 4.3 ms, release 2.7 against 5.0 ms), the same bits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static const uint64_t MASK52 = (UINT64_C(1) << 52) - 1;
/* 2^52 as a bit pattern: OR-ing an integer m < 2^52 into its mantissa gives 2^52 + m exactly,
 * so (double)m costs no int64 conversion (AVX2 has none; this keeps the loop vectorised). */
static const uint64_t TWO52_BITS = UINT64_C(0x4330000000000000);
static const double TWO52 = 4503599627370496.0;
/* ln 2 = LN2_HIGH + LN2_LOW; LN2_HIGH has 32 significant bits, so e * LN2_HIGH is exact for
 * |e| < 2^21. */
static const double LN2_HIGH = 6.93147180369123816490e-01;
static const double LN2_LOW = 1.90821492927058770002e-10;
static const double SQRT2 = 1.41421356237309504880;
/* pi / 2 per unit of a 50-bit quadrant offset: 2 pi 2^-52. */
static const double HALF_PI_PER_UNIT = 6.283185307179586476925286766559 / 4503599627370496.0;

static inline double from_bits(uint64_t bits) {
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static inline uint64_t to_bits(double d) {
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    return bits;
}

/* m < 2^52 as a double, exactly. */
static inline double small_to_double(uint64_t m) { return from_bits(TWO52_BITS | m) - TWO52; }

/* ln x for a normal x in (0, 1]: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s),
 * s = (m - 1) / (m + 1), s^2 <= 0.02944. The series 2 sum_{j <= 10} s^(2j+1) / (2j+1) leaves
 * a relative error below 2 * 0.02944^11 / 23 < 1.3e-18, far under float64's 1.1e-16. */
static inline double log_unit(double x) {
    uint64_t bits = to_bits(x);
    uint64_t biased = bits >> 52; /* x > 0 and normal: no sign bit, exponent field >= 1 */
    double m = from_bits((bits & MASK52) | UINT64_C(0x3FF0000000000000)); /* [1, 2) */
    int high = m > SQRT2;
    m = high ? 0.5 * m : m;
    /* e = biased - 1023 + high, as a double without an int64 conversion. */
    double e = small_to_double(biased + (uint64_t)high) - 1023.0;
    double s = (m - 1.0) / (m + 1.0);
    double s2 = s * s;
    double p = 1.0 / 21.0;
    p = p * s2 + 1.0 / 19.0;
    p = p * s2 + 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    return (2.0 * s * p + e * LN2_LOW) + e * LN2_HIGH;
}

/* sin and cos of theta = 2 pi m 2^-52 for a 52-bit m. The top 2 bits are the quadrant q; the
 * offset f (50 bits) is reflected to g = 2^50 - f past the quadrant's middle, so the series
 * only see a = g pi/2 2^-50 in [0, pi/4] (g is an exact integer; a is one rounding). Cut after
 * a^17/17! and a^18/18!, the truncation errors are below 0.786^19/19! < 1e-19 and
 * 0.786^20/20! < 4e-21. The reflection swaps sin and cos, the quadrant rotates them by
 * multiples of pi/2: both exact (selects and signs), so small results keep full relative
 * accuracy. */
static inline void sincos_of_unit(uint64_t m, double *sin_out, double *cos_out) {
    const uint64_t quarter = UINT64_C(1) << 50;
    uint64_t q = m >> 50;
    uint64_t f = m & (quarter - 1);
    int reflect = f > (quarter >> 1);
    uint64_t g = reflect ? quarter - f : f;
    double a = small_to_double(g) * HALF_PI_PER_UNIT;
    double a2 = a * a;
    double sa = 1.0 / 355687428096000.0; /* 1/17! */
    sa = sa * -a2 + 1.0 / 1307674368000.0;
    sa = sa * -a2 + 1.0 / 6227020800.0;
    sa = sa * -a2 + 1.0 / 39916800.0;
    sa = sa * -a2 + 1.0 / 362880.0;
    sa = sa * -a2 + 1.0 / 5040.0;
    sa = sa * -a2 + 1.0 / 120.0;
    sa = sa * -a2 + 1.0 / 6.0;
    sa = sa * -a2 + 1.0;
    sa = sa * a;
    double ca = 1.0 / 6402373705728000.0; /* 1/18! */
    ca = ca * -a2 + 1.0 / 20922789888000.0;
    ca = ca * -a2 + 1.0 / 87178291200.0;
    ca = ca * -a2 + 1.0 / 479001600.0;
    ca = ca * -a2 + 1.0 / 3628800.0;
    ca = ca * -a2 + 1.0 / 40320.0;
    ca = ca * -a2 + 1.0 / 720.0;
    ca = ca * -a2 + 1.0 / 24.0;
    ca = ca * -a2 + 0.5;
    ca = ca * -a2 + 1.0;
    /* sin and cos of the in-quadrant angle b = q-offset. */
    double sb = reflect ? ca : sa;
    double cb = reflect ? sa : ca;
    /* theta = q pi/2 + b: (sin, cos) = (sb, cb), (cb, -sb), (-sb, -cb), (-cb, sb). */
    double s = (q & 1) ? cb : sb;
    double c = (q & 1) ? sb : cb;
    *sin_out = (q >= 2) ? -s : s;
    *cos_out = (q == 1 || q == 2) ? -c : c;
}

/* One pair: the radius word w1 and the angle word w2 give (r cos theta, r sin theta). */
static inline void one_pair(uint64_t w1, uint64_t w2, double radius_factor, double after,
                            double *x, double *y) {
    uint64_t m1 = w1 & MASK52;
    double u1 = (small_to_double(m1) + 0.5) * (1.0 / TWO52);
    double r = __builtin_sqrt(log_unit(u1) * radius_factor) * after;
    double s, c;
    sincos_of_unit(w2 & MASK52, &s, &c);
    *x = r * c;
    *y = r * s;
}

/* Pairs [start, stop) of a transform of `pairs` pairs; returns how many radius words had
 * m1 = 0. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static uint64_t transform_range(const uint64_t *words, double *out, uint64_t pairs,
                                uint64_t start, uint64_t stop, double radius_factor,
                                double after) {
    uint64_t deep = 0;
    for (uint64_t i = start; i < stop; i++) {
        deep += (words[i] & MASK52) == 0;
        one_pair(words[i], words[pairs + i], radius_factor, after, &out[i], &out[pairs + i]);
    }
    return deep;
}

/* The arguments both entry points share; sets a Python error and returns 0 if one is bad. */
static int valid_arguments(unsigned long long words_address, unsigned long long out_address,
                           unsigned long long count, double scale, int threads,
                           const char *name) {
    if ((words_address == 0 || out_address == 0) && count > 0) {
        PyErr_Format(PyExc_ValueError, "%s: an address is 0", name);
        return 0;
    }
    if (!(scale >= 0.0) || !__builtin_isfinite(scale)) {
        PyErr_Format(PyExc_ValueError, "%s: the noise scale must be a finite float >= 0", name);
        return 0;
    }
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "%s: threads must be at least 1", name);
        return 0;
    }
    return 1;
}

/* Pairs per OpenMP task: large enough that scheduling costs nothing, small enough to split
 * a step's draw over every thread. */
#define BLOCK_PAIRS 16384

/* transform(words, out, count, scale, threads): see the top of the file; count outputs from
 * 2 ceil(count / 2) words (an odd count drops the last pair's sine, as the torch transform's
 * cut does). */
static PyObject *transform(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long words_address, out_address, count;
    double scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKdi", &words_address, &out_address, &count, &scale,
                          &threads)) {
        return NULL;
    }
    if (!valid_arguments(words_address, out_address, count, scale, threads, "transform")) {
        return NULL;
    }
    const uint64_t *words = (const uint64_t *)(uintptr_t)words_address;
    double *out = (double *)(uintptr_t)out_address;
    const uint64_t pairs = ((uint64_t)count + 1) / 2;
    const uint64_t whole = (uint64_t)count / 2; /* pairs whose two values are both kept */
    /* The scale goes into the logarithm's factor (no extra product) unless its square
     * overflows, as in the torch transform. */
    const int folded = __builtin_isfinite(2.0 * scale * scale);
    const double radius_factor = folded ? -2.0 * scale * scale : -2.0;
    const double after = folded ? 1.0 : scale;
    const long long blocks = (long long)((whole + BLOCK_PAIRS - 1) / BLOCK_PAIRS);
    uint64_t deep = 0;
    (void)threads; /* unused without OpenMP */
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : deep)
    for (long long b = 0; b < blocks; b++) {
        uint64_t start = (uint64_t)b * BLOCK_PAIRS;
        uint64_t stop = start + BLOCK_PAIRS < whole ? start + BLOCK_PAIRS : whole;
        deep += transform_range(words, out, pairs, start, stop, radius_factor, after);
    }
    if (pairs > whole) { /* odd count: the last pair keeps its cosine only */
        double dropped;
        deep += (words[whole] & MASK52) == 0;
        one_pair(words[whole], words[pairs + whole], radius_factor, after, &out[whole],
                 &dropped);
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(deep);
}

/* The release: pairs [start, stop) of `pairs`, each value v = (noise std_units) + sum scale
 * on the grid's integers, written back over the float32 sum as grid rint(v). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void release_range(const uint64_t *words, float *sums, uint64_t pairs, uint64_t start,
                          uint64_t stop, double radius_factor, double after, double scale,
                          double grid) {
    for (uint64_t i = start; i < stop; i++) {
        double x, y;
        one_pair(words[i], words[pairs + i], radius_factor, after, &x, &y);
        double vx = x + (double)sums[i] * scale;
        double vy = y + (double)sums[pairs + i] * scale;
        sums[i] = (float)(__builtin_rint(vx) * grid);
        sums[pairs + i] = (float)(__builtin_rint(vy) * grid);
    }
}

/* release(words, sums, count, std_units, scale, grid, threads): secure mode's whole release
 * of float32 parameters in one pass. With z the transform() of the words at std_units (the
 * noise std in grid units) and s the float32 clipped sums, each value becomes
 *     sums[k] = (float)(grid * rint(z[k] + (double)s[k] * scale)),
 * the computation dptorch.noise.snap_to_grid does in float64 torch passes (the noise and
 * the scaled sum added in float64, rounded half to even onto the grid, scaled back exactly
 * by a power of two, cast). Returns the count of radius words that need a deeper uniform:
 * when it is not 0 nothing was written, and the caller does the release another way. */
static PyObject *release(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long words_address, sums_address, count;
    double std_units, scale, grid;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKdddi", &words_address, &sums_address, &count, &std_units,
                          &scale, &grid, &threads)) {
        return NULL;
    }
    if (!valid_arguments(words_address, sums_address, count, std_units, threads, "release")) {
        return NULL;
    }
    if (!__builtin_isfinite(scale) || !(grid > 0.0) || !__builtin_isfinite(grid)) {
        PyErr_SetString(PyExc_ValueError, "release: scale and grid must be finite, grid > 0");
        return NULL;
    }
    const uint64_t *words = (const uint64_t *)(uintptr_t)words_address;
    float *sums = (float *)(uintptr_t)sums_address;
    const uint64_t pairs = ((uint64_t)count + 1) / 2;
    const uint64_t whole = (uint64_t)count / 2;
    const int folded = __builtin_isfinite(2.0 * std_units * std_units);
    const double radius_factor = folded ? -2.0 * std_units * std_units : -2.0;
    const double after = folded ? 1.0 : std_units;
    const long long blocks = (long long)((whole + BLOCK_PAIRS - 1) / BLOCK_PAIRS);
    uint64_t deep = 0;
    (void)threads;
    Py_BEGIN_ALLOW_THREADS
    /* First the radius words alone: if one needs a deeper uniform, nothing is written, so the
     * caller can run the torch release on the same sums and words. */
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : deep)
    for (long long i = 0; i < (long long)pairs; i++) {
        deep += (words[i] & MASK52) == 0;
    }
    if (deep == 0) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long long b = 0; b < blocks; b++) {
            uint64_t start = (uint64_t)b * BLOCK_PAIRS;
            uint64_t stop = start + BLOCK_PAIRS < whole ? start + BLOCK_PAIRS : whole;
            release_range(words, sums, pairs, start, stop, radius_factor, after, scale, grid);
        }
        if (pairs > whole) {
            double x, dropped;
            one_pair(words[whole], words[pairs + whole], radius_factor, after, &x, &dropped);
            sums[whole] = (float)(__builtin_rint(x + (double)sums[whole] * scale) * grid);
        }
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(deep);
}

static PyMethodDef methods[] = {
    {"transform", transform, METH_VARARGS,
     "transform(words, out, count, scale, threads): count float64 N(0, scale^2) values at "
     "address `out` by Box-Muller from 2*ceil(count/2) int64 words at address `words` (see "
     "the C file for the exact function); returns how many radius words need a deeper "
     "uniform. The GIL is released."},
    {"release", release, METH_VARARGS,
     "release(words, sums, count, std_units, scale, grid, threads): overwrite `count` float32 "
     "clipped sums with grid * rint(noise + sum * scale), the noise transform()ed from the "
     "words at std_units (see the C file); returns how many radius words need a deeper "
     "uniform (then nothing was written). The GIL is released."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_secure_gaussian",
    "Secure mode's float64 Box-Muller transform of CSPRNG words, vectorised.", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__secure_gaussian(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
#ifdef _OPENMP
    const long openmp = 1;
#else
    const long openmp = 0;
#endif
    if (PyModule_AddIntConstant(m, "openmp", openmp) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
