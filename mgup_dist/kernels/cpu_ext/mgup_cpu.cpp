// The CPU step of MGUP-AdamW / MGUP-Lion (top-K and cautious) as fused, multi-threaded loops.
//
// Every loop runs on torch's own intra-op thread pool (at::parallel_for: OpenMP with
// torch.get_num_threads() threads), never on a pool of its own.  A chunk's pieces are cut
// into blocks of BLK elements and the blocks are spread over the threads, so small tensors
// and large ones keep every core busy alike.
//
// Rounding: every formula is evaluated in float32 in the order and with the roundings of
// the eager torch ops it replaces (mgup_dist.rules), so that states, keys and parameters
// are bit for bit those of the eager path:
//   m.mul_(b1); m.add_(g, alpha=1-b1)        m = fma(g, 1-b1, m*b1)     (torch's add uses fmadd)
//   v.mul_(b2); v.addcmul_(g, g, value=1-b2) v = fma((1-b2)*g, g, v*b2) (addcmul: fma(value*t1, t2, self))
//   u = m / (sqrt(v / bc2) + eps) / bc1       (authors: m / (sqrt(v) + eps))
//   phi = key >= t ? alpha : gamma;  p = p*(1-lr*wd) - (u*phi)*lr_eff
// This file is compiled with -ffp-contract=off: the compiler never fuses a multiply and an
// add that torch rounds separately; the fused ones are written as std::fma.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(MGUP_MKL_SQRT)
// torch.sqrt of float32 on CPU builds with MKL is MKL's vmsSqrt in high-accuracy mode
// (aten/src/ATen/cpu/vml.h), which differs from the correctly rounded sqrt by one ulp in
// ~16 % of values: call the very function torch calls (exported by libtorch_cpu), so that
// u is bit for bit the eager u.  Its result depends on the value only.
// Outside an OpenMP region MKL would run its own threads for the call: held to this thread.
extern "C" void vmsSqrt(const int n, const float* a, float* r, const long long mode);
extern "C" int MKL_Set_Num_Threads_Local(int n);  // the C entry (mkl_service.h maps mkl_set_num_threads_local to it)
constexpr long long VML_MODE = 0x00000002 /* VML_HA */ | 0x00140000 /* VML_FTZDAZ_OFF */ | 0x00000100 /* VML_ERRMODE_IGNORE */;
inline void sqrt_n(float* x, int64_t n) {
  const int prev = MKL_Set_Num_Threads_Local(1);
  vmsSqrt((int)n, x, x, VML_MODE);
  MKL_Set_Num_Threads_Local(prev);
}
#else
inline void sqrt_n(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);
}
#endif

namespace {

constexpr int64_t SUB = 1024;  // elements per sqrt call: the loops around it stay in L1

constexpr int64_t BLK = 1 << 15;  // elements per work item of the elementwise passes (4 x 128 KB)

enum Rule { ADAMW = 0, LION = 1 };

// The scalars of one piece, float32, in the order of mgup_dist.kernels.cpu_ext.consts:
// 0 b1, 1 1-b1, 2 b2, 3 1-b2, 4 alpha (/denominator), 5 gamma (/denominator), 6 1-lr*wd,
// 7 lr_eff, 8 bc1, 9 bc2, 10 eps
constexpr int NC = 11;

struct Item {
  int64_t piece, a, b;
};

std::vector<Item> items_of(const std::vector<int64_t>& lengths) {
  std::vector<Item> out;
  for (int64_t i = 0; i < (int64_t)lengths.size(); ++i)
    for (int64_t a = 0; a < lengths[i]; a += BLK) out.push_back({i, a, std::min(lengths[i], a + BLK)});
  return out;
}

// Work under PAR_MIN elements runs on the calling thread: an OpenMP region ends in a barrier
// that waits for every thread, and on a machine busy with other processes a descheduled
// thread makes that wait a scheduler time slice, far more than a small pass costs.
constexpr int64_t PAR_MIN = 1 << 19;

// Whether other processes want the cores this process's threads would use: runnable tasks
// of the machine (/proc/loadavg) minus this process's running threads, plus torch's thread
// count, above the online cores.  Then a region's barrier would wait for a descheduled
// thread, and one thread is faster than several.  Sampled at most every 100 ms.  The thread
// count never changes a result (every pass is exact whatever its split), only its speed.
bool cores_contended() {
  static std::atomic<int64_t> last{INT64_MIN / 2};
  static std::atomic<bool> busy{false};
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
  if (now - last.load(std::memory_order_relaxed) < 100) return busy.load(std::memory_order_relaxed);
  last.store(now, std::memory_order_relaxed);
  bool b = false;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    double l1, l5, l15;
    long running = 0, total = 0;
    if (std::fscanf(f, "%lf %lf %lf %ld/%ld", &l1, &l5, &l15, &running, &total) == 5) {
      long mine = 0;  // this process's threads now running (the caller among them)
      if (DIR* d = opendir("/proc/self/task")) {
        while (dirent* e = readdir(d)) {
          if (e->d_name[0] == '.') continue;
          char path[64], buf[256];
          std::snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
          if (FILE* t = std::fopen(path, "r")) {
            size_t k = std::fread(buf, 1, sizeof buf - 1, t);
            buf[k] = 0;
            const char* rp = std::strrchr(buf, ')');
            if (rp && rp[1] == ' ' && rp[2] == 'R') ++mine;
            std::fclose(t);
          }
        }
        closedir(d);
      }
      const long others = std::max(0L, running - std::max(1L, mine));
      b = others + at::get_num_threads() > sysconf(_SC_NPROCESSORS_ONLN);
    }
    std::fclose(f);
  }
  busy.store(b, std::memory_order_relaxed);
  return b;
}

template <typename F>
void par_for(int64_t n, int64_t work, F&& f) {
  if (n < 2 || work < PAR_MIN || at::get_num_threads() < 2 || cores_contended()) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  at::parallel_for(0, n, 1, f);
}

template <typename F>
void for_items(const std::vector<Item>& items, F&& f) {
  int64_t work = 0;
  for (auto& it : items) work += it.b - it.a;
  par_for((int64_t)items.size(), work, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) f(items[i]);
  });
}

inline int32_t key_of(float s) {
  // mgup_dist.radix.keys_: -0.0 + 0.0 = +0.0; negatives' magnitude bits flipped; NaN -> INT_MIN + 1
  float x = s + 0.0f;
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t k = bits ^ ((bits >> 31) & 0x7fffffff);
  return (s != s) ? (std::numeric_limits<int32_t>::min() + 1) : k;
}

