"""The application as `serene server --http` serves it (waitress, webapp/server.py) against a
hostile local page or process (issue 8, item 10; issue 11, item 11), over real sockets: the
Host header is checked (DNS rebinding), half-sent requests hold no thread and do not keep a
good request from being served, nothing is cacheable; behind a TLS-terminating proxy, only
what reached it over HTTPS is served and the cookie is Secure."""

import re
import socket
import threading
import time
import urllib.request

import pytest
import sqlalchemy as sa

from webapp_fixtures import PASSWORD, add_user, provision_home

from serene.webapp import db
from serene.webapp.server import THREADS, AppServer


@pytest.fixture(scope="module")
def home(tmp_path_factory, database_module):  # SQLite, then PostgreSQL
    return provision_home(tmp_path_factory.mktemp("serving"), ["SRN-0001"])


@pytest.fixture
def srv(home):
    s = AppServer(home, 0).start()
    yield s
    s.stop()


def raw(port, request, timeout=5):
    """Send `request` as is, return (status, headers dict, body) of the whole answer (the
    server closes after it: our requests say Connection: close, its errors close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get(port, host, path="/login", extra=""):
    req = "GET %s HTTP/1.1\r\n" % path
    if host is not None:
        req += "Host: %s\r\n" % host
    return raw(port, (req + extra + "User-Agent: test\r\nConnection: close\r\n\r\n").encode())


def test_host_header_allow_list(srv):
    port = srv.port
    for host in ("127.0.0.1:%d" % port, "localhost:%d" % port, "LOCALHOST:%d" % port):
        status, headers, body = get(port, host)
        assert status == 200 and b'name="csrf_token"' in body, host
    # A DNS-rebinding page: the browser sends the attacker's name (with or without a port).
    for host in ("evil.example", "evil.example:%d" % port, "127.0.0.1:%d" % (port + 1),
                 "127.0.0.1", "localhost", "127.0.0.1:%d.evil.example" % port):
        for path in ("/login", "/triage.json", "/devices"):
            status, _, body = get(port, host, path)
            assert status == 421, (host, path)
            assert b"csrf_token" not in body
    # No Host, or two: 400.
    assert get(port, None)[0] == 400
    two = ("GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nHost: evil.example\r\n"
           "Connection: close\r\n\r\n" % port)
    assert raw(port, two.encode())[0] == 400
    # urllib (a real client) gets the page.
    with urllib.request.urlopen(srv.url + "login", timeout=5) as r:
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"


def test_every_response_is_no_store(srv):
    port, host = srv.port, "127.0.0.1:%d" % srv.port
    post = ("POST /login HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-www-form-"
            "urlencoded\r\nContent-Length: 12\r\nConnection: close\r\n\r\nusername=bob" % host)
    answers = [
        get(port, host, "/login"),  # 200
        get(port, host, "/triage.json"),  # 401: anonymous JSON
        get(port, host, "/devices"),  # 302 to the login page
        get(port, host, "/favicon.ico"),  # 204
        get(port, "evil.example"),  # 421
        get(port, None),  # 400 (ours)
        raw(port, post.encode()),  # 400: no CSRF token
        raw(port, b"garbage\r\n\r\n"),  # 400 (waitress)
        raw(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"),  # 431 (waitress)
        raw(port, ("POST /login HTTP/1.1\r\nHost: %s\r\nContent-Length: 100000\r\n\r\n"
                   % host).encode()),  # 413 (waitress)
    ]
    assert [a[0] for a in answers] == [200, 401, 302, 204, 421, 400, 400, 400, 431, 413]
    for status, headers, _ in answers:
        assert headers["cache-control"] == "no-store", status
    for status, headers, _ in answers[:7]:  # the application's answers
        assert headers["x-content-type-options"] == "nosniff", status
        assert "unsafe-inline" not in headers["content-security-policy"]


def test_500_half_sent_requests_hold_no_thread_and_a_good_one_is_served(home):
    before = threading.active_count()
    s = AppServer(home, 0).start()  # the defaults: 4 threads, 1000 connections, 5 s
    half = []
    try:
        assert threading.active_count() == before + 1 + THREADS
        for _ in range(500):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Slow: " % s.port)
            half.append(c)
        time.sleep(0.3)  # the server has read them all
        t0 = time.monotonic()
        status, _, body = get(s.port, "127.0.0.1:%d" % s.port, "/login")
        served_s = time.monotonic() - t0
        assert status == 200 and b'name="csrf_token"' in body
        assert served_s < 2.0, served_s
        # The loop thread and THREADS workers, whatever the number of sockets.
        assert threading.active_count() <= before + 1 + THREADS
        # Silent for five seconds, the half-sent requests are closed, unanswered.
        deadline = time.monotonic() + 10
        while s.closed["idle"] < 500 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.closed == {"idle": 500}
        for c in half[:20]:
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for c in half:
            c.close()
        s.stop()
    assert threading.active_count() <= before


def test_at_the_connection_limit_the_oldest_half_sent_request_makes_room(home):
    s = AppServer(home, 0, connection_limit=50).start()  # 48 connections (+ listener, trigger)
    half = []
    try:
        for _ in range(100):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Slow: " % s.port)
            half.append(c)
        t0 = time.monotonic()
        status, _, body = get(s.port, "127.0.0.1:%d" % s.port, "/login")
        assert status == 200 and b'name="csrf_token"' in body
        assert time.monotonic() - t0 < 2.0
        # Each time the 48 are open the oldest not being answered goes: 47 remain.
        assert s.closed["evicted"] == 101 - 47
        for c in half[:10]:  # the oldest: closed, unanswered
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for c in half:
            c.close()
        s.stop()


def test_a_trickling_or_silent_connection_is_closed_at_its_deadline(home):
    s = AppServer(home, 0, idle_s=1, request_s=1.0).start()
    try:
        silent = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        trick = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(4)]
        t0 = time.monotonic()
        head = b"GET /login HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Slow: " % s.port
        closed = {}
        i = 0
        while len(closed) < 4 and time.monotonic() - t0 < 6:
            for n, c in enumerate(trick):  # a byte every 0.1 s: never silent for 1 s
                if n in closed:
                    continue
                try:
                    c.sendall(head[i:i + 1] if i < len(head) else b"a")
                except (BrokenPipeError, ConnectionResetError):
                    closed[n] = time.monotonic() - t0
            i += 1
            time.sleep(0.1)
        assert len(closed) == 4
        # closed within a second or two of its 1 s deadline (maintenance runs every second;
        # a write notices the close one round-trip later)
        assert all(0.9 <= t < 4.0 for t in closed.values()), closed
        assert s.closed["too slow"] == 4
        try:
            assert silent.recv(1) == b""  # silent for idle_s: closed, unanswered
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 4.0
        for c in trick + [silent]:
            c.close()
        # A good client is served as before.
        assert get(s.port, "127.0.0.1:%d" % s.port)[0] == 200
    finally:
        s.stop()


def test_exposed_only_behind_a_tls_proxy(home):
    with pytest.raises(ValueError, match="proxy"):
        AppServer(home, 0, host="0.0.0.0")  # not loopback, no proxy: refused
    with pytest.raises(ValueError, match="public-host"):
        AppServer(home, 0, host="0.0.0.0", trusted_proxy="127.0.0.1")
    # The proxy runs on this machine (127.0.0.1): the test speaks for it.
    s = AppServer(home, 0, trusted_proxy="127.0.0.1",
                  public_hosts=["serene.example.org"]).start()
    try:
        assert s.url == "https://serene.example.org/"
        add_user(s.app.engine, "tech", "technician")
        https = "X-Forwarded-Proto: https\r\nX-Forwarded-For: 203.0.113.7\r\n"
        pub = "serene.example.org"
        # Plain HTTP (a client that went around the proxy, or the proxy's port 80): refused.
        assert get(s.port, pub)[0] == 403
        # The loopback address is no Host of the public service.
        assert get(s.port, "127.0.0.1:%d" % s.port, extra=https)[0] == 421
        status, headers, body = get(s.port, pub, extra=https)
        assert status == 200
        assert "Secure" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
        assert headers["strict-transport-security"].startswith("max-age=")
        assert headers["cache-control"] == "no-store"
        # Log in as a browser does through the proxy: same cookie, CSRF token, and the
        # same-origin Referer that Flask-WTF requires over HTTPS (Referrer-Policy: same-origin).
        cookie = headers["set-cookie"].split(";", 1)[0]
        token = re.search(rb'name="csrf_token" value="([^"]+)"', body).group(1).decode()
        form = "csrf_token=%s&username=tech&password=%s" % (token, PASSWORD.replace(" ", "+"))

        def login(referer):
            req = ("POST /login HTTP/1.1\r\nHost: %s\r\n%sCookie: %s\r\n%sContent-Type: "
                   "application/x-www-form-urlencoded\r\nContent-Length: %d\r\n"
                   "Connection: close\r\n\r\n%s" % (pub, https, cookie, referer, len(form),
                                                    form))
            return raw(s.port, req.encode())

        assert login("")[0] == 400  # no Referer over HTTPS: CSRF check fails
        status, headers, _ = login("Referer: https://%s/login\r\n" % pub)
        assert status == 302 and "Secure" in headers["set-cookie"]
        with s.app.engine.begin() as conn:
            ip = conn.execute(sa.select(db.audit.c.ip).where(db.audit.c.action == "login")
                              .order_by(db.audit.c.id.desc())).scalar()
        assert ip == "203.0.113.7"  # the client's address as the proxy saw it
    finally:
        s.stop()
    # X-Forwarded-Proto from anyone but the configured proxy is deleted: still plain, 403.
    s = AppServer(home, 0, trusted_proxy="192.0.2.1", public_hosts=["serene.example.org"]) \
        .start()
    try:
        assert get(s.port, "serene.example.org", extra="X-Forwarded-Proto: https\r\n")[0] == 403
    finally:
        s.stop()
