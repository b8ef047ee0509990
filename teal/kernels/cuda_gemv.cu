// Algorithm "ballot": the TEAL sparse GEMV on CUDA cores, reading only the kept weight rows.
//
// Layout: wt = W.t(), (K, N) row-major in the activation dtype (bf16 / fp16), N contiguous;
// thresholds fp32 (S, 1) scalar or (S, K) per channel (strides passed). Channel k of x is kept
// for segment s iff |x_k| > t_s(k) (TEAL, arXiv 2408.14690, Section 4, Eq. 2-3), compared in fp32.
//
// A block owns one column tile (32 lanes x 8 columns = 256 columns, 16-byte loads) of one
// segment and a K range of k_per_split channels. Its warps take the range's 32-channel chunks in
// turn. Per chunk each lane reads one x value; a warp ballot gives the chunk's keep bits, and the
// warp walks only the set bits, U rows at a time (U independent 16-byte loads in flight per
// lane, x broadcast by a shuffle): a dropped row costs neither bytes nor instructions beyond its
// ballot bit.
//
// Gated (gate/up, SwiGLU): columns [0, F) are gate's, [F, 2F) up's; a block owns gate's tile and
// up's tile of the same columns, each with its own keep bits (threshold rows 0 and 1), and the
// output is silu(g) * u in fp32.
//
// Split-K, two ways, both summing the split's partials in split order (deterministic, and the
// same bits either way):
// - cluster (compute capability 9.0+, split <= 16): the split's blocks of a column tile form one
//   thread-block cluster; after a cluster barrier each block sums its share of the tile's
//   columns over every block's shared memory (distributed shared memory) and stores y: no
//   global partials, fences or counters.
// - global: each block writes its fp32 sums to part[split, W] (W = N, gated 2F), fences, and
//   bumps its column tile's arrival counter; the last block to arrive sums the partials, applies
//   the epilogue, writes y and resets the counter to zero (counters stay zero between launches).
// fp32 accumulation throughout; the only rounding to the activation dtype is the final store.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <cooperative_groups.h>

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
  int gated; int per_channel;
};

// One 16-byte piece of a weight row, streamed once (no L1 allocation).
__device__ __forceinline__ uint4 load_row16(const char* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ float threshold(const Args& a, int seg, int k) {
  return a.per_channel ? __ldg(a.t + seg * a.stride_ts + (long long)k * a.stride_tk)
                       : __ldg(a.t + seg * a.stride_ts);
}

// The warp walks the set bits of `bits` (the kept channels of the chunk at c0) U at a time:
// the batch's U row loads are issued back to back (unpredicated: a batch of n < U rows loads
// its first row again for the rest, which L2 serves), then its n x 8 FMAs. wg points at this
// lane's 16 bytes of row 0 (a valid column even for lanes past the segment's end, whose sums
// are never stored).
template <typename T, int U>
__device__ __forceinline__ void kept_rows(unsigned bits, float xv, int c0, const char* wg,
                                          long long stride_b, float* acc) {
  while (bits) {
    const int n = min(U, __popc(bits));  // warp-uniform
    int ks[U];
    ks[0] = __ffs(bits) - 1;
    bits &= bits - 1;
#pragma unroll
    for (int u = 1; u < U; ++u) {
      ks[u] = u < n ? __ffs(bits) - 1 : ks[0];
      if (u < n) bits &= bits - 1;
    }
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) wv[u] = load_row16(wg + (long long)(c0 + ks[u]) * stride_b);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float xs = __shfl_sync(FULL, xv, ks[u]);
      if (u < n) {
        float f[VEC];
        Conv<T>::unpack(wv[u], f);
#pragma unroll
        for (int q = 0; q < VEC; ++q) acc[q] = fmaf(xs, f[q], acc[q]);
      }
    }
  }
}

__device__ __forceinline__ float epilogue(float g, float u, int gated) {
  return gated ? g / (1.f + __expf(-g)) * u : g;
}

