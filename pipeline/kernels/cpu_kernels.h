// rsp.kernels.cpu: the shared part of every generated sparse convolution / linear kernel for CPUs.
//
// rsp.kernels.cpu pastes this file (after bsr_kernels.cuh, for the TVM FFI macros) at the top of each
// generated unit; the unit adds the layer's constants (CSR rows of the GEMM view, per non-zero the input
// plane and in-plane offset it reads, the values as exact hex-float literals) and calls rsp_cpu::run.
//
// Why this layout: a direct sparse convolution that vectorises over *output pixels*, with no im2col.
// The padded input of each image is split into stride phases (SH x SW planes per channel, each Ws wide),
// and the output is computed on a grid of Hs x Ws positions per image; then every (channel, tap) reads
// its plane at one constant offset from the output position, so one non-zero weight is one broadcast and
// NV contiguous 8-float loads + FMAs for 8*NV outputs. Grid positions past the real output width are
// computed and dropped (a few percent on 32x32 maps). Images of a batch are stacked along the grid, so
// small late-stage maps (4x4, 2x2) still fill the vectors at batch > 1. Zeros cost nothing: only the
// non-zeros of each output row are walked. Inside a TVM library, large layers spread their output rows
// over TVM's thread pool; elsewhere (ctypes) a call runs on the calling thread.
//
// Layout: x is NCHW float32 contiguous, y N x O x OH x OW (a linear layer is the 1x1 convolution of a
// 1x1 image: x (N, C), y (N, O)).
#ifndef RSP_CPU_KERNELS_H_
#define RSP_CPU_KERNELS_H_

#include <stdint.h>
#include <string.h>

#include <new>
#include <vector>

