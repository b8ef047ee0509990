// Algorithm "ballot": the TEAL sparse GEMV on CUDA cores, reading only the kept weight rows.
//
// Layout: wt = W.t(), (K, N) row-major in the activation dtype (bf16 / fp16), N contiguous;
// thresholds fp32 (S, 1) scalar or (S, K) per channel (strides passed). Channel k of x is kept
// for segment s iff |x_k| > t_s(k) (TEAL, arXiv 2408.14690, Section 4, Eq. 2-3), compared in fp32.
//
// A block owns one column tile (32 lanes x 8 columns = 256 columns, 16-byte loads) of one
// segment and a K range of k_per_split channels. Its warps take the range's 32-channel chunks in
// turn. Per chunk each lane reads one x value; a warp ballot gives the chunk's keep bits, and the
// warp walks only the set bits, UNROLL rows at a time (UNROLL independent 16-byte loads in flight
// per lane, x broadcast by a shuffle): a dropped row costs neither bytes nor instructions.
// The next chunk's x is read while the current chunk's rows are in flight.
//
// Gated (gate/up, SwiGLU): columns [0, F) are gate's, [F, 2F) up's; a block owns gate's tile and
// up's tile of the same columns, each with its own keep bits (threshold rows 0 and 1), and the
// output is silu(g) * u in fp32.
//
// Split-K: with split > 1 blocks along K, each block writes its fp32 sums to part[split, W]
// (W = N, gated 2F), fences, and bumps its column tile's arrival counter; the last block to
// arrive sums the partials in split order (deterministic), applies the epilogue, writes y and
// resets the counter to zero (counters stay zero between launches). fp32 accumulation
// throughout; the only rounding to the activation dtype is the final store.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int LANES = 32;
constexpr int VEC = 8;               // columns per lane (16 bytes of bf16 / fp16)
constexpr int BN = LANES * VEC;      // columns per block tile
constexpr unsigned FULL = 0xffffffffu;

template <typename T> struct Conv;
template <> struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16(v); }
  // 8 bf16 packed in a uint4 -> 8 fp32 (exact: a bf16 is the top half of an fp32)
  static __device__ __forceinline__ void unpack(const uint4& w, float* f) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  }
};
template <> struct Conv<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half(v); }
  static __device__ __forceinline__ void unpack(const uint4& w, float* f) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h = *reinterpret_cast<const __half2*>(&u[i]);
      float2 p = __half22float2(h);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};

