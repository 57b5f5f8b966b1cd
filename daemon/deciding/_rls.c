/* The online head's arithmetic, compiled: an update's step (``_step_numpy`` in reflexd/deciding/online.py),
 * a block of a fold (``_fold_numpy``) and an arm's spread at a decision (``_spread_numpy``), each in
 * one call instead of several numpy calls.
 *
 * numpy spends 0.5-1.5 us per call on this machine's kind whatever the size, so the update in numpy
 * cost 12-34 us at the median; here it is the arithmetic alone, and it uses the context's
 * sparsity: Σx is the sum of the rows of the seen inputs (Σ is symmetric), O(n·m) for n inputs
 * set of the m seen, not O(m²). The numpy step stays as the reference (tested equal) and as
 * the fallback where this module could not be built.
 *
 * Arrays arrive through the buffer protocol (no numpy headers at build time): every one is
 * checked for its type, shape and contiguity, and every index for its range, so a wrong
 * argument is a ValueError, never a read out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

/* The arithmetic is kept out of the functions that parse arguments: inlined into them, gcc no
 * longer vectorized its loops (the update took three times as long at 129 inputs). */
#define NOINLINE __attribute__((noinline))

/* On x86-64, the arithmetic is also built for AVX2 with FMA and the best version the CPU runs is
 * chosen when the module loads (a third less time at 129 inputs than the baseline's SSE2). */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)  /* ifuncs: glibc */
#if __has_attribute(target_clones)
#define VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef VECTORIZED
#define VECTORIZED
#endif

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static void release(Buf *bufs, int n) {
    for (int i = 0; i < n; i++) {
        if (bufs[i].held) {
            PyBuffer_Release(&bufs[i].view);
            bufs[i].held = 0;
        }
    }
}

/* A C-contiguous buffer of ``ndim`` dimensions of doubles ('d') or of Py_ssize_t ('n', or the
 * 'l'/'q' numpy gives intp where it is 8 bytes), writable if asked. */
static int take(PyObject *obj, Buf *buf, int ndim, int integer, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &buf->view, flags) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: a C-contiguous%s array is needed", name, writable ? ", writable" : "");
        return -1;
    }
    buf->held = 1;
    const char *f = buf->view.format ? buf->view.format : "B";
    if (*f == '=' || *f == '@' || (PY_LITTLE_ENDIAN ? *f == '<' : *f == '>')) f++;
    int ok = integer ? (buf->view.itemsize == (Py_ssize_t)sizeof(Py_ssize_t) && (f[0] == 'n' || f[0] == 'l' || f[0] == 'q') && f[1] == 0)
                     : (buf->view.itemsize == (Py_ssize_t)sizeof(double) && f[0] == 'd' && f[1] == 0);
    if (!ok || buf->view.ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: a %d-dimensional array of %s is needed", name, ndim,
                     integer ? "intp" : "float64");
        return -1;
    }
    return 0;
}

/* Argument helpers: each sets the exception and returns -1 on a wrong argument. */
static int arguments(Py_ssize_t nargs, Py_ssize_t n, const char *name) {
    if (nargs == n) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, n);
    return -1;
}

