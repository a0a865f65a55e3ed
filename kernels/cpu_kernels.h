// rsp.kernels.cpu: the shared part of every generated sparse convolution / linear kernel for CPUs.
//
// rsp.kernels.cpu pastes this file (after bsr_kernels.cuh, for the TVM FFI macros) at the top of each
// generated unit; the unit adds the layer's constants (CSR rows of the GEMM view, per non-zero its absolute
// offset in the packed input, the values as exact hex-float literals, the fused epilogue) and calls
// rsp_cpu::run.
//
// Why this layout: a direct sparse convolution that vectorises over *output pixels*, with no im2col.
// The padded input of each image is split into stride phases (SH x SW planes per channel, each Ws wide),
// and the output is computed on a grid of positions q = oy * Ws + ox per image; then every (channel, tap)
// reads its plane at one constant offset from q, so one non-zero weight is one broadcast and NV contiguous
// 8-float loads + FMAs for 8*NV outputs. Only the grid up to the last real output of the last image is
// computed ((OH - 1) * Ws + OW positions: a 4x4 map with padding 1 takes 3 vectors, not the 6x6 plane).
// Images of a batch are stacked along the grid, so small late-stage maps (4x4, 2x2) still fill the vectors
// at batch > 1. Zeros cost nothing: only the non-zeros of each output row are walked. Each row keeps at
// least 8 independent accumulators (the non-zeros are split U ways), so the FMA latency is hidden even when
// a row is one vector wide.
//
// The packed layout of a chunk is fixed per layer (``chunk`` images, no more than the batch the artifact
// was exported for; ``stride`` = chunk x plane floats per phase plane, planes back to back), so the
// per-non-zero offsets are compile-time constants, the packed input is as small as the data (a 512-channel
// 2x2 map packs into 32 KB: L1), and packing writes every grid position (padding included) exactly once: no
// memset, no offset table per call. A vector that runs past its plane reads the next plane (or the zeroed
// tail after the last one): only lanes beyond the real outputs see those values, and they are dropped.
//
// Epilogue, fused per output row: + bias (BatchNorm folded into the weights and bias by the exporter),
// + a residual input (same shape as the convolution's output), ReLU, then an optional 2x2 / stride-2 max
// pool; one pass over the row's grid, no extra tensor between TVM operators.
//
// Layout: x is NCHW float32 contiguous, y N x O x OH' x OW' (OH' = OH / 2 with the pool; a linear layer is
// the 1x1 convolution of a 1x1 image: x (N, C), y (N, O)).
#ifndef RSP_CPU_KERNELS_H_
#define RSP_CPU_KERNELS_H_

#include <stdint.h>
#include <string.h>

#include <atomic>
#include <new>
#include <vector>

