// rsp.kernels: shared part of every generated BSR convolution / linear kernel.
//
// rsp.kernels.codegen pastes this file at the top of each generated translation unit (the hash of a
// kernel covers it), so a generated .cu is self-contained. The same text compiles as CUDA (nvcc) and as
// plain host C++ (g++: the "host emulator" the CPU tests use to check the generated indexing and weights
// bit for bit against the GPU build, since both evaluate the same fmaf chain in the same order).
//
// Layout: x is NCHW float32 contiguous, y is N x O x OH x OW float32 contiguous (a linear layer is the
// 1x1 convolution of a 1x1 image: x (N, C), y (N, O)). One thread computes one output pixel
// (n, oh, ow) for a group of output channels; a thread block covers 128 consecutive pixels of one group
// (blockIdx.y), so every warp follows the same code path and the same weights.
#ifndef RSP_BSR_KERNELS_CUH_
#define RSP_BSR_KERNELS_CUH_

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define RSP_HD __device__ __forceinline__
#define RSP_GROUP_FN static __device__ __noinline__
#define RSP_ZERO_BUFFER(n) static __device__ float rsp_zeros[n];
#define RSP_LDG(p) __ldg(p)
#define RSP_CONST_ARRAY __device__ const
#define RSP_UNROLL _Pragma("unroll")
#define RSP_UNROLL4 _Pragma("unroll 4")
__device__ __forceinline__ float rsp_bits_to_float(unsigned b) { return __uint_as_float(b); }
#else
#define RSP_HD inline
#define RSP_GROUP_FN static
#define RSP_ZERO_BUFFER(n) static float rsp_zeros[n];
#define RSP_LDG(p) (*(p))
#define RSP_CONST_ARRAY static const
#define RSP_UNROLL
#define RSP_UNROLL4
inline float rsp_bits_to_float(unsigned b) {
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}
#endif

// Geometry of one layer, all compile-time constants: input C x H x W, O output channels, kernel KH x KW,
// stride, padding, dilation, output OH x OW.
template <int C_, int H_, int W_, int O_, int OH_, int OW_, int KH_, int KW_, int SH_, int SW_, int PH_, int PW_,
          int DH_, int DW_>
struct RspConv {
  static constexpr int C = C_, H = H_, W = W_, O = O_, OH = OH_, OW = OW_, KH = KH_, KW = KW_;
  static constexpr int SH = SH_, SW = SW_, PH = PH_, PW = PW_, DH = DH_, DW = DW_;
  static constexpr int KHW = KH * KW;
  static constexpr int OHW = OH * OW;
  static constexpr long long CHW = (long long)C * H * W;
  static constexpr long long OOHW = (long long)O * OH * OW;
  static constexpr bool PADDED = PH > 0 || PW > 0;
  // One bit per (kh, kw) tap: set when the tap reads inside the image for this pixel. Bit KHW is never
  // set; the generic kernel gives it to the padding columns of a ragged last block.
  typedef typename std::conditional<(KHW >= 32), unsigned long long, unsigned>::type mask_t;
  static_assert(KHW < 64, "kernels with more than 63 taps are not supported");

  struct Pixel {
    long long xoff;  // start of image n in x
    long long yoff;  // (n, 0, oh, ow) in y
    int base;        // (oh*SH - PH) * W + (ow*SW - PW): offset of tap (0, 0) inside the image (may be < 0)
    mask_t valid;    // taps inside the image
  };

  static RSP_HD Pixel pixel(int pix) {
    Pixel p;
    const int n = pix / OHW;
    const int r = pix - n * OHW;
    const int oh = r / OW;
    const int ow = r - oh * OW;
    const int ih0 = oh * SH - PH;
    const int iw0 = ow * SW - PW;
    p.xoff = (long long)n * CHW;
    p.yoff = (long long)n * OOHW + r;
    p.base = ih0 * W + iw0;
    mask_t v = 0;
    if (PADDED) {
      RSP_UNROLL
      for (int i = 0; i < KH; ++i) {
        RSP_UNROLL
        for (int j = 0; j < KW; ++j) {
          const bool ok = (unsigned)(ih0 + i * DH) < (unsigned)H && (unsigned)(iw0 + j * DW) < (unsigned)W;
          v |= (mask_t)(ok ? 1 : 0) << (i * KW + j);
        }
      }
    } else {
      // Without padding every tap of every output pixel reads inside the image.
      v = (mask_t)(((mask_t)1 << KHW) - 1);
    }
    p.valid = v;
    return p;
  }
};

