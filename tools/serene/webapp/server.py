"""Serve the application with waitress: bounded threads, bounded connections, bounded time.

    AppServer(home, port=0, host="127.0.0.1", trusted_proxy=None, public_hosts=()).start()
        -> .port, .url, .app; .stop()

Waitress (Pylons) reads every connection in one asynchronous loop (poll): a request's line,
headers and body are parsed there, and only a complete request is handed to a fixed pool of
THREADS worker threads. So a client that sends half a request holds a socket and a few
hundred bytes, never a thread (issue 8, item 10: 500 half-sent requests held 502 threads in
werkzeug's threaded server). Bounds:
- THREADS workers; at most CONNECTION_LIMIT open connections, read with poll() (select()
  stops at 1024 descriptors); at the limit the oldest one not being answered is closed to
  make room (ours, below: waitress alone stops accepting until one closes);
- a connection silent for IDLE_S is closed (waitress' channel_timeout, checked every second);
  a request must have arrived whole REQUEST_S after its first byte, however slowly it
  trickles (ours, below: waitress alone only times out silence);
- a request head is at most MAX_HEADER_BYTES (431), a body MAX_BODY_BYTES (413);
- waitress' own error answers (400 malformed, 431, 413) say Cache-Control: no-store too.
The application checks the Host header against the addresses served (421: a DNS-rebinding
page sends its own name) and says Cache-Control: no-store on every answer (webapp/__init__).

TLS. Waitress has no TLS, and the servers that do it in Python were judged on slow clients:
cheroot 11 (CherryPy's, TLS-capable) hands a connection to a worker thread as soon as its
first byte arrives and the worker then blocks reading the head (10 threads, 50 half-sent
heads: a good request still unanswered after 30 s), and it does every TLS handshake on its
single accept path (3 connections that never sent a ClientHello delayed a good HTTPS client
by 30 s: 10 s of timeout each, one after the other). Measured 2026-12, not guessed.
So the application never speaks TLS itself, and it never serves plain HTTP beyond loopback:
- by default it binds 127.0.0.1 (reachable from this machine only), plain HTTP;
- to expose it, put a TLS-terminating reverse proxy in front (nginx, README) and give its
  address: trusted_proxy (--trusted-proxy). Waitress then takes X-Forwarded-Proto and
  X-Forwarded-For from that address only (from anyone else they are deleted), the
  application refuses (403) every request that did not reach the proxy over HTTPS, the
  session cookie is Secure (HSTS too), and the Host allow-list is public_hosts (the names the
  proxy serves, --public-host). Binding anything but loopback without trusted_proxy is
  refused (ValueError).
"""

import collections
import ipaddress
import logging
import threading
import time

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress import wasyncore

THREADS = 4  # worker threads: pages are ~10-50 ms of SQLite and Jinja2
CONNECTION_LIMIT = 1000  # open connections (half-sent ones included: no thread each)
IDLE_S = 5  # a connection silent this long is closed (between requests too)
REQUEST_S = 5.0  # a request must be whole this long after its first byte
MAX_HEADER_BYTES = 8192  # request line + headers (a browser's: well under 2 KiB)
MAX_BODY_BYTES = 64 * 1024  # forms only (the app's MAX_CONTENT_LENGTH too)
BACKLOG = 1024


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NoStoreErrorTask(ErrorTask):
    def execute(self):
        self.response_headers.append(("Cache-Control", "no-store"))
        super().execute()


class _Channel(HTTPChannel):
    """waitress' channel, with the time a request's first byte arrived and no-store errors."""

    error_task_class = _NoStoreErrorTask

    def __init__(self, *a, **kw):
        self.request_started = time.monotonic()
        super().__init__(*a, **kw)

    def received(self, data):
        if self.request is None and data:
            self.request_started = time.monotonic()
        return super().received(data)


