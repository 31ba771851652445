// Does copying a 4 KiB reply before sending it over a Unix socket cost much? (NBD zero-copy
// reads, docs/performance.md). Sender CPU per reply, reader in a child:
//   gcc -O2 -o /tmp/unix-send-copy bench/experiments/unix-send-copy.c
//   for m in 0 1 2 3; do taskset -c 1 /tmp/unix-send-copy $m 300000; done
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
// mode 0: send from a copy buffer (memcpy from region + send); 1: send straight from region;
// 2: vmsplice region page + splice pipe->socket; 3: memfd region, splice memfd->pipe->socket
int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: %s MODE(0-3) REPLIES\n", argv[0]); return 2; }
  int mode = atoi(argv[1]); long n = atol(argv[2]); size_t region = 256 << 20;
  int sv[2]; socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  pid_t pid = fork();
  if (pid == 0) { close(sv[0]); char *b = malloc(1 << 20); long got = 0; while (got < n * 4112) { ssize_t r = recv(sv[1], b, 1 << 20, 0); if (r <= 0) break; got += r; } exit(0); }
  close(sv[1]);
  int mfd = memfd_create("r", 0); ftruncate(mfd, region);
  char *mem = mode == 3 ? mmap(0, region, PROT_READ|PROT_WRITE, MAP_SHARED, mfd, 0) : mmap(0, region, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
  for (size_t i = 0; i < region; i += 4096) memset(mem + i, i >> 12, 4096);
  char *buf = aligned_alloc(4096, 4096); char hdr[16] = {0};
  int p[2]; pipe(p); fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
  struct rusage r0, r1; getrusage(RUSAGE_SELF, &r0);
  unsigned long long x = 88172645463325252ULL;
  for (long i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17; size_t off = (x % (region / 4096)) * 4096;
    if (mode == 0 || mode == 1) {
      char *src = mem + off; if (mode == 0) { memcpy(buf, src, 4096); src = buf; }
      struct iovec iov[2] = {{hdr, 16}, {src, 4096}}; struct msghdr m = {0}; m.msg_iov = iov; m.msg_iovlen = 2;
      if (sendmsg(sv[0], &m, 0) != 4112) { perror("send"); return 1; }
    } else if (mode == 2) {
      struct iovec iov[2] = {{hdr, 16}, {mem + off, 4096}};
      if (vmsplice(p[1], iov, 2, 0) != 4112) { perror("vmsplice"); return 1; }
      if (splice(p[0], 0, sv[0], 0, 4112, SPLICE_F_MOVE) != 4112) { perror("splice"); return 1; }
    } else {
      struct iovec iov[1] = {{hdr, 16}};
      if (vmsplice(p[1], iov, 1, 0) != 16) { perror("vmsplice"); return 1; }
      loff_t o = off; if (splice(mfd, &o, p[1], 0, 4096, 0) != 4096) { perror("splice1"); return 1; }
      if (splice(p[0], 0, sv[0], 0, 4112, SPLICE_F_MOVE) != 4112) { perror("splice2"); return 1; }
    }
  }
  getrusage(RUSAGE_SELF, &r1);
  double us = ((r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) * 1e6 + (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) + (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) * 1e6 + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec));
  printf("mode %d: %.2f us cpu per reply\n", mode, us / n);
  waitpid(pid, 0, 0); return 0;
}