// The generic BSR kernel (pattern read at run time from row_ptr / col_idx): used where a specialised
// kernel's code would be too large. Block row `brow` (R output channels) of the R x CB blocks; the
// arrays are __device__ const globals of the generated unit, read with __ldg (all lanes of a warp read
// the same address: one broadcast transaction). vals_bits holds the float32 bit patterns (nnzb, R, CB);
// koff[k] is the input offset of GEMM column k relative to Pixel::base, kbit[k] its tap bit (KHW for
// padding columns beyond K, never valid).
template <class G, int R, int CB, bool RELU>
RSP_HD void rsp_bsr_generic_tile(int brow, int pix, const float* __restrict__ x, float* __restrict__ y,
                                 const int* __restrict__ row_ptr, const int* __restrict__ col_idx,
                                 const unsigned* __restrict__ vals_bits, const int* __restrict__ koff,
                                 const unsigned char* __restrict__ kbit, const unsigned* __restrict__ bias_bits) {
  const typename G::Pixel p = G::pixel(pix);
  const float* __restrict__ xb = x + p.xoff;
  float acc[R];
  RSP_UNROLL
  for (int r = 0; r < R; ++r) {
    const int o = brow * R + r;
    acc[r] = (bias_bits != 0 && o < G::O) ? rsp_bits_to_float(RSP_LDG(bias_bits + o)) : 0.0f;
  }
  const int j0 = RSP_LDG(row_ptr + brow), j1 = RSP_LDG(row_ptr + brow + 1);
  RSP_UNROLL4  // independent blocks in flight: their index and input loads overlap
  for (int j = j0; j < j1; ++j) {
    const int k0 = RSP_LDG(col_idx + j) * CB;
    const unsigned* __restrict__ blk = vals_bits + (long long)j * (R * CB);
    RSP_UNROLL
    for (int c = 0; c < CB; ++c) {
      const int k = k0 + c;
      const unsigned bit = RSP_LDG(kbit + k);
      const float v = ((p.valid >> bit) & 1) ? RSP_LDG(xb + (p.base + RSP_LDG(koff + k))) : 0.0f;
      RSP_UNROLL
      for (int r = 0; r < R; ++r) acc[r] = fmaf(v, rsp_bits_to_float(RSP_LDG(blk + r * CB + c)), acc[r]);
    }
  }
  float* __restrict__ yb = y + p.yoff;
  RSP_UNROLL
  for (int r = 0; r < R; ++r) {
    const int o = brow * R + r;
    if (o < G::O) yb[(long long)o * G::OHW] = RELU ? fmaxf(acc[r], 0.0f) : acc[r];
  }
}

#ifdef RSP_TVM_FFI
// TVM FFI entry points (compiled with -DRSP_TVM_FFI and the tvm_ffi headers): DLTensor arguments in
// destination-passing style. CUDA build: the stream from the TVM FFI environment (TVMFFIEnvGetStream);
// host build (g++): the emulator on CPU tensors (a correctness path for tests, not a fast one).
#include <limits.h>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

