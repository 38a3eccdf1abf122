/* Runs TVM-built Hexagon kernels in a static hexagon-linux-musl program (under qemu-hexagon).
 *
 * Linked with the kernels' object and a generated "kernels.h" that lists each kernel's packed
 * entry as KERNEL(symbol). Stands in for the few TVM runtime pieces the kernels call: the
 * backend workspace allocator and parallel launch (serial here), the FFI error setters and the
 * module-import lookup behind `__tvm_set_device` (a no-op on one device).
 *
 * usage: driver PLAN INPUTS OUTPUTS
 *   PLAN (text): number of calls, then per call "kernel_index nargs" and per argument
 *                "type_code bits lanes ndim dim0 dim1 ..." (DLPack dtype and shape)
 *   INPUTS:      every argument's bytes, call after call, argument after argument
 *   OUTPUTS:     the same buffers after the calls, same layout
 * stdout: one line "call INDEX rc RC" per call once its buffers are written (RC != 0: the kernel
 *         raised, message on stderr).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tvm/ffi/c_api.h>

typedef int (*Packed)(void *self, const TVMFFIAny *args, int32_t num_args, TVMFFIAny *result);

#define KERNEL(symbol) extern int symbol(void *, const TVMFFIAny *, int32_t, TVMFFIAny *);
#include "kernels.h"
#undef KERNEL
#define KERNEL(symbol) symbol,
static const Packed kernels[] = {
#include "kernels.h"
};
#undef KERNEL

enum { ALIGN = 128 }; /* one HVX vector; kernels assume at least 64 */

/* ---- runtime pieces the generated code reaches through weak pointers (strong here) ---- */

static void *alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  (void)device_type, (void)device_id, (void)code, (void)bits;
  return aligned_alloc(ALIGN, (size_t)((nbytes + ALIGN - 1) / ALIGN * ALIGN));
}

static int free_workspace(int device_type, int device_id, void *ptr) {
  (void)device_type, (void)device_id;
  free(ptr);
  return 0;
}

typedef struct { void *sync_handle; int32_t num_task; } ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv *env, void *cdata);

static int parallel_launch(ParallelLambda body, void *cdata, int num_task) {
  ParallelEnv env = {NULL, 1};  /* one task: the body covers the whole range */
  (void)num_task;
  return body(0, &env, cdata);
}

static int parallel_barrier(int task_id, ParallelEnv *env) { (void)task_id, (void)env; return 0; }

static int set_device_stub;  /* the handle returned for "__tvm_set_device" */

static int lookup_from_imports(void *library_ctx, const char *name, void **out) {
  (void)library_ctx;
  if (strcmp(name, "__tvm_set_device") != 0) {
    fprintf(stderr, "kernel looked up unknown function %s\n", name);
    return -1;
  }
  *out = &set_device_stub;
  return 0;
}

static int function_call(void *func, TVMFFIAny *args, int32_t num_args, TVMFFIAny *result) {
  (void)func, (void)args, (void)num_args;
  result->type_index = kTVMFFINone;  /* __tvm_set_device: one device, nothing to switch */
  return 0;
}

static int handle_init_once(void **handle, int (*init)(void **result)) {
  return *handle ? 0 : init(handle);
}

void *__TVMBackendAllocWorkspace = (void *)alloc_workspace;
void *__TVMBackendFreeWorkspace = (void *)free_workspace;
void *__TVMBackendParallelLaunch = (void *)parallel_launch;
void *__TVMBackendParallelBarrier = (void *)parallel_barrier;
void *__TVMFFIEnvModLookupFromImports = (void *)lookup_from_imports;
void *__TVMFFIFunctionCall = (void *)function_call;
void *__TVMFFIHandleInitOnce = (void *)handle_init_once;

void TVMFFIErrorSetRaisedFromCStr(const char *kind, const char *message) {
  fprintf(stderr, "%s: %s\n", kind, message);
}

void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t num_parts) {
  fprintf(stderr, "%s: ", kind);
  for (int32_t i = 0; i < num_parts; ++i)
    if (parts[i]) fputs(parts[i], stderr);
  fputc('\n', stderr);
}

/* Hexagon LLVM emits this call for large aligned copies; compiler-rt may lack it. */
__attribute__((weak)) void *__hexagon_memcpy_likely_aligned_min32bytes_mult8bytes(void *dst, const void *src,
                                                                                  size_t n) {
  return memcpy(dst, src, n);
}

/* ---- plan, buffers, calls ---- */

static void fail(const char *what) {
  fprintf(stderr, "driver: %s\n", what);
  exit(2);
}

static size_t tensor_bytes(const DLTensor *t) {
  size_t n = (size_t)(t->dtype.bits * t->dtype.lanes + 7) / 8;
  for (int32_t d = 0; d < t->ndim; ++d) n *= (size_t)t->shape[d];
  return n;
}

static void transfer(DLTensor *t, FILE *f, int writing) {
  size_t n = tensor_bytes(t);
  size_t done = writing ? fwrite(t->data, 1, n, f) : fread(t->data, 1, n, f);
  if (done != n) fail(writing ? "short write of outputs" : "inputs file is shorter than the plan");
}

int main(int argc, char **argv) {
  if (argc != 4) fail("usage: driver PLAN INPUTS OUTPUTS");
  FILE *plan = fopen(argv[1], "r"), *in = fopen(argv[2], "rb"), *out = fopen(argv[3], "wb");
  if (!plan || !in || !out) fail("cannot open plan, inputs or outputs");
  int calls;
  if (fscanf(plan, "%d", &calls) != 1) fail("plan: missing call count");
  for (int c = 0; c < calls; ++c) {
    int kernel, nargs;
    if (fscanf(plan, "%d %d", &kernel, &nargs) != 2) fail("plan: bad call line");
    if (kernel < 0 || kernel >= (int)(sizeof kernels / sizeof kernels[0])) fail("plan: kernel index out of range");
    DLTensor *tensors = calloc((size_t)nargs + 1, sizeof(DLTensor));
    TVMFFIAny *args = calloc((size_t)nargs + 1, sizeof(TVMFFIAny));
    for (int a = 0; a < nargs; ++a) {
      DLTensor *t = &tensors[a];
      int code, bits, lanes;
      if (fscanf(plan, "%d %d %d %d", &code, &bits, &lanes, &t->ndim) != 4) fail("plan: bad argument");
      t->dtype = (DLDataType){(uint8_t)code, (uint8_t)bits, (uint16_t)lanes};
      t->device = (DLDevice){kDLHexagon, 0};  /* the kernels assert the device they were built for */
      t->shape = calloc((size_t)t->ndim + 1, sizeof(int64_t));
      for (int32_t d = 0; d < t->ndim; ++d)
        if (fscanf(plan, "%lld", (long long *)&t->shape[d]) != 1) fail("plan: bad shape");
      t->data = aligned_alloc(ALIGN, (tensor_bytes(t) + ALIGN) / ALIGN * ALIGN);
      transfer(t, in, 0);
      args[a].type_index = kTVMFFIDLTensorPtr;
      args[a].v_ptr = t;
    }
    TVMFFIAny result = {.type_index = kTVMFFINone};
    int rc = kernels[kernel](NULL, args, nargs, &result);
    for (int a = 0; a < nargs; ++a) {
      transfer(&tensors[a], out, 1);
      free(tensors[a].data);
      free(tensors[a].shape);
    }
    fflush(out);  /* a later kernel that crashes the program leaves this call's results readable */
    printf("call %d rc %d\n", c, rc);
    fflush(stdout);
    free(tensors);
    free(args);
  }
  fclose(out);
  return 0;
}
