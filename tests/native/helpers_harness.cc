// Runs the compiled LSTM loops (tbptt_jax/csrc/lstm.cc, included whole) with their helper
// threads coming in every way XLA's pool may deliver them, and checks that every way gives
// the single-thread results bit for bit. Built and run by tests/test_native.py; prints one
// line per case and "ok" at the end, or the first mismatch. Given a path, it also writes
// the single-thread results there (float32, in the order of `Outputs`, H = 20 then 240),
// for the test to compare builds for different vector widths.

#include LSTM_SOURCE

#include <cstdio>
#include <deque>
#include <random>
#include <string>

namespace {

// How the scheduled helper tasks run.
enum class Delivery { kThreads, kDropped, kInline, kAfterTheCall, kLate };

struct Pool {
  Delivery delivery;
  std::vector<std::thread> threads;
  std::deque<std::function<void()>> kept;  // kAfterTheCall: run once the call has returned
  Helpers helpers(int64_t count) {
    return {count, [this](std::function<void()> task) {
      switch (delivery) {
        case Delivery::kThreads: threads.emplace_back(std::move(task)); break;
        case Delivery::kDropped: break;
        case Delivery::kInline: task(); break;
        case Delivery::kAfterTheCall: kept.push_back(std::move(task)); break;
        case Delivery::kLate:  // after the caller has stopped waiting for helpers
          threads.emplace_back([task = std::move(task)] {
            std::this_thread::sleep_for(2 * kHelperWait);
            task();
          });
          break;
      }
    }};
  }
  void finish() {
    for (auto& thread : threads) thread.join();
    threads.clear();
    for (auto& task : kept) task();
    kept.clear();
  }
};

struct Outputs {
  std::vector<float> acts, hs, cs, d_gates, dh0, dc0;
  bool operator==(const Outputs& o) const {
    return acts == o.acts && hs == o.hs && cs == o.cs && d_gates == o.d_gates &&
           dh0 == o.dh0 && dc0 == o.dc0;
  }
};

Outputs run(int64_t steps, int64_t batch, int64_t hidden, const Helpers& forward_helpers,
            const Helpers& backward_helpers) {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  auto draw = [&](int64_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
  };
  const auto x_proj = draw(steps * batch * 4 * hidden), w_hh = draw(4 * hidden * hidden),
             bias = draw(4 * hidden), h0 = draw(batch * hidden), c0 = draw(batch * hidden),
             dhs = draw(steps * batch * hidden), dh = draw(batch * hidden),
             dc = draw(batch * hidden);
  std::vector<char> resets(steps * batch);
  for (size_t i = 0; i < resets.size(); ++i) resets[i] = i % 7 == 3;
  const bool* reset = reinterpret_cast<const bool*>(resets.data());
  Outputs out{x_proj, std::vector<float>(steps * batch * hidden),
              std::vector<float>(steps * batch * hidden), {}, std::vector<float>(batch * hidden),
              std::vector<float>(batch * hidden)};
  lstm_forward<float>(forward_helpers, steps, batch, hidden, out.acts.data(), w_hh.data(),
                      bias.data(), h0.data(), c0.data(), reset, out.hs.data(), out.cs.data());
  out.d_gates = out.acts;
  lstm_backward<float>(backward_helpers, steps, batch, hidden, out.d_gates.data(), w_hh.data(),
                       out.cs.data(), c0.data(), reset, dhs.data(), dh.data(), dc.data(),
                       out.dh0.data(), out.dc0.data());
  return out;
}

void write(std::FILE* file, const Outputs& out) {
  for (const auto* v : {&out.acts, &out.hs, &out.cs, &out.d_gates, &out.dh0, &out.dc0})
    std::fwrite(v->data(), sizeof(float), v->size(), file);
}

}  // namespace

int main(int argc, char** argv) {
  std::FILE* results = argc > 1 ? std::fopen(argv[1], "wb") : nullptr;
  const char* names[] = {"threads", "dropped", "inline", "after the call", "late"};
  // H = 20: the threads split the batch; H = 240 (900 KiB of W_hh): the hidden units.
  for (const int64_t hidden : {20, 240}) {
    const int64_t steps = 6, batch = 5;
    Pool single{Delivery::kDropped};
    const Outputs reference = run(steps, batch, hidden, single.helpers(1), single.helpers(1));
    if (results) write(results, reference);
    for (const int64_t threads : {2, 3}) {
      for (int delivery = 0; delivery < 5; ++delivery) {
        Pool pool{static_cast<Delivery>(delivery)};
        const Outputs got = run(steps, batch, hidden, pool.helpers(threads), pool.helpers(threads));
        pool.finish();
        std::printf("H %ld, %ld threads, helpers %s: %s\n", long(hidden), long(threads),
                    names[delivery], got == reference ? "same" : "DIFFERENT");
        if (!(got == reference)) return 1;
      }
    }
  }
  if (results) std::fclose(results);
  std::printf("ok\n");
  return 0;
}