namespace rsp_ffi {
inline void check_tensor(const tvm::ffi::TensorView& t, const char* fn, const char* what, long long per_sample,
                         bool cuda = true) {
  const DLDevice d = t.device();
  if (cuda && d.device_type != kDLCUDA && d.device_type != kDLCUDAManaged)
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be a CUDA tensor (device type " << (int)d.device_type
                              << ")";
  if (!cuda && d.device_type != kDLCPU)
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be a CPU tensor (device type " << (int)d.device_type
                              << "; this is the host emulator build)";
  const DLDataType dt = t.dtype();
  if (dt.code != kDLFloat || dt.bits != 32 || dt.lanes != 1)
    TVM_FFI_THROW(TypeError) << fn << ": " << what << " must be float32";
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be contiguous";
  if (t.ndim() < 1) TVM_FFI_THROW(ValueError) << fn << ": " << what << " must have a batch dimension";
  if (t.size(0) > INT_MAX) TVM_FFI_THROW(ValueError) << fn << ": " << what << " batch is too large";
  if (t.numel() != t.size(0) * per_sample)
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must hold " << per_sample << " values per sample";
}

inline const float* data(const tvm::ffi::TensorView& t) {
  return reinterpret_cast<const float*>(static_cast<const char*>(t.data_ptr()) + t.byte_offset());
}
}  // namespace rsp_ffi

// Export FN as the TVM FFI symbol __tvm_ffi_NAME and register it as the global function NAME when the
// library loads (override allowed: two artifacts may carry the same layer). A failed registration must not
// abort the library load; the VM still finds NAME through the exported symbol.
#define RSP_TVM_FFI_EXPORT_(NAME, FN)                                                                         \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(NAME, FN);                                                                    \
  TVM_FFI_STATIC_INIT_BLOCK() {                                                                               \
    try {                                                                                                     \
      tvm::ffi::Function::SetGlobal(#NAME, tvm::ffi::Function::FromTyped(FN, std::string(#NAME)), true);     \
    } catch (...) {                                                                                           \
    }                                                                                                         \
  }

// Defines `void NAME_ffi(TensorView x, TensorView y)` (CUDA tensors; LAUNCH on TVM's stream for the
// device) and exports it (RSP_TVM_FFI_EXPORT_): the library module of an exported TVM artifact finds it.
#define RSP_DEFINE_TVM_FFI(NAME, LAUNCH, PER_SAMPLE_X, PER_SAMPLE_Y)                                        \
  static void NAME##_ffi(tvm::ffi::TensorView x, tvm::ffi::TensorView y) {                                  \
    rsp_ffi::check_tensor(x, #NAME, "x", (PER_SAMPLE_X));                                                   \
    rsp_ffi::check_tensor(y, #NAME, "y", (PER_SAMPLE_Y));                                                   \
    if (x.size(0) != y.size(0)) TVM_FFI_THROW(ValueError) << #NAME ": x and y batch sizes differ";          \
    if (x.device().device_id != y.device().device_id)                                                       \
      TVM_FFI_THROW(ValueError) << #NAME ": x and y are on different devices";                              \
    const int dev = x.device().device_id;                                                                   \
    int prev = dev;                                                                                         \
    cudaGetDevice(&prev);                                                                                   \
    if (prev != dev) cudaSetDevice(dev);                                                                    \
    cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));                      \
    const int err = LAUNCH(rsp_ffi::data(x), const_cast<float*>(rsp_ffi::data(y)), (int)x.size(0), stream); \
    if (prev != dev) cudaSetDevice(prev);                                                                   \
    if (err != 0)                                                                                           \
      TVM_FFI_THROW(RuntimeError) << #NAME ": kernel launch failed: "                                       \
                                  << cudaGetErrorString(static_cast<cudaError_t>(err));                     \
  }                                                                                                         \
  RSP_TVM_FFI_EXPORT_(NAME, NAME##_ffi)

// The host emulator's entry point (build_host(..., tvm_ffi=True)): the same signature and checks on CPU
// tensors; RUN is NAME_host(x, y, batch).
#define RSP_DEFINE_TVM_FFI_HOST(NAME, RUN, PER_SAMPLE_X, PER_SAMPLE_Y)                                       \
  static void NAME##_ffi(tvm::ffi::TensorView x, tvm::ffi::TensorView y) {                                  \
    rsp_ffi::check_tensor(x, #NAME, "x", (PER_SAMPLE_X), false);                                            \
    rsp_ffi::check_tensor(y, #NAME, "y", (PER_SAMPLE_Y), false);                                            \
    if (x.size(0) != y.size(0)) TVM_FFI_THROW(ValueError) << #NAME ": x and y batch sizes differ";          \
    const int err = RUN(rsp_ffi::data(x), const_cast<float*>(rsp_ffi::data(y)), (int)x.size(0));            \
    if (err != 0) TVM_FFI_THROW(RuntimeError) << #NAME ": host kernel failed (" << err << ")";              \
  }                                                                                                         \
  RSP_TVM_FFI_EXPORT_(NAME, NAME##_ffi)

#endif  // RSP_TVM_FFI

#endif  // RSP_BSR_KERNELS_CUH_
