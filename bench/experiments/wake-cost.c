// What a sleep and a wake-up cost on this machine, in CPU time charged to the threads: the
// cost every event-loop server pays per receive, and what sets the CPU-per-IO rows of the
// bench on a VM (see docs/performance.md).
//
//   gcc -O2 -pthread -o wake-cost bench/experiments/wake-cost.c
//   wake-cost CPU_A CPU_B        # e.g. 0 1 (across CPUs) and 0 0 (on one CPU)
//
// Two rounds of eventfd ping-pong between a thread on CPU_A and one on CPU_B:
//   both-block  both threads block in read() between turns (a server and a client that
//               both sleep);
//   one-spins   B polls its eventfd without blocking, so only A sleeps and is woken.
// Printed per round trip: each thread's CPU time (CLOCK_THREAD_CPUTIME_ID) and the wall time.
// Then one thread on CPU_A alone sleeps in nanosleep (10 µs to 1 ms) and prints the CPU time
// charged to it per sleep: with the CPU otherwise idle, what a sleep costs, however long.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

enum { ROUND_TRIPS = 50000 };

static int to_a, to_b, cpu_a, cpu_b, b_spins;
static double b_cpu_ns;

static double clock_ns(clockid_t c) {
  struct timespec t;
  clock_gettime(c, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) {
    fprintf(stderr, "cannot pin to CPU %d\n", cpu);
    exit(1);
  }
}

static void *thread_b(void *unused) {
  (void)unused;
  pin(cpu_b);
  double start = clock_ns(CLOCK_THREAD_CPUTIME_ID);
  uint64_t v;
  for (int i = 0; i < ROUND_TRIPS; i++) {
    while (read(to_b, &v, 8) != 8) {
      // one-spins: the eventfd is non-blocking and B polls it
    }
    v = 1;
    if (write(to_a, &v, 8) != 8) exit(1);
  }
  b_cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID) - start;
  return NULL;
}

static void round_trip(const char *name) {
  to_a = eventfd(0, 0);
  to_b = eventfd(0, b_spins ? EFD_NONBLOCK : 0);
  pthread_t b;
  pthread_create(&b, NULL, thread_b, NULL);
  pin(cpu_a);
  usleep(10000);
  double cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID), wall0 = clock_ns(CLOCK_MONOTONIC);
  uint64_t v;
  for (int i = 0; i < ROUND_TRIPS; i++) {
    v = 1;
    if (write(to_b, &v, 8) != 8 || read(to_a, &v, 8) != 8) exit(1);
  }
  double a_cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
  double wall = clock_ns(CLOCK_MONOTONIC) - wall0;
  pthread_join(b, NULL);
  printf("%-10s A %6.0f ns CPU, B %6.0f ns CPU%s, %6.0f ns wall per round trip\n", name,
         a_cpu / ROUND_TRIPS, b_cpu_ns / ROUND_TRIPS, b_spins ? " (spinning)" : "",
         wall / ROUND_TRIPS);
  close(to_a);
  close(to_b);
}

static void sleep_alone(void) {
  static const long sleep_us[] = {10, 50, 200, 1000};
  pin(cpu_a);
  for (unsigned k = 0; k < sizeof sleep_us / sizeof sleep_us[0]; k++) {
    int n = 200000 / (sleep_us[k] + 20);  // about 0.2 s of sleeping each
    struct timespec d = {0, sleep_us[k] * 1000};
    double cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID), wall0 = clock_ns(CLOCK_MONOTONIC);
    for (int i = 0; i < n; i++) nanosleep(&d, NULL);
    printf("sleep %4ld us alone: %6.0f ns CPU, %8.0f ns wall per sleep\n", sleep_us[k],
           (clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0) / n, (clock_ns(CLOCK_MONOTONIC) - wall0) / n);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s CPU_A CPU_B\n", argv[0]);
    return 2;
  }
  cpu_a = atoi(argv[1]);
  cpu_b = atoi(argv[2]);
  b_spins = 0;
  round_trip("both-block");
  if (cpu_a != cpu_b) {  // one CPU cannot host a spinner and a sleeper usefully
    b_spins = 1;
    round_trip("one-spins");
  }
  sleep_alone();
  return 0;
}