inline float sign_keep_nan(float x) {
  // torch.where(isnan(x), x, sign(x)); torch.sign(+-0) = +0
  float sg = (float)((0.0f < x) - (x < 0.0f));
  return (x != x) ? x : sg;
}

// u from m and r = sqrt(v / bc2) (authors: sqrt(v)), the sqrt done by sqrt_n
inline float adamw_u(float m, float r, const float* c, bool authors) {
  if (authors) return m / (r + c[10]);
  return (m / (r + c[10])) / c[8];
}

struct Ptrs {
  std::vector<float*> p, g, m, v;
};

std::vector<float*> ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<float*> out;
  out.reserve(ts.size());
  for (auto& t : ts) {
    TORCH_CHECK(!t.defined() || (t.scalar_type() == at::kFloat && t.is_contiguous()), "mgup_cpu: float32 contiguous pieces expected");
    out.push_back(t.defined() ? t.data_ptr<float>() : nullptr);
  }
  return out;
}

std::vector<int64_t> lens(const std::vector<at::Tensor>& g) {
  std::vector<int64_t> out;
  for (auto& t : g) out.push_back(t.numel());
  return out;
}

// ------------------------------------------------------------------------------- phase 1
template <int R, bool MAX, bool AUTH>
void score_block(float* __restrict g, float* __restrict m, float* __restrict v, int32_t* __restrict key, int64_t n, const float* c) {
  const float b1 = c[0], cb1 = c[1], b2 = c[2], cb2 = c[3], bc1 = c[8], bc2 = c[9], eps = c[10];
  (void)bc1;
  (void)eps;
  if (R == ADAMW) {
    alignas(64) float r[SUB];
    for (int64_t a = 0; a < n; a += SUB) {
      const int64_t e = std::min(SUB, n - a);
      float *G = g + a, *M = m + a, *V = v + a;
#pragma omp simd
      for (int64_t i = 0; i < e; ++i) {
        float gi = MAX ? -G[i] : G[i];
        float mi = std::fma(gi, cb1, M[i] * b1);
        float vi = std::fma(cb2 * gi, gi, V[i] * b2);
        M[i] = mi;
        V[i] = vi;
        r[i] = AUTH ? vi : vi / bc2;
      }
      sqrt_n(r, e);
#pragma omp simd
      for (int64_t i = 0; i < e; ++i) {
        float gi = MAX ? -G[i] : G[i];
        key[a + i] = key_of(adamw_u(M[i], r[i], c, AUTH) * gi);
      }
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float gi = MAX ? -g[i] : g[i];
      float u = sign_keep_nan(std::fma(gi, cb1, m[i] * b1));
      key[i] = key_of(u * gi);
    }
  }
}

template <int R, bool MAX, bool AUTH>
void score_t(const Ptrs& P, int32_t* keys, const std::vector<int64_t>& off, const std::vector<int64_t>& L, const float* C) {
  auto items = items_of(L);
  for_items(items, [&](const Item& it) {
    const int64_t a = it.a, i = it.piece;
    score_block<R, MAX, AUTH>(P.g[i] + a, P.m[i] + a, R == ADAMW ? P.v[i] + a : nullptr, keys + off[i] + a, it.b - a, C + NC * i);
  });
}

// ------------------------------------------------------------------------------- phase 3
template <int R, bool MAX, bool AUTH>
void apply_block(float* __restrict p, float* __restrict g, float* __restrict m, float* __restrict v, const int32_t* __restrict key,
                 int64_t n, int32_t t, const float* c) {
  const float b1 = c[0], cb1 = c[1], b2 = c[2], cb2 = c[3], al = c[4], ga = c[5], dec = c[6], lr = c[7];
  if (R == ADAMW) {
    alignas(64) float r[SUB];
    for (int64_t a = 0; a < n; a += SUB) {
      const int64_t e = std::min(SUB, n - a);
      float *P = p + a, *M = m + a, *V = v + a;
      const int32_t* KK = key + a;
#pragma omp simd
      for (int64_t i = 0; i < e; ++i) r[i] = AUTH ? V[i] : V[i] / c[9];
      sqrt_n(r, e);
#pragma omp simd
      for (int64_t i = 0; i < e; ++i) {
        float u = adamw_u(M[i], r[i], c, AUTH);
        float phi = KK[i] >= t ? al : ga;
        P[i] = P[i] * dec - (u * phi) * lr;
      }
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float gi = MAX ? -g[i] : g[i];
      float u = sign_keep_nan(std::fma(gi, cb1, m[i] * b1));
      float phi = key[i] >= t ? al : ga;
      p[i] = p[i] * dec - (u * phi) * lr;
      m[i] = std::fma(gi, cb2, m[i] * b2);  // Lion's momentum moves after the step
    }
  }
}

template <int R, bool MAX, bool AUTH>
void apply_t(const Ptrs& P, const int32_t* keys, const std::vector<int64_t>& off, const std::vector<int64_t>& L, const int64_t* t,
             const float* C) {
  auto items = items_of(L);
  for_items(items, [&](const Item& it) {
    const int64_t a = it.a, i = it.piece;
    apply_block<R, MAX, AUTH>(P.p[i] + a, P.g[i] + a, P.m[i] + a, R == ADAMW ? P.v[i] + a : nullptr, keys + off[i] + a, it.b - a,
                              (int32_t)t[i], C + NC * i);
  });
}

// ------------------------------------------------------------------------------ cautious
template <int R, bool MAX, bool AUTH>
void cautious_block(float* __restrict p, float* __restrict g, float* __restrict m, float* __restrict v, int64_t n, const float* c) {
  const float b1 = c[0], cb1 = c[1], b2 = c[2], cb2 = c[3], al = c[4], ga = c[5], dec = c[6], lr = c[7];
  // phi = alpha where s > 0 (authors: s >= 0); NaN: gamma
  if (R == ADAMW) {
    alignas(64) float r[SUB];
    for (int64_t a = 0; a < n; a += SUB) {
      const int64_t e = std::min(SUB, n - a);
      float *P = p + a, *G = g + a, *M = m + a, *V = v + a;
#pragma omp simd
      for (int64_t i = 0; i < e; ++i) {
        float gi = MAX ? -G[i] : G[i];
        float mi = std::fma(gi, cb1, M[i] * b1);
        float vi = std::fma(cb2 * gi, gi, V[i] * b2);
        M[i] = mi;
        V[i] = vi;
        r[i] = AUTH ? vi : vi / c[9];
      }
      sqrt_n(r, e);
#pragma omp simd
      for (int64_t i = 0; i < e; ++i) {
        float gi = MAX ? -G[i] : G[i];
        float u = adamw_u(M[i], r[i], c, AUTH);
        float s = u * gi;
        float phi = (AUTH ? (s >= 0.0f) : (s > 0.0f)) ? al : ga;
        P[i] = P[i] * dec - (u * phi) * lr;
      }
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float gi = MAX ? -g[i] : g[i];
      float u = sign_keep_nan(std::fma(gi, cb1, m[i] * b1));
      float s = u * gi;
      float phi = (AUTH ? (s >= 0.0f) : (s > 0.0f)) ? al : ga;
      p[i] = p[i] * dec - (u * phi) * lr;
      m[i] = std::fma(gi, cb2, m[i] * b2);
    }
  }
}