static int integer(PyObject *obj, Py_ssize_t *out) {  /* any integer, numpy's too */
    *out = PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int real(PyObject *obj, double *out) {
    *out = PyFloat_AsDouble(obj);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* cx = Σx for Σ = base - down[:r]ᵀdown[:r] (m × m, symmetric) and the n inputs x[rows] = vals:
 * the sum of base's rows of those inputs, less each kept row times its product with x. */
static void NOINLINE VECTORIZED sigma_x(const double *restrict base, const double *restrict down, Py_ssize_t m, Py_ssize_t r,
                    const Py_ssize_t *restrict rows, const double *restrict vals, Py_ssize_t n, double *restrict cx) {
    for (Py_ssize_t t = 0; t < n; t++) {
        const double *restrict line = base + rows[t] * m;
        const double v = vals[t];
        for (Py_ssize_t i = 0; i < m; i++) cx[i] += v * line[i];
    }
    for (Py_ssize_t k = 0; k < r; k++) {
        const double *restrict u = down + k * m;
        double a = 0.0;
        for (Py_ssize_t t = 0; t < n; t++) a += u[rows[t]] * vals[t];
        for (Py_ssize_t i = 0; i < m; i++) cx[i] -= a * u[i];
    }
}

/* step(x, row_of, features, theta, base, down, r, target, new_theta, new_weights) -> (s, error) or None
 *
 * For inputs x (d) of an arm whose seen inputs are ``features`` (m; ``row_of`` maps an input to
 * its row, -1 if never seen), weights ``theta`` (m) and covariance base - down[:r]ᵀdown[:r]:
 * cx = Σx, s = 1 + xᵀcx, error = target - θᵀx; writes θ + cx·error/s to new_theta, scatters
 * it over new_weights (a copy of the weights the caller made), and writes cx/√s to down[r].
 * None, writing nothing, if x sets an input never seen (the caller adds its row first).
 */
static PyObject *step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t r;
    double target;
    if (arguments(nargs, 10, "step") || integer(args[6], &r) || real(args[7], &target)) return NULL;

    enum { X, ROW_OF, FEATURES, THETA, BASE, DOWN, NEW_THETA, NEW_WEIGHTS, N };
    Buf b[N];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    Py_ssize_t *rows = NULL;
    double *vals = NULL, *cx = NULL;
    if (take(args[0], &b[X], 1, 0, 0, "x") || take(args[1], &b[ROW_OF], 1, 1, 0, "row_of")
        || take(args[2], &b[FEATURES], 1, 1, 0, "features") || take(args[3], &b[THETA], 1, 0, 0, "theta")
        || take(args[4], &b[BASE], 2, 0, 0, "base") || take(args[5], &b[DOWN], 2, 0, 1, "down")
        || take(args[8], &b[NEW_THETA], 1, 0, 1, "new_theta") || take(args[9], &b[NEW_WEIGHTS], 1, 0, 1, "new_weights"))
        goto done;

    Py_ssize_t d = b[X].view.shape[0], m = b[FEATURES].view.shape[0];
    if (b[ROW_OF].view.shape[0] != d || b[NEW_WEIGHTS].view.shape[0] != d || b[THETA].view.shape[0] != m
        || b[NEW_THETA].view.shape[0] != m || b[BASE].view.shape[0] != m || b[BASE].view.shape[1] != m
        || b[DOWN].view.shape[1] != m) {
        PyErr_SetString(PyExc_ValueError, "step(): the arrays' lengths disagree");
        goto done;
    }
    if (r < 0 || r >= b[DOWN].view.shape[0]) {
        PyErr_SetString(PyExc_ValueError, "step(): r is past down's rows");
        goto done;
    }
    const double *x = b[X].view.buf, *theta = b[THETA].view.buf, *base = b[BASE].view.buf;
    const Py_ssize_t *row_of = b[ROW_OF].view.buf, *features = b[FEATURES].view.buf;
    double *down = b[DOWN].view.buf, *new_theta = b[NEW_THETA].view.buf, *new_weights = b[NEW_WEIGHTS].view.buf;

    rows = PyMem_Malloc((d ? d : 1) * sizeof(Py_ssize_t));
    vals = PyMem_Malloc((d ? d : 1) * sizeof(double));
    cx = PyMem_Calloc(m ? m : 1, sizeof(double));
    if (!rows || !vals || !cx) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < m; i++) {  /* before anything is written */
        if (features[i] < 0 || features[i] >= d) {
            PyErr_Format(PyExc_ValueError, "step(): features[%zd] = %zd is past the %zd inputs", i, features[i], d);
            goto done;
        }
    }
    Py_ssize_t n = 0;
    for (Py_ssize_t j = 0; j < d; j++) {
        if (x[j] != 0.0) {
            Py_ssize_t row = row_of[j];
            if (row < 0) {  /* never seen */
                result = Py_NewRef(Py_None);
                goto done;
            }
            if (row >= m) {
                PyErr_Format(PyExc_ValueError, "step(): row_of[%zd] = %zd is past the %zd rows", j, row, m);
                goto done;
            }
            rows[n] = row;
            vals[n++] = x[j];
        }
    }
    sigma_x(base, down, m, r, rows, vals, n, cx);
    double s = 1.0, predicted = 0.0;
    for (Py_ssize_t t = 0; t < n; t++) {
        s += vals[t] * cx[rows[t]];
        predicted += vals[t] * theta[rows[t]];
    }
    double error = target - predicted, gain = error / s, scale = 1.0 / sqrt(s);
    double *u = down + r * m;
    for (Py_ssize_t i = 0; i < m; i++) {
        double value = theta[i] + cx[i] * gain;
        new_theta[i] = value;
        new_weights[features[i]] = value;
        u[i] = cx[i] * scale;
    }
    result = Py_BuildValue("(dd)", s, error);

done:
    PyMem_Free(rows);
    PyMem_Free(vals);
    PyMem_Free(cx);
    release(b, N);
    return result;
}