namespace rsp_cpu {

typedef float v8 __attribute__((vector_size(32)));  // AVX2 on x86-64-v3; two NEON registers on aarch64

static inline v8 load8(const float* p) {
  v8 v;
  memcpy(&v, p, sizeof v);  // unaligned load (vmovups / ldr q)
  return v;
}
static inline void store8(float* p, v8 v) { memcpy(p, &v, sizeof v); }

struct Layer {
  int C, H, W, M, OH, OW, SH, SW, PH, PW;
  int Hs, Ws;      // a stride-phase plane per image: ceil(Hp / SH) x ceil(Wp / SW) of the padded input
  int max_off;     // the largest in-plane offset any non-zero reads
  const int* row_ptr;  // M + 1
  const int* plane;    // per non-zero: plane index (c * SH + row phase) * SW + column phase
  const int* off;      // per non-zero: in-plane offset (row // SH) * Ws + col // SW
  const float* val;    // per non-zero
  const float* bias;   // M or nullptr
  bool relu;
};

// acc[v] += w * x[off + 8v] for the non-zeros of one output row, over NV vectors of 8 grid positions.
template <int NV>
static inline void row_block(const Layer& L, const float* xs, const int* abs_off, int m, long long q0, float* out) {
  v8 acc[NV];
  const float b = L.bias ? L.bias[m] : 0.0f;
  for (int v = 0; v < NV; ++v) acc[v] = (v8){b, b, b, b, b, b, b, b};
  const float* base = xs + q0;
  for (int j = L.row_ptr[m], e = L.row_ptr[m + 1]; j < e; ++j) {
    const float* p = base + abs_off[j];
    const float w = L.val[j];
    for (int v = 0; v < NV; ++v) acc[v] += load8(p + 8 * v) * w;
  }
  for (int v = 0; v < NV; ++v) store8(out + 8 * v, acc[v]);
}

template <int NV>
static void rows(const Layer& L, const float* xs, const int* abs_off, long long grid, float* yrow, float* y,
                 int batch, int m0, int m1) {
  const long long per_img = (long long)L.Hs * L.Ws, steps = (grid + 8 * NV - 1) / (8 * NV);
  const long long ohw = (long long)L.OH * L.OW;
  for (int m = m0; m < m1; ++m) {
    for (long long s = 0; s < steps; ++s) row_block<NV>(L, xs, abs_off, m, s * 8 * NV, yrow + s * 8 * NV);
    for (int n = 0; n < batch; ++n) {  // keep the real outputs: rows oy < OH, columns ox < OW of each image
      float* dst = y + ((long long)n * L.M + m) * ohw;
      const float* src = yrow + n * per_img;
      for (int oy = 0; oy < L.OH; ++oy)
        for (int ox = 0; ox < L.OW; ++ox) {
          const float v = src[(long long)oy * L.Ws + ox];
          dst[(long long)oy * L.OW + ox] = (L.relu && v < 0.0f) ? 0.0f : v;
        }
    }
  }
}

// Output rows [m0, m1) over the packed chunk, with this thread's grid-row buffer.
struct RowsTask {
  const Layer* L;
  const float* xs;
  const int* abs_off;
  long long grid, padded;
  float* y;
  int batch, nv;
};

static int rows_range(const RowsTask& t, int m0, int m1) {
  static thread_local std::vector<float> yrow;
  try {
    yrow.resize((size_t)t.padded);
  } catch (const std::bad_alloc&) {
    return 1;
  }
  switch (t.nv) {
    case 4: rows<4>(*t.L, t.xs, t.abs_off, t.grid, yrow.data(), t.y, t.batch, m0, m1); break;
    case 3: rows<3>(*t.L, t.xs, t.abs_off, t.grid, yrow.data(), t.y, t.batch, m0, m1); break;
    case 2: rows<2>(*t.L, t.xs, t.abs_off, t.grid, yrow.data(), t.y, t.batch, m0, m1); break;
    default: rows<1>(*t.L, t.xs, t.abs_off, t.grid, yrow.data(), t.y, t.batch, m0, m1); break;
  }
  return 0;
}

// Inside a TVM library the output rows are spread over TVM's own CPU thread pool (the one its operators
// use, so nothing is oversubscribed): the loader fills this weak pointer, as for TVM's generated code
// (__TVMBackendAllocWorkspace and friends). Loaded by ctypes it stays null and the kernel runs serially.
#ifdef RSP_TVM_FFI
typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelEnv;  // TVMParallelGroupEnv
typedef int (*ParallelLambda)(int task_id, ParallelEnv* penv, void* cdata);
extern "C" __attribute__((weak)) void* __TVMBackendParallelLaunch = nullptr;

// 1 when the loader has filled the pointer (tests call it through ctypes on a loaded TVM library).
extern "C" __attribute__((weak)) int rsp_cpu_parallel_ready(void) { return __TVMBackendParallelLaunch != nullptr; }

static int parallel_task(int task_id, ParallelEnv* penv, void* cdata) {
  const RowsTask& t = *static_cast<const RowsTask*>(cdata);
  const int n = penv->num_task > 0 ? penv->num_task : 1, m = t.L->M;
  return rows_range(t, (int)((long long)m * task_id / n), (int)((long long)m * (task_id + 1) / n));
}
#endif

// Below this many (non-zero x vector) updates (~30 us) a parallel launch costs more than it saves.
static const long long PARALLEL_MIN_WORK = 50000;

static int all_rows(const RowsTask& t, int nnz) {
#ifdef RSP_TVM_FFI
  typedef int (*Launch)(ParallelLambda, void*, int);
  Launch launch = reinterpret_cast<Launch>(__TVMBackendParallelLaunch);
  const long long work = (long long)nnz * (t.padded / 8);
  if (launch && work >= PARALLEL_MIN_WORK && t.L->M > 1)
    return launch(parallel_task, const_cast<RowsTask*>(&t), 0) == 0 ? 0 : 3;
#else
  (void)nnz;
#endif
  return rows_range(t, 0, t.L->M);
}

// One chunk of images: pack them, then every output row over their stacked grid.
static int run_chunk(const Layer& L, int nnz, const float* x, float* y, int batch) {
  const long long per_img = (long long)L.Hs * L.Ws, grid = per_img * batch;
  const int nv = grid >= 32 ? 4 : grid >= 24 ? 3 : grid >= 16 ? 2 : 1;
  const long long padded = (grid + 8 * nv - 1) / (8 * nv) * (8 * nv);
  const long long stride = padded + L.max_off + 8;  // one phase plane (all images), read past the grid: zeros
  const int planes = L.C * L.SH * L.SW;
  if ((double)planes * (double)stride > 2147483647.0) return 2;  // offsets are 32-bit
  static thread_local std::vector<float> xs;
  static thread_local std::vector<int> abs_off;
  try {
    xs.assign((size_t)(planes * stride), 0.0f);
    abs_off.resize((size_t)nnz);
  } catch (const std::bad_alloc&) {
    return 1;
  }
  for (int j = 0; j < nnz; ++j) abs_off[j] = (int)(L.plane[j] * stride + L.off[j]);
  // Pack: padded input, split into stride phases; padding stays zero.
  for (int n = 0; n < batch; ++n)
    for (int c = 0; c < L.C; ++c) {
      const float* src = x + ((long long)n * L.C + c) * L.H * L.W;
      for (int iy = 0; iy < L.H; ++iy) {
        const int py = iy + L.PH, a = py % L.SH, i = py / L.SH;
        for (int ix = 0; ix < L.W; ++ix) {
          const int px = ix + L.PW, b = px % L.SW, jj = px / L.SW;
          xs[(size_t)(((c * L.SH + a) * L.SW + b) * stride + n * per_img + (long long)i * L.Ws + jj)] =
              src[(long long)iy * L.W + ix];
        }
      }
    }
  const RowsTask task{&L, xs.data(), abs_off.data(), grid, padded, y, batch, nv};
  return all_rows(task, nnz);
}

// Returns 0; 1: the scratch memory could not be allocated; 2: an image is too large for 32-bit offsets;
// 3: TVM's parallel launch failed.
// Images are taken in chunks whose packed input stays within about 256 KB (the per-core L2 of current
// x86 and Arm cores): every non-zero re-reads the chunk, so a chunk that spills to L3 runs 2-3x slower.
static int run(const Layer& L, int nnz, const float* x, float* y, int batch) {
  const long long per_img_bytes = (long long)L.C * L.SH * L.SW * L.Hs * L.Ws * 4;
  const int chunk = (int)(per_img_bytes >= (256 << 10) ? 1 : (256 << 10) / per_img_bytes);
  const long long x_img = (long long)L.C * L.H * L.W, y_img = (long long)L.M * L.OH * L.OW;
  for (int n0 = 0; n0 < batch; n0 += chunk) {
    const int nb = batch - n0 < chunk ? batch - n0 : chunk;
    const int err = run_chunk(L, nnz, x + n0 * x_img, y + n0 * y_img, nb);
    if (err) return err;
  }
  return 0;
}

}  // namespace rsp_cpu

#endif  // RSP_CPU_KERNELS_H_
