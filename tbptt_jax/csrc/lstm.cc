// The LSTM layer's two sequential loops, forward and reverse, as XLA custom calls on CPU.
//
// The pure-JAX layer (tbptt_jax/_kernels.py) runs each step as several XLA kernels: one
// matrix product and a few elementwise fusions, each a dispatch of its own, which at small
// sizes costs as much as the arithmetic. Here one call runs every step of a window: per
// step one matrix product for all four gates, and the gate arithmetic on its result while
// it is still in cache. The batch is split between threads, the caller's and helpers from
// XLA's pool (`run_team`): each row's recurrence is independent of the others', so a
// thread runs its rows through every step without waiting for the rest; only where W_hh
// is too big for one core's cache do the threads split the hidden units instead and meet
// once a step (`in_parts`). The weights are packed once per call into the column panels
// the matrix-product kernel streams.
//
// The semantics are the pure-JAX kernel's, which the tests hold this to:
//   forward:  pre = x_proj[t] + bias + h_in @ W_hh^T; i, f, o = sigmoid, g = tanh;
//             c = f * c_in + i * g; h = o * tanh(c); the carry zeroed first where reset[t].
//   outputs:  hs[t], cs[t], and the activations (i, f, g, o) written over x_proj[t].
//   reverse:  from the activations, cs, and the gradients flowing into hs and the final
//             carry: the gate gradients (written over the activations) and the gradient
//             of the carry before step 0. Weight gradients are not formed here: the caller
//             takes them from the gate gradients as single large products.
//
// Every array is row-major; float32 and float64 (the latter with the C library's exp and
// tanh, for the float64 parity tests). Built by tbptt_jax/_native.py with the host's
// compiler; the pure-JAX kernel is the fallback wherever this cannot be built.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vectors of the target's native width, and how many registers it has: AVX-512 (64 bytes,
// 32 registers), AVX/AVX2 (32 bytes, 16), else 16-byte SSE (16) or NEON (32). A wider
// vector than the target's is split by the compiler into several registers each, and the
// micro-kernel's accumulators then spill: with AVX-512's 64 bytes on an AVX2 CPU, the M
// LSTM step ran 5.6x slower than torch's and 3.7x slower than the pure-JAX loops. Moved by
// memcpy: any alignment.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kVectorRegisters = 16;
#elif defined(__aarch64__)
constexpr int kVectorBytes = 16, kVectorRegisters = 32;
#else
constexpr int kVectorBytes = 16, kVectorRegisters = 16;
#endif
typedef float VecF __attribute__((vector_size(kVectorBytes)));
typedef double VecD __attribute__((vector_size(kVectorBytes)));
typedef int32_t VecI __attribute__((vector_size(kVectorBytes)));

template <typename T> struct Simd;
template <> struct Simd<float> {
  using V = VecF;
  static constexpr int kLanes = kVectorBytes / 4;
};
template <> struct Simd<double> {
  using V = VecD;
  static constexpr int kLanes = kVectorBytes / 8;
};

template <typename T> using V = typename Simd<T>::V;
template <typename T> constexpr int kLanes = Simd<T>::kLanes;

