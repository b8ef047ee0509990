// CPU sparse-activation GEMV / small GEMM for TEAL decode and prefill (arXiv 2408.14690, Eq. 2-3).
//
// y[m, n] = sum over kept k of x[m, k] * wt[k, n], with k kept for row m and projection s iff
// |x[m, k]| > t_s (or t_s[k]), compared in fp32; wt is the input-channel-major (K, N) weight, so a
// dropped channel's weight row is never read.  fp32 accumulation, one rounding to the activation
// dtype at the end.  Up to TILE rows share one pass over the weight: a weight row is read once
// if any row of the tile keeps it.  Every output element is summed by one task in increasing k,
// so results do not depend on the thread count.
//
// Built on first use by teal/kernels/cpu.py (torch.utils.cpp_extension.load_inline).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

constexpr int TILE = 8;  // rows per pass over the weight

inline float load(const float* p, int64_t j) { return p[j]; }
inline float load(const c10::BFloat16* p, int64_t j) { return static_cast<float>(p[j]); }
inline float load(const c10::Half* p, int64_t j) { return static_cast<float>(p[j]); }

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#if defined(__F16C__)
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif
#define TEAL_VEC 1
#endif

// Which weight dtypes have an 8-wide AVX2 load (float32, bfloat16; float16 with F16C).
template <typename T> struct Vec8 { static constexpr bool ok = false; };
#ifdef TEAL_VEC
template <> struct Vec8<float> { static constexpr bool ok = true; };
template <> struct Vec8<c10::BFloat16> { static constexpr bool ok = true; };
#if defined(__F16C__)
template <> struct Vec8<c10::Half> { static constexpr bool ok = true; };
#endif
#endif

// acc[0:n] += a[0] * w[0][0:n] + ... + a[R-1] * w[R-1][0:n], as R fused multiply-adds in that
// order (the same sum as R single-row updates, one load and store of acc instead of R).
template <int R, typename T>
inline void axpy(float* __restrict acc, const T* const* w, const float* a, int64_t n) {
  int64_t j = 0;
#ifdef TEAL_VEC
  if constexpr (Vec8<T>::ok) {
    __m256 av[R];
    for (int r = 0; r < R; ++r) av[r] = _mm256_set1_ps(a[r]);
    for (; j + 8 <= n; j += 8) {
      __m256 s = _mm256_loadu_ps(acc + j);
      for (int r = 0; r < R; ++r) s = _mm256_fmadd_ps(av[r], load8(w[r] + j), s);
      _mm256_storeu_ps(acc + j, s);
    }
  }
#endif
  for (; j < n; ++j) {
    float s = acc[j];
    for (int r = 0; r < R; ++r) s = std::fma(a[r], load(w[r], j), s);
    acc[j] = s;
  }
}

// The kept channels of one projection for one tile of rows: the union list and, per listed
// channel, a bit per row of the tile that keeps it.
struct Kept {
  std::vector<int32_t> k;
  std::vector<uint8_t> rows;
};

template <typename T>
Kept kept_channels(const T* x, int64_t K, int64_t m0, int64_t m1, const float* thr,
                   bool per_channel, bool dense) {
  Kept out;
  out.k.reserve(K);
  out.rows.reserve(K);
  const uint8_t all = static_cast<uint8_t>((1u << (m1 - m0)) - 1u);
  for (int64_t k = 0; k < K; ++k) {
    uint8_t bits = 0;
    if (dense) {
      bits = all;
    } else {
      const float t = per_channel ? thr[k] : thr[0];
      for (int64_t m = m0; m < m1; ++m)
        if (std::fabs(load(x + m * K, k)) > t) bits |= static_cast<uint8_t>(1u << (m - m0));
    }
    if (bits) {
      out.k.push_back(static_cast<int32_t>(k));
      out.rows.push_back(bits);
    }
  }
  return out;
}

