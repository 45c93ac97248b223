/*
 * netsvc: the linuxguest's TCP services, for network handover tests.
 *
 *   port 7     echo: every byte a client sends comes back.
 *   port 7777  counter: "%016llu\n" records, one every LG_COUNTER_US, from 0
 *              upwards, so the host sees any lost, repeated or reordered
 *              byte and the longest stall across an upgrade.
 *
 * One child process per connection; started by /init when lg.ip= is set.
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define COUNTER_PERIOD_NS 1000000L /* 1 ms */

static int listen_on(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) {
        perror("netsvc: listen");
        return -1;
    }
    return s;
}

static void echo(int c)
{
    char buf[4096];
    ssize_t n;
    while ((n = read(c, buf, sizeof buf)) > 0)
        if (write(c, buf, n) != n)
            break;
}

static void counter(int c)
{
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (unsigned long long n = 0;; n++) {
        char line[32];
        int len = snprintf(line, sizeof line, "%016llu\n", n);
        if (write(c, line, len) != len)
            return;
        next.tv_nsec += COUNTER_PERIOD_NS;
        if (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
}

static void serve(int port, void (*handler)(int))
{
    int s = listen_on(port);
    if (s < 0)
        _exit(1);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0)
            continue;
        if (fork() == 0) {
            close(s);
            handler(c);
            _exit(0);
        }
        close(c);
    }
}

int main(void)
{
    signal(SIGCHLD, SIG_IGN); /* no zombies from finished connections */
    if (fork() == 0)
        serve(7, echo);
    serve(7777, counter);
    return 0;
}