template <typename T>
inline V<T> load(const T* p) {
  V<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, V<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// The first n (<= lanes) elements at p, the rest zero; and their store.
template <typename T>
inline V<T> load_n(const T* p, int n) {
  if (n == kLanes<T>) return load(p);
  V<T> v = {};
  std::memcpy(&v, p, sizeof(T) * n);
  return v;
}

template <typename T>
inline void store_n(T* p, V<T> v, int n) {
  if (n == kLanes<T>) return store(p, v);
  std::memcpy(p, &v, sizeof(T) * n);
}

template <typename T>
inline V<T> splat(T x) {
  return V<T>{} + x;
}

// exp, sigmoid and tanh. float32: Cephes' exp and Eigen's rational tanh (XLA's CPU
// functions, within a few ulp), clamped where the result saturates, by comparisons that a
// NaN fails, so that it passes through as in torch; float64: the C library's, lane by lane.
inline VecF exp_f(VecF x) {
  x = x > 88.3762626647949f ? splat(88.3762626647949f) : x;
  x = x < -88.3762626647949f ? splat(-88.3762626647949f) : x;
  VecF fx = x * 1.44269504088896341f + 0.5f;
  VecI n = __builtin_convertvector(fx, VecI);
  VecF nf = __builtin_convertvector(n, VecF);
  nf = nf > fx ? nf - 1.0f : nf;  // floor
  n = __builtin_convertvector(nf, VecI);
  x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  VecF z = x * x;
  VecF y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x +
             4.1665795894e-2f) * x + 1.6666665459e-1f) * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  VecI bits = (n + 127) << 23;
  VecF scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline VecF sigmoid(VecF x) { return 1.0f / (1.0f + exp_f(-x)); }

inline VecF tanh(VecF x) {
  x = x > 9.0f ? splat(9.0f) : x;
  x = x < -9.0f ? splat(-9.0f) : x;
  VecF x2 = x * x;
  VecF p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  p = x * p;
  VecF q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  return p / q;
}

inline VecD sigmoid(VecD x) {
  for (int k = 0; k < kLanes<double>; ++k) x[k] = 1.0 / (1.0 + std::exp(-x[k]));
  return x;
}

inline VecD tanh(VecD x) {
  for (int k = 0; k < kLanes<double>; ++k) x[k] = std::tanh(x[k]);
  return x;
}

// C[M, N] = A[M, K] @ B[K, N], with B packed by `pack` or `pack_transposed`: N a multiple
// of kCols, each kCols-wide column panel contiguous ([N / kCols][K][kCols]), so that the
// micro-kernel streams it.
// Rows of C per micro-kernel at most: 2 * kMaxRows accumulators, 2 panel vectors and a
// broadcast fit in the vector registers (AVX-512's 32: 12 rows; AVX2's 16: 6).
constexpr int kMaxRows = kVectorRegisters >= 32 ? 12 : 6;
template <typename T> constexpr int kCols = 2 * kLanes<T>;  // columns of C per micro-kernel

template <typename T, int R>
inline void micro_kernel(const T* a, int64_t lda, const T* panel, T* c, int64_t ldc,
                         int64_t depth) {
  V<T> acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = V<T>{};
  for (int64_t k = 0; k < depth; ++k) {
    const V<T> b0 = load(panel + k * kCols<T>), b1 = load(panel + k * kCols<T> + kLanes<T>);
    for (int r = 0; r < R; ++r) {
      const T a_rk = a[r * lda + k];
      acc0[r] += a_rk * b0;
      acc1[r] += a_rk * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store(c + r * ldc, acc0[r]);
    store(c + r * ldc + kLanes<T>, acc1[r]);
  }
}

// The micro-kernels for 1..kMaxRows rows, indexed by rows - 1.
template <typename T, int... R>
constexpr auto micro_kernels(std::integer_sequence<int, R...>) {
  return std::array{&micro_kernel<T, R + 1>...};
}

template <typename T>
void matmul(const T* a, int64_t lda, const T* panels, T* c, int64_t ldc, int64_t rows,
            int64_t cols, int64_t depth) {
  // The rows in as few blocks as the registers allow, of near-equal size: each block
  // streams every panel once (10 rows as one block, not 8 + 2; 25 as 9 + 8 + 8).
  static constexpr auto kernels = micro_kernels<T>(std::make_integer_sequence<int, kMaxRows>{});
  const int64_t blocks = (rows + kMaxRows - 1) / kMaxRows;
  for (int64_t j = 0; j < cols; j += kCols<T>) {
    const T* panel = panels + j * depth;
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t i = rows * block / blocks, end = rows * (block + 1) / blocks;
      kernels[end - i - 1](a + i * lda, lda, panel, c + i * ldc + j, ldc, depth);
    }
  }
}