template <int R, bool MAX, bool AUTH>
void cautious_t(const Ptrs& P, const std::vector<int64_t>& L, const float* C) {
  auto items = items_of(L);
  for_items(items, [&](const Item& it) {
    const int64_t a = it.a, i = it.piece;
    cautious_block<R, MAX, AUTH>(P.p[i] + a, P.g[i] + a, P.m[i] + a, R == ADAMW ? P.v[i] + a : nullptr, it.b - a, C + NC * i);
  });
}

#define DISPATCH(FN, ...)                                              \
  do {                                                                 \
    if (rule == ADAMW) {                                               \
      if (maximize) {                                                  \
        if (authors) FN<ADAMW, true, true>(__VA_ARGS__);               \
        else FN<ADAMW, true, false>(__VA_ARGS__);                      \
      } else {                                                         \
        if (authors) FN<ADAMW, false, true>(__VA_ARGS__);              \
        else FN<ADAMW, false, false>(__VA_ARGS__);                     \
      }                                                                \
    } else {                                                           \
      if (maximize) {                                                  \
        if (authors) FN<LION, true, true>(__VA_ARGS__);                \
        else FN<LION, true, false>(__VA_ARGS__);                       \
      } else {                                                         \
        if (authors) FN<LION, false, true>(__VA_ARGS__);               \
        else FN<LION, false, false>(__VA_ARGS__);                      \
      }                                                                \
    }                                                                  \
  } while (0)

at::Tensor consts_ok(const at::Tensor& c, int64_t pieces) {
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == pieces * NC, "mgup_cpu: consts [pieces, 11] float32");
  return c;
}

void score(int64_t rule, std::vector<at::Tensor> g, std::vector<at::Tensor> m, std::vector<at::Tensor> v, at::Tensor keys,
           std::vector<int64_t> off, at::Tensor consts, bool maximize, bool authors) {
  TORCH_CHECK(keys.scalar_type() == at::kInt && keys.is_contiguous(), "mgup_cpu: int32 keys expected");
  Ptrs P;
  P.g = ptrs(g);
  P.m = ptrs(m);
  if (rule == ADAMW) P.v = ptrs(v);
  auto L = lens(g);
  const float* C = consts_ok(consts, (int64_t)g.size()).data_ptr<float>();
  int32_t* K = keys.data_ptr<int32_t>();
  DISPATCH(score_t, P, K, off, L, C);
}

void apply(int64_t rule, std::vector<at::Tensor> p, std::vector<at::Tensor> g, std::vector<at::Tensor> m, std::vector<at::Tensor> v,
           at::Tensor keys, std::vector<int64_t> off, at::Tensor t, at::Tensor consts, bool maximize, bool authors) {
  TORCH_CHECK(keys.scalar_type() == at::kInt && keys.is_contiguous(), "mgup_cpu: int32 keys expected");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() == (int64_t)p.size(), "mgup_cpu: t [pieces] int64");
  Ptrs P;
  P.p = ptrs(p);
  P.g = ptrs(g);
  P.m = ptrs(m);
  if (rule == ADAMW) P.v = ptrs(v);
  auto L = lens(p);
  const float* C = consts_ok(consts, (int64_t)p.size()).data_ptr<float>();
  DISPATCH(apply_t, P, keys.data_ptr<int32_t>(), off, L, t.data_ptr<int64_t>(), C);
}

void cautious(int64_t rule, std::vector<at::Tensor> p, std::vector<at::Tensor> g, std::vector<at::Tensor> m, std::vector<at::Tensor> v,
              at::Tensor consts, bool maximize, bool authors) {
  Ptrs P;
  P.p = ptrs(p);
  P.g = ptrs(g);
  P.m = ptrs(m);
  if (rule == ADAMW) P.v = ptrs(v);
  auto L = lens(p);
  const float* C = consts_ok(consts, (int64_t)p.size()).data_ptr<float>();
  DISPATCH(cautious_t, P, L, C);
}

// ------------------------------------------------------------------------------- phase 2
// The exact K-th largest key of every unit (a contiguous range of the keys), then the
// ties at it resolved to the lower index: of the keys equal to the K-th, the first
// K - #(key > t) stay, the later ones are lowered by one, so that afterwards
// ``key >= t`` selects exactly K.
//
// Large units (Floyd-Rivest): the sorted keys at fixed sample positions give a bracket
// [lo, hi] around the K-th key's rank (+-4 standard deviations of the sample rank); one
// pass over the keys counts #(key > hi) and collects the keys in [lo, hi] (~3 %); the K-th
// key is found among those.  A bracket that misses falls back to a selection on a full
// copy: the result is exact either way.  Small units: a selection on a copy, one unit per
// thread.

constexpr int64_t SBLK = 1 << 16;  // elements per work item of the counting passes

template <typename K>
struct Found {
  K t;
  int64_t above, eq;
};

template <typename K>
Found<K> kth_by_copy(const K* a, int64_t n, int64_t k, std::vector<K>& buf) {
  buf.assign(a, a + n);
  std::nth_element(buf.begin(), buf.begin() + (n - k), buf.end());
  K t = buf[n - k];
  int64_t above = 0, eq = 0;
  for (int64_t i = 0; i < n; ++i) {
    above += a[i] > t;
    eq += a[i] == t;
  }
  return {t, above, eq};
}