// One block: a column tile (gated: gate's and up's tiles of the same columns) of one segment
// and a K range; CLUSTER: the split's blocks of a tile form one thread-block cluster and sum
// their partials through distributed shared memory (Hopper), else the global split-K tail.
template <typename T, int U, bool CLUSTER, bool GATED>
__global__ void __launch_bounds__(256) ballot_gemv_kernel(const Args a) {
  extern __shared__ __align__(16) float red[];  // [warps][planes][BN]
  __shared__ int last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int pid_n = blockIdx.x, pid_k = blockIdx.y;
  const T* x = static_cast<const T*>(a.x);
  const char* w = static_cast<const char*>(a.w);
  const long long stride_b = a.stride_wk * (long long)sizeof(T);
  const int planes = GATED ? 2 : 1;

  int seg = 0, col0, seg_end;
  if (GATED) {
    col0 = pid_n * BN;
    seg_end = a.ncols;
  } else {
    for (int s = 1; s < a.nseg; ++s) seg += pid_n >= a.tile_starts[s];
    const int seg_start = seg == 0 ? 0 : a.ends[seg - 1];
    col0 = seg_start + (pid_n - a.tile_starts[seg]) * BN;
    seg_end = a.ends[seg];
  }
  const int col = col0 + lane * VEC;
  // segments are multiples of VEC columns (host check); a lane past the segment's end reads
  // the tile's first columns instead (its sums are never stored)
  const char* wg = w + (long long)(col < seg_end ? col : col0) * sizeof(T);
  const char* wu = wg + (long long)a.ncols * sizeof(T);  // gated: up's columns

  // 1. the warps take the block's 32-channel chunks in turn: one x value per lane, one ballot
  //    per plane, then only the kept rows are loaded (a dropped row costs one ballot bit)
  const int k_lo = pid_k * a.k_per_split;
  const int k_hi = min(a.K, k_lo + a.k_per_split);
  const float tg0 = threshold(a, seg, 0), tu0 = GATED ? threshold(a, 1, 0) : 0.f;
  float acc[VEC], acc_u[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) { acc[j] = 0.f; acc_u[j] = 0.f; }
  for (int c0 = k_lo + warp * LANES; c0 < k_hi; c0 += nwarps * LANES) {
    const int k = c0 + lane;
    const bool in = k < k_hi;
    const float xv = in ? Conv<T>::to_f(x[k]) : 0.f;
    const float tg = a.per_channel && in ? threshold(a, seg, k) : tg0;
    kept_rows<T, U>(__ballot_sync(FULL, in && fabsf(xv) > tg), xv, c0, wg, stride_b, acc);
    if (GATED) {
      const float tu = a.per_channel && in ? threshold(a, 1, k) : tu0;
      kept_rows<T, U>(__ballot_sync(FULL, in && fabsf(xv) > tu), xv, c0, wu, stride_b, acc_u);
    }
  }

  // 2. sum the warps' partial sums of the tile in warp order (into warp 0's slot)
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    red[(warp * planes) * BN + lane * VEC + j] = acc[j];
    if (GATED) red[(warp * planes + 1) * BN + lane * VEC + j] = acc_u[j];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < BN; c += blockDim.x) {
    float g = red[c], u = GATED ? red[BN + c] : 0.f;
    for (int v = 1; v < nwarps; ++v) {
      g += red[(v * planes) * BN + c];
      if (GATED) u += red[(v * planes + 1) * BN + c];
    }
    red[c] = g;
    if (GATED) red[BN + c] = u;
  }
  T* y = static_cast<T*>(a.y);
  if (a.split == 1) {
    __syncthreads();
    for (int c = threadIdx.x; c < BN; c += blockDim.x)
      if (col0 + c < seg_end) y[col0 + c] = Conv<T>::from_f(epilogue(red[c], GATED ? red[BN + c] : 0.f, GATED));
    return;
  }

  if constexpr (CLUSTER) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // 3a. cluster (1, split, 1): block rank r == pid_k sums columns [r * per, (r + 1) * per) of
    //     every rank's tile in rank (= split) order, then all wait before any smem goes away
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    const int per = (BN + a.split - 1) / a.split;
    for (int i = threadIdx.x; i < per; i += blockDim.x) {
      const int c = pid_k * per + i;
      if (c >= BN || col0 + c >= seg_end) continue;
      float g = 0.f, u = 0.f;
      for (int r = 0; r < a.split; ++r) {
        const float* rs = cl.map_shared_rank(red, r);
        g += rs[c];
        if (GATED) u += rs[BN + c];
      }
      y[col0 + c] = Conv<T>::from_f(epilogue(g, u, GATED));
    }
    cl.sync();
#endif
    return;
  } else {
    // 3b. global split-K: fp32 partials to part[split, W] (W = N, gated 2F), then the last
    //     block of the column tile to arrive sums them in split order and resets the counter
    const int W = GATED ? 2 * a.ncols : a.ncols;
    __syncthreads();
    for (int c = threadIdx.x; c < BN; c += blockDim.x) {
      const int n = col0 + c;
      if (n >= seg_end) continue;
      a.part[(long long)pid_k * W + n] = red[c];
      if (GATED) a.part[(long long)pid_k * W + a.ncols + n] = red[BN + c];
    }
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
          pu[i] = ok && GATED ? __ldcg(p + a.ncols) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) { g += pg[i]; u += pu[i]; }
      }
      y[n] = Conv<T>::from_f(epilogue(g, u, GATED));
    }
    if (threadIdx.x == 0) a.cnt[pid_n] = 0;
  }
}