// B's panels for `matmul`, allocated uninitialised: packing writes every element (zeroing
// the 2 MiB first made W_hh's packing at L take about twice as long).
template <typename T>
using Panels = std::unique_ptr<T[]>;

// Packs B[depth, cols] for `matmul`, zero-padded to padded_cols: B[k, n] = b[k * ldb + n].
template <typename T>
Panels<T> pack(const T* b, int64_t ldb, int64_t depth, int64_t cols, int64_t padded_cols) {
  Panels<T> panels(new T[depth * padded_cols]);
  for (int64_t j = 0; j < padded_cols; j += kCols<T>) {
    const int64_t width = std::min<int64_t>(kCols<T>, cols - j);
    for (int64_t k = 0; k < depth; ++k) {
      T* out = &panels[j * depth + k * kCols<T>];
      std::fill(std::copy_n(b + k * ldb + j, width, out), out + kCols<T>, T(0));
    }
  }
  return panels;
}

// The same for B = A^T, with A's rows picked by row(n): B[k, n] = a[row(n) * lda + k].
// Written panel by panel in order, reading the panel's kCols rows of A side by side: a
// column at a time (writes kCols apart) took twice as long (W_hh at L: 1 ms per thread
// and call, against a forward step of ~0.35 ms).
template <typename T, typename Row>
Panels<T> pack_transposed(const T* a, int64_t lda, Row row, int64_t depth, int64_t cols,
                          int64_t padded_cols) {
  Panels<T> panels(new T[depth * padded_cols]);
  for (int64_t j = 0; j < padded_cols; j += kCols<T>) {
    const int64_t width = std::min<int64_t>(kCols<T>, cols - j);
    std::array<const T*, kCols<T>> a_rows;
    for (int64_t n = 0; n < width; ++n) a_rows[n] = a + row(j + n) * lda;
    for (int64_t k = 0; k < depth; ++k) {
      T* out = &panels[j * depth + k * kCols<T>];
      for (int64_t n = 0; n < width; ++n) out[n] = a_rows[n][k];
      std::fill(out + width, out + kCols<T>, T(0));
    }
  }
  return panels;
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A reusable barrier for the threads of one call: spins briefly (a step takes
// microseconds), then yields, so that more threads than cores still make progress.
class Barrier {
 public:
  // Before any thread waits: how many take part.
  void set_threads(int64_t threads) { threads_ = threads; }
  void wait() {
    if (threads_ == 1) return;
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins)
      if (spins > 4000) std::this_thread::yield();
  }

 private:
  int64_t threads_ = 1;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> generation_{0};
};

// What one thread computes: the rows b0..b1 of the batch, the hidden units u0..u1.
struct Part {
  int64_t b0, b1, u0, u1;
};

// W_hh (4H x H elements) beyond this is too big to share one core's cache (2 MiB of L2
// here) with the rest of a step: measured on 2 cores (B = 20-50), the batch split is
// faster at H = 128 and 200 (float32: 256 and 640 KiB), the unit split at H = 256 (1 MiB)
// and 512.
constexpr int64_t kCachedWeightBytes = 768 << 10;

// Where a call's helper threads come from: up to `threads` - 1 tasks handed to `schedule`
// (XLA's intra-op pool, whose idle workers spin for work and so start a task at once; a
// thread of our own had to wait for the scheduler: ~1 ms at M, behind XLA's spinning
// worker, against ~1.5 ms for a whole forward call of 50 steps).
struct Helpers {
  int64_t threads;
  std::function<void(std::function<void()>)> schedule;
};

// How long the caller of parts that meet at a barrier waits for its helpers to start
// before going on without the rest: where none comes (XLA's workers busy, e.g. with the
// other devices' calls under jax-dp), the caller runs alone.
constexpr auto kHelperWait = std::chrono::microseconds(200);

// Runs body(j, n) for the parts j = 0..n-1 of a call, n at most helpers.threads, the
// caller's thread and helpers each running some; prepare(n) first. Parts that never wait
// for each other (`independent`) are n = helpers.threads, taken in turn by whichever
// thread is free, the caller included: a helper that starts late takes what is left, or
// nothing. Parts that meet at a barrier need a thread each: n is the caller and the
// helpers that started within kHelperWait. A helper that comes after that, or that the
// pool runs inline on the caller's thread, returns at once (the team outlives the call
// for it).
template <typename Prepare, typename Body>
void run_team(const Helpers& helpers, bool independent, Prepare prepare, Body body) {
  struct Team {
    std::mutex mutex;
    bool closed = false;
    int64_t started = 0;             // helpers, for parts with a barrier
    std::atomic<int64_t> size{0};    // n, once decided
    std::atomic<int64_t> next{1};    // the next part to take, for independent parts
    std::atomic<int64_t> done{0};    // parts finished by helpers
    std::thread::id caller = std::this_thread::get_id();
    std::function<void(int64_t, int64_t)> body;
  };
  const auto team = std::make_shared<Team>();
  team->body = body;
  if (independent) {
    prepare(helpers.threads);
    team->size.store(helpers.threads, std::memory_order_release);
  }
  for (int64_t k = 1; k < helpers.threads; ++k) {
    helpers.schedule([team, independent] {
      if (std::this_thread::get_id() == team->caller) return;
      int64_t n;
      if (independent) {
        n = team->size.load(std::memory_order_acquire);
        for (int64_t j; (j = team->next.fetch_add(1)) < n;) {
          team->body(j, n);
          team->done.fetch_add(1, std::memory_order_acq_rel);
        }
        return;
      }
      int64_t j;
      {
        std::lock_guard<std::mutex> lock(team->mutex);
        if (team->closed) return;
        j = ++team->started;
      }
      while ((n = team->size.load(std::memory_order_acquire)) == 0) std::this_thread::yield();
      team->body(j, n);
      team->done.fetch_add(1, std::memory_order_acq_rel);
    });
  }
  int64_t n = helpers.threads, by_caller = 1;
  if (!independent) {
    const auto deadline = std::chrono::steady_clock::now() + kHelperWait;
    for (;;) {
      std::lock_guard<std::mutex> lock(team->mutex);
      if (team->started == helpers.threads - 1 || std::chrono::steady_clock::now() > deadline) {
        team->closed = true;
        n = 1 + team->started;
        break;
      }
    }
    prepare(n);
    team->size.store(n, std::memory_order_release);
  }
  body(int64_t{0}, n);
  if (independent) {
    for (int64_t j; (j = team->next.fetch_add(1)) < n; ++by_caller) body(j, n);
  }
  while (team->done.load(std::memory_order_acquire) < n - by_caller) std::this_thread::yield();
}

// Runs body(part, barrier) on up to helpers.threads threads (the caller one of them). Each
// row's recurrence is independent of the others', so the threads split the batch and never
// wait for each other, unless the weights are too big for that: each thread would then
// stream all of W_hh from memory at every step. They then split the hidden units (each
// thread reads only its units' weights) and meet at `barrier` once a step: after writing
// their part of what the next product reads whole (h forward, the gate gradients in
// reverse). Split by batch, the barrier is a no-op.
template <typename T, typename Body>
void in_parts(const Helpers& helpers, int64_t batch, int64_t hidden, Body body) {
  const int64_t chunks = (hidden + kLanes<T> - 1) / kLanes<T>;
  const bool by_units = 4 * hidden * hidden * int64_t(sizeof(T)) > kCachedWeightBytes;
  const Helpers team{std::max<int64_t>(1, std::min(helpers.threads, by_units ? chunks : batch)),
                     helpers.schedule};
  Barrier barrier;
  run_team(team, !by_units, [&](int64_t n) { barrier.set_threads(by_units ? n : 1); },
           [&](int64_t j, int64_t n) {
             auto unit = [&](int64_t k) { return std::min(hidden, chunks * k / n * kLanes<T>); };
             body(by_units ? Part{0, batch, unit(j), unit(j + 1)}
                           : Part{batch * j / n, batch * (j + 1) / n, 0, hidden},
                  barrier);
           });
}

template <typename T>
void lstm_forward(const Helpers& helpers, int64_t steps, int64_t batch, int64_t hidden,
                  T* x_acts, const T* w_hh, const T* bias, const T* h0, const T* c0,
                  const bool* resets, T* hs, T* cs) {
  const int64_t gates = 4 * hidden;
  in_parts<T>(helpers, batch, hidden, [&](Part part, Barrier& barrier) {
    const int64_t rows = part.b1 - part.b0, units = part.u1 - part.u0;
    const int64_t cols = round_up(4 * units, kCols<T>);
    // W_hh^T's columns, gate by gate those of units u0..u1: column g * units + u is
    // the weights into gate g of unit u0 + u, row g * H + u0 + u of W_hh.
    const auto w_hh_row = [&](int64_t n) { return n / units * hidden + part.u0 + n % units; };
    const Panels<T> w_t = pack_transposed(w_hh, hidden, w_hh_row, hidden, 4 * units, cols);
    std::vector<T> h_in(rows * hidden), pre(rows * cols);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t step = t * batch, prev = (t - 1) * batch;
      const bool* reset = resets + step;
      for (int64_t b = part.b0; b < part.b1; ++b) {
        T* h_in_b = &h_in[(b - part.b0) * hidden];
        if (reset[b]) std::fill_n(h_in_b, hidden, T(0));
        else std::copy_n(t == 0 ? h0 + b * hidden : hs + (prev + b) * hidden, hidden, h_in_b);
      }
      matmul<T>(h_in.data(), hidden, w_t.get(), pre.data(), cols, rows, cols, hidden);
      for (int64_t b = part.b0; b < part.b1; ++b) {
        T* row = x_acts + (step + b) * gates;
        const T* pre_b = &pre[(b - part.b0) * cols];
        const T* c_prev = t == 0 ? c0 + b * hidden : cs + (prev + b) * hidden;
        for (int64_t u = 0; u < units; u += kLanes<T>) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes<T>, units - u));
          const int64_t at = part.u0 + u;
          V<T> act[4];
          for (int g = 0; g < 4; ++g)
            act[g] = load_n(pre_b + g * units + u, n) + load_n(row + g * hidden + at, n) +
                     load_n(bias + g * hidden + at, n);
          act[0] = sigmoid(act[0]);
          act[1] = sigmoid(act[1]);
          act[2] = tanh(act[2]);
          act[3] = sigmoid(act[3]);
          const V<T> c_in = reset[b] ? V<T>{} : load_n(c_prev + at, n);
          const V<T> c = act[1] * c_in + act[0] * act[2];
          store_n(cs + (step + b) * hidden + at, c, n);
          store_n(hs + (step + b) * hidden + at, act[3] * tanh(c), n);
          for (int g = 0; g < 4; ++g) store_n(row + g * hidden + at, act[g], n);
        }
      }
      barrier.wait();  // h[t] whole before any thread reads it
    }
  });
}