// #(a > hi), #(lo <= a <= hi), and (want) the keys in [lo, hi] appended to out
template <typename K>
void count_block(const K* a, int64_t n, K lo, K hi, bool want, int64_t& gt, int64_t& in, std::vector<K>& out) {
  int64_t c_gt = 0, c_in = 0, i = 0;
#if defined(__AVX512F__)
  if (sizeof(K) == 4) {
    const int32_t* x = reinterpret_cast<const int32_t*>(a);
    __m512i vlo = _mm512_set1_epi32((int32_t)lo), vhi = _mm512_set1_epi32((int32_t)hi);
    // compress into a per-thread block buffer (reused: no fresh pages), then copy the few kept
    thread_local std::vector<int32_t> tmp;
    if (want && (int64_t)tmp.size() < n + 16) tmp.resize(n + 16);  // + one vector: the stores write 16 lanes
    int32_t* dst = want ? tmp.data() : nullptr;
    int64_t j = 0;
    for (; i + 16 <= n; i += 16) {
      __m512i k = _mm512_loadu_si512(x + i);
      __mmask16 g = _mm512_cmpgt_epi32_mask(k, vhi);
      __mmask16 b = _mm512_mask_cmpge_epi32_mask(_mm512_cmpge_epi32_mask(k, vlo), vhi, k);
      c_gt += __builtin_popcount(g);
      int nb = __builtin_popcount(b);
      c_in += nb;
      if (want && nb) {
        _mm512_storeu_si512(dst + j, _mm512_maskz_compress_epi32(b, k));
        j += nb;
      }
    }
    for (; i < n; ++i) {
      int32_t k = x[i];
      c_gt += k > (int32_t)hi;
      bool b = k >= (int32_t)lo && k <= (int32_t)hi;
      c_in += b;
      if (want && b) dst[j++] = k;
    }
    if (want) out.insert(out.end(), reinterpret_cast<K*>(dst), reinterpret_cast<K*>(dst) + j);
    gt += c_gt;
    in += c_in;
    return;
  }
#endif
  for (; i < n; ++i) {
    K k = a[i];
    c_gt += k > hi;
    bool b = k >= lo && k <= hi;
    c_in += b;
    if (want && b) out.push_back(k);
  }
  gt += c_gt;
  in += c_in;
}

// lower the ties at t after the first ``need`` (lowest index) by one, in parallel
template <typename K>
void lower_ties(K* a, int64_t n, K t, int64_t need) {
  const int64_t nb = (n + SBLK - 1) / SBLK;
  std::vector<int64_t> cnt(nb + 1, 0);
  par_for(nb, n, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const K* x = a + b * SBLK;
      int64_t e = std::min(SBLK, n - b * SBLK), c = 0;
      for (int64_t i = 0; i < e; ++i) c += x[i] == t;
      cnt[b + 1] = c;
    }
  });
  for (int64_t b = 0; b < nb; ++b) cnt[b + 1] += cnt[b];
  par_for(nb, n, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (cnt[b + 1] <= need) continue;
      int64_t keep = std::max<int64_t>(0, need - cnt[b]);
      K* x = a + b * SBLK;
      int64_t e = std::min(SBLK, n - b * SBLK);
      for (int64_t i = 0; i < e; ++i) {
        if (x[i] == t) {
          if (keep > 0) --keep;
          else x[i] = t - 1;
        }
      }
    }
  });
}

template <typename K>
void lower_ties_serial(K* a, int64_t n, K t, int64_t need) {
  for (int64_t i = 0; i < n; ++i)
    if (a[i] == t) {
      if (need > 0) --need;
      else a[i] = t - 1;
    }
}

template <typename K>
at::Tensor select_t(at::Tensor keys, const std::vector<int64_t>& off, const std::vector<int64_t>& len, const std::vector<int64_t>& ks,
                    const std::vector<at::Tensor>& samples, int64_t small_unit) {
  const int64_t U = (int64_t)off.size();
  K* base = keys.data_ptr<K>();
  at::Tensor out = at::full({U}, (int64_t)std::numeric_limits<K>::max(), at::kLong);
  int64_t* T = out.data_ptr<int64_t>();
  std::vector<int64_t> small, big;
  for (int64_t u = 0; u < U; ++u) {
    if (ks[u] == 0 || len[u] == 0) continue;  // nothing selected: the threshold stays the largest key
    (len[u] <= small_unit || ks[u] == len[u] ? small : big).push_back(u);
  }
  // small units: one per thread at a time
  int64_t small_work = 0;
  for (int64_t u : small) small_work += len[u];
  par_for((int64_t)small.size(), small_work, [&](int64_t s0, int64_t s1) {
    std::vector<K> buf;
    for (int64_t s = s0; s < s1; ++s) {
      int64_t u = small[s];
      K* a = base + off[u];
      auto f = kth_by_copy<K>(a, len[u], ks[u], buf);
      int64_t need = ks[u] - f.above;
      if (f.eq > need) lower_ties_serial<K>(a, len[u], f.t, need);
      T[u] = (int64_t)f.t;
    }
  });
  for (int64_t bi = 0; bi < (int64_t)big.size(); ++bi) {
    int64_t u = big[bi];
    K* a = base + off[u];
    const int64_t n = len[u], k = ks[u];
    const at::Tensor& si = samples[bi];
    const int64_t S = si.numel();
    const int64_t* idx = si.data_ptr<int64_t>();
    std::vector<K> s(S);
    for (int64_t j = 0; j < S; ++j) s[j] = a[idx[j]];
    const int64_t r = n - k;  // ascending rank of the K-th largest
    const double p = (double)r / (double)n;
    const int64_t js = (int64_t)((__int128)r * S / n);
    const int64_t margin = (int64_t)(4.0 * std::sqrt(S * p * (1 - p))) + 8;
    // the sample's order statistics js -+ margin (two selections instead of a sort)
    K lo = std::numeric_limits<K>::min(), hi = std::numeric_limits<K>::max();
    if (js - margin >= 0) {
      std::nth_element(s.begin(), s.begin() + (js - margin), s.end());
      lo = s[js - margin];
    }
    if (js + margin < S) {
      auto from = js - margin >= 0 ? s.begin() + (js - margin) : s.begin();
      std::nth_element(from, s.begin() + (js + margin), s.end());
      hi = s[js + margin];
    }
    const bool want = lo != hi;
    const int64_t nb = (n + SBLK - 1) / SBLK;
    std::vector<int64_t> gts(nb, 0), ins(nb, 0);
    std::vector<std::vector<K>> cands(nb);
    par_for(nb, n, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t e = std::min(SBLK, n - b * SBLK);
        count_block<K>(a + b * SBLK, e, lo, hi, want, gts[b], ins[b], cands[b]);
      }
    });
    int64_t c_gt = 0, c_in = 0;
    for (int64_t b = 0; b < nb; ++b) {
      c_gt += gts[b];
      c_in += ins[b];
    }
    Found<K> f;
    if (c_gt < k && k <= c_gt + c_in) {  // the K-th key lies in [lo, hi]
      const int64_t kk = k - c_gt;      // its place among the keys in the bracket, from the top
      if (want) {
        std::vector<K> cand;
        cand.reserve(c_in);
        for (auto& c : cands) cand.insert(cand.end(), c.begin(), c.end());
        std::nth_element(cand.begin(), cand.begin() + (c_in - kk), cand.end());
        K t = cand[c_in - kk];
        int64_t above = c_gt, eq = 0;
        for (K x : cand) {
          above += x > t;
          eq += x == t;
        }
        f = {t, above, eq};
      } else {
        f = {lo, c_gt, c_in};
      }
    } else {  // the sample missed: exact anyway
      std::vector<K> buf;
      f = kth_by_copy<K>(a, n, k, buf);
    }
    int64_t need = k - f.above;
    if (f.eq > need) lower_ties<K>(a, n, f.t, need);
    T[u] = (int64_t)f.t;
  }
  return out;
}