struct Args {
  const void* x; const void* w; const float* t; float* part; int* cnt; void* y;
  int K; long long stride_wk; long long stride_ts; long long stride_tk;
  int k_per_split; int split; int ncols;           // ncols: N (gated: F)
  int ends[4]; int tile_starts[4]; int nseg;        // segment ends / first tiles (not gated)
  int gated; int per_channel; int flags; int list_cap;
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

__device__ __forceinline__ float threshold(const Args& a, int seg, int k) {
  return a.per_channel ? __ldg(a.t + seg * a.stride_ts + (long long)k * a.stride_tk)
                       : __ldg(a.t + seg * a.stride_ts);
}

constexpr int MAXCH = 8;  // 32-channel chunks per warp (k_per_split <= MAXCH * 32 * warps)
constexpr int PLANE = 1 << 30;  // list entry flag: up's row (gated)

// Shared memory per warp: a ring of D row slots (32 lanes x 16 bytes each) and the warp's kept
// list (cap entries of channel | PLANE flag, and x as fp32).
template <typename T, int D>
__global__ void __launch_bounds__(256) ballot_gemv_kernel(const Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int pid_n = blockIdx.x, pid_k = blockIdx.y;
  const T* x = static_cast<const T*>(a.x);
  const char* w = static_cast<const char*>(a.w);
  const long long stride_b = a.stride_wk * (long long)sizeof(T);
  const int planes = a.gated ? 2 : 1;

  int seg = 0, col0, seg_end;
  if (a.gated) {
    col0 = pid_n * BN;
    seg_end = a.ncols;
  } else {
    for (int s = 1; s < a.nseg; ++s) seg += pid_n >= a.tile_starts[s];
    const int seg_start = seg == 0 ? 0 : a.ends[seg - 1];
    col0 = seg_start + (pid_n - a.tile_starts[seg]) * BN;
    seg_end = a.ends[seg];
  }
  const int col = col0 + lane * VEC;
  const bool col_ok = col < seg_end;  // segments are multiples of VEC columns (host check)
  const char* wg = w + (long long)col * sizeof(T);
  const long long up_off = (long long)a.ncols * sizeof(T);

  unsigned char* mine = smem + (size_t)warp * (D * LANES * 16 + a.list_cap * 8);
  uint4* ring = reinterpret_cast<uint4*>(mine);
  int* lidx = reinterpret_cast<int*>(mine + D * LANES * 16);
  float* lx = reinterpret_cast<float*>(lidx + a.list_cap);

  // 1. this warp's chunks (c * nwarps + warp) of the block's K range: x (and per-channel
  //    thresholds) read at once, then one ballot per chunk and plane appends the kept channels
  //    to the warp's list (prefix popcount: no block barrier)
  const int k_lo = pid_k * a.k_per_split;
  const int k_hi = min(a.K, k_lo + a.k_per_split);
  float xr[MAXCH], tgr[MAXCH], tur[MAXCH];
  const float tg0 = threshold(a, seg, 0), tu0 = a.gated ? threshold(a, 1, 0) : 0.f;
#pragma unroll
  for (int c = 0; c < MAXCH; ++c) {
    const int k = k_lo + (c * nwarps + warp) * LANES + lane;
    const bool in = k < k_hi;
    xr[c] = in ? Conv<T>::to_f(x[k]) : 0.f;
    tgr[c] = a.per_channel && in ? threshold(a, seg, k) : tg0;
    tur[c] = a.per_channel && in && a.gated ? threshold(a, 1, k) : tu0;
  }
  const unsigned below = (1u << lane) - 1u;
  int n = 0;
  for (int p = 0; p < planes; ++p) {
#pragma unroll
    for (int c = 0; c < MAXCH; ++c) {
      const int k = k_lo + (c * nwarps + warp) * LANES + lane;
      const bool keep = k < k_hi && fabsf(xr[c]) > (p ? tur[c] : tgr[c]);
      const unsigned bits = __ballot_sync(FULL, keep);
      if (keep) {
        const int pos = n + __popc(bits & below);
        lidx[pos] = k | (p ? PLANE : 0);
        lx[pos] = xr[c];
      }
      n += __popc(bits);
    }
  }
  __syncwarp();

  // 2. walk the list: each lane copies its own 16 bytes of row j + D - 1 into the ring
  //    (cp.async) while it multiplies row j, so D - 1 rows per warp are in flight
  float acc[VEC], acc_u[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) { acc[j] = 0.f; acc_u[j] = 0.f; }
#pragma unroll
  for (int j = 0; j < D - 1; ++j) {
    if (j < n && col_ok) {
      const int e = lidx[j];
      cp_async16(ring + j * LANES + lane, wg + (long long)(e & (PLANE - 1)) * stride_b + (e & PLANE ? up_off : 0));
    }
    cp_async_commit();
  }
  for (int j = 0; j < n; ++j) {
    const int jn = j + D - 1;
    if (jn < n && col_ok) {
      const int e = lidx[jn];
      cp_async16(ring + (jn & (D - 1)) * LANES + lane,
                 wg + (long long)(e & (PLANE - 1)) * stride_b + (e & PLANE ? up_off : 0));
    }
    cp_async_commit();
    cp_async_wait<D - 1>();
    if (a.flags & 1) continue;
    const uint4 wv = col_ok ? ring[(j & (D - 1)) * LANES + lane] : make_uint4(0u, 0u, 0u, 0u);
    const float xs = lx[j];
    float f[VEC];
    Conv<T>::unpack(wv, f);
    if (lidx[j] & PLANE) {
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc_u[q] = fmaf(xs, f[q], acc_u[q]);
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] = fmaf(xs, f[q], acc[q]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with its ring and list: reuse them for the reduction

  // 3. sum the warps' partial sums of the tile
  float* red = reinterpret_cast<float*>(smem);  // [warps][planes][BN]
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    red[(warp * planes) * BN + lane * VEC + j] = acc[j];
    if (a.gated) red[(warp * planes + 1) * BN + lane * VEC + j] = acc_u[j];
  }
  __syncthreads();
  const int W = a.gated ? 2 * a.ncols : a.ncols;  // workspace row length
  T* y = static_cast<T*>(a.y);
  for (int c = threadIdx.x; c < BN; c += blockDim.x) {
    float g = 0.f, u = 0.f;
    for (int v = 0; v < nwarps; ++v) {
      g += red[(v * planes) * BN + c];
      if (a.gated) u += red[(v * planes + 1) * BN + c];
    }
    const int n = col0 + c;
    if (n >= seg_end) continue;
    if (a.split == 1) {
      const float o = a.gated ? g / (1.f + __expf(-g)) * u : g;
      y[n] = Conv<T>::from_f(o);
    } else {
      a.part[(long long)pid_k * W + n] = g;
      if (a.gated) a.part[(long long)pid_k * W + a.ncols + n] = u;
    }
  }
  if (a.split == 1 || (a.flags & 2)) return;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.cnt + pid_n, 1) == a.split - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int c = threadIdx.x; c < BN; c += blockDim.x) {
    const int n = col0 + c;
    if (n >= seg_end) continue;
    float g = 0.f, u = 0.f;
    for (int s0 = 0; s0 < a.split; s0 += 8) {  // 8 independent L2 reads, summed in order
      float pg[8], pu[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const bool ok = s0 + i < a.split;
        const float* p = a.part + (long long)(s0 + i) * W + n;
        pg[i] = ok ? __ldcg(p) : 0.f;
        pu[i] = ok && a.gated ? __ldcg(p + a.ncols) : 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) { g += pg[i]; u += pu[i]; }
    }
    const float o = a.gated ? g / (1.f + __expf(-g)) * u : g;
    y[n] = Conv<T>::from_f(o);
  }
  if (threadIdx.x == 0) a.cnt[pid_n] = 0;
}

