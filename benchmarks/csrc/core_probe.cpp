// How far apart a virtual machine's two CPUs are, for benchmarks/placement.py: the one-way
// time of a hand-over between two threads pinned to two CPUs (a cache line written by one and
// awaited by the other, back and forth). Cores sharing a cache hand a line over in tens of
// nanoseconds; cores on different dies of an EPYC (CCDs) take several times that.
#include <pthread.h>
#include <sched.h>
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace {

bool pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

// Nanoseconds per one-way hand-over between CPUs a and b, over `rounds` round trips.
double handover_ns(int64_t a, int64_t b, int64_t rounds) {
  alignas(64) std::atomic<int64_t> line{0};
  bool pinned = true;
  std::thread other([&] {
    pinned = pin(static_cast<int>(b)) && pinned;
    for (int64_t i = 0; i < rounds; ++i) {
      while (line.load(std::memory_order_acquire) != 2 * i + 1) {
      }
      line.store(2 * i + 2, std::memory_order_release);
    }
  });
  // The calling thread's affinity is restored afterwards: torch's threads inherit nothing.
  cpu_set_t before;
  pthread_getaffinity_np(pthread_self(), sizeof(before), &before);
  const bool here = pin(static_cast<int>(a));
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < rounds; ++i) {
    line.store(2 * i + 1, std::memory_order_release);
    while (line.load(std::memory_order_acquire) != 2 * i + 2) {
    }
  }
  const auto stop = std::chrono::steady_clock::now();
  other.join();
  pthread_setaffinity_np(pthread_self(), sizeof(before), &before);
  TORCH_CHECK(here && pinned, "could not pin threads to CPUs ", a, " and ", b);
  return std::chrono::duration<double, std::nano>(stop - start).count() / (2.0 * rounds);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("handover_ns", &handover_ns, "one-way hand-over time between two CPUs, in ns");
}
