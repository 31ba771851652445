// The least replication over loopback costs a 4 KiB write, next to which the replication
// step's ratios read (docs/performance.md). Two processes, one TCP connection on 127.0.0.1,
// blocking send/recv, TCP_NODELAY; the "replica" copies each page into a RAM region.
//   gcc -O2 -o /tmp/repl-floor bench/experiments/repl-floor.c
//   /tmp/repl-floor [ITERATIONS]
// Prints:
// - sync: the round trip of a page and its 16-byte acknowledgement (what a sync replica adds
//   to a write's latency at queue depth 1, with no protocol and no device), p50 and p99;
// - async: the primary's CPU per page it only sends (the copy into a queue and the send a
//   write costs the primary when nobody waits for the replica), and the replica's CPU per
//   page it receives and copies (taken from the same two cores the client and primary use).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define HEADER 32
#define REGION (64u << 20)

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static uint64_t cpu_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void full(int fd, void *buf, size_t len, int recv_side) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = recv_side ? recv(fd, (char *)buf + done, len - done, 0)
                          : send(fd, (char *)buf + done, len - done, 0);
    if (n <= 0) {
      perror(recv_side ? "recv" : "send");
      exit(1);
    }
    done += (size_t)n;
  }
}

static int cmp(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

// The replica: mode 0 acknowledges every page, mode 1 only receives; both copy each page
// into the region. It reports its CPU per page on stderr-free stdout at the end.
static void replica(int fd, long iterations, int ack) {
  char *region = malloc(REGION);
  char frame[HEADER + PAGE], reply[16] = {0};
  uint64_t start = cpu_ns();
  for (long i = 0; i < iterations; i++) {
    full(fd, frame, sizeof frame, 1);
    memcpy(region + ((size_t)i * PAGE) % REGION, frame + HEADER, PAGE);
    if (ack)
      full(fd, reply, sizeof reply, 0);
  }
  if (!ack)
    printf("async: replica CPU per page %.2f us\n",
           (double)(cpu_ns() - start) / 1000.0 / (double)iterations);
  exit(0);
}

static int connected_pair(int fds[2]) {
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) ||
      getsockname(l, (struct sockaddr *)&a, &len))
    return -1;
  fds[0] = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(fds[0], (struct sockaddr *)&a, sizeof a))
    return -1;
  fds[1] = accept(l, NULL, NULL);
  close(l);
  setsockopt(fds[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fds[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fds[1] < 0 ? -1 : 0;
}

static void run(long iterations, int ack) {
  int fds[2];
  if (connected_pair(fds)) {
    perror("loopback pair");
    exit(1);
  }
  pid_t child = fork();
  if (child == 0) {
    close(fds[0]);
    replica(fds[1], iterations, ack);
  }
  close(fds[1]);
  char frame[HEADER + PAGE], reply[16], *queue = malloc(PAGE);
  memset(frame, 0x5a, sizeof frame);
  uint64_t *rtt = malloc(sizeof(uint64_t) * (size_t)iterations);
  uint64_t cpu_start = cpu_ns();
  for (long i = 0; i < iterations; i++) {
    uint64_t t0 = now_ns();
    memcpy(queue, frame + HEADER, PAGE); // the async copy (a sync write sends in place)
    full(fds[0], frame, sizeof frame, 0);
    if (ack)
      full(fds[0], reply, sizeof reply, 1);
    rtt[i] = now_ns() - t0;
  }
  uint64_t cpu = cpu_ns() - cpu_start;
  close(fds[0]);
  waitpid(child, NULL, 0);
  if (ack) {
    qsort(rtt, (size_t)iterations, sizeof *rtt, cmp);
    printf("sync: page round trip p50 %.1f us, p99 %.1f us\n",
           (double)rtt[iterations / 2] / 1000.0, (double)rtt[iterations * 99 / 100] / 1000.0);
  } else {
    printf("async: primary CPU per page sent %.2f us\n",
           (double)cpu / 1000.0 / (double)iterations);
  }
  free(rtt);
  free(queue);
}

int main(int argc, char **argv) {
  long iterations = argc > 1 ? atol(argv[1]) : 200000;
  fflush(stdout);
  run(iterations, 1);
  fflush(stdout);
  run(iterations, 0);
  return 0;
}