namespace rsp_cpu {

typedef float v8 __attribute__((vector_size(32)));  // AVX2 on x86-64-v3; two NEON registers on aarch64
typedef float wfloat __attribute__((may_alias));   // dense weights are read from a byte string

static inline v8 load8(const float* p) {
  v8 v;
  memcpy(&v, p, sizeof v);  // unaligned load (vmovups / ldr q)
  return v;
}
static inline void store8(float* p, v8 v) { memcpy(p, &v, sizeof v); }
// Scratch memory of the calling thread, one buffer per use shared by every layer of the library (inline
// functions are one per shared object; hidden: not shared with another library), so consecutive layers
// pack into and compute from the same cache-warm lines. Grows, never shrinks; nullptr when out of memory.
enum Scratch { PACKED_INPUT = 0, GRID_ROWS = 1 };
__attribute__((visibility("hidden"))) inline float* scratch(int which, size_t floats) {
  static thread_local std::vector<float> buf[2];
  try {
    if (buf[which].size() < floats) buf[which].resize(floats);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
  return buf[which].data();
}

static inline v8 vmax(v8 a, v8 b) { return a > b ? a : b; }  // vmaxps / fmax (no NaN in a pooled row)

struct Layer {
  int C, H, W, M, OH, OW, SH, SW, PH, PW;
  int Hs, Ws;          // a stride-phase plane per image: ceil(Hp / SH) x ceil(Wp / SW) of the padded input
  int chunk;           // images per packed chunk (its input stays in L2)
  long long stride;    // floats per phase plane of a chunk: chunk * Hs * Ws
  int slack;           // floats read past the last plane (the largest offset + one vector): a zeroed tail
  const int* row_ptr;  // M + 1
  const int* aoff;     // per non-zero: plane * stride + (row // SH) * Ws + col // SW
  const float* val;    // per non-zero
  const float* bias;   // M or nullptr
  bool relu;
  bool residual;  // y += r (N x M x OH x OW) before the ReLU
  int pool;       // 0, or 2: 2x2 max pool with stride 2 after the ReLU
  // prologue, fused into the packing: the model's input normalisation (x - sub[c]) / div[c] (before the
  // zero padding, as in the model), or a global average pool of a GH x GW map (a linear layer's input)
  const float* in_sub;  // C or nullptr
  const float* in_div;  // C or nullptr
  int GH, GW;           // 0: no pool
  // dense mode (a layer where the sparse kernel does not beat a dense library): every weight, packed
  // [ceil(M / 4)][K][4] in val, koff[k] the offset of GEMM column k; row_ptr[m] = m * K for load balancing
  bool dense;
  int K;
  const int* koff;
  int halo;  // phase-plane rows an output row reads below its own: (KH - 1) * DH / SH
  const char* name;  // the kernel's symbol (rsp_cpu_thread_choices)
};

// acc += w * x[aoff + 8v] over the non-zeros [j0, j1) of one output row, for NV vectors of 8 grid positions
// from base; U partial sums keep NV * U accumulators independent (FMA latency), added at the end.
template <int NV, int U>
static inline void row_block(const Layer& L, const float* base, int j0, int j1, float b, float* out) {
  v8 acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < NV; ++v) acc[u][v] = (v8){0, 0, 0, 0, 0, 0, 0, 0};
  int j = j0;
  for (; j + U <= j1; j += U)
    for (int u = 0; u < U; ++u) {
      const float* p = base + L.aoff[j + u];
      const float w = L.val[j + u];
      for (int v = 0; v < NV; ++v) acc[u][v] += load8(p + 8 * v) * w;
    }
  for (; j < j1; ++j) {
    const float* p = base + L.aoff[j];
    const float w = L.val[j];
    for (int v = 0; v < NV; ++v) acc[0][v] += load8(p + 8 * v) * w;
  }
  for (int v = 0; v < NV; ++v) {
    v8 s = (v8){b, b, b, b, b, b, b, b};
    for (int u = 0; u < U; ++u) s += acc[u][v];
    store8(out + 8 * v, s);
  }
}

// The grid of one output row: steps of 4 vectors, then a 1-3 vector tail.
template <const Layer& L>
static inline void row_grid(const float* xs, int m, long long vectors, float* yrow) {
  const int j0 = L.row_ptr[m], j1 = L.row_ptr[m + 1];
  const float b = L.bias ? L.bias[m] : 0.0f;
  long long v = 0;
  for (; v + 4 <= vectors; v += 4) row_block<4, 2>(L, xs + 8 * v, j0, j1, b, yrow + 8 * v);
  switch (vectors - v) {
    case 3: row_block<3, 3>(L, xs + 8 * v, j0, j1, b, yrow + 8 * v); break;
    case 2: row_block<2, 4>(L, xs + 8 * v, j0, j1, b, yrow + 8 * v); break;
    case 1: row_block<1, 8>(L, xs + 8 * v, j0, j1, b, yrow + 8 * v); break;
    default: break;
  }
}

// Units of work along the grid: an output row (a pair of rows with the 2x2 pool) of one image. Unit u is
// image u / units_per_image, rows from (u % units_per_image) * rows_per_unit.
template <const Layer& L>
static constexpr int rows_per_unit() { return L.pool ? 2 : 1; }
template <const Layer& L>
static constexpr int units_per_image() { return L.pool ? L.OH / 2 : L.OH; }
// Outputs one unit writes per channel (a pooled row, or an output row).
template <const Layer& L>
static constexpr int outputs_per_unit() { return L.pool ? L.OW / 2 : L.OW; }
// Grid position of unit u's first output, and one past its last.
template <const Layer& L>
static inline long long unit_begin(long long u) {
  return (u / units_per_image<L>()) * (long long)L.Hs * L.Ws + (u % units_per_image<L>()) * rows_per_unit<L>() * (long long)L.Ws;
}
template <const Layer& L>
static inline long long unit_end(long long u) { return unit_begin<L>(u) + (rows_per_unit<L>() - 1) * (long long)L.Ws + L.OW; }

// Keep the real outputs of row m for units [u0, u1) (yrow holds the grid from unit_begin(u0)): + residual,
// ReLU, 2x2 max pool.
template <const Layer& L>
static inline void row_epilogue(const float* yrow, const float* r, float* y, int m, int u0, int u1) {
  const long long per_img = (long long)L.Hs * L.Ws, ohw = (long long)L.OH * L.OW, start = unit_begin<L>(u0);
  const int PH_ = L.pool ? L.OH / 2 : L.OH, PW_ = L.pool ? L.OW / 2 : L.OW;
  const bool relu = L.relu;
  for (int u = u0; u < u1; ++u) {
    const int n = u / units_per_image<L>(), k = u % units_per_image<L>();
    const float* src = yrow + (n * per_img - start);  // image n's grid origin
    const float* res = r ? r + ((long long)n * L.M + m) * ohw : nullptr;
    float* dst = y + ((long long)n * L.M + m) * PH_ * PW_;
    if (!L.pool) {  // 8 outputs per step (a 2x2 or 4x4 map: the scalar tail)
      const int oy = k;
      const float* s = src + (long long)oy * L.Ws;
      float* d = dst + (long long)oy * L.OW;
      const float* rr = res ? res + (long long)oy * L.OW : nullptr;
      const v8 zero = (v8){0, 0, 0, 0, 0, 0, 0, 0};
      int ox = 0;
      for (; ox + 8 <= L.OW; ox += 8) {
        v8 v = load8(s + ox);
        if (rr) v += load8(rr + ox);
        if (relu) v = vmax(v, zero);
        store8(d + ox, v);
      }
      for (; ox < L.OW; ++ox) {
        float v = s[ox];
        if (rr) v += rr[ox];
        d[ox] = relu && v < 0.0f ? 0.0f : v;
      }
      continue;
    }
    const int py = k;
    if (!res) {  // max commutes with ReLU: the max of each 2x2 window (8 windows per step), then the ReLU
      const float* s0 = src + (long long)(2 * py) * L.Ws;
      const float* s1 = s0 + L.Ws;
      float* d = dst + (long long)py * PW_;
      int px = 0;
      for (; px + 8 <= PW_; px += 8) {  // columns 2px .. 2px + 15 of both rows (< OW)
        const v8 a = vmax(load8(s0 + 2 * px), load8(s1 + 2 * px)), b = vmax(load8(s0 + 2 * px + 8), load8(s1 + 2 * px + 8));
        v8 mx = vmax(__builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14), __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15));
        if (relu) mx = vmax(mx, (v8){0, 0, 0, 0, 0, 0, 0, 0});
        store8(d + px, mx);
      }
      for (; px < PW_; ++px) {
        const float a = s0[2 * px] > s0[2 * px + 1] ? s0[2 * px] : s0[2 * px + 1];
        const float b = s1[2 * px] > s1[2 * px + 1] ? s1[2 * px] : s1[2 * px + 1];
        const float mx = a > b ? a : b;
        d[px] = relu && mx < 0.0f ? 0.0f : mx;
      }
      continue;
    }
    for (int px = 0; px < PW_; ++px) {
      float best = 0.0f;
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx) {
          const int oy = 2 * py + dy, ox = 2 * px + dx;
          float v = src[(long long)oy * L.Ws + ox] + res[(long long)oy * L.OW + ox];
          if (relu && v < 0.0f) v = 0.0f;
          if ((dy | dx) == 0 || v > best) best = v;
        }
      dst[(long long)py * PW_ + px] = best;
    }
  }
}

