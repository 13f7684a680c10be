/* A load generator for bench/connections.py and bench/peers.py: epoll, no threads.
 *
 *   client HOST PORT closed    CONCURRENCY SECONDS SOURCES PROXY
 *   client HOST PORT burst     COUNT       TIMEOUT SOURCES PROXY
 *   client HOST PORT keepalive CONCURRENCY SECONDS SOURCES PROXY
 *
 * Each connection binds to one of SOURCES client addresses 127.0.0.2, 127.0.0.3, ...
 * (in turn), connects, writes "GET / HTTP/1.1" (after a PROXY v1 header naming that
 * address when PROXY is 1), reads until the server closes, and counts a success when
 * the answer starts with "HTTP/1.1 200".
 *
 * closed: keep CONCURRENCY connections in flight for SECONDS, then let the last ones
 *         finish; prints "done OK ERRORS SECONDS P50_US P99_US".
 * burst:  open COUNT connections and write every request, print "queued N", wait for a
 *         line on stdin, then time until every answer is in (at most TIMEOUT seconds);
 *         prints "done OK ERRORS SECONDS P50_US P99_US" (latency from the go line).
 * keepalive: CONCURRENCY kept-alive connections (each from the next of SOURCES addresses)
 *         send "GET /" again as soon as each answer (by its Content-Length) is in, for
 *         SECONDS; a connection the server closes is opened again. OK counts answers.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { CONNECTING, READING };

struct conn {
    int fd;
    int state;
    int got;
    char head[1024]; /* the answer's first bytes: its status line and (keepalive) its head */
    long need;       /* keepalive: the answer's whole length, once its head is in (-1 before) */
    double started;
};

static struct sockaddr_in server;
static int sources, proxy, server_port, keepalive;
static double stop_at;
static long next_source;
static double *latencies;
static long latency_count, latency_cap, ok, errors;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int open_conn(int ep, struct conn *c, double started) {
    struct sockaddr_in src = {.sin_family = AF_INET};
    int one = 1;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) return -1;
    setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    src.sin_addr.s_addr = htonl(0x7f000002 + (uint32_t)(next_source++ % sources));
    if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) {
        close(c->fd);
        return -1;
    }
    if (connect(c->fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        return -1;
    }
    c->state = CONNECTING;
    c->got = 0;
    c->need = -1;
    c->started = started;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

static int send_request(struct conn *c) {
    char buf[256];
    int n = 0;
    if (proxy) {
        struct sockaddr_in local;
        socklen_t len = sizeof local;
        getsockname(c->fd, (struct sockaddr *)&local, &len);
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &local.sin_addr, ip, sizeof ip);
        n = snprintf(buf, sizeof buf, "PROXY TCP4 %s 127.0.0.1 %d %d\r\n", ip, ntohs(local.sin_port), server_port);
    }
    if (proxy && c->state != CONNECTING) n = 0; /* keepalive: the PROXY header went with the first request */
    n += snprintf(buf + n, sizeof buf - n, keepalive ? "GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
                                                     : "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    return send(c->fd, buf, n, MSG_NOSIGNAL) == n ? 0 : -1;
}

static void finish(int ep, struct conn *c, int success, double t) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    if (success) {
        ok++;
        if (latency_count < latency_cap) latencies[latency_count++] = (t - c->started) * 1e6;
    } else {
        errors++;
    }
}

/* keepalive: the length of the answer whose head is in c->head (its head plus Content-Length), or -1. */
static long answer_length(struct conn *c) {
    int limit = c->got < (int)sizeof c->head ? c->got : (int)sizeof c->head;
    char *end = memmem(c->head, limit, "\r\n\r\n", 4);
    if (!end) return -1;
    long body = 0;
    for (char *line = c->head; line < end; line++) {
        if ((line == c->head || line[-1] == '\n') && strncasecmp(line, "content-length:", 15) == 0) {
            body = atol(line + 15);
            break;
        }
    }
    return (end - c->head) + 4 + body;
}

/* keepalive: an answer is in; count it, and send the next request (1: the connection is done). */
static int answered(int ep, struct conn *c) {
    double t = now();
    int success = memcmp(c->head, "HTTP/1.1 200", 12) == 0;
    if (success) {
        ok++;
        if (latency_count < latency_cap) latencies[latency_count++] = (t - c->started) * 1e6;
    } else {
        errors++;
    }
    c->got = 0;
    c->need = -1;
    c->started = t;
    if (t >= stop_at || send_request(c) < 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
        return 1;
    }
    return 0;
}

