/* Hidden-state capture for llama.cpp's eval callback (ggml_backend_sched_eval_callback), in C.
 *
 * llama.cpp calls the callback for every graph node, first to ask whether we want its data, then (for the nodes
 * we said yes to) with the finished tensor. A Python callback costs microseconds per node, several hundred times
 * per decode step; this one costs a string compare. It copies each wanted tensor (f32, contiguous) into a
 * caller-owned buffer, appending across the micro-batches of one llama_decode.
 *
 * Only public ggml entry points are used, handed in as function pointers by the Python side (edge/llamacpp/lib.py),
 * so nothing here depends on struct ggml_tensor's layout: the element count and byte size come from ggml_nelements
 * and ggml_nbytes, and a tensor that is not contiguous f32 (4 bytes per element) sets an error code that the
 * Python side raises after llama_decode returns.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define COEXIT_MAX_WANTED 8
#define COEXIT_NAME_LEN 64

struct ggml_tensor;

typedef struct {
    const char *(*get_name)(const struct ggml_tensor *);
    void (*tensor_get)(const struct ggml_tensor *, void *, size_t, size_t);
    size_t (*nbytes)(const struct ggml_tensor *);
    int64_t (*nelements)(const struct ggml_tensor *);
    bool (*is_contiguous)(const struct ggml_tensor *);
    int32_t n_wanted;
    int32_t error;      /* 0 ok, 1 a wanted tensor is not contiguous f32, 2 a buffer is too small */
    char names[COEXIT_MAX_WANTED][COEXIT_NAME_LEN];
    float *buf[COEXIT_MAX_WANTED];
    int64_t capacity[COEXIT_MAX_WANTED];  /* floats */
    int64_t filled[COEXIT_MAX_WANTED];    /* floats written since the caller last reset it */
} coexit_capture;

int32_t coexit_capture_size(void) { return (int32_t)sizeof(coexit_capture); }

bool coexit_capture_eval(struct ggml_tensor *t, bool ask, void *user) {
    coexit_capture *c = (coexit_capture *)user;
    const char *name = c->get_name(t);
    for (int32_t i = 0; i < c->n_wanted; i++) {
        if (strncmp(name, c->names[i], COEXIT_NAME_LEN) != 0) continue;
        if (ask) return true;
        int64_t n = c->nelements(t);
        size_t nb = c->nbytes(t);
        if (nb != (size_t)n * sizeof(float) || !c->is_contiguous(t)) { c->error = 1; return true; }
        if (c->filled[i] + n > c->capacity[i]) { c->error = 2; return true; }
        c->tensor_get(t, c->buf[i] + c->filled[i], 0, nb);
        c->filled[i] += n;
        return true;
    }
    return !ask;  /* ask: not wanted; data phase: keep computing */
}