template <typename T>
void lstm_backward(const Helpers& helpers, int64_t steps, int64_t batch, int64_t hidden,
                   T* acts_dgates, const T* w_hh, const T* cs, const T* c0, const bool* resets,
                   const T* dhs, const T* dh_last, const T* dc_last, T* dh0, T* dc0) {
  const int64_t gates = 4 * hidden;
  in_parts<T>(helpers, batch, hidden, [&](Part part, Barrier& barrier) {
    const int64_t rows = part.b1 - part.b0, units = part.u1 - part.u0;
    const int64_t cols = round_up(units, kCols<T>);
    const Panels<T> w = pack(w_hh + part.u0, hidden, gates, units, cols);  // units u0..u1
    // dh and dc flowing back into the step being processed, then out of it.
    std::vector<T> dh(rows * units), dc(rows * units), dh_prev(rows * cols);
    for (int64_t b = part.b0; b < part.b1; ++b) {
      std::copy_n(dh_last + b * hidden + part.u0, units, &dh[(b - part.b0) * units]);
      std::copy_n(dc_last + b * hidden + part.u0, units, &dc[(b - part.b0) * units]);
    }
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t step = t * batch, prev = (t - 1) * batch;
      const bool* reset = resets + step;
      for (int64_t b = part.b0; b < part.b1; ++b) {
        T* row = acts_dgates + (step + b) * gates;
        const T* c_prev = t == 0 ? c0 + b * hidden : cs + (prev + b) * hidden;
        T* dh_b = &dh[(b - part.b0) * units];
        T* dc_b = &dc[(b - part.b0) * units];
        for (int64_t u = 0; u < units; u += kLanes<T>) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes<T>, units - u));
          const int64_t at = part.u0 + u, own = (step + b) * hidden + at;
          const V<T> i = load_n(row + at, n), f = load_n(row + hidden + at, n),
                     g = load_n(row + 2 * hidden + at, n), o = load_n(row + 3 * hidden + at, n);
          const V<T> d_h = load_n(dh_b + u, n) + load_n(dhs + own, n);
          const V<T> tanh_c = tanh(load_n(cs + own, n));
          const V<T> d_c = load_n(dc_b + u, n) + d_h * o * (T(1) - tanh_c * tanh_c);
          const V<T> c_in = reset[b] ? V<T>{} : load_n(c_prev + at, n);
          store_n(row + at, d_c * g * i * (T(1) - i), n);
          store_n(row + hidden + at, d_c * c_in * f * (T(1) - f), n);
          store_n(row + 2 * hidden + at, d_c * i * (T(1) - g * g), n);
          store_n(row + 3 * hidden + at, d_h * tanh_c * o * (T(1) - o), n);
          store_n(dc_b + u, reset[b] ? V<T>{} : d_c * f, n);
        }
      }
      barrier.wait();  // d_gates[t] whole before any thread reads it
      matmul<T>(acts_dgates + (step + part.b0) * gates, gates, w.get(), dh_prev.data(), cols,
                rows, cols, gates);
      for (int64_t b = part.b0; b < part.b1; ++b) {
        T* dh_b = &dh[(b - part.b0) * units];
        if (reset[b]) std::fill_n(dh_b, units, T(0));
        else std::copy_n(&dh_prev[(b - part.b0) * cols], units, dh_b);
      }
    }
    for (int64_t b = part.b0; b < part.b1; ++b) {
      std::copy_n(&dh[(b - part.b0) * units], units, dh0 + b * hidden + part.u0);
      std::copy_n(&dc[(b - part.b0) * units], units, dc0 + b * hidden + part.u0);
    }
  });
}

