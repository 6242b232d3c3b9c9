/* Retrainer's ONNX Runtime custom operators: LayerNormalization and RMSNormalization over the
 * last axis, in the domain "ai.retrainer.cpu", with ONNX's inputs, output and attributes; and
 * SkipLayerNormalization / SkipRMSNormalization, the same norm of the sum of two tensors of one
 * shape (inputs x, skip, scale[, bias]; outputs the norm and the sum): a residual Add and the norm
 * that reads it, in one pass over the rows. And Gelu (ONNX's, approximate "none"), whose erf is a
 * polynomial the compiler vectorizes where ONNX Runtime calls its erf per element in a loop it
 * cannot.
 *
 * Why: ONNX Runtime's CPU kernels for both norms normalize each row with scalar loops whose sums
 * are one chain of dependent additions, so they cannot vectorize (~70 us for [32, 64, 64] on this
 * machine's two cores, against ~8 us vectorized on one). A pre-norm transformer of width 64 spends a
 * fifth of its int8 graph there (ml/quantization/kernels.py says when a graph is rewritten to use
 * these, and how close the results are).
 *
 * Built by `make` (native/build.sh, the Makefile's rule for the library) against ONNX Runtime's C
 * API header, and loaded by
 * `onnxruntime.SessionOptions.register_custom_ops_library`. Only the C API is used: the library works
 * with any ONNX Runtime from 1.17 (API version 17) on.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#define DOMAIN "ai.retrainer.cpu"
#define API_VERSION 17 /* KernelContext_ParallelFor and the shape inference callbacks */
#define MAX_RANK 16
/* Rows are shared between ORT's intra-op threads above this many elements: below it, waking a
 * thread costs more than the rows it would take. */
#ifndef PARALLEL_ELEMENTS
#define PARALLEL_ELEMENTS 32768
#endif
#define TASK_ELEMENTS 16384

static const OrtApi* api;

/* The loops are compiled for AVX-512, AVX2 and plain x86-64, the best picked at load (GCC's
 * function multi-versioning), so one build runs on any x86-64 machine. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTORIZED
#endif

typedef struct {
  const float* x;
  const float* skip; /* NULL: a plain norm; else skip_rows rows, repeated down x (a broadcast) */
  float* sum;        /* x + skip, when skip */
  const float* scale;
  const float* bias; /* NULL: none */
  float* y;
  size_t rows, width, rows_per_task, skip_rows;
  int scale_is_scalar, bias_is_scalar, centred;
  float epsilon;
} Job;

/* Rows [first, last): y = (x - mean) / sqrt(var + epsilon) * scale + bias (LayerNormalization), or
 * y = x / sqrt(mean(x^2) + epsilon) * scale (RMSNormalization, `centred` 0). Sums in float, as ONNX
 * Runtime's kernels; the `omp simd` reductions let the compiler split them across vector lanes (so the
 * order of additions differs from ORT's: results agree to ~1e-6, not bit for bit). */
VECTORIZED static void normalize_rows(const Job* job, size_t first, size_t last) {
  const size_t width = job->width;
  for (size_t row = first; row < last; ++row) {
    const float* x = job->x + row * width;
    float* y = job->y + row * width;
    if (job->skip != NULL) { /* the residual Add: x + skip, kept as the second output */
      const float* skip = job->skip + (row % job->skip_rows) * width;
      float* sum = job->sum + row * width;
#pragma omp simd
      for (size_t i = 0; i < width; ++i) sum[i] = x[i] + skip[i];
      x = sum;
    }
    /* LayerNormalization works on the row shifted by its first value, s = x - x[0] (exact for values
     * within a factor of 2 of it): a row far from zero (a mean of 1000, a spread of 0.01) keeps its
     * precision, where summing x itself in float would lose the mean in rounding (ONNX Runtime's
     * error there: 3e-3; this kernel's: 1e-7). RMSNormalization has no mean: shift 0. */
    const float shift = job->centred ? x[0] : 0.0f;
    float mean = 0.0f; /* of s */
    if (job->centred) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (size_t i = 0; i < width; ++i) sum += x[i] - shift;
      mean = sum / (float)width;
    }
    const float centre = job->centred ? mean : 0.0f;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (size_t i = 0; i < width; ++i) squares += ((x[i] - shift) - centre) * ((x[i] - shift) - centre);
    const float inverse = 1.0f / sqrtf(squares / (float)width + job->epsilon);
    const float* scale = job->scale;
    const float* bias = job->bias;
    if (job->scale_is_scalar || (bias != NULL && job->bias_is_scalar)) { /* rare: one value broadcast */
      for (size_t i = 0; i < width; ++i)
        y[i] = ((x[i] - shift) - centre) * inverse * scale[job->scale_is_scalar ? 0 : i] +
               (bias == NULL ? 0.0f : bias[job->bias_is_scalar ? 0 : i]);
    } else if (bias != NULL) {
#pragma omp simd
      for (size_t i = 0; i < width; ++i) y[i] = ((x[i] - shift) - centre) * inverse * scale[i] + bias[i];
    } else {
#pragma omp simd
      for (size_t i = 0; i < width; ++i) y[i] = ((x[i] - shift) - centre) * inverse * scale[i];
    }
  }
}