// acc[r * ld + 0:n] = sum over kept-list entries [i0, i1) of x[m0 + r, k] * wt[k, c0:c0+n],
// in increasing k.
template <typename T>
void accumulate(const T* x, const T* wt, int64_t K, int64_t N, int64_t m0, int64_t nrows,
                const Kept& kept, int64_t i0, int64_t i1, int64_t c0, int64_t n, float* acc,
                int64_t ld) {
  for (int64_t r = 0; r < nrows; ++r) {
    const uint8_t bit = static_cast<uint8_t>(1u << r);
    const T* xr = x + (m0 + r) * K;
    float* ar = acc + r * ld;
    std::fill(ar, ar + n, 0.0f);
    const T* w[4];
    float a[4];
    int q = 0;
    for (int64_t i = i0; i < i1; ++i) {
      if (!(kept.rows[i] & bit)) continue;
      const int64_t k = kept.k[i];
      w[q] = wt + k * N + c0;
      a[q] = load(xr, k);
      if (++q == 4) {
        axpy<4>(ar, w, a, n);
        q = 0;
      }
    }
    if (q == 3) axpy<3>(ar, w, a, n);
    if (q == 2) axpy<2>(ar, w, a, n);
    if (q == 1) axpy<1>(ar, w, a, n);
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// The output of fp32 sums: rounded once (SwiGLU: g and u rounded, silu(g) rounded, the
// product rounded, as torch's eager ops do).
template <typename T>
inline T finish(float v) { return static_cast<T>(v); }
template <typename T>
inline T swiglu(float g, float u) {
  const float gr = static_cast<float>(static_cast<T>(g)), ur = static_cast<float>(static_cast<T>(u));
  return static_cast<T>(static_cast<float>(static_cast<T>(silu(gr))) * ur);
}

// One decode row tile: the kept list of each projection split into KPARTS contiguous parts
// (split-K), each part streaming whole rows of its share of the weight on one thread; the
// parts are added in a fixed order, so the result does not depend on the thread count.
constexpr int KPARTS = 2;

template <typename T>
void run_split_k(const T* x, const T* wt, T* y, int64_t M, int64_t K, int64_t N,
                 const std::vector<Kept>& kept, const std::vector<int64_t>& ends, bool gated) {
  const int64_t S = static_cast<int64_t>(ends.size());
  std::unique_ptr<float[]> part(new float[KPARTS * M * N]);
  at::parallel_for(0, S * KPARTS, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t s = i / KPARTS, p = i % KPARTS;
      const int64_t c0 = s ? ends[s - 1] : 0;
      const int64_t L = static_cast<int64_t>(kept[s].k.size());
      accumulate(x, wt, K, N, 0, M, kept[s], p * L / KPARTS, (p + 1) * L / KPARTS, c0,
                 ends[s] - c0, part.get() + p * M * N + c0, N);
    }
  });
  const int64_t n_out = gated ? ends[0] : N;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < n_out; ++j) {
      float v = 0.0f, u = 0.0f;
      for (int p = 0; p < KPARTS; ++p) {
        v += part[(p * M + r) * N + j];
        if (gated) u += part[(p * M + r) * N + n_out + j];
      }
      y[r * n_out + j] = gated ? swiglu<T>(v, u) : finish<T>(v);
    }
}