// Dense mode: 4 output rows x NV vectors at a time, every column k: NV input loads shared by the 4 rows
// (4 broadcasts + NV loads per 4 * NV FMAs), 4 * NV independent accumulators.
template <int NV>
static inline void dense_block(const Layer& L, const wfloat* W, const float* base, int g, const float* bias4, float* out,
                               long long pitch) {
  v8 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = (v8){bias4[r], bias4[r], bias4[r], bias4[r], bias4[r], bias4[r], bias4[r], bias4[r]};
  const wfloat* w = W + (long long)g * L.K * 4;
  for (int k = 0; k < L.K; ++k, w += 4) {
    const float* p = base + L.koff[k];
    v8 x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load8(p + 8 * v);
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += x[v] * w[r];
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) store8(out + r * pitch + 8 * v, acc[r][v]);
}

template <const Layer& L>
static inline void dense_grid(const wfloat* W, const float* xs, int g, long long vectors, float* y4, long long pitch) {
  float b4[4];
  for (int r = 0; r < 4; ++r) {
    const int m = 4 * g + r;
    b4[r] = (L.bias && m < L.M) ? L.bias[m] : 0.0f;
  }
  long long v = 0;
  for (; v + 3 <= vectors; v += 3) dense_block<3>(L, W, xs + 8 * v, g, b4, y4 + 8 * v, pitch);
  if (vectors - v == 2) dense_block<2>(L, W, xs + 8 * v, g, b4, y4 + 8 * v, pitch);
  if (vectors - v == 1) dense_block<1>(L, W, xs + 8 * v, g, b4, y4 + 8 * v, pitch);
}

static inline void fill0(float* d, long long n) {
  for (long long i = 0; i < n; ++i) d[i] = 0.0f;
}