class _Server(TcpWSGIServer):
    channel_class = _Channel
    request_s = REQUEST_S

    def __init__(self, *a, **kw):
        #: connections closed unanswered: "idle" (silent for channel_timeout), "too slow"
        #: (a request not whole request_s after its first byte), "evicted" (the oldest, to
        #: make room at the connection limit)
        self.closed = collections.Counter()
        super().__init__(*a, **kw)

    _evicting = None

    def readable(self):
        """At the connection limit, close the oldest connection that is not being answered
        (a half-sent or idle one) to make room, one at a time: a flood of connections then
        waits behind itself, not a good client behind the flood."""
        if self.accepting and len(self._map) >= self.adj.connection_limit and (
                self._evicting is None or self._evicting.socket is None):
            idle = [ch for ch in self.active_channels.values()
                    if not ch.requests and not ch.will_close]
            if idle:
                self._evicting = min(idle, key=lambda ch: ch.request_started)
                self._evicting.will_close = True  # closed at the next round of the loop
                self.closed["evicted"] += 1
        return super().readable()

    def maintenance(self, now):
        """waitress' (close what was silent for channel_timeout), and the request deadline."""
        idle = now - self.adj.channel_timeout
        slow = time.monotonic() - self.request_s
        for ch in list(self.active_channels.values()):
            if ch.requests or ch.will_close:
                continue  # being answered, or closing already
            if ch.last_activity < idle:
                why = "idle"
            elif ch.request is not None and ch.request_started < slow:
                why = "too slow"
            else:
                continue
            ch.will_close = True  # the loop closes it (writable -> handle_write)
            self.closed[why] += 1


class AppServer:
    def __init__(self, home, port=0, host="127.0.0.1", trusted_proxy=None, public_hosts=(),
                 db_url=None, threads=THREADS, idle_s=IDLE_S, request_s=REQUEST_S,
                 connection_limit=CONNECTION_LIMIT, **config):
        if not is_loopback(host) and not trusted_proxy:
            raise ValueError("serving on %s needs a TLS-terminating reverse proxy in front "
                             "(--trusted-proxy ADDRESS, see the README): the application "
                             "serves plain HTTP on loopback only" % host)
        if trusted_proxy:
            ipaddress.ip_address(trusted_proxy)  # ValueError if not an address
        self.home, self.host, self.port = home, host, port
        self.trusted_proxy, self.public_hosts = trusted_proxy, tuple(public_hosts)
        if trusted_proxy and not self.public_hosts:
            raise ValueError("behind a proxy, give the public host name(s) it serves "
                             "(--public-host)")
        self.db_url, self.config = db_url, config
        self.threads, self.idle_s, self.request_s = threads, idle_s, request_s
        self.connection_limit = connection_limit
        self._srv = self._thread = None
        self._stopping = threading.Event()

    def start(self):
        from . import create_app

        proxied = bool(self.trusted_proxy)
        self.app = create_app(self.home, self.db_url, SESSION_COOKIE_SECURE=proxied,
                              REQUIRE_HTTPS=proxied, **self.config)
        host = "127.0.0.1" if self.host == "localhost" else self.host
        kw = dict(threads=self.threads, connection_limit=self.connection_limit,
                  channel_timeout=self.idle_s, cleanup_interval=1,
                  max_request_header_size=MAX_HEADER_BYTES,
                  max_request_body_size=MAX_BODY_BYTES, asyncore_use_poll=True,
                  recv_bytes=65536,  # an over-long head is read whole: a clean 431
                  backlog=BACKLOG, ident="serene", expose_tracebacks=False,
                  clear_untrusted_proxy_headers=True)
        if proxied:
            kw.update(trusted_proxy=self.trusted_proxy, trusted_proxy_count=1,
                      trusted_proxy_headers={"x-forwarded-proto", "x-forwarded-for"})
        adj = Adjustments(host=host, port=self.port, **kw)
        logging.getLogger("waitress").setLevel(logging.ERROR)  # no line per overflow
        self._map = {}
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adj.threads)
        self._srv = _Server(self.app, self._map, dispatcher=dispatcher, adj=adj,
                            sockinfo=adj.listen[0])
        self._srv.request_s = self.request_s
        self.port = int(self._srv.effective_port)
        if proxied:
            hosts = set(self.public_hosts)
        else:
            hosts = {"%s:%d" % (host, self.port)}
            if is_loopback(host):
                hosts |= {"127.0.0.1:%d" % self.port, "localhost:%d" % self.port}
        self.app.config["ALLOWED_HOSTS"] = {h.lower() for h in hosts}
        self._thread = threading.Thread(target=self._loop, name="webapp", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=0.5, map=self._map, use_poll=True, count=1)
        finally:
            self._srv.task_dispatcher.shutdown(timeout=5)
            wasyncore.close_all(self._map)

    @property
    def closed(self):
        """Connections closed unanswered, by reason ("idle", "too slow")."""
        return self._srv.closed

    @property
    def url(self):
        if self.trusted_proxy:
            return "https://%s/" % self.public_hosts[0]
        return "http://%s:%d/" % ("127.0.0.1" if is_loopback(self.host) else self.host,
                                  self.port)

    def stop(self):
        if self._thread:
            self._stopping.set()
            self._srv.pull_trigger()
            self._thread.join(10)
            self._thread = None
