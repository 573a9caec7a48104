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

/* Does text[0:n] hold word (lower case letters) in any ASCII case, from position i? */
static inline int
word_at(const unsigned char *text, Py_ssize_t n, Py_ssize_t i, const char *word, Py_ssize_t wlen)
{
    Py_ssize_t j;
    if (n - i < wlen)
        return 0;
    for (j = 1; j < wlen; j++) {
        /* (c | 0x20) is the lower case of an ASCII letter, and no other byte gives a letter's lower case */
        if ((text[i + j] | 0x20) != (unsigned char)word[j])
            return 0;
    }
    return 1;
}

/* Does text[0:n] hold "set", "advisory" or "discard" in any ASCII case? One pass. */
static int
has_session_word(const unsigned char *text, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        switch (text[i] | 0x20) {
        case 's':
            if (word_at(text, n, i, "set", 3))
                return 1;
            break;
        case 'a':
            if (word_at(text, n, i, "advisory", 8))
                return 1;
            break;
        case 'd':
            if (word_at(text, n, i, "discard", 7))
                return 1;
            break;
        }
    }
    return 0;
}

static int
get_range(Py_buffer *view, Py_ssize_t start, Py_ssize_t end)
{
    if (start < 0 || end < start || end > view->len) {
        PyErr_SetString(PyExc_ValueError, "start and end must lie within the buffer");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(plain_queries_doc,
"plain_queries(buf, end, max_size) -> int\n\n"
"The number of Query messages in buf[:end] if it holds nothing else (whole messages,\n"
"each length between 4 and max_size) and no query text contains 'set', 'advisory' or\n"
"'discard' in any ASCII case; else -1.");

static PyObject *
plain_queries(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t end, max_size, p = 0, count = 0;
    const unsigned char *b;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "plain_queries(buf, end, max_size) takes 3 arguments");
        return NULL;
    }
    end = PyLong_AsSsize_t(args[1]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    max_size = PyLong_AsSsize_t(args[2]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (get_range(&view, 0, end) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
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
        if (has_session_word(body, length - 4))
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

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "reply_end(buf, start, end) takes 3 arguments");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    end = PyLong_AsSsize_t(args[2]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (get_range(&view, start, end) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
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