/* new[i] = base[i] - Σ_q rows[i, q]·down[q] for the rows i in [a, b) */
static void NOINLINE VECTORIZED fold_rows(double *restrict new, const double *restrict base, const double *restrict rows,
                               const double *restrict down, Py_ssize_t m, Py_ssize_t k, Py_ssize_t a, Py_ssize_t b) {
    for (Py_ssize_t i = a; i < b; i++) {
        double *restrict out = new + i * m;
        memcpy(out, base + i * m, m * sizeof(double));
        const double *c = rows + i * k;
        Py_ssize_t q = 0;
        for (; q + 4 <= k; q += 4) {  /* four rows a pass: a quarter of the passes over ``out`` */
            const double *restrict u0 = down + q * m, *restrict u1 = u0 + m, *restrict u2 = u1 + m, *restrict u3 = u2 + m;
            for (Py_ssize_t j = 0; j < m; j++) out[j] -= c[q] * u0[j] + c[q + 1] * u1[j] + c[q + 2] * u2[j] + c[q + 3] * u3[j];
        }
        for (; q < k; q++) {
            const double *restrict u = down + q * m;
            for (Py_ssize_t j = 0; j < m; j++) out[j] -= c[q] * u[j];
        }
    }
}

/* fold(new, base, rows, down, a, b) -> None
 *
 * Rows a to b of the next base: new[i] = base[i] - Σ_k rows[i, k]·down[k] for i in [a, b), where
 * ``rows`` (m × K) is the first K rows of ``down`` transposed (``_Arm._fold``).
 */
static PyObject *fold(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t a, b_;
    if (arguments(nargs, 6, "fold") || integer(args[4], &a) || integer(args[5], &b_)) return NULL;

    enum { NEW, BASE, ROWS, DOWN, N };
    Buf b[N];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (take(args[0], &b[NEW], 2, 0, 1, "new") || take(args[1], &b[BASE], 2, 0, 0, "base")
        || take(args[2], &b[ROWS], 2, 0, 0, "rows") || take(args[3], &b[DOWN], 2, 0, 0, "down"))
        goto done;
    Py_ssize_t m = b[BASE].view.shape[0], k = b[ROWS].view.shape[1];
    if (b[BASE].view.shape[1] != m || b[NEW].view.shape[0] != m || b[NEW].view.shape[1] != m
        || b[ROWS].view.shape[0] != m || b[DOWN].view.shape[0] < k || b[DOWN].view.shape[1] != m) {
        PyErr_SetString(PyExc_ValueError, "fold(): the arrays' shapes disagree");
        goto done;
    }
    if (a < 0 || b_ < a) {
        PyErr_SetString(PyExc_ValueError, "fold(): a block is 0 <= a <= b");
        goto done;
    }
    if (b_ > m) b_ = m;  /* as a slice past the end */
    const double *base = b[BASE].view.buf, *rows = b[ROWS].view.buf, *down = b[DOWN].view.buf;
    double *new = b[NEW].view.buf;
    fold_rows(new, base, rows, down, m, k, a, b_);
    result = Py_NewRef(Py_None);

done:
    release(b, N);
    return result;
}

/* The posterior variance of an arm's mean at inputs x[rows] = vals (its seen inputs), at a noise
 * of 1: xᵀ(base - down[:r]ᵀdown[:r])x, O(n² + r·n) for the n inputs set. */
