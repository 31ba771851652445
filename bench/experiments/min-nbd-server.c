// The least an NBD server can do per request: the floor for a server's CPU per IO at a fixed
// 20k IOPS (docs/performance.md). One thread, one connection at a time,
// blocking recv/send, a RAM region, simple replies only, no checks worth the name: not a server
// anyone should use, only the syscalls and the copy every server has to pay.
//   apt-get install liburing-dev   (modes 2 and 3; without -DWITH_URING only 0 and 1 exist)
//   gcc -O2 -DWITH_URING -o /tmp/min-nbd-server bench/experiments/min-nbd-server.c -luring
//   [LEAN=15] /tmp/min-nbd-server SOCKET SIZE_MIB [MODE]
// MODE 0: blocking recv + send (default); 1: recv with MSG_DONTWAIT first, then poll() when
// empty (what an event loop does); 2: io_uring, one recv and one send SQE per request, the
// send and the next recv submitted in the same io_uring_enter that waits (DEFER_TASKRUN);
// 3: io_uring with everything that saves work: a registered ring fd, the socket as a fixed
// file, one multishot recv into a provided-buffer ring, sends with CQE_SKIP_SUCCESS so each
// request costs one io_uring_enter (submit the reply, then wait for the next request).
// LEAN (mode 3, a bit mask, default 15) turns these off one at a time: 1 ring fd, 2 fixed
// file, 4 multishot recv, 8 skip success.
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>
#ifdef WITH_URING
#include <liburing.h>
#endif

static uint64_t size;
static char *mem;

static int full(int fd, void *p, size_t n, int rd) {
  char *c = p;
  while (n) {
    ssize_t r = rd ? recv(fd, c, n, MSG_WAITALL) : send(fd, c, n, MSG_NOSIGNAL);
    if (r <= 0) return -1;
    c += r; n -= r;
  }
  return 0;
}

static int opt_reply(int fd, uint32_t opt, uint32_t type, const void *data, uint32_t len) {
  struct __attribute__((packed)) { uint64_t magic; uint32_t opt, type, len; } h = {
      htobe64(0x3e889045565a9ULL), htobe32(opt), htobe32(type), htobe32(len)};
  if (full(fd, &h, sizeof h, 0)) return -1;
  return len ? full(fd, (void *)data, len, 0) : 0;
}

static int handshake(int fd) {
  struct __attribute__((packed)) { char m[16]; uint16_t flags; } hello;
  memcpy(hello.m, "NBDMAGICIHAVEOPT", 16);
  hello.flags = htobe16(3);  // FIXED_NEWSTYLE | NO_ZEROES
  uint32_t cflags;
  if (full(fd, &hello, sizeof hello, 0) || full(fd, &cflags, 4, 1)) return -1;
  for (;;) {
    struct __attribute__((packed)) { uint64_t magic; uint32_t opt, len; } o;
    if (full(fd, &o, sizeof o, 1)) return -1;
    uint32_t opt = be32toh(o.opt), len = be32toh(o.len);
    char data[4096];
    if (len > sizeof data || full(fd, data, len, 1)) return -1;
    if (opt == 7) {  // OPT_GO: NBD_INFO_EXPORT, then ACK
      struct __attribute__((packed)) { uint16_t type; uint64_t size; uint16_t flags; } info = {
          0, htobe64(size), htobe16(1 | 4)};  // HAS_FLAGS | SEND_FLUSH
      if (opt_reply(fd, opt, 3, &info, sizeof info) || opt_reply(fd, opt, 1, 0, 0)) return -1;
      return 0;
    }
    if (opt_reply(fd, opt, 0x80000001u, 0, 0)) return -1;  // ERR_UNSUP
  }
}

struct __attribute__((packed)) req { uint32_t magic; uint16_t flags, type; uint64_t cookie, offset; uint32_t len; };
struct __attribute__((packed)) rep { uint32_t magic, error; uint64_t cookie; };

// Serves one request whose header is in r; data for writes is read with blocking recv.
static int serve_one(int fd, struct req *r, char *buf) {
  uint16_t type = be16toh(r->type);
  uint64_t off = be64toh(r->offset);
  uint32_t len = be32toh(r->len);
  struct rep p = {htobe32(0x67446698), 0, r->cookie};
  if (type == 2) return -1;  // DISC
  if (len > (32u << 20) || off + len > size) { p.error = htobe32(22); return full(fd, &p, sizeof p, 0); }
  if (type == 1 && full(fd, mem + off, len, 1)) return -1;
  if (type == 0) {
    memcpy(buf + sizeof p, mem + off, len);
    memcpy(buf, &p, sizeof p);
    return full(fd, buf, sizeof p + len, 0);
  }
  return full(fd, &p, sizeof p, 0);
}