// Pack rows [r0, r1) of every phase plane of a chunk (row n * Hs + i: row i of image n's plane; a linear
// layer's plane has one row per image): every position, padding as zeros. Plain loops, no memset/memcpy
// calls (cpu_flags turns off GCC's idiom recognition): a 512-channel 2x2 map is 2000 rows of 4 floats, and
// a libc call per row cost more than the layer's arithmetic.
template <const Layer& L>
static void pack(const float* x, float* xs, long long r0, long long r1) {
  const long long per_img = (long long)L.Hs * L.Ws;
  if (L.GH) {  // a linear layer (1x1 image) of a global average pool: plane c holds the images' means
    const long long hw = (long long)L.GH * L.GW;
    for (int c = 0; c < L.C; ++c) {
      float* plane = xs + (long long)c * L.stride;
      for (long long n = r0; n < r1; ++n) {
        const float* src = x + ((long long)n * L.C + c) * hw;
        float acc = 0.0f;
        for (long long i = 0; i < hw; ++i) acc += src[i];
        plane[n] = acc / (float)hw;
      }
    }
    return;
  }
  const int right = L.Ws - L.PW - L.W;
  for (int c = 0; c < L.C; ++c)
    for (int a = 0; a < L.SH; ++a)
      for (int b = 0; b < L.SW; ++b) {
        float* plane = xs + ((long long)(c * L.SH + a) * L.SW + b) * L.stride;
        long long n = r0 / L.Hs;
        int i = (int)(r0 % L.Hs);
        for (long long row = r0; row < r1; ++row, i = i + 1 == L.Hs ? 0 : i + 1, n += i == 0) {
          float* d = plane + n * per_img + (long long)i * L.Ws;
          const int iy = i * L.SH + a - L.PH;
          if (iy < 0 || iy >= L.H) {
            fill0(d, L.Ws);
            continue;
          }
          const float* s = x + (((long long)n * L.C + c) * L.H + iy) * L.W;
          if (L.SW == 1) {  // left padding, the row (8 values per step), right padding
            fill0(d, L.PW);
            float* dr = d + L.PW;
            int j = 0;
            if (L.in_sub) {
              const float sub = L.in_sub[c], div = L.in_div[c];
              const v8 vs = (v8){sub, sub, sub, sub, sub, sub, sub, sub}, vd = (v8){div, div, div, div, div, div, div, div};
              for (; j + 8 <= L.W; j += 8) store8(dr + j, (load8(s + j) - vs) / vd);
              for (; j < L.W; ++j) dr[j] = (s[j] - sub) / div;
            } else {
              for (; j + 8 <= L.W; j += 8) store8(dr + j, load8(s + j));
              for (; j < L.W; ++j) dr[j] = s[j];
            }
            if (right > 0) fill0(d + L.PW + L.W, right);
          } else {
            for (int jj = 0; jj < L.Ws; ++jj) {
              const int ix = jj * L.SW + b - L.PW;
              d[jj] = (ix >= 0 && ix < L.W) ? (L.in_sub ? (s[ix] - L.in_sub[c]) / L.in_div[c] : s[ix]) : 0.0f;
            }
          }
        }
      }
}

// Rows [m0, m1) over grid units [u0, u1) of the packed chunk xs. A long grid (a large map) with many
// non-zeros per row is computed in tiles of TILE vectors across all the rows: a tile of the packed input
// (every channel, TILE * 8 positions plus the taps' reach) stays in L1 while every row reads it, where row
// by row each row streams its channels' whole planes from L2. With few non-zeros per row (99 %) the per-tile
// row overhead and the spilled output buffer cost more than that saves (measured), so such layers go row by
// row.
static const long long TILE = 4;
static const long long TILE_MIN_NNZ = 24;  // average non-zeros per row from which tiling pays (measured)

template <const Layer& L>
static int compute(const float* xs0, const wfloat* W, const float* r, float* y, int m0, int m1, int u0, int u1) {
  const long long start = unit_begin<L>(u0);
  const long long vectors = (unit_end<L>(u1 - 1) - start + 7) / 8;
  const float* xs = xs0 + start;
  const long long pitch = vectors * 8;
  const bool tiled = !L.dense && vectors > 2 * TILE && m1 > m0 &&
                     (long long)(L.row_ptr[m1] - L.row_ptr[m0]) >= TILE_MIN_NNZ * (m1 - m0);
  float* const yb = scratch(GRID_ROWS, (size_t)(pitch * (tiled ? (m1 - m0) : (L.dense ? 4 : 1))));
  if (!yb) return 1;
  if (L.dense) {  // groups of 4 rows (row splits are multiples of 4)
    for (int g = m0 / 4; 4 * g < m1; ++g) {
      dense_grid<L>(W, xs, g, vectors, yb, pitch);
      for (int q = 0; q < 4; ++q) {
        const int m = 4 * g + q;
        if (m >= m0 && m < m1) row_epilogue<L>(yb + q * pitch, r, y, m, u0, u1);
      }
    }
    return 0;
  }
  if (tiled) {
    for (long long v = 0; v < vectors; v += TILE) {
      const long long nv = vectors - v < TILE ? vectors - v : TILE;
      for (int m = m0; m < m1; ++m) row_grid<L>(xs + 8 * v, m, nv, yb + (m - m0) * pitch + 8 * v);
    }
    for (int m = m0; m < m1; ++m) row_epilogue<L>(yb + (m - m0) * pitch, r, y, m, u0, u1);
    return 0;
  }
  for (int m = m0; m < m1; ++m) {
    row_grid<L>(xs, m, vectors, yb);
    row_epilogue<L>(yb, r, y, m, u0, u1);
  }
  return 0;
}

// Inside a TVM library a layer's work is spread over rsp's own small thread pool. TVM's pool was tried
// first and measured: its parallel launch costs more than a whole 99 % sparse layer (a VGG-16 took 2.1 ms on
// 2 threads against 0.9 ms on 1), because its workers sleep between launches. rsp's workers spin for a
// short while after each task (RSP_CPU_SPIN_US, default 2000) and then sleep, so the layers of one
// inference, a few microseconds apart, hand over in a cache-line round trip. Threads: RSP_NUM_THREADS, else
// TVM_NUM_THREADS (what the user set for the TVM runtime), else the CPUs this process may run on. The
// graph around the kernels holds no TVM compute (the exporter fuses it into the kernels), so the two pools
// do not compete. Loaded by ctypes (no RSP_TVM_FFI) a call runs serially on the calling thread.
static const long long ROW_COST = 4;  // the per-row epilogue, in non-zero equivalents (load balancing)
// Below this much work (non-zero x vector updates, the per-row epilogue included: ~10 us) one thread is
// quicker than a hand-over; RSP_CPU_PARALLEL_MIN_WORK overrides it.
static const long long PARALLEL_MIN_WORK = 16384;