static double NOINLINE quadratic(const double *restrict base, const double *restrict down, Py_ssize_t m, Py_ssize_t r,
                                 const Py_ssize_t *restrict rows, const double *restrict vals, Py_ssize_t n) {
    double quad = 0.0;
    for (Py_ssize_t t = 0; t < n; t++) {
        const double *line = base + rows[t] * m;
        double a = 0.0;
        for (Py_ssize_t q = 0; q < n; q++) a += line[rows[q]] * vals[q];
        quad += a * vals[t];
    }
    for (Py_ssize_t k = 0; k < r; k++) {
        const double *u = down + k * m;
        double a = 0.0;
        for (Py_ssize_t t = 0; t < n; t++) a += u[rows[t]] * vals[t];
        quad -= a * a;
    }
    return quad;
}

/* spread(x, row_of, features, base, down, r, last, unit) -> float
 *
 * The variance of an arm's mean at x with its last input (the live model's score) set to
 * ``last``: over the inputs it has seen, xᵀ(base - down[:r]ᵀdown[:r])x; each input it has not
 * seen adds its prior variance ``unit`` times its square (``OnlineHead.spread``).
 */
static PyObject *spread(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t r;
    double last, unit;
    if (arguments(nargs, 8, "spread") || integer(args[5], &r) || real(args[6], &last) || real(args[7], &unit)) return NULL;

    enum { X, ROW_OF, FEATURES, BASE, DOWN, N };
    Buf b[N];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    Py_ssize_t *rows = NULL;
    double *vals = NULL;
    if (take(args[0], &b[X], 1, 0, 0, "x") || take(args[1], &b[ROW_OF], 1, 1, 0, "row_of")
        || take(args[2], &b[FEATURES], 1, 1, 0, "features") || take(args[3], &b[BASE], 2, 0, 0, "base")
        || take(args[4], &b[DOWN], 2, 0, 0, "down"))
        goto done;
    /* ``features`` is not read (row_of says where each input's row is): its length checks the state's */
    Py_ssize_t d = b[X].view.shape[0], m = b[BASE].view.shape[0];
    if (d == 0 || b[ROW_OF].view.shape[0] != d || b[FEATURES].view.shape[0] != m || b[BASE].view.shape[1] != m
        || b[DOWN].view.shape[1] != m) {
        PyErr_SetString(PyExc_ValueError, "spread(): the arrays' lengths disagree");
        goto done;
    }
    if (r < 0 || r > b[DOWN].view.shape[0]) {
        PyErr_SetString(PyExc_ValueError, "spread(): r is past down's rows");
        goto done;
    }
    const double *x = b[X].view.buf;
    const Py_ssize_t *row_of = b[ROW_OF].view.buf;
    rows = PyMem_Malloc(d * sizeof(Py_ssize_t));
    vals = PyMem_Malloc(d * sizeof(double));
    if (!rows || !vals) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t n = 0;
    double unseen = 0.0;
    for (Py_ssize_t j = 0; j < d; j++) {
        double v = j == d - 1 ? last : x[j];
        if (v == 0.0) continue;
        Py_ssize_t row = row_of[j];
        if (row >= m) {
            PyErr_Format(PyExc_ValueError, "spread(): row_of[%zd] = %zd is past the %zd rows", j, row, m);
            goto done;
        }
        if (row < 0) {
            unseen += v * v;
        } else {
            rows[n] = row;
            vals[n++] = v;
        }
    }
    result = PyFloat_FromDouble(quadratic(b[BASE].view.buf, b[DOWN].view.buf, m, r, rows, vals, n) + unit * unseen);

done:
    PyMem_Free(rows);
    PyMem_Free(vals);
    release(b, N);
    return result;
}

static PyMethodDef methods[] = {
    {"step", (PyCFunction)(void (*)(void))step, METH_FASTCALL,
     "step(x, row_of, features, theta, base, down, r, target, new_theta, new_weights) -> (s, error) or None"},
    {"spread", (PyCFunction)(void (*)(void))spread, METH_FASTCALL,
     "spread(x, row_of, features, base, down, r, last, unit) -> float: the variance of an arm's mean at x"},
    {"fold", (PyCFunction)(void (*)(void))fold, METH_FASTCALL,
     "fold(new, base, rows, down, a, b) -> None: rows a to b of the next base"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_rls",
    .m_doc = "The online head's single update, compiled (see reflexd.deciding.online).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__rls(void) { return PyModule_Create(&module); }