static void serve_blocking(int fd, int dontwait_first) {
  char *buf = malloc(sizeof(struct rep) + (32u << 20));
  for (;;) {
    struct req r;
    if (dontwait_first) {
      ssize_t n = recv(fd, &r, sizeof r, MSG_DONTWAIT);
      if (n < 0) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, -1) < 0) break;
        n = 0;
      }
      if (n < (ssize_t)sizeof r && full(fd, (char *)&r + n, sizeof r - n, 1)) break;
    } else if (full(fd, &r, sizeof r, 1)) {
      break;
    }
    if (serve_one(fd, &r, buf)) break;
  }
  free(buf);
}

#ifdef WITH_URING
// Reads of whole requests are assumed (fio's nbd engine sends 28-byte headers, one at a time
// at 20k IOPS); writes fall back to blocking recv of the payload.
static void serve_uring(int fd) {
  struct io_uring ring;
  struct io_uring_params par = {.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN};
  if (io_uring_queue_init_params(64, &ring, &par)) { perror("io_uring"); return; }
  char *buf = malloc(sizeof(struct rep) + (32u << 20));
  struct req r;
  size_t have = 0;
  struct io_uring_sqe *s = io_uring_get_sqe(&ring);
  io_uring_prep_recv(s, fd, &r, sizeof r, 0);
  io_uring_sqe_set_data64(s, 1);
  for (;;) {
    if (io_uring_submit_and_wait(&ring, 1) < 0) break;
    struct io_uring_cqe *c;
    int stop = 0, rearm = 0;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&ring, head, c) {
      seen++;
      if (c->user_data != 1) continue;  // send completions
      if (c->res <= 0) { stop = 1; continue; }
      have += c->res;
      if (have == sizeof r) {
        have = 0;
        uint16_t type = be16toh(r.type);
        uint64_t off = be64toh(r.offset);
        uint32_t len = be32toh(r.len);
        struct rep p = {htobe32(0x67446698), 0, r.cookie};
        if (type == 2) { stop = 1; continue; }
        if (type == 0 && len <= (32u << 20) && off + len <= size) {
          memcpy(buf + sizeof p, mem + off, len);
          memcpy(buf, &p, sizeof p);
          s = io_uring_get_sqe(&ring);
          io_uring_prep_send(s, fd, buf, sizeof p + len, MSG_WAITALL);
          io_uring_sqe_set_data64(s, 2);
        } else if (serve_one(fd, &r, buf)) {
          stop = 1;
        }
      }
      rearm = 1;
    }
    io_uring_cq_advance(&ring, seen);
    if (stop) break;
    if (rearm) {
      s = io_uring_get_sqe(&ring);
      io_uring_prep_recv(s, fd, (char *)&r + have, sizeof r - have, 0);
      io_uring_sqe_set_data64(s, 1);
    }
  }
  io_uring_queue_exit(&ring);
  free(buf);
}

enum { BUFS = 16, BUF_SIZE = 4096 };

static unsigned lean = 15;  // LEAN env: 1 ring fd, 2 fixed file, 4 multishot recv, 8 skip success