/* Advance one connection on an event; returns 1 when it is finished. */
static int step(int ep, struct conn *c, unsigned events) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP)) || send_request(c) < 0) {
            finish(ep, c, 0, now());
            return 1;
        }
        c->state = READING;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        return 0;
    }
    char buf[4096];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0) {
            int keep = (int)sizeof c->head - c->got;
            if (keep > 0) memcpy(c->head + c->got, buf, n < keep ? n : keep);
            c->got += (int)n;
            if (keepalive) {
                if (c->need < 0) c->need = answer_length(c);
                if (c->need >= 0 && c->got >= c->need && answered(ep, c)) return 1;
            }
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (keepalive && n == 0 && c->got == 0) { /* closed between answers: opened again, not an error */
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            return 1;
        }
        int success = n == 0 && c->got >= 12 && memcmp(c->head, "HTTP/1.1 200", 12) == 0;
        finish(ep, c, success, now());
        return 1;
    }
}

static void report(double elapsed) {
    double p50 = 0, p99 = 0;
    if (latency_count) {
        qsort(latencies, latency_count, sizeof *latencies, cmp);
        p50 = latencies[latency_count / 2];
        p99 = latencies[(long)(latency_count * 0.99)];
    }
    printf("done %ld %ld %.6f %.1f %.1f\n", ok, errors, elapsed, p50, p99);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT closed|burst|keepalive N SECONDS SOURCES PROXY\n", argv[0]);
        return 2;
    }
    server.sin_family = AF_INET;
    inet_pton(AF_INET, argv[1], &server.sin_addr);
    server_port = atoi(argv[2]);
    server.sin_port = htons(server_port);
    int burst = strcmp(argv[3], "burst") == 0;
    keepalive = strcmp(argv[3], "keepalive") == 0;
    long n = atol(argv[4]);
    double seconds = atof(argv[5]);
    sources = atoi(argv[6]);
    proxy = atoi(argv[7]);
    struct rlimit lim = {n + 64, n + 64};
    setrlimit(RLIMIT_NOFILE, &lim);
    latency_cap = 4000000;
    latencies = malloc(sizeof *latencies * latency_cap);
    struct conn *conns = calloc(n, sizeof *conns);
    int ep = epoll_create1(0);
    struct epoll_event events[512];

    if (!burst) {
        double start = now(), deadline;
        stop_at = start + seconds;
        deadline = stop_at + 10;
        long active = 0;
        for (long i = 0; i < n; i++)
            if (open_conn(ep, &conns[i], now()) == 0) active++; else errors++, conns[i].fd = -1;
        while (active > 0 && now() < deadline) {
            int k = epoll_wait(ep, events, 512, 100);
            for (int i = 0; i < k; i++) {
                struct conn *c = events[i].data.ptr;
                if (!step(ep, c, events[i].events)) continue;
                active--;
                if (now() < stop_at) {
                    if (open_conn(ep, c, now()) == 0) active++; else errors++;
                }
            }
        }
        report(now() - start);
        return 0;
    }

    /* burst: everything connected and written first, while the server is paused */
    long pending = 0;
    double queue_deadline = now() + seconds;
    for (long i = 0; i < n; i++)
        if (open_conn(ep, &conns[i], 0) == 0) pending++; else errors++, conns[i].fd = -1;
    long connecting = pending;
    while (connecting > 0 && now() < queue_deadline) {
        int k = epoll_wait(ep, events, 512, 100);
        for (int i = 0; i < k; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->state != CONNECTING) continue;
            connecting--;
            if (step(ep, c, events[i].events)) pending--;
        }
    }
    printf("queued %ld\n", pending);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    double start = now(), deadline = start + seconds;
    for (long i = 0; i < n; i++) conns[i].started = start;
    while (pending > 0 && now() < deadline) {
        int k = epoll_wait(ep, events, 512, 100);
        for (int i = 0; i < k; i++)
            if (step(ep, events[i].data.ptr, events[i].events)) pending--;
    }
    errors += pending;
    report(now() - start);
    return 0;
}