at::Tensor select_units(at::Tensor keys, std::vector<int64_t> off, std::vector<int64_t> len, std::vector<int64_t> ks,
                  std::vector<at::Tensor> samples, int64_t small_unit) {
  TORCH_CHECK(keys.is_contiguous(), "mgup_cpu: contiguous keys expected");
  if (keys.scalar_type() == at::kInt) return select_t<int32_t>(keys, off, len, ks, samples, small_unit);
  TORCH_CHECK(keys.scalar_type() == at::kLong, "mgup_cpu: int32 or int64 keys expected");
  return select_t<int64_t>(keys, off, len, ks, samples, small_unit);
}

// ----------------------------------------------------------- top-K without a key buffer
// For units held whole on this rank (each a piece of the chunk): the keys are never
// stored.  Phase 1 updates the moments and counts, per large unit, the top 12 bits of
// every key (4096 bins); phase 2 recomputes the keys of the bin that holds the K-th key
// (a second read of g, m, v) and finds the K-th key and the tie cut-off among them; phase
// 3 recomputes the key of every element beside its update.  The K-th key ``t`` and the
// cut-off ``cut`` (an index in the unit) define the selection exactly as the reference:
// selected  <=>  key > t  or  (key == t and index < cut)   (ties: the lower index wins).
// Bytes an element (fp32 AdamW): 20 + 12 + 20, and no scratch of 4 bytes an element to
// hold between steps or to fault in fresh.

constexpr int HBITS = 12, HBINS = 1 << HBITS, HSHIFT = 32 - HBITS;

// keys of n elements (n <= SUB) into out, from the state after phase 1 (AdamW: m, v
// updated; Lion: m before its late update)
// FAST: the correctly rounded sqrt instead of torch's (see sqrt_n): keys within NEAR of the
// exact ones, for filtering only
template <int R, bool MAX, bool AUTH, bool FAST = false>
inline void keys_sub(const float* __restrict g, const float* __restrict m, const float* __restrict v, int64_t n, const float* c,
                     int32_t* __restrict out) {
  if (R == ADAMW) {
    alignas(64) float r[SUB];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) r[i] = AUTH ? v[i] : v[i] / c[9];
    if (FAST) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) r[i] = std::sqrt(r[i]);
    } else {
      sqrt_n(r, n);
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float gi = MAX ? -g[i] : g[i];
      out[i] = key_of(adamw_u(m[i], r[i], c, AUTH) * gi);
    }
  } else {
    const float b1 = c[0], cb1 = c[1];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float gi = MAX ? -g[i] : g[i];
      out[i] = key_of(sign_keep_nan(std::fma(gi, cb1, m[i] * b1)) * gi);
    }
  }
}

// per piece: 4096 bin counts of its keys' top bits (only pieces marked ``hist``)
template <int R, bool MAX, bool AUTH>
void topk_score_t(const Ptrs& P, const std::vector<int64_t>& L, const float* C, const std::vector<bool>& hist, int64_t* H) {
  auto items = items_of(L);
  int64_t work = 0;
  for (int64_t l : L) work += l;
  par_for((int64_t)items.size(), work, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> h(2 * HBINS, 0);  // two interleaved histograms: fewer store-to-load stalls on a hot bin
    int64_t cur = -1;
    auto flush = [&]() {
      if (cur < 0) return;
      int64_t* dst = H + cur * HBINS;
      for (int b = 0; b < HBINS; ++b) {
        int32_t c2 = h[b] + h[HBINS + b];
        if (c2) __atomic_fetch_add(dst + b, (int64_t)c2, __ATOMIC_RELAXED);
      }
      std::fill(h.begin(), h.end(), 0);
    };
    alignas(64) int32_t kk[SUB];
    for (int64_t it = i0; it < i1; ++it) {
      const Item& I = items[it];
      const int64_t i = I.piece;
      const float* c = C + NC * i;
      float *g = P.g[i], *m = P.m[i], *v = R == ADAMW ? P.v[i] : nullptr;
      if (hist[i] && i != cur) {
        flush();
        cur = i;
      }
      for (int64_t a = I.a; a < I.b; a += SUB) {
        const int64_t e = std::min(SUB, I.b - a);
        if (R == ADAMW) {
          const float b1 = c[0], cb1 = c[1], b2 = c[2], cb2 = c[3];
          float *G = g + a, *M = m + a, *V = v + a;
#pragma omp simd
          for (int64_t j = 0; j < e; ++j) {
            float gi = MAX ? -G[j] : G[j];
            M[j] = std::fma(gi, cb1, M[j] * b1);
            V[j] = std::fma(cb2 * gi, gi, V[j] * b2);
          }
        }
        if (!hist[i]) continue;
        keys_sub<R, MAX, AUTH>(g + a, m + a, R == ADAMW ? v + a : nullptr, e, c, kk);
        int64_t j = 0;
        for (; j + 2 <= e; j += 2) {
          ++h[(kk[j] >> HSHIFT) + HBINS / 2];
          ++h[HBINS + (kk[j + 1] >> HSHIFT) + HBINS / 2];
        }
        for (; j < e; ++j) ++h[(kk[j] >> HSHIFT) + HBINS / 2];
      }
    }
    flush();
  });
}

// the largest digit b with #(digit >= b) >= k; k_new = k - #(digit > b)  (radix.choose_digit)
inline int64_t choose(const int64_t* h, int64_t nb, int64_t& k) {
  int64_t above = 0;
  for (int64_t b = nb - 1; b >= 0; --b) {
    if (above + h[b] >= k) {
      k -= above;
      return b;
    }
    above += h[b];
  }
  k -= above;
  return 0;
}