// One chunk, as tasks. Every thread packs, into its own scratch, the part of the input it reads, so no
// packed line travels between cores and packing (at 99 % as costly as the arithmetic) is shared too:
// - bands (a map with enough output rows): task i computes every output row over its band of grid units
//   and packs only the input rows the band reads (its rows plus the taps' reach);
// - rows (a small map: 2x2 and 4x4 grids are one to three vectors): task i computes a share of the output
//   rows (split by non-zeros) over the whole grid; each thread packs the whole chunk once per call (a few
//   microseconds at these sizes), however many of the tasks it claims.
struct ChunkTask {
  const float* x;
  const float* r;
  float* y;
  const wfloat* w;
  int nb;
  bool bands;
  unsigned long long call;  // unique per call: a thread's whole-chunk packing is reused within it
};

// The call a thread's packed scratch holds in full (0: none, or only a band).
__attribute__((visibility("hidden"))) inline unsigned long long& packed_call() {
  static thread_local unsigned long long call = 0;
  return call;
}
__attribute__((visibility("hidden"))) inline unsigned long long next_call() {
  static std::atomic<unsigned long long> calls{0};
  return ++calls;
}

template <const Layer& L>
static int chunk_job(const void* ctx, int task, int ntask) {
  const ChunkTask& t = *static_cast<const ChunkTask*>(ctx);
  const int U = t.nb * units_per_image<L>(), align = L.dense ? 4 : 1;
  int m0 = 0, m1 = L.M, u0 = 0, u1 = U;
  if (ntask > 1 && t.bands) {
    u0 = (int)((long long)U * task / ntask);
    u1 = (int)((long long)U * (task + 1) / ntask);
  } else if (ntask > 1) {  // rows split by cost (non-zeros + a constant per row): equal shares
    const long long total = L.row_ptr[L.M] + ROW_COST * L.M;
    auto split = [&](long long target) {
      int lo = 0, hi = L.M;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (L.row_ptr[mid] + ROW_COST * mid < target) lo = mid + 1; else hi = mid;
      }
      const int aligned = (lo + align - 1) / align * align;
      return aligned < L.M ? aligned : L.M;
    };
    m0 = split(total * task / ntask);
    m1 = task + 1 == ntask ? L.M : split(total * (task + 1) / ntask);
  }
  if (m0 >= m1 || u0 >= u1) return 0;
  const long long planes = (long long)L.C * L.SH * L.SW;
  float* const xs = scratch(PACKED_INPUT, (size_t)(planes * L.stride + L.slack));
  if (!xs) return 1;
  fill0(xs + planes * L.stride, L.slack);  // the tail the last plane's vectors read into
  if (u0 > 0 || u1 < U) {  // a band: its rows of every plane
    const int n0 = u0 / units_per_image<L>(), n1 = (u1 - 1) / units_per_image<L>();
    const int first = (u0 % units_per_image<L>()) * rows_per_unit<L>();
    const int last = ((u1 - 1) % units_per_image<L>()) * rows_per_unit<L>() + rows_per_unit<L>() - 1 + L.halo;
    pack<L>(t.x, xs, (long long)n0 * L.Hs + first, (long long)n1 * L.Hs + (last + 1 < L.Hs ? last + 1 : L.Hs));
    packed_call() = 0;
  } else if (packed_call() != t.call) {
    pack<L>(t.x, xs, 0, (long long)t.nb * L.Hs);
    packed_call() = t.call;
  }
  return compute<L>(xs, t.w, t.r, t.y, m0, m1, u0, u1);
}