Helpers pool_helpers(ffi::ThreadPool& pool) {
  return {std::max<int64_t>(1, pool.num_threads()),
          [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); }};
}

// Calls body(T{}) with T the element type of `x`: float or double.
template <typename Body>
ffi::Error with_float_type(ffi::AnyBuffer x, Body body) {
  switch (x.element_type()) {
    case ffi::DataType::F32: body(float{}); break;
    case ffi::DataType::F64: body(double{}); break;
    default: return ffi::Error::InvalidArgument("tbptt LSTM kernel: float32 or float64 only");
  }
  return ffi::Error::Success();
}

// The results are written over an input (XLA aliases them, as asked); if it ever hands
// over separate buffers, the input is copied into the result first.
void as_result(ffi::AnyBuffer input, void* result) {
  if (result != input.untyped_data()) std::memcpy(result, input.untyped_data(), input.size_bytes());
}

ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x_proj, ffi::AnyBuffer w_hh,
                           ffi::AnyBuffer bias, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                           ffi::Buffer<ffi::PRED> resets, ffi::Result<ffi::AnyBuffer> hs,
                           ffi::Result<ffi::AnyBuffer> cs, ffi::Result<ffi::AnyBuffer> acts) {
  const auto dims = x_proj.dimensions();
  return with_float_type(x_proj, [&](auto zero) {
    using T = decltype(zero);
    as_result(x_proj, acts->untyped_data());
    lstm_forward<T>(pool_helpers(pool), dims[0], dims[1], dims[2] / 4, acts->typed_data<T>(),
                    w_hh.typed_data<T>(), bias.typed_data<T>(), h0.typed_data<T>(),
                    c0.typed_data<T>(), resets.typed_data(), hs->typed_data<T>(),
                    cs->typed_data<T>());
  });
}