/* GELU, x * (1 + erf(x / sqrt(2))) / 2, with erf from Abramowitz & Stegun 7.1.28 (|error| <= 3e-7):
 * erf(a) = 1 - (1 + c1 a + ... + c6 a^6)^-16 for a >= 0, odd. No branch, no library call: one
 * polynomial, four squarings and a division per element, in vector lanes. A large |x| drives the
 * power to infinity (erf 1, GELU x or 0), a NaN stays NaN. */
VECTORIZED static void gelu(const float* x, float* y, size_t count) {
#pragma omp simd
  for (size_t i = 0; i < count; ++i) {
    const float a = fabsf(x[i]) * 0.70710678118654752f;
    float p = 1.0f + a * (0.0705230784f +
                          a * (0.0422820123f + a * (0.0092705272f + a * (0.0001520143f + a * (0.0002765672f +
                                                                                                 a * 0.0000430638f)))));
    p *= p; /* ^2 */
    p *= p; /* ^4 */
    p *= p; /* ^8 */
    p *= p; /* ^16 */
    const float erf_a = 1.0f - 1.0f / p;
    y[i] = 0.5f * x[i] * (1.0f + (x[i] < 0.0f ? -erf_a : erf_a));
  }
}

typedef struct {
  const float* x;
  float* y;
  size_t count, per_task;
} Elementwise;

static void gelu_task(void* data, size_t task) {
  const Elementwise* job = (const Elementwise*)data;
  const size_t first = task * job->per_task;
  const size_t last = first + job->per_task < job->count ? first + job->per_task : job->count;
  gelu(job->x + first, job->y + first, last - first);
}

static void run_task(void* data, size_t task) {
  const Job* job = (const Job*)data;
  const size_t first = task * job->rows_per_task;
  const size_t last = first + job->rows_per_task < job->rows ? first + job->rows_per_task : job->rows;
  normalize_rows(job, first, last);
}

typedef struct {
  OrtCustomOp op; /* first: ORT hands back a pointer to it */
  const char* name;
  size_t inputs, outputs;
  int centred, skip, gelu; /* LayerNormalization's mean; the residual Add; not a norm but Gelu */
} NormOp;

typedef struct {
  const NormOp* op; /* which operator this node is */
  float epsilon;
  int64_t axis;
} Kernel;

static OrtStatus* fail(const char* message) { return api->CreateStatus(ORT_INVALID_ARGUMENT, message); }

#define CHECK(call)                      \
  do {                                   \
    OrtStatus* status_ = (call);         \
    if (status_ != NULL) return status_; \
  } while (0)

/* The element count and dimensions of an input (or NULL data: an optional input left out). */
static OrtStatus* input(OrtKernelContext* context, size_t index, const float** data, int64_t* dims, size_t* rank,
                        size_t* count) {
  size_t inputs = 0;
  *data = NULL;
  *count = 0;
  CHECK(api->KernelContext_GetInputCount(context, &inputs));
  if (index >= inputs) return NULL;
  const OrtValue* value = NULL;
  CHECK(api->KernelContext_GetInput(context, index, &value));
  if (value == NULL) return NULL;
  OrtTensorTypeAndShapeInfo* info = NULL;
  CHECK(api->GetTensorTypeAndShape(value, &info));
  OrtStatus* status = api->GetDimensionsCount(info, rank);
  if (status == NULL && *rank > MAX_RANK) status = fail("ai.retrainer.cpu normalization: input rank above 16");
  if (status == NULL) status = api->GetDimensions(info, dims, *rank);
  if (status == NULL) status = api->GetTensorShapeElementCount(info, count);
  api->ReleaseTensorTypeAndShapeInfo(info);
  CHECK(status);
  return api->GetTensorMutableData((OrtValue*)value, (void**)data);
}

static OrtStatus* compute_gelu(OrtKernelContext* context) {
  int64_t dims[MAX_RANK];
  size_t rank = 0;
  Elementwise job = {0};
  CHECK(input(context, 0, &job.x, dims, &rank, &job.count));
  OrtValue* output = NULL;
  CHECK(api->KernelContext_GetOutput(context, 0, dims, rank, &output));
  CHECK(api->GetTensorMutableData(output, (void**)&job.y));
  if (job.count < PARALLEL_ELEMENTS) {
    gelu(job.x, job.y, job.count);
    return NULL;
  }
  job.per_task = TASK_ELEMENTS;
  return api->KernelContext_ParallelFor(context, gelu_task, (job.count + TASK_ELEMENTS - 1) / TASK_ELEMENTS, 0, &job);
}

