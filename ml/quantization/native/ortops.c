/* Retrainer's ONNX Runtime custom operators: LayerNormalization and RMSNormalization over the
 * last axis, in the domain "ai.retrainer.cpu", with ONNX's inputs, output and attributes.
 *
 * Why: ONNX Runtime's CPU kernels for both normalize each row with scalar loops whose sums are
 * one chain of dependent additions, so they cannot vectorize (~70 us for [32, 64, 64] on this
 * machine's two cores, against ~8 us vectorized on one). A pre-norm transformer of width 64 spends a
 * fifth of its int8 graph there (ml/quantization/native.py says when the graph is rewritten to use
 * these, and why the result is the same).
 *
 * Built by `make` (Makefile target `ortops`) against ONNX Runtime's C API header, and loaded by
 * `onnxruntime.SessionOptions.register_custom_ops_library`. Only the C API is used: the library works
 * with any ONNX Runtime from 1.17 (API version 17) on.
 */
#include <math.h>
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
  const float* scale;
  const float* bias; /* NULL: none */
  float* y;
  size_t rows, width, rows_per_task;
  int scale_is_scalar, bias_is_scalar, centred;
  float epsilon;
} Job;

/* Rows [first, last): y = (x - mean) / sqrt(var + epsilon) * scale + bias (LayerNormalization), or
 * y = x / sqrt(mean(x^2) + epsilon) * scale (RMSNormalization, `centred` 0). Sums in float, as ONNX
 * Runtime's kernels; the `omp simd` reductions let the compiler split them across vector lanes. */
VECTORIZED static void normalize_rows(const Job* job, size_t first, size_t last) {
  const size_t width = job->width;
  for (size_t row = first; row < last; ++row) {
    const float* x = job->x + row * width;
    float* y = job->y + row * width;
    float mean = 0.0f;
    if (job->centred) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (size_t i = 0; i < width; ++i) sum += x[i];
      mean = sum / (float)width;
    }
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (size_t i = 0; i < width; ++i) squares += (x[i] - mean) * (x[i] - mean);
    const float inverse = 1.0f / sqrtf(squares / (float)width + job->epsilon);
    const float* scale = job->scale;
    const float* bias = job->bias;
    if (job->scale_is_scalar || (bias != NULL && job->bias_is_scalar)) { /* rare: one value broadcast */
      for (size_t i = 0; i < width; ++i)
        y[i] = (x[i] - mean) * inverse * scale[job->scale_is_scalar ? 0 : i] +
               (bias == NULL ? 0.0f : bias[job->bias_is_scalar ? 0 : i]);
    } else if (bias != NULL) {
#pragma omp simd
      for (size_t i = 0; i < width; ++i) y[i] = (x[i] - mean) * inverse * scale[i] + bias[i];
    } else {
#pragma omp simd
      for (size_t i = 0; i < width; ++i) y[i] = (x[i] - mean) * inverse * scale[i];
    }
  }
}

static void run_task(void* data, size_t task) {
  const Job* job = (const Job*)data;
  const size_t first = task * job->rows_per_task;
  const size_t last = first + job->rows_per_task < job->rows ? first + job->rows_per_task : job->rows;
  normalize_rows(job, first, last);
}

typedef struct {
  float epsilon;
  int64_t axis;
  int centred;
} Kernel;

typedef struct {
  OrtCustomOp op; /* first: ORT hands back a pointer to it */
  const char* name;
  size_t inputs;
  int centred;
} NormOp;

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

static OrtStatus* ORT_API_CALL compute(void* state, OrtKernelContext* context) {
  const Kernel* kernel = (const Kernel*)state;
  int64_t dims[MAX_RANK], unused[MAX_RANK];
  size_t rank = 0, unused_rank = 0, count = 0, scale_count = 0, bias_count = 0;
  Job job = {0};
  CHECK(input(context, 0, &job.x, dims, &rank, &count));
  CHECK(input(context, 1, &job.scale, unused, &unused_rank, &scale_count));
  CHECK(input(context, 2, &job.bias, unused, &unused_rank, &bias_count));
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
  job.centred = kernel->centred;
  job.epsilon = kernel->epsilon;
  OrtValue* output = NULL;
  CHECK(api->KernelContext_GetOutput(context, 0, dims, rank, &output));
  CHECK(api->GetTensorMutableData(output, (void**)&job.y));
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
  kernel->centred = ((const NormOp*)op)->centred;
  OrtStatus* status = api->KernelInfoGetAttribute_float(info, "epsilon", &kernel->epsilon);
  if (status != NULL) api->ReleaseStatus(status);
  status = api->KernelInfoGetAttribute_int64(info, "axis", &kernel->axis);
  if (status != NULL) api->ReleaseStatus(status);
  *state = kernel;
  return NULL;
}

static void ORT_API_CALL destroy_kernel(void* state) { free(state); }

static OrtStatus* ORT_API_CALL same_shape(const OrtCustomOp* op, OrtShapeInferContext* context) {
  (void)op;
  OrtTensorTypeAndShapeInfo* info = NULL; /* the context's own: not released here */
  CHECK(api->ShapeInferContext_GetInputTypeShape(context, 0, &info));
  return api->ShapeInferContext_SetOutputTypeShape(context, 0, info);
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
static size_t ORT_API_CALL one(const OrtCustomOp* op) {
  (void)op;
  return 1;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp* op, size_t index) {
  (void)op;
  return index < 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL; /* the bias */
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

static NormOp layer_norm = {.name = "LayerNormalization", .inputs = 3, .centred = 1};
static NormOp rms_norm = {.name = "RMSNormalization", .inputs = 2, .centred = 0};

static void describe(NormOp* op) {
  memset(&op->op, 0, sizeof op->op); /* callbacks of later API versions: none */
  op->op.version = API_VERSION;
  op->op.GetName = op_name;
  op->op.GetExecutionProviderType = cpu;
  op->op.GetInputType = float_type;
  op->op.GetInputTypeCount = input_count;
  op->op.GetOutputType = float_type;
  op->op.GetOutputTypeCount = one;
  op->op.KernelDestroy = destroy_kernel;
  op->op.GetInputCharacteristic = input_kind;
  op->op.GetOutputCharacteristic = output_kind;
  op->op.GetInputMemoryType = cpu_memory;
  op->op.CreateKernelV2 = create_kernel;
  op->op.KernelComputeV2 = compute;
  op->op.InferOutputShapeFn = same_shape;
}

/* What onnxruntime.SessionOptions.register_custom_ops_library calls. */
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  api = base->GetApi(API_VERSION);
  if (api == NULL) return NULL; /* an ONNX Runtime older than 1.17 cannot even report why */
  describe(&layer_norm);
  describe(&rms_norm);
  OrtCustomOpDomain* domain = NULL;
  CHECK(api->CreateCustomOpDomain(DOMAIN, &domain));
  OrtStatus* status = api->CustomOpDomain_Add(domain, &layer_norm.op);
  if (status == NULL) status = api->CustomOpDomain_Add(domain, &rms_norm.op);
  if (status == NULL) status = api->AddCustomOpDomain(options, domain);
  /* the domain stays alive with the sessions using it: ORT does not own it, and it is tiny */
  return status;
}