template <typename T, int U, bool CLUSTER, bool GATED>
cudaError_t prepare(size_t smem) {
  cudaError_t e = cudaSuccess;
  if (smem > 48 * 1024)
    e = cudaFuncSetAttribute(ballot_gemv_kernel<T, U, CLUSTER, GATED>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e == cudaSuccess && CLUSTER)
    e = cudaFuncSetAttribute(ballot_gemv_kernel<T, U, CLUSTER, GATED>,
                             cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  return e;
}

size_t smem_bytes(int warps, int gated) { return (size_t)warps * (gated ? 2 : 1) * BN * sizeof(float); }

template <typename T, int U, bool CLUSTER, bool GATED>
cudaError_t launch_k(const Args& a, dim3 grid, dim3 block, cudaStream_t stream) {
  const size_t smem = smem_bytes(block.x / LANES, GATED);
  cudaError_t e = prepare<T, U, CLUSTER, GATED>(smem);
  if (e != cudaSuccess) return e;
  if (!CLUSTER) {
    ballot_gemv_kernel<T, U, false, GATED><<<grid, block, smem, stream>>>(a);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = grid.y;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, ballot_gemv_kernel<T, U, true, GATED>, a);
}

template <typename T, int U>
cudaError_t launch_u(const Args& a, dim3 grid, dim3 block, int cluster, cudaStream_t st) {
  if (cluster)
    return a.gated ? launch_k<T, U, true, true>(a, grid, block, st) : launch_k<T, U, true, false>(a, grid, block, st);
  return a.gated ? launch_k<T, U, false, true>(a, grid, block, st) : launch_k<T, U, false, false>(a, grid, block, st);
}

template <typename T>
cudaError_t launch_t(const Args& a, int tiles, int warps, int unroll, int cluster, cudaStream_t st) {
  dim3 grid(tiles, a.split), block(warps * LANES);
  return unroll == 4 ? launch_u<T, 4>(a, grid, block, cluster, st) : launch_u<T, 8>(a, grid, block, cluster, st);
}

template <typename T, int U, bool GATED>
int max_cluster_k(int warps) {
  const size_t smem = smem_bytes(warps, GATED);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, 16);
  cfg.blockDim = dim3(warps * LANES);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 16;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  cudaError_t e = prepare<T, U, true, GATED>(smem);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxPotentialClusterSize(&n, ballot_gemv_kernel<T, U, true, GATED>, &cfg);
  if (e != cudaSuccess) { cudaGetLastError(); return 0; }
  return n;
}

template <typename T>
int max_cluster_t(int warps, int unroll, int gated) {
  if (unroll == 4) return gated ? max_cluster_k<T, 4, true>(warps) : max_cluster_k<T, 4, false>(warps);
  return gated ? max_cluster_k<T, 8, true>(warps) : max_cluster_k<T, 8, false>(warps);
}

}  // namespace

// The C entry points (loaded with ctypes by teal/kernels/ballot.py; no torch headers, so the
// build takes seconds and does not depend on the torch version). Pointers are device pointers;
// dtype 0 = bf16, 1 = fp16; sizes: nseg segment widths (gated: nseg = 1, sizes[0] = F);
// thresholds fp32 with strides (stride_tk 0 and per_channel 0: one scalar per segment);
// cnt: int32 arrival counters (>= column tiles, all zero); part: fp32 workspace (>= split * W,
// W = N or 2F) when K > k_per_split and not cluster. cluster: 1 = the split's blocks of a tile
// form one cluster (compute capability 9.0+, split <= teal_ballot_max_cluster). Returns 0, or a
// cudaError_t / -1 (bad arguments).
extern "C" int teal_ballot_gemv(const void* x, const void* wt, const float* t, float* part,
                                int* cnt, void* y, int K, long long stride_wk,
                                long long stride_ts, long long stride_tk, int per_channel,
                                const long long* sizes, int nseg, int gated, int k_per_split,
                                int warps, int unroll, int dtype, void* stream, int cluster) {
  if (warps < 1 || warps > 8 || (unroll != 4 && unroll != 8) || k_per_split < 1 ||
      k_per_split % LANES || nseg < 1 || nseg > 4 || (gated && nseg != 1) || dtype < 0 ||
      dtype > 1)
    return -1;
  Args a{};
  a.x = x; a.w = wt; a.t = t; a.part = part; a.cnt = cnt; a.y = y;
  a.K = K; a.stride_wk = stride_wk; a.stride_ts = stride_ts; a.stride_tk = stride_tk;
  a.per_channel = per_channel; a.k_per_split = k_per_split;
  a.split = (K + k_per_split - 1) / k_per_split;
  a.gated = gated; a.nseg = nseg;
  if (cluster && (a.split < 2 || a.split > 16)) return -1;
  int tiles = 0, end = 0;
  for (int s = 0; s < nseg; ++s) {
    a.tile_starts[s] = tiles;
    end += (int)sizes[s];
    a.ends[s] = end;
    tiles += ((int)sizes[s] + BN - 1) / BN;
  }
  a.ncols = end;  // gated: F
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dtype == 0 ? (int)launch_t<__nv_bfloat16>(a, tiles, warps, unroll, cluster, st)
                    : (int)launch_t<__half>(a, tiles, warps, unroll, cluster, st);
}

// The largest cluster (blocks along K, at most 16) the GPU can co-schedule for this launch
// shape on the current device; 0 where clusters are not supported.
extern "C" int teal_ballot_max_cluster(int warps, int unroll, int gated, int dtype) {
  if (warps < 1 || warps > 8 || (unroll != 4 && unroll != 8)) return 0;
  return dtype == 0 ? max_cluster_t<__nv_bfloat16>(warps, unroll, gated)
                    : max_cluster_t<__half>(warps, unroll, gated);
}