ffi::Error LstmBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer acts, ffi::AnyBuffer w_hh,
                            ffi::AnyBuffer /*hs*/, ffi::AnyBuffer cs, ffi::AnyBuffer c0,
                            ffi::Buffer<ffi::PRED> resets,
                            ffi::AnyBuffer dhs, ffi::AnyBuffer dh_last, ffi::AnyBuffer dc_last,
                            ffi::Result<ffi::AnyBuffer> d_gates, ffi::Result<ffi::AnyBuffer> dh0,
                            ffi::Result<ffi::AnyBuffer> dc0) {
  const auto dims = acts.dimensions();
  return with_float_type(acts, [&](auto zero) {
    using T = decltype(zero);
    as_result(acts, d_gates->untyped_data());
    lstm_backward<T>(pool_helpers(pool), dims[0], dims[1], dims[2] / 4,
                     d_gates->typed_data<T>(), w_hh.typed_data<T>(), cs.typed_data<T>(),
                     c0.typed_data<T>(), resets.typed_data(), dhs.typed_data<T>(),
                     dh_last.typed_data<T>(), dc_last.typed_data<T>(), dh0->typed_data<T>(),
                     dc0->typed_data<T>());
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TbpttLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x_proj [T, B, 4H]
                                  .Arg<ffi::AnyBuffer>()  // w_hh [4H, H]
                                  .Arg<ffi::AnyBuffer>()  // bias [4H]
                                  .Arg<ffi::AnyBuffer>()  // h0 [B, H]
                                  .Arg<ffi::AnyBuffer>()  // c0 [B, H]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // resets [T, B]
                                  .Ret<ffi::AnyBuffer>()  // hs [T, B, H]
                                  .Ret<ffi::AnyBuffer>()  // cs [T, B, H]
                                  .Ret<ffi::AnyBuffer>());  // activations [T, B, 4H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(TbpttLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // activations [T, B, 4H]
                                  .Arg<ffi::AnyBuffer>()  // w_hh [4H, H]
                                  .Arg<ffi::AnyBuffer>()  // hs [T, B, H]: not read (*)
                                  .Arg<ffi::AnyBuffer>()  // cs [T, B, H]
                                  .Arg<ffi::AnyBuffer>()  // c0 [B, H]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // resets [T, B]
                                  .Arg<ffi::AnyBuffer>()  // dhs [T, B, H]
                                  .Arg<ffi::AnyBuffer>()  // dh after the last step [B, H]
                                  .Arg<ffi::AnyBuffer>()  // dc after the last step [B, H]
                                  .Ret<ffi::AnyBuffer>()  // d_gates [T, B, 4H]
                                  .Ret<ffi::AnyBuffer>()  // dh before step 0 [B, H]
                                  .Ret<ffi::AnyBuffer>());  // dc before step 0 [B, H]
// (*) Passed so that XLA keeps the hidden states' buffer alive until the reverse loop: see
// _backward_kernel in tbptt_jax/_native.py.