static OrtStatus* ORT_API_CALL compute(void* state, OrtKernelContext* context) {
  const Kernel* kernel = (const Kernel*)state;
  if (kernel->op->gelu) return compute_gelu(context);
  int64_t dims[MAX_RANK], unused[MAX_RANK];
  size_t rank = 0, unused_rank = 0, count = 0, scale_count = 0, bias_count = 0;
  Job job = {0};
  const size_t first = kernel->op->skip ? 1 : 0; /* where scale and bias are */
  CHECK(input(context, 0, &job.x, dims, &rank, &count));
  if (kernel->op->skip) {
    int64_t skip_dims[MAX_RANK];
    size_t skip_rank = 0, skip_count = 0;
    CHECK(input(context, 1, &job.skip, skip_dims, &skip_rank, &skip_count));
    if (job.skip != NULL && skip_count > count) { /* the larger addend is x: a + b == b + a */
      const float* smaller = job.x;
      job.x = job.skip;
      job.skip = smaller;
      int64_t swapped[MAX_RANK];
      memcpy(swapped, dims, rank * sizeof dims[0]);
      memcpy(dims, skip_dims, skip_rank * sizeof dims[0]);
      memcpy(skip_dims, swapped, rank * sizeof dims[0]);
      const size_t r = rank, c = count;
      rank = skip_rank;
      count = skip_count;
      skip_rank = r;
      skip_count = c;
    }
    /* skip: x's shape, or its trailing dimensions (added to each of x's leading indices, as Add
     * broadcasts), after any leading dimensions of 1 */
    size_t ones = 0;
    while (ones < skip_rank && skip_dims[ones] == 1 && skip_rank - ones > 1) ++ones;
    const size_t kept = skip_rank - ones;
    if (job.skip == NULL || skip_rank > rank || kept == 0 ||
        memcmp(skip_dims + ones, dims + (rank - kept), kept * sizeof dims[0]) != 0)
      return fail("ai.retrainer.cpu skip normalization: skip must have x's shape or its trailing dimensions");
    job.skip_rows = dims[rank - 1] ? skip_count / (size_t)dims[rank - 1] : 0;
    if (job.skip_rows == 0 && count != 0) return fail("ai.retrainer.cpu skip normalization: an empty skip");
  }
  CHECK(input(context, first + 1, &job.scale, unused, &unused_rank, &scale_count));
  CHECK(input(context, first + 2, &job.bias, unused, &unused_rank, &bias_count));
  const int64_t axis = kernel->axis < 0 ? kernel->axis + (int64_t)rank : kernel->axis;
  if (rank == 0 || axis != (int64_t)rank - 1) return fail("ai.retrainer.cpu normalization: only the last axis");
  job.width = (size_t)dims[rank - 1];
  job.rows = job.width ? count / job.width : 0;
  if (scale_count != 1 && scale_count != job.width)
    return fail("ai.retrainer.cpu normalization: the scale must have one value or one per element of the last axis");
  if (job.bias != NULL && bias_count != 1 && bias_count != job.width)
    return fail("ai.retrainer.cpu normalization: the bias must have one value or one per element of the last axis");
  job.scale_is_scalar = scale_count == 1 && job.width != 1;
  job.bias_is_scalar = bias_count == 1 && job.width != 1;
  job.centred = kernel->op->centred;
  job.epsilon = kernel->epsilon;
  OrtValue* output = NULL;
  CHECK(api->KernelContext_GetOutput(context, 0, dims, rank, &output));
  CHECK(api->GetTensorMutableData(output, (void**)&job.y));
  if (kernel->op->skip) {
    CHECK(api->KernelContext_GetOutput(context, 1, dims, rank, &output));
    CHECK(api->GetTensorMutableData(output, (void**)&job.sum));
  }
  if (count == 0) return NULL;
  if (count < PARALLEL_ELEMENTS) {
    normalize_rows(&job, 0, job.rows);
    return NULL;
  }
  job.rows_per_task = TASK_ELEMENTS / job.width ? TASK_ELEMENTS / job.width : 1;
  const size_t tasks = (job.rows + job.rows_per_task - 1) / job.rows_per_task;
  return api->KernelContext_ParallelFor(context, run_task, tasks, 0, &job);
}

static OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* unused, const OrtKernelInfo* info,
                                             void** state) {
  (void)unused;
  Kernel* kernel = (Kernel*)malloc(sizeof(Kernel));
  if (kernel == NULL) return api->CreateStatus(ORT_FAIL, "ai.retrainer.cpu normalization: out of memory");
  kernel->epsilon = 1e-5f; /* ONNX's defaults, kept when the node has no such attribute */
  kernel->axis = -1;
  kernel->op = (const NormOp*)op;
  OrtStatus* status = api->KernelInfoGetAttribute_float(info, "epsilon", &kernel->epsilon);
  if (status != NULL) api->ReleaseStatus(status);
  status = api->KernelInfoGetAttribute_int64(info, "axis", &kernel->axis);
  if (status != NULL) api->ReleaseStatus(status);
  *state = kernel;
  return NULL;
}

static void ORT_API_CALL destroy_kernel(void* state) { free(state); }

static OrtStatus* ORT_API_CALL same_shape(const OrtCustomOp* op, OrtShapeInferContext* context) {
  OrtTensorTypeAndShapeInfo* info = NULL; /* the context's own: not released here */
  CHECK(api->ShapeInferContext_GetInputTypeShape(context, 0, &info));
  CHECK(api->ShapeInferContext_SetOutputTypeShape(context, 0, info));
  return ((const NormOp*)op)->skip ? api->ShapeInferContext_SetOutputTypeShape(context, 1, info) : NULL;
}

static const char* ORT_API_CALL op_name(const OrtCustomOp* op) { return ((const NormOp*)op)->name; }
static const char* ORT_API_CALL cpu(const OrtCustomOp* op) {
  (void)op;
  return "CPUExecutionProvider";
}
static ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp* op, size_t index) {
  (void)op;
  (void)index;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL input_count(const OrtCustomOp* op) { return ((const NormOp*)op)->inputs; }
static size_t ORT_API_CALL output_count(const OrtCustomOp* op) { return ((const NormOp*)op)->outputs; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp* op, size_t index) {
  const NormOp* norm = (const NormOp*)op;
  return index + 1 < norm->inputs || norm->centred == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL; /* bias */
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp* op, size_t index) {
  (void)op;
  (void)index;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL cpu_memory(const OrtCustomOp* op, size_t index) {
  (void)op;
  (void)index;
  return OrtMemTypeDefault;
}

/* Constant for the library's lifetime: sessions in several threads share them (callbacks of later
 * API versions than API_VERSION: none, so ORT never reads them). */
#define CALLBACKS                                                                                         \
  {                                                                                                       \
    .version = API_VERSION, .GetName = op_name, .GetExecutionProviderType = cpu, .GetInputType = float_type, \
    .GetInputTypeCount = input_count, .GetOutputType = float_type, .GetOutputTypeCount = output_count,      \
    .KernelDestroy = destroy_kernel, .GetInputCharacteristic = input_kind,                                \
    .GetOutputCharacteristic = output_kind, .GetInputMemoryType = cpu_memory, .CreateKernelV2 = create_kernel, \
    .KernelComputeV2 = compute, .InferOutputShapeFn = same_shape,                                         \
  }
static NormOp layer_norm = {CALLBACKS, "LayerNormalization", 3, 1, 1, 0, 0};
static NormOp rms_norm = {CALLBACKS, "RMSNormalization", 2, 1, 0, 0, 0};
static NormOp skip_layer_norm = {CALLBACKS, "SkipLayerNormalization", 4, 2, 1, 1, 0};
static NormOp skip_rms_norm = {CALLBACKS, "SkipRMSNormalization", 3, 2, 0, 1, 0};
static NormOp gelu_op = {CALLBACKS, "Gelu", 1, 1, 0, 0, 1};
static NormOp* const ops[] = {&layer_norm, &rms_norm, &skip_layer_norm, &skip_rms_norm, &gelu_op};

/* One domain for every session of the process, made at the first registration: sessions hold a
 * pointer to it, and it lives as long as the library. */
static OrtCustomOpDomain* domain;
static OrtStatus* domain_status;
static pthread_once_t domain_once = PTHREAD_ONCE_INIT;

static void make_domain(void) {
  domain_status = api->CreateCustomOpDomain(DOMAIN, &domain);
  for (size_t i = 0; domain_status == NULL && i < sizeof ops / sizeof ops[0]; ++i)
    domain_status = api->CustomOpDomain_Add(domain, &ops[i]->op);
}

/* What onnxruntime.SessionOptions.register_custom_ops_library calls. An ONNX Runtime older than 1.17
 * gets no operators (and cannot be told why): a session of a rewritten graph then fails to load, and
 * ml/quantization/onnx_graph.py runs the graph as it was. */
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* base) {
  api = base->GetApi(API_VERSION);
  if (api == NULL) return NULL;
  pthread_once(&domain_once, make_domain);
  if (domain_status != NULL) return api->CreateStatus(api->GetErrorCode(domain_status), api->GetErrorMessage(domain_status));
  return api->AddCustomOpDomain(options, domain);
}
