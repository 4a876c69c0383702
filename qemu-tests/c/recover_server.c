/*
 * A small epoll server for the error-recovery tests (cowctl run --recover). It keeps a table
 * of TABLE longs in the heap and answers one request per line:
 *   SET I V   table[I] = V            -> "OK"
 *   GET I                             -> "V"
 *   ADD I V   table[I] += V           -> the new value (not idempotent: a retry adds again)
 *   SLEEP MS  sleeps MS milliseconds  -> "OK" (keeps the loop busy while requests queue up)
 *   DUMP                              -> the whole table, "V V V ...", one line
 *   BAD I     table[I..I+16) = -1, then a NULL dereference (a crash after a partial update)
 *   ABORT     abort()
 *   FPE       an integer division by zero
 *   QUIT      exit(0)
 * Replies are queued and sent at the end of the event-loop iteration, before the next
 * epoll_wait (as redis does). Its own SIGSEGV/SIGABRT/SIGFPE handler says so and exits 77.
 * Usage: recover_server PORT_FILE [crash-at-start]   (listens on 127.0.0.1, port written to
 * PORT_FILE once it accepts)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define TABLE 4096
#define MAX_CONN 1024
#define BUF 65536

struct conn {
	char in[BUF];
	size_t in_len;
	char *out;
	size_t out_len, out_cap;
};

static long *table;
static struct conn *conns[MAX_CONN];
static volatile long *nowhere;
static volatile int zero;

static void crash_handler(int sig)
{
	char msg[64];
	int n = snprintf(msg, sizeof msg, "server: crash handler: signal %d\n", sig);
	(void)!write(2, msg, n);
	_exit(77);
}

static void reply(struct conn *c, const char *text)
{
	size_t n = strlen(text);
	if (c->out_len + n + 1 > c->out_cap) {
		c->out_cap = (c->out_len + n + 1) * 2;
		c->out = realloc(c->out, c->out_cap);
	}
	memcpy(c->out + c->out_len, text, n);
	c->out_len += n;
	c->out[c->out_len++] = '\n';
}

static void request(struct conn *c, char *line)
{
	char word[16];
	long i = 0, v = 0;
	char text[32];
	int k = sscanf(line, "%15s %ld %ld", word, &i, &v);
	if (k < 1) {
		reply(c, "ERR");
	} else if (!strcmp(word, "SET") && k == 3 && i >= 0 && i < TABLE) {
		table[i] = v;
		reply(c, "OK");
	} else if (!strcmp(word, "ADD") && k == 3 && i >= 0 && i < TABLE) {
		table[i] += v;
		snprintf(text, sizeof text, "%ld", table[i]);
		reply(c, text);
	} else if (!strcmp(word, "SLEEP") && k == 2 && i >= 0) {
		usleep(i * 1000);
		reply(c, "OK");
	} else if (!strcmp(word, "GET") && k == 2 && i >= 0 && i < TABLE) {
		snprintf(text, sizeof text, "%ld", table[i]);
		reply(c, text);
	} else if (!strcmp(word, "DUMP")) {
		char *all = malloc(TABLE * 24);
		size_t len = 0;
		for (int j = 0; j < TABLE; j++)
			len += sprintf(all + len, j ? " %ld" : "%ld", table[j]);
		reply(c, all);
		free(all);
	} else if (!strcmp(word, "BAD") && k == 2 && i >= 0 && i + 16 <= TABLE) {
		for (int j = 0; j < 16; j++)
			table[i + j] = -1;
		*nowhere = i; /* SIGSEGV */
	} else if (!strcmp(word, "ABORT")) {
		table[0] = -1;
		abort();
	} else if (!strcmp(word, "QUIT")) {
		exit(0);
	} else if (!strcmp(word, "FPE")) {
		table[1] = -1;
		table[2] = table[3] / zero;
	} else {
		reply(c, "ERR");
	}
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	struct sigaction sa = { 0 };
	sa.sa_handler = crash_handler;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGABRT, &sa, NULL);
	sigaction(SIGFPE, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	table = malloc(TABLE * sizeof *table);
	for (long j = 0; j < TABLE; j++)
		table[j] = j;
	if (argc > 2 && !strcmp(argv[2], "crash-at-start"))
		*nowhere = 1;

	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof addr;
	if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 128) ||
	    getsockname(lfd, (struct sockaddr *)&addr, &alen)) {
		perror("server: listen");
		return 1;
	}
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
	FILE *f = fopen(tmp, "w");
	fprintf(f, "%d\n", ntohs(addr.sin_port));
	fclose(f);
	rename(tmp, argv[1]);

	struct epoll_event events[64];
	for (;;) {
		/* The end of the iteration: send what it queued. */
		for (int fd = 0; fd < MAX_CONN; fd++) {
			struct conn *c = conns[fd];
			if (c && c->out_len) {
				ssize_t n = write(fd, c->out, c->out_len);
				if (n > 0) {
					memmove(c->out, c->out + n, c->out_len - n);
					c->out_len -= n;
				}
			}
		}
		int n = epoll_wait(ep, events, 64, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("server: epoll_wait");
			return 1;
		}
		for (int e = 0; e < n; e++) {
			int fd = events[e].data.fd;
			if (fd == lfd) {
				int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
				if (cfd < 0)
					continue;
				if (cfd >= MAX_CONN) {
					close(cfd);
					continue;
				}
				conns[cfd] = calloc(1, sizeof(struct conn));
				struct epoll_event cev = { .events = EPOLLIN, .data.fd = cfd };
				epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
				continue;
			}
			struct conn *c = conns[fd];
			ssize_t got = read(fd, c->in + c->in_len, BUF - 1 - c->in_len);
			if (got <= 0) {
				if (got < 0 && errno == EAGAIN)
					continue;
				epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
				close(fd);
				free(c->out);
				free(c);
				conns[fd] = NULL;
				continue;
			}
			c->in_len += got;
			c->in[c->in_len] = 0;
			char *start = c->in, *nl;
			while ((nl = strchr(start, '\n'))) {
				*nl = 0;
				request(c, start);
				start = nl + 1;
			}
			c->in_len -= start - c->in;
			memmove(c->in, start, c->in_len);
		}
	}
}