template <typename T, int D>
cudaError_t launch_d(const Args& a, dim3 grid, dim3 block, cudaStream_t stream) {
  const int warps = block.x / LANES;
  const size_t ring = (size_t)warps * (D * LANES * 16 + a.list_cap * 8);
  const size_t red = (size_t)warps * (a.gated ? 2 : 1) * BN * sizeof(float);
  const size_t smem = ring > red ? ring : red;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(ballot_gemv_kernel<T, D>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  ballot_gemv_kernel<T, D><<<grid, block, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const Args& a, int tiles, int warps, int depth, cudaStream_t stream) {
  dim3 grid(tiles, a.split), block(warps * LANES);
  if (depth == 4) return launch_d<T, 4>(a, grid, block, stream);
  if (depth == 8) return launch_d<T, 8>(a, grid, block, stream);
  return launch_d<T, 16>(a, grid, block, stream);
}

}  // namespace

// The C entry point (loaded with ctypes by teal/kernels/ballot.py; no torch headers, so the
// build takes seconds and does not depend on the torch version). Pointers are device pointers;
// dtype 0 = bf16, 1 = fp16; sizes: nseg segment widths (gated: nseg = 1, sizes[0] = F);
// thresholds fp32 with strides (stride_tk 0 and per_channel 0: one scalar per segment);
// cnt: int32 arrival counters (>= column tiles, all zero); part: fp32 workspace (>= split * W,
// W = N or 2F) when K > k_per_split. Returns 0, or a cudaError_t / -1 (bad arguments).
extern "C" int teal_ballot_gemv(const void* x, const void* wt, const float* t, float* part,
                                int* cnt, void* y, int K, long long stride_wk,
                                long long stride_ts, long long stride_tk, int per_channel,
                                const long long* sizes, int nseg, int gated, int k_per_split,
                                int warps, int unroll, int dtype, void* stream, int flags) {
  if (warps < 1 || warps > 8 || (unroll != 4 && unroll != 8 && unroll != 16) ||
      k_per_split < 1 || k_per_split > MAXCH * LANES * warps || nseg < 1 || nseg > 4 ||
      (gated && nseg != 1) || dtype < 0 || dtype > 1)
    return -1;
  Args a{};
  a.x = x; a.w = wt; a.t = t; a.part = part; a.cnt = cnt; a.y = y;
  a.K = K; a.stride_wk = stride_wk; a.stride_ts = stride_ts; a.stride_tk = stride_tk;
  a.per_channel = per_channel; a.k_per_split = k_per_split;
  a.split = (K + k_per_split - 1) / k_per_split;
  a.gated = gated; a.nseg = nseg; a.flags = flags;
  const int chunks = (k_per_split + LANES * warps - 1) / (LANES * warps);  // per warp
  a.list_cap = chunks * LANES * (gated ? 2 : 1);
  int tiles = 0, end = 0;
  for (int s = 0; s < nseg; ++s) {
    a.tile_starts[s] = tiles;
    end += (int)sizes[s];
    a.ends[s] = end;
    tiles += ((int)sizes[s] + BN - 1) / BN;
  }
  a.ncols = end;  // gated: F
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dtype == 0 ? (int)launch_t<__nv_bfloat16>(a, tiles, warps, unroll, st)
                    : (int)launch_t<__half>(a, tiles, warps, unroll, st);
}