#ifdef RSP_TVM_FFI
}  // namespace rsp_cpu
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#if defined(__x86_64__)
#include <immintrin.h>
#define RSP_CPU_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define RSP_CPU_PAUSE() asm volatile("yield" ::: "memory")
#else
#define RSP_CPU_PAUSE() ((void)0)
#endif
namespace rsp_cpu {

// A launch is published as one 64-bit word: generation (32 bits) | tasks claimed (16) | tasks (16). Every
// participant, the caller included, claims task indices from it by CAS, so when a worker is descheduled (a
// 2-core VM shared with other runtimes' spinning threads) the caller simply runs its tasks; the caller then
// waits only for tasks a worker has claimed. A worker that wakes after its launch finds the generation
// changed and claims nothing, so it never touches a task that is gone.
struct Pool {
  int n = 1;  // threads, the caller included
  long long min_work = PARALLEL_MIN_WORK;
  long long spin_us = 2000;
  bool adaptive = true;  // RSP_CPU_ADAPTIVE=0: every layer above min_work in parallel
  std::atomic<unsigned long long> word{0};
  std::atomic<int> done{0}, err{0};
  std::atomic<bool> stop{false};
  int (*fn)(const void*, int, int) = nullptr;  // the launch: fn(ctx, task, tasks)
  const void* ctx = nullptr;
  std::mutex mu, busy;
  std::condition_variable cv;
  int sleepers = 0;
  std::vector<std::thread> workers;
};

static long long env_int(const char* name, long long fallback) {
  const char* v = getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long x = strtoll(v, &end, 10);
  return (end && *end == 0 && x > 0) ? x : fallback;
}

static inline unsigned word_gen(unsigned long long w) { return (unsigned)(w >> 32); }

// Claim and run tasks of generation g until none is left.
static void claim_tasks(Pool* p, unsigned g) {
  unsigned long long w = p->word.load(std::memory_order_acquire);
  for (;;) {
    const int claimed = (int)((w >> 16) & 0xFFFF), total = (int)(w & 0xFFFF);
    if (word_gen(w) != g || claimed >= total) return;
    if (!p->word.compare_exchange_weak(w, w + (1ULL << 16), std::memory_order_acq_rel, std::memory_order_acquire))
      continue;
    const int e = p->fn(p->ctx, claimed, total);
    if (e) p->err.store(e);
    p->done.fetch_add(1, std::memory_order_acq_rel);
    w = p->word.load(std::memory_order_acquire);
  }
}

static void worker_loop(Pool* p, int, unsigned seen) {  // seen: the generation before the first task
  for (;;) {
    unsigned g;
    auto t0 = std::chrono::steady_clock::now();
    int spins = 0;
    while ((g = word_gen(p->word.load(std::memory_order_acquire))) == seen) {
      if (p->stop.load(std::memory_order_relaxed)) return;
      RSP_CPU_PAUSE();
      if (++spins % 64) continue;
      const long long us =
          std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
      if (us < p->spin_us) {
        if (us > 200) sched_yield();  // still quick to wake, but other runnable threads get the core
        continue;
      }
      std::unique_lock<std::mutex> lk(p->mu);
      ++p->sleepers;
      p->cv.wait(lk, [&] { return word_gen(p->word.load(std::memory_order_acquire)) != seen || p->stop.load(); });
      --p->sleepers;
      if (p->stop.load()) return;
    }
    seen = g;
    claim_tasks(p, g);
  }
}

static Pool* g_pool = nullptr;
static std::once_flag* g_pool_once = new std::once_flag;

static void pool_after_fork() {  // the child has none of the workers: abandon the pool, make a new one on use
  g_pool = nullptr;
  g_pool_once = new std::once_flag;
}

static Pool* pool() {
  std::call_once(*g_pool_once, [] {
    Pool* p = new Pool;
    cpu_set_t set;
    long long cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    p->n = (int)env_int("RSP_NUM_THREADS", env_int("TVM_NUM_THREADS", cpus));
    if (p->n > 64) p->n = 64;
    p->spin_us = env_int("RSP_CPU_SPIN_US", 2000);
    p->min_work = env_int("RSP_CPU_PARALLEL_MIN_WORK", PARALLEL_MIN_WORK);
    const char* adaptive = getenv("RSP_CPU_ADAPTIVE");
    p->adaptive = !(adaptive && adaptive[0] == '0' && adaptive[1] == 0);
    try {
      for (int i = 1; i < p->n; ++i) p->workers.emplace_back(worker_loop, p, i, word_gen(p->word.load()));
    } catch (...) {  // no threads: run serially
      p->stop = true;
      p->cv.notify_all();
      for (auto& w : p->workers) w.join();
      p->workers.clear();
      p->stop = false;
      p->n = 1;
    }
    static bool registered = false;
    if (!registered) registered = pthread_atfork(nullptr, nullptr, pool_after_fork) == 0;
    g_pool = p;
  });
  return g_pool;
}

// The library is unloaded (dlclose) or the process exits: stop and join the workers, which run code of
// this library.
__attribute__((destructor)) static void pool_shutdown() {
  Pool* p = g_pool;
  if (!p) return;
  {
    std::lock_guard<std::mutex> lk(p->mu);
    p->stop = true;
  }
  p->cv.notify_all();
  for (auto& w : p->workers)
    if (w.joinable()) w.join();
  p->workers.clear();
}

extern "C" __attribute__((weak)) int rsp_cpu_threads(void) { return pool()->n; }

// fn(ctx, i, tasks) for i < tasks (at most `units`, per_thread per thread: a few even out the load, and a late
// worker leaves the caller less to do), the caller holding p->busy.
static int launch_held(Pool* p, int (*fn)(const void*, int, int), const void* ctx, int units, int per_thread) {
  const int tasks = units < per_thread * p->n ? units : per_thread * p->n;
  p->fn = fn;
  p->ctx = ctx;
  p->err.store(0);
  p->done.store(0, std::memory_order_relaxed);
  const unsigned g = word_gen(p->word.load(std::memory_order_relaxed)) + 1;
  bool wake;
  {
    std::lock_guard<std::mutex> lk(p->mu);
    p->word.store(((unsigned long long)g << 32) | (unsigned long long)tasks, std::memory_order_release);
    wake = p->sleepers > 0;
  }
  if (wake) p->cv.notify_all();
  claim_tasks(p, g);
  for (int spins = 0; p->done.load(std::memory_order_acquire) != tasks; ++spins) {
    RSP_CPU_PAUSE();
    if (spins > 2000) sched_yield();  // a worker holding a task was descheduled: let it run
  }
  return p->err.load();
}

// Whether a layer runs on the pool or on the calling thread, measured where the library runs: which is faster
// depends on the machine, on what else runs on it and on the layer's place in the network (where its input
// was written, by which core), more than a work threshold can say. Each layer alternates the two for
// 2 x PROBES calls (in a single-stream inference every layer is in the same phase: whole inferences on one
// thread, then on all), keeps the faster by the median, and probes again every PERIOD calls. The two agree
// to float rounding, as any two thread counts do (a band's grid can end in another vector block, which sums
// a row's non-zeros in another order); RSP_CPU_ADAPTIVE=0 keeps every layer on the pool. Touched only by the
// caller that holds the pool (p->busy).
static const int PROBES = 8, PERIOD = 1024;  // a probe phase costs ~1 % of the calls; a choice made while
// another runtime's threads were still spinning lasts at most PERIOD calls (~0.5 s at 99 %)
struct ThreadChoice {
  const char* name = nullptr;
  int calls = 0;  // since the last probe phase began
  bool parallel = true;
  float us[2][PROBES];  // [serial, parallel] probe times
  float median_us[2] = {0, 0};
};

static float median8(float* v) {  // PROBES values, sorted in place
  for (int i = 1; i < PROBES; ++i)
    for (int j = i; j > 0 && v[j] < v[j - 1]; --j) {
      const float t = v[j];
      v[j] = v[j - 1];
      v[j - 1] = t;
    }
  return 0.5f * (v[PROBES / 2 - 1] + v[PROBES / 2]);
}

struct ThreadChoices {  // every layer of this library that has run on a pool of more than one thread
  std::mutex mu;
  std::vector<ThreadChoice*> all;
};
__attribute__((visibility("hidden"))) inline ThreadChoices& thread_choices() {
  static ThreadChoices* c = new ThreadChoices;  // never destroyed: layers may report after static destruction
  return *c;
}

template <const Layer& L>
static ThreadChoice& thread_choice() {
  static ThreadChoice* c = [] {
    ThreadChoice* t = new ThreadChoice;
    t->name = L.name;
    std::lock_guard<std::mutex> lk(thread_choices().mu);
    thread_choices().all.push_back(t);
    return t;
  }();
  return *c;
}

// One layer's chunk: on the pool or serially (ThreadChoice), serially below min_work or when another caller
// holds the pool.
template <const Layer& L>
static int launch(int (*fn)(const void*, int, int), const void* ctx, int units, int per_thread, long long work) {
  Pool* p = pool();
  if (p->n <= 1 || units <= 1 || work < p->min_work || !p->busy.try_lock()) return fn(ctx, 0, 1);
  if (!p->adaptive) {
    const int e = launch_held(p, fn, ctx, units, per_thread);
    p->busy.unlock();
    return e;
  }
  ThreadChoice& c = thread_choice<L>();
  const int phase = c.calls < PERIOD ? c.calls : 0;
  c.calls = phase + 1;
  if (phase >= 2 * PROBES) {
    const int e = c.parallel ? launch_held(p, fn, ctx, units, per_thread) : fn(ctx, 0, 1);
    p->busy.unlock();
    return e;
  }
  const bool parallel = (phase & 1) == 0;
  const auto t0 = std::chrono::steady_clock::now();
  const int e = parallel ? launch_held(p, fn, ctx, units, per_thread) : fn(ctx, 0, 1);
  c.us[parallel][phase / 2] = std::chrono::duration<float, std::micro>(std::chrono::steady_clock::now() - t0).count();
  if (phase == 2 * PROBES - 1) {
    float tmp[2][PROBES];
    memcpy(tmp, c.us, sizeof tmp);
    c.median_us[0] = median8(tmp[0]);
    c.median_us[1] = median8(tmp[1]);
    c.parallel = c.median_us[1] <= c.median_us[0];
  }
  p->busy.unlock();
  return e;
}

// The choices so far, one line per layer: "<symbol> parallel|serial <median us on the pool> <median us
// serially>" (probe medians; a layer still probing for the first time says "probing"). Returns the length of
// the whole report (written up to n - 1 characters, NUL-terminated).
extern "C" __attribute__((weak)) int rsp_cpu_thread_choices(char* buf, int n) {
  std::string out;
  {
    std::lock_guard<std::mutex> lk(thread_choices().mu);
    for (const ThreadChoice* c : thread_choices().all) {
      char line[256];
      const bool decided = c->median_us[0] > 0 || c->median_us[1] > 0;
      snprintf(line, sizeof line, "%s %s %.2f %.2f\n", c->name ? c->name : "?",
               decided ? (c->parallel ? "parallel" : "serial") : "probing", c->median_us[1], c->median_us[0]);
      out += line;
    }
  }
  if (buf && n > 0) {
    const size_t k = out.size() < (size_t)(n - 1) ? out.size() : (size_t)(n - 1);
    memcpy(buf, out.data(), k);
    buf[k] = 0;
  }
  return (int)out.size();
}
#endif

// One chunk of images: its units over the threads (ChunkTask).
template <const Layer& L>
static int run_chunk(const float* x, const float* r, float* y, int nb, const wfloat* W) {
  const int U = nb * units_per_image<L>();
  const long long vectors = (unit_end<L>(U - 1) + 7) / 8;
  // bands where two halves of the grid take no more vectors than the whole (+1/8): maps from 8x8 up; a 4x4
  // grid is 3 vectors whole and 4 in halves, a 2x2 one 1 and 2
  // and where the split ends a channel's outputs on a cache line (16 floats; or falls between images): two
  // threads writing halves of one line (an 8x8 map pooled to 4x4 is one line per channel) pass it back and
  // forth for every channel
  const int half = U / 2;
  const bool bands = !L.GH && U >= 2 && ((half % units_per_image<L>()) * outputs_per_unit<L>()) % 16 == 0 &&
                     8 * ((unit_end<L>(half - 1) + 7) / 8 + (unit_end<L>(U - 1) - unit_begin<L>(half) + 7) / 8) <= 9 * vectors;
  const ChunkTask task{x, r, y, W, nb, bands, next_call()};
#ifdef RSP_TVM_FFI
  const long long work = ((long long)L.row_ptr[L.M] + ROW_COST * L.M) * vectors;
  return launch<L>(chunk_job<L>, &task, bands ? U / 2 : L.M / (L.dense ? 4 : 1), bands ? 1 : 4, work);
#else
  return chunk_job<L>(&task, 0, 1);
#endif
}

// Returns 0; 1: the scratch memory could not be allocated; 4: the layer
// needs a residual input and got none.
template <const Layer& L>
static int run(const float* x, const float* r, float* y, int batch, const void* dense_weights = nullptr) {
  const wfloat* W = static_cast<const wfloat*>(dense_weights);
  if (L.residual && !r) return 4;
  const long long x_img = (long long)L.C * (L.GH ? (long long)L.GH * L.GW : (long long)L.H * L.W);
  const long long r_img = (long long)L.M * L.OH * L.OW;
  const long long y_img = L.pool ? (long long)L.M * (L.OH / 2) * (L.OW / 2) : r_img;
  for (int n0 = 0; n0 < batch; n0 += L.chunk) {
    const int nb = batch - n0 < L.chunk ? batch - n0 : L.chunk;
    const int err = run_chunk<L>(x + n0 * x_img, L.residual ? r + n0 * r_img : nullptr, y + n0 * y_img, nb, W);
    if (err) return err;
  }
  return 0;
}

}  // namespace rsp_cpu