template <int R, bool MAX, bool AUTH>
struct Unit {
  const float *g, *m, *v;
  int64_t n;
  const float* c;
  // f(index of the first element, keys of up to SUB elements, count) over blocks of the unit, in parallel
  template <typename F>
  void blocks(F&& f) const {
    const int64_t nb = (n + BLK - 1) / BLK;
    par_for(nb, n, [&](int64_t b0, int64_t b1) {
      alignas(64) int32_t kk[SUB];
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t a = b * BLK; a < std::min(n, (b + 1) * BLK); a += SUB) {
          const int64_t e = std::min(SUB, n - a);
          keys_sub<R, MAX, AUTH>(g + a, m + a, R == ADAMW ? v + a : nullptr, e, c, kk);
          f(b, a, kk, e);
        }
    });
  }
};

// (t, cut) of a small unit: its keys in a buffer, a selection on a copy
template <int R, bool MAX, bool AUTH>
void small_unit(const Unit<R, MAX, AUTH>& U, int64_t k, int64_t* tc, std::vector<int32_t>& A, std::vector<int32_t>& B) {
  const int64_t n = U.n;
  A.resize(n);
  for (int64_t a = 0; a < n; a += SUB) keys_sub<R, MAX, AUTH>(U.g + a, U.m + a, R == ADAMW ? U.v + a : nullptr, std::min(SUB, n - a), U.c, A.data() + a);
  B.assign(A.begin(), A.end());
  std::nth_element(B.begin(), B.begin() + (n - k), B.end());
  const int32_t t = B[n - k];
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) above += A[i] > t;
  int64_t need = k - above, cut = n;
  for (int64_t i = 0; i < n; ++i)
    if (A[i] == t && need-- == 0) {
      cut = i;
      break;
    }
  tc[0] = t;
  tc[1] = cut;
}

// The keys whose FAST key lies within NEAR of the bin [lo, hi] (and every huge or NaN one) are
// recomputed exactly.  Why NEAR suffices: torch's sqrt (MKL, high accuracy) is within one ulp
// of the correctly rounded sqrt, and r = sqrt(.) is a normal float (the sqrt of the smallest
// float32 is ~4e-23); every later operation (+eps, m/d, /bc1, *g) is monotone and moves a
// one-ulp difference by at most one more ulp, so the two keys differ by a few units of the
// key's last place; NEAR = 256 leaves a wide margin.  Overflow to inf (only with eps = 0 and
// a vanishing v) is caught by the huge-or-NaN test.
constexpr int64_t NEAR = 256, HUGE_KEY = 0x71000000;  // |s| >~ 6e29, inf and NaN

template <int R, bool MAX, bool AUTH>
void collect_block(const Unit<R, MAX, AUTH>& U, int64_t a0, int64_t a1, int64_t prefix, int shift, std::vector<int32_t>& ck,
                   std::vector<int64_t>& ci) {
  const int64_t lo = prefix * (int64_t(1) << shift), hi = lo + (int64_t(1) << shift) - 1;
  alignas(64) int32_t kk[SUB];
  alignas(64) float gg[SUB], mm[SUB], vv[SUB];
  alignas(64) int32_t ex[SUB];
  alignas(64) int32_t near[SUB + 16];  // offsets in the sub-block of the keys to recompute
  const int32_t flo = (int32_t)std::max<int64_t>(lo - NEAR, std::numeric_limits<int32_t>::min());
  const int32_t fhi = (int32_t)std::min<int64_t>(hi + NEAR, std::numeric_limits<int32_t>::max());
  for (int64_t a = a0; a < a1; a += SUB) {
    const int64_t e = std::min(SUB, a1 - a);
    keys_sub<R, MAX, AUTH, true>(U.g + a, U.m + a, R == ADAMW ? U.v + a : nullptr, e, U.c, kk);
    int64_t nn = 0, j = 0;
#if defined(__AVX512F__)
    const __m512i vlo = _mm512_set1_epi32(flo), vhi = _mm512_set1_epi32(fhi), vH = _mm512_set1_epi32((int32_t)HUGE_KEY),
                  vnH = _mm512_set1_epi32(-(int32_t)HUGE_KEY), step = _mm512_set1_epi32(16);
    __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= e; j += 16) {
      __m512i k = _mm512_load_si512(kk + j);
      __mmask16 mk = _mm512_mask_cmple_epi32_mask(_mm512_cmpge_epi32_mask(k, vlo), k, vhi) | _mm512_cmpgt_epi32_mask(k, vH) |
                     _mm512_cmplt_epi32_mask(k, vnH);
      // compress in a register, then a plain store (a compressing store is microcoded on some CPUs)
      _mm512_storeu_si512(near + nn, _mm512_maskz_compress_epi32(mk, pos));
      nn += __builtin_popcount(mk);
      pos = _mm512_add_epi32(pos, step);
    }
#endif
    for (; j < e; ++j) {
      const int32_t k = kk[j];
      near[nn] = (int32_t)j;
      nn += (k >= flo && k <= fhi) || k > (int32_t)HUGE_KEY || k < -(int32_t)HUGE_KEY;
    }
    if (!nn) continue;
    for (int64_t q = 0; q < nn; ++q) {
      gg[q] = U.g[a + near[q]];
      mm[q] = U.m[a + near[q]];
      if (R == ADAMW) vv[q] = U.v[a + near[q]];
    }
    keys_sub<R, MAX, AUTH>(gg, mm, vv, nn, U.c, ex);
    for (int64_t q = 0; q < nn; ++q)
      if (((int64_t)ex[q] >> shift) == prefix) {
        ck.push_back(ex[q]);
        ci.push_back(a + near[q]);
      }
  }
}

// (t, cut) from the collected keys of the K-th key's bin (in index order): the kk-th largest
inline void finish_bin(const std::vector<int32_t>& keys, const std::vector<int64_t>& idx, int64_t kk, int64_t n, int64_t* tc) {
  const int64_t c_in = (int64_t)keys.size();
  std::vector<int32_t> sel(keys);
  std::nth_element(sel.begin(), sel.begin() + (c_in - kk), sel.end());
  const int32_t t = sel[c_in - kk];
  int64_t above = 0;
  for (int32_t x : keys) above += x > t;
  int64_t need = kk - above, cut = n;
  for (int64_t j = 0; j < c_in; ++j)
    if (keys[j] == t && need-- == 0) {
      cut = idx[j];
      break;
    }
  tc[0] = t;
  tc[1] = cut;
}