template <typename T>
void run(const T* x, const T* wt, T* y, int64_t M, int64_t K, int64_t N, const float* thr,
         bool per_channel, const std::vector<int64_t>& ends, bool gated, bool dense,
         int64_t chunk) {
  const int64_t S = static_cast<int64_t>(ends.size());
  const int64_t n_out = gated ? ends[0] : N;
  const int64_t tiles = (M + TILE - 1) / TILE;
  // Kept lists per (row tile, projection), built once before the parallel part.
  std::vector<Kept> kept(tiles * S);
  at::parallel_for(0, tiles * S, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t tile = i / S, s = i % S;
      const int64_t m0 = tile * TILE, m1 = std::min(M, m0 + TILE);
      kept[i] = kept_channels(x, K, m0, m1, thr + s * (per_channel ? K : 1), per_channel, dense);
    }
  });
  if (tiles == 1) {
    run_split_k(x, wt, y, M, K, N, kept, ends, gated);
    return;
  }
  // Several row tiles (prefill) — tasks: (row tile, projection segment, column chunk);
  // gated: one chunk of gate and up.
  struct Task { int64_t tile, s, c0, n; };
  std::vector<Task> tasks;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    int64_t a = 0;
    for (int64_t s = 0; s < (gated ? 1 : S); ++s) {
      const int64_t b = ends[s];
      for (int64_t c = a; c < b; c += chunk) tasks.push_back({tile, s, c, std::min(chunk, b - c)});
      a = b;
    }
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t e) {
    // scratch for the widest task only, left uninitialised (accumulate zeroes what it uses)
    const int64_t width = std::min(chunk, gated ? n_out : N);
    std::unique_ptr<float[]> acc(new float[TILE * width]);
    std::unique_ptr<float[]> acc_up(new float[gated ? TILE * width : 1]);
    for (int64_t i = b; i < e; ++i) {
      const Task& t = tasks[i];
      const int64_t m0 = t.tile * TILE, nrows = std::min<int64_t>(TILE, M - m0);
      const Kept& k0 = kept[t.tile * S + t.s];
      accumulate(x, wt, K, N, m0, nrows, k0, 0, static_cast<int64_t>(k0.k.size()), t.c0, t.n,
                 acc.get(), t.n);
      if (!gated) {
        for (int64_t r = 0; r < nrows; ++r)
          for (int64_t j = 0; j < t.n; ++j) y[(m0 + r) * N + t.c0 + j] = finish<T>(acc[r * t.n + j]);
        continue;
      }
      const Kept& k1 = kept[t.tile * S + 1];
      accumulate(x, wt, K, N, m0, nrows, k1, 0, static_cast<int64_t>(k1.k.size()), n_out + t.c0,
                 t.n, acc_up.get(), t.n);
      for (int64_t r = 0; r < nrows; ++r)
        for (int64_t j = 0; j < t.n; ++j)
          y[(m0 + r) * n_out + t.c0 + j] = swiglu<T>(acc[r * t.n + j], acc_up[r * t.n + j]);
    }
  });
}

}  // namespace

// x (M, K), wt (K, N) contiguous, same dtype (float32, bfloat16 or float16); thresholds fp32
// (S,) or (S, K); ends: the S projections' end columns (gated: [F, 2F]).  Returns (M, N), or
// (M, F) for gated.  Shapes and dtypes are checked by the Python caller.
torch::Tensor sparse_gemm(torch::Tensor x, torch::Tensor wt, torch::Tensor thresholds,
                          std::vector<int64_t> ends, bool gated, bool dense, int64_t chunk) {
  const int64_t M = x.size(0), K = x.size(1), N = wt.size(1);
  const bool per_channel = thresholds.dim() == 2;
  auto y = torch::empty({M, gated ? ends[0] : N}, x.options());
  const float* thr = thresholds.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      run(x.data_ptr<float>(), wt.data_ptr<float>(), y.data_ptr<float>(), M, K, N, thr,
          per_channel, ends, gated, dense, chunk);
      break;
    case at::kBFloat16:
      run(x.data_ptr<c10::BFloat16>(), wt.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
          M, K, N, thr, per_channel, ends, gated, dense, chunk);
      break;
    case at::kHalf:
      run(x.data_ptr<c10::Half>(), wt.data_ptr<c10::Half>(), y.data_ptr<c10::Half>(), M, K, N,
          thr, per_channel, ends, gated, dense, chunk);
      break;
    default:
      TORCH_CHECK(false, "teal sparse_gemm: float32, bfloat16 or float16 only");
  }
  return y;
}