static void serve_uring_lean(int fd) {
  struct io_uring ring;
  struct io_uring_params par = {.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN};
  if (io_uring_queue_init_params(64, &ring, &par)) { perror("io_uring"); return; }
  if (lean & 1) io_uring_register_ring_fd(&ring);
  if ((lean & 2) && io_uring_register_files(&ring, &fd, 1)) { perror("files"); return; }
  int fixed = lean & 2 ? IOSQE_FIXED_FILE : 0, sfd = lean & 2 ? 0 : fd;
  struct io_uring_buf_ring *br = mmap(0, BUFS * sizeof(struct io_uring_buf), PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  struct io_uring_buf_reg reg = {.ring_addr = (unsigned long)br, .ring_entries = BUFS, .bgid = 0};
  if (io_uring_register_buf_ring(&ring, &reg, 0)) { perror("buf ring"); return; }
  io_uring_buf_ring_init(br);
  char *bufs = malloc(BUFS * BUF_SIZE);
  for (int i = 0; i < BUFS; i++)
    io_uring_buf_ring_add(br, bufs + i * BUF_SIZE, BUF_SIZE, i, io_uring_buf_ring_mask(BUFS), i);
  io_uring_buf_ring_advance(br, BUFS);
  // A reply buffer per send that may be in flight: sends complete silently (CQE_SKIP_SUCCESS),
  // so slots rotate; 128 covers fio's iodepth of 32 with room to spare.
  enum { SLOTS = 128, SLOT_SIZE = 4096 + sizeof(struct rep) };
  char *slots = malloc(SLOTS * SLOT_SIZE);
  unsigned next_slot = 0;
  char acc[sizeof(struct req)];
  size_t have = 0;
  int armed = 0, stop = 0;
  while (!stop) {
    if (!armed) {
      struct io_uring_sqe *s = io_uring_get_sqe(&ring);
      if (lean & 4) io_uring_prep_recv_multishot(s, sfd, NULL, 0, 0);
      else io_uring_prep_recv(s, sfd, NULL, BUF_SIZE, 0);
      s->flags |= fixed | IOSQE_BUFFER_SELECT;
      s->buf_group = 0;
      io_uring_sqe_set_data64(s, 1);
      armed = 1;
    }
    if (io_uring_submit_and_wait(&ring, 1) < 0) break;
    struct io_uring_cqe *c;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&ring, head, c) {
      seen++;
      if (c->user_data != 1) { if (c->res < 0) stop = 1; continue; }
      if (!(c->flags & IORING_CQE_F_MORE)) armed = 0;
      if (c->res <= 0) { if (c->res != -ENOBUFS) stop = 1; continue; }
      int bid = c->flags >> IORING_CQE_BUFFER_SHIFT;
      char *d = bufs + bid * BUF_SIZE;
      for (int i = 0; i < c->res && !stop; i++) {
        acc[have++] = d[i];
        if (have < sizeof acc) continue;
        have = 0;
        struct req *r = (struct req *)acc;
        uint16_t type = be16toh(r->type);
        uint64_t off = be64toh(r->offset);
        uint32_t len = be32toh(r->len);
        struct rep p = {htobe32(0x67446698), 0, r->cookie};
        if (type == 0 && len <= 4096 && off + len <= size) {
          char *buf = slots + (next_slot++ % SLOTS) * SLOT_SIZE;
          memcpy(buf + sizeof p, mem + off, len);
          memcpy(buf, &p, sizeof p);
          struct io_uring_sqe *s = io_uring_get_sqe(&ring);
          io_uring_prep_send(s, sfd, buf, sizeof p + len, MSG_WAITALL);
          s->flags |= fixed | (lean & 8 ? IOSQE_CQE_SKIP_SUCCESS : 0);
          io_uring_sqe_set_data64(s, 2);
        } else {
          stop = 1;  // 4 KiB reads only in this mode
        }
      }
      io_uring_buf_ring_add(br, d, BUF_SIZE, bid, io_uring_buf_ring_mask(BUFS), 0);
      io_uring_buf_ring_advance(br, 1);
    }
    io_uring_cq_advance(&ring, seen);
  }
  io_uring_queue_exit(&ring);
  free(slots);
  free(bufs);
}
#endif

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: %s SOCKET SIZE_MIB [MODE 0-3]\n", argv[0]); return 2; }
  size = (uint64_t)atol(argv[2]) << 20;
  int mode = argc > 3 ? atoi(argv[3]) : 0;
  if (getenv("LEAN")) lean = atoi(getenv("LEAN"));
  mem = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) { perror("mmap"); return 1; }
  memset(mem, 0x5a, size);  // every page backed, as after the bench's prewrite
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[1]);
  unlink(argv[1]);
  int l = socket(AF_UNIX, SOCK_STREAM, 0);
  if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 16)) { perror("listen"); return 1; }
  for (;;) {
    int fd = accept(l, 0, 0);
    if (fd < 0) continue;
    if (handshake(fd) == 0) {
#ifdef WITH_URING
      if (mode == 2) serve_uring(fd); else if (mode == 3) serve_uring_lean(fd); else
#endif
      serve_blocking(fd, mode == 1);
    }
    close(fd);
  }
}