// the keys of a unit whose top bits (above ``shift``) equal ``prefix``, with their indices, in index order
template <int R, bool MAX, bool AUTH>
void collect_all(const Unit<R, MAX, AUTH>& U, int64_t prefix, int shift, std::vector<int32_t>& keys, std::vector<int64_t>& idx) {
  const int64_t nb = (U.n + BLK - 1) / BLK;
  std::vector<std::vector<int32_t>> ck(nb);
  std::vector<std::vector<int64_t>> ci(nb);
  par_for(nb, U.n, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) collect_block<R, MAX, AUTH>(U, b * BLK, std::min(U.n, (b + 1) * BLK), prefix, shift, ck[b], ci[b]);
  });
  for (int64_t b = 0; b < nb; ++b) {
    keys.insert(keys.end(), ck[b].begin(), ck[b].end());
    idx.insert(idx.end(), ci[b].begin(), ci[b].end());
  }
}

// (t, cut) of a large unit from its top-bits histogram
template <int R, bool MAX, bool AUTH>
void big_unit(const Unit<R, MAX, AUTH>& U, int64_t k, const int64_t* h0, int64_t* tc) {
  const int64_t n = U.n, nb = (n + BLK - 1) / BLK;
  int64_t kk = k;
  int64_t prefix = choose(h0, HBINS, kk) - HBINS / 2;  // the K-th key's top 12 bits (signed)
  int64_t cnt = h0[prefix + HBINS / 2];
  int shift = HSHIFT;
  // narrow the prefix by 10-bit digits while the bin is too large to collect
  const int64_t cap = std::max<int64_t>(1 << 18, n / 8);
  while (shift > 0 && cnt > cap) {
    const int w = std::min(10, shift), ns = shift - w;
    const int64_t nbins = 1 << w;
    std::vector<int64_t> hh(nbins, 0);
    std::vector<std::vector<int64_t>> part(nb);
    U.blocks([&](int64_t b, int64_t, const int32_t* x, int64_t e) {
      auto& hp = part[b];
      if (hp.empty()) hp.assign(nbins, 0);
      for (int64_t j = 0; j < e; ++j)
        if (((int64_t)x[j] >> shift) == prefix) ++hp[((int64_t)x[j] >> ns) & (nbins - 1)];
    });
    for (auto& hp : part)
      if (!hp.empty())
        for (int64_t b = 0; b < nbins; ++b) hh[b] += hp[b];
    const int64_t d = choose(hh.data(), nbins, kk);
    cnt = hh[d];
    prefix = (prefix << w) | d;
    shift = ns;
  }
  if (shift == 0) {  // the K-th key is known; its ties: the first kk (lowest index) are selected
    const int32_t t = (int32_t)prefix;
    tc[0] = t;
    if (kk >= cnt) {
      tc[1] = n;
      return;
    }
    std::vector<int64_t> per(nb + 1, 0);
    U.blocks([&](int64_t b, int64_t, const int32_t* x, int64_t e) {
      int64_t c = 0;
      for (int64_t j = 0; j < e; ++j) c += x[j] == t;
      per[b + 1] += c;
    });
    int64_t b = 0, seen = 0;
    while (seen + per[b + 1] <= kk) {  // find the block that holds the (kk+1)-th tie
      seen += per[b + 1];
      ++b;
    }
    int64_t need = kk - seen, cut = n;
    alignas(64) int32_t x[SUB];
    for (int64_t a = b * BLK; a < std::min(n, (b + 1) * BLK) && cut == n; a += SUB) {
      const int64_t e = std::min(SUB, n - a);
      keys_sub<R, MAX, AUTH>(U.g + a, U.m + a, R == ADAMW ? U.v + a : nullptr, e, U.c, x);
      for (int64_t j = 0; j < e; ++j)
        if (x[j] == t && need-- == 0) {
          cut = a + j;
          break;
        }
    }
    tc[1] = cut;
    return;
  }
  // the bin is small enough now: collect it
  std::vector<int32_t> keys;
  std::vector<int64_t> idx;
  collect_all(U, prefix, shift, keys, idx);
  finish_bin(keys, idx, kk, n, tc);
}

template <int R, bool MAX, bool AUTH>
void topk_select_t(const Ptrs& P, const std::vector<int64_t>& L, const float* C, const int64_t* H, const std::vector<int64_t>& ks,
                   int64_t small_unit_n, int64_t* TC) {
  const int64_t np = (int64_t)L.size();
  auto unit = [&](int64_t i) {
    return Unit<R, MAX, AUTH>{P.g[i], P.m[i], R == ADAMW ? P.v[i] : nullptr, L[i], C + NC * i};
  };
  // tasks of one parallel region: whole small units, and blocks of the large units whose
  // K-th key's bin is small enough to collect
  struct Task {
    int64_t piece, a, b;  // b < 0: a small unit
  };
  struct Big {
    int64_t piece, kk, prefix;
    int64_t first, last;  // its tasks
  };
  std::vector<Task> tasks;
  std::vector<Big> bigs;
  std::vector<int64_t> heavy;
  for (int64_t i = 0; i < np; ++i) {
    TC[2 * i] = std::numeric_limits<int32_t>::max();  // nothing selected (padding, K = 0)
    TC[2 * i + 1] = 0;
    if (ks[i] <= 0 || L[i] == 0) continue;
    if (ks[i] >= L[i]) {  // everything selected: every key (NaN's too) is above INT_MIN
      TC[2 * i] = std::numeric_limits<int32_t>::min();
      continue;
    }
    if (L[i] <= small_unit_n) {
      tasks.push_back({i, 0, -1});
      continue;
    }
    const int64_t* h = H + HBINS * i;
    int64_t kk = ks[i];
    const int64_t d = choose(h, HBINS, kk);
    const int64_t cap = std::max<int64_t>(1 << 18, L[i] / 8);
    if (h[d] > cap) {  // a crowded bin (many equal keys, e.g. zero gradients): narrowed by more passes
      heavy.push_back(i);
      continue;
    }
    Big B{i, kk, d - HBINS / 2, (int64_t)tasks.size(), 0};
    for (int64_t a = 0; a < L[i]; a += BLK) tasks.push_back({i, a, std::min(L[i], a + BLK)});
    B.last = (int64_t)tasks.size();
    bigs.push_back(B);
  }
  std::vector<std::vector<int32_t>> ck(tasks.size());
  std::vector<std::vector<int64_t>> ci(tasks.size());
  int64_t work = 0;
  for (const Task& T : tasks) work += T.b < 0 ? L[T.piece] : T.b - T.a;
  par_for((int64_t)tasks.size(), work, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> A, B;
    for (int64_t t = t0; t < t1; ++t) {
      const Task& T = tasks[t];
      if (T.b < 0) {
        small_unit<R, MAX, AUTH>(unit(T.piece), ks[T.piece], TC + 2 * T.piece, A, B);
      } else {
        // the bin's prefix is the key's top HBITS bits
        const int64_t prefix = [&] {
          for (const Big& G : bigs)
            if (G.piece == T.piece) return G.prefix;
          return int64_t(0);
        }();
        collect_block<R, MAX, AUTH>(unit(T.piece), T.a, T.b, prefix, HSHIFT, ck[t], ci[t]);
      }
    }
  });
  int64_t cands = 0;
  for (auto& c : ck) cands += (int64_t)c.size();
  par_for((int64_t)bigs.size(), 8 * cands, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Big& G = bigs[b];
      std::vector<int32_t> keys;
      std::vector<int64_t> idx;
      for (int64_t t = G.first; t < G.last; ++t) {
        keys.insert(keys.end(), ck[t].begin(), ck[t].end());
        idx.insert(idx.end(), ci[t].begin(), ci[t].end());
      }
      finish_bin(keys, idx, G.kk, L[G.piece], TC + 2 * G.piece);
    }
  });
  for (int64_t i : heavy) big_unit<R, MAX, AUTH>(unit(i), ks[i], H + HBINS * i, TC + 2 * i);
}