#ifdef RSP_TVM_FFI
// The TVM FFI entry of a CPU kernel: NAME(x, y), or NAME(x, r, y) for a layer with a fused residual input.
#define RSP_DEFINE_TVM_FFI_CPU(NAME, RUN, PER_SAMPLE_X, PER_SAMPLE_Y)                                        \
  static void NAME##_ffi(tvm::ffi::TensorView x, tvm::ffi::TensorView y) {                                  \
    rsp_ffi::check_tensor(x, #NAME, "x", (PER_SAMPLE_X), false);                                            \
    rsp_ffi::check_tensor(y, #NAME, "y", (PER_SAMPLE_Y), false);                                            \
    if (x.size(0) != y.size(0)) TVM_FFI_THROW(ValueError) << #NAME ": x and y batch sizes differ";          \
    const int err = RUN(rsp_ffi::data(x), nullptr, const_cast<float*>(rsp_ffi::data(y)), (int)x.size(0));   \
    if (err != 0) TVM_FFI_THROW(RuntimeError) << #NAME ": CPU kernel failed (" << err << ")";               \
  }                                                                                                         \
  RSP_TVM_FFI_EXPORT_(NAME, NAME##_ffi)

#define RSP_DEFINE_TVM_FFI_CPU_RESIDUAL(NAME, RUN, PER_SAMPLE_X, PER_SAMPLE_R, PER_SAMPLE_Y)                 \
  static void NAME##_ffi(tvm::ffi::TensorView x, tvm::ffi::TensorView r, tvm::ffi::TensorView y) {          \
    rsp_ffi::check_tensor(x, #NAME, "x", (PER_SAMPLE_X), false);                                            \
    rsp_ffi::check_tensor(r, #NAME, "r", (PER_SAMPLE_R), false);                                            \
    rsp_ffi::check_tensor(y, #NAME, "y", (PER_SAMPLE_Y), false);                                            \
    if (x.size(0) != y.size(0) || r.size(0) != y.size(0))                                                   \
      TVM_FFI_THROW(ValueError) << #NAME ": x, r and y batch sizes differ";                                 \
    const int err = RUN(rsp_ffi::data(x), rsp_ffi::data(r), const_cast<float*>(rsp_ffi::data(y)),           \
                        (int)x.size(0));                                                                    \
    if (err != 0) TVM_FFI_THROW(RuntimeError) << #NAME ": CPU kernel failed (" << err << ")";               \
  }                                                                                                         \
  RSP_TVM_FFI_EXPORT_(NAME, NAME##_ffi)
#endif

#endif  // RSP_CPU_KERNELS_H_
