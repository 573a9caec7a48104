/* The fast path's two byte scans, in C (pgherd.shared.wire.scan has the Python reference).
 *
 * Each walks PostgreSQL protocol messages (a type byte, then a big-endian int32 length
 * that counts itself but not the type byte) in a bytes-like object, and answers with
 * -1 whenever the input is anything but the common case: the caller then takes its
 * general path.  Nothing is allocated; the GIL is held throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static inline Py_ssize_t
msg_length(const unsigned char *p)
{
    return ((Py_ssize_t)p[0] << 24) | ((Py_ssize_t)p[1] << 16) | ((Py_ssize_t)p[2] << 8) | (Py_ssize_t)p[3];
}

/* Does text[i:i+wlen] equal word (lower case) in any ASCII case? Its first letter is known to. */
static inline int
word_at(const unsigned char *text, Py_ssize_t n, Py_ssize_t i, const char *word, Py_ssize_t wlen)
{
    Py_ssize_t j;
    if (n - i < wlen)
        return 0;
    for (j = 1; j < wlen; j++) {
        unsigned char c = text[i + j];
        if (c >= 'A' && c <= 'Z')
            c |= 0x20;
        if (c != (unsigned char)word[j])
            return 0;
    }
    return 1;
}

/* Python's \s and \w for bytes patterns: ASCII only. */
static inline int
is_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

static inline int
is_word(unsigned char c)
{
    return ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') || (c >= '0' && c <= '9') || c == '_';
}

/* router.settings.may_change(text[0:n]): would _HINT_START or _HINT_INSIDE match?
 *   _HINT_START   \s*(?:re)?set\b                                    at the start, any case
 *   _HINT_INSIDE  set_config|advisory|discard|(?:[;\n\r\x00]|\*\/)\s*(?:re)?set\b   anywhere
 * One pass: at each "set", "advisory" or "discard" (first letter by switch), the rest is
 * checked around it. tests/unit/test_scan.py holds this against the regular expressions. */
static int
may_change(const unsigned char *t, Py_ssize_t n)
{
    Py_ssize_t i, j, k;
    for (i = 0; i < n; i++) {
        switch (t[i] | 0x20) {
        case 'a':
            if (word_at(t, n, i, "advisory", 8))
                return 1;
            break;
        case 'd':
            if (word_at(t, n, i, "discard", 7))
                return 1;
            break;
        case 's':
            if (!word_at(t, n, i, "set", 3))
                break;
            if (word_at(t, n, i, "set_config", 10))
                return 1;
            if (i + 3 < n && is_word(t[i + 3]))
                break;  /* not set\b */
            /* (re)set: "re" must then follow the delimiter, as 'e' is neither space nor delimiter */
            j = (i >= 2 && (t[i - 2] | 0x20) == 'r' && (t[i - 1] | 0x20) == 'e') ? i - 2 : i;
            for (k = j - 1; k >= 0 && is_space(t[k]); k--) {
                if (t[k] == '\n' || t[k] == '\r')
                    return 1;  /* a delimiter that \s* also covers */
            }
            if (k < 0 || t[k] == ';' || t[k] == '\0' || (t[k] == '/' && k >= 1 && t[k - 1] == '*'))
                return 1;
            break;
        }
    }
    return 0;
}

/* Both functions take (buf, x, y): buf as a buffer, x and y as integers, with start..end (two
 * of 0, x, y) inside the buffer. 0 with the buffer held, or -1 with an exception set. */
static int
get_args(PyObject *const *args, Py_ssize_t nargs, const char *usage, Py_buffer *view, Py_ssize_t *x,
         Py_ssize_t *y, int x_is_start)
{
    Py_ssize_t start, end;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s takes 3 arguments", usage);
        return -1;
    }
    *x = PyLong_AsSsize_t(args[1]);
    if (*x == -1 && PyErr_Occurred())
        return -1;
    *y = PyLong_AsSsize_t(args[2]);
    if (*y == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) < 0)
        return -1;
    start = x_is_start ? *x : 0;
    end = x_is_start ? *y : *x;
    if (start < 0 || end < start || end > view->len) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "start and end must lie within the buffer");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(plain_queries_doc,
"plain_queries(buf, end, max_size) -> int\n\n"
"The number of Query messages in buf[:end] if it holds nothing else (whole messages,\n"
"each length between 4 and max_size) and router.settings.may_change is false for every\n"
"query text; else -1.");

static PyObject *
plain_queries(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t end, max_size, p = 0, count = 0;
    const unsigned char *b;

    if (get_args(args, nargs, "plain_queries(buf, end, max_size)", &view, &end, &max_size, 0) < 0)
        return NULL;
    b = (const unsigned char *)view.buf;
    while (p < end) {
        Py_ssize_t length;
        const unsigned char *body;
        if (end - p < 5 || b[p] != 'Q')
            goto no;
        length = msg_length(b + p + 1);
        if (length < 4 || length > max_size || length > end - p - 1)
            goto no;
        body = b + p + 5;
        /* the query text, without its terminating NUL (as ClientSession._plain_request passes it) */
        if (may_change(body, length > 4 ? length - 5 : 0))
            goto no;
        count++;
        p += 1 + length;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(count > 0 ? count : -1);
no:
    PyBuffer_Release(&view);
    return PyLong_FromLong(-1);
}

PyDoc_STRVAR(reply_end_doc,
"reply_end(buf, start, end) -> int\n\n"
"end if buf[start:end] is whole messages, the last a ReadyForQuery (length 5) ending at\n"
"end, and none before it an ErrorResponse, ReadyForQuery, CopyInResponse,\n"
"CopyBothResponse or ParameterStatus; else -1.");

static PyObject *
reply_end(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start, end, p, result = -1;
    const unsigned char *b;

    if (get_args(args, nargs, "reply_end(buf, start, end)", &view, &start, &end, 1) < 0)
        return NULL;
    b = (const unsigned char *)view.buf;
    for (p = start; end - p >= 5;) {
        unsigned char t = b[p];
        Py_ssize_t length = msg_length(b + p + 1);
        if (length < 4 || length > end - p - 1)
            break;
        p += 1 + length;
        if (t == 'Z') {
            if (length == 5 && p == end)
                result = end;
            break;
        }
        if (t == 'E' || t == 'G' || t == 'W' || t == 'S')
            break;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(result);
}

static PyMethodDef methods[] = {
    {"plain_queries", (PyCFunction)(void (*)(void))plain_queries, METH_FASTCALL, plain_queries_doc},
    {"reply_end", (PyCFunction)(void (*)(void))reply_end, METH_FASTCALL, reply_end_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "The fast path's byte scans (see pgherd.shared.wire.scan).", 0, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&module);
}