template <int R, bool MAX, bool AUTH>
void topk_apply_block(float* __restrict p, const float* __restrict g, float* __restrict m, const float* __restrict v, int64_t a0,
                      int64_t n, int32_t t, int64_t cut, const float* c) {
  const float b1 = c[0], cb1 = c[1], b2 = c[2], cb2 = c[3], al = c[4], ga = c[5], dec = c[6], lr = c[7];
  alignas(64) float r[SUB];
  for (int64_t a = 0; a < n; a += SUB) {
    const int64_t e = std::min(SUB, n - a);
    float* P = p + a;
    const float* G = g + a;
    float* M = m + a;
    if (R == ADAMW) {
      const float* V = v + a;
#pragma omp simd
      for (int64_t i = 0; i < e; ++i) r[i] = AUTH ? V[i] : V[i] / c[9];
      sqrt_n(r, e);
    }
    const int64_t base = a0 + a;
#pragma omp simd
    for (int64_t i = 0; i < e; ++i) {
      float gi = MAX ? -G[i] : G[i];
      float u = R == ADAMW ? adamw_u(M[i], r[i], c, AUTH) : sign_keep_nan(std::fma(gi, cb1, M[i] * b1));
      int32_t key = key_of(u * gi);
      bool on = key > t || (key == t && base + i < cut);
      float phi = on ? al : ga;
      P[i] = P[i] * dec - (u * phi) * lr;
      if (R == LION) M[i] = std::fma(gi, cb2, M[i] * b2);
    }
  }
}

template <int R, bool MAX, bool AUTH>
void topk_apply_t(const Ptrs& P, const std::vector<int64_t>& L, const float* C, const int64_t* TC) {
  auto items = items_of(L);
  for_items(items, [&](const Item& it) {
    const int64_t a = it.a, i = it.piece;
    topk_apply_block<R, MAX, AUTH>(P.p[i] + a, P.g[i] + a, P.m[i] + a, R == ADAMW ? P.v[i] + a : nullptr, a, it.b - a,
                                   (int32_t)TC[2 * i], TC[2 * i + 1], C + NC * i);
  });
}

at::Tensor topk_score(int64_t rule, std::vector<at::Tensor> g, std::vector<at::Tensor> m, std::vector<at::Tensor> v, at::Tensor consts,
                      std::vector<bool> hist, bool maximize, bool authors) {
  Ptrs P;
  P.g = ptrs(g);
  P.m = ptrs(m);
  if (rule == ADAMW) P.v = ptrs(v);
  auto L = lens(g);
  const float* C = consts_ok(consts, (int64_t)g.size()).data_ptr<float>();
  at::Tensor H = at::zeros({(int64_t)g.size(), HBINS}, at::kLong);
  DISPATCH(topk_score_t, P, L, C, hist, H.data_ptr<int64_t>());
  return H;
}

at::Tensor topk_select(int64_t rule, std::vector<at::Tensor> g, std::vector<at::Tensor> m, std::vector<at::Tensor> v, at::Tensor consts,
                       at::Tensor H, std::vector<int64_t> ks, int64_t small_unit_n, bool maximize, bool authors) {
  Ptrs P;
  P.g = ptrs(g);
  P.m = ptrs(m);
  if (rule == ADAMW) P.v = ptrs(v);
  auto L = lens(g);
  const float* C = consts_ok(consts, (int64_t)g.size()).data_ptr<float>();
  TORCH_CHECK(H.scalar_type() == at::kLong && H.is_contiguous() && H.numel() == (int64_t)g.size() * HBINS, "mgup_cpu: histogram");
  at::Tensor TC = at::empty({(int64_t)g.size(), 2}, at::kLong);
  DISPATCH(topk_select_t, P, L, C, H.data_ptr<int64_t>(), ks, small_unit_n, TC.data_ptr<int64_t>());
  return TC;
}

void topk_apply(int64_t rule, std::vector<at::Tensor> p, std::vector<at::Tensor> g, std::vector<at::Tensor> m, std::vector<at::Tensor> v,
                at::Tensor consts, at::Tensor TC, bool maximize, bool authors) {
  Ptrs P;
  P.p = ptrs(p);
  P.g = ptrs(g);
  P.m = ptrs(m);
  if (rule == ADAMW) P.v = ptrs(v);
  auto L = lens(p);
  const float* C = consts_ok(consts, (int64_t)p.size()).data_ptr<float>();
  TORCH_CHECK(TC.scalar_type() == at::kLong && TC.is_contiguous() && TC.numel() == 2 * (int64_t)p.size(), "mgup_cpu: (t, cut)");
  DISPATCH(topk_apply_t, P, L, C, TC.data_ptr<int64_t>());
}

int64_t num_threads() { return at::get_num_threads(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("score", &score, "phase 1: moments, u, s = u*g -> order keys");
  mod.def("apply", &apply, "phase 3: phi, weight decay, step (Lion: the late momentum)");
  mod.def("cautious", &cautious, "the cautious step in one pass");
  mod.def("select", &select_units, "the exact K-th key per unit, ties to the lower index");
  mod.def("topk_score", &topk_score, "top-K phase 1 without keys: moments and the top-bits histogram of large units");
  mod.def("topk_select", &topk_select, "top-K phase 2 without keys: (K-th key, tie cut-off) per unit");
  mod.def("topk_apply", &topk_apply, "top-K phase 3 without keys: the keys recomputed beside the update");
  mod.def("num_threads", &num_threads, "threads of torch's intra-op pool as the extension sees it");
}
