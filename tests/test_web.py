"""The web view against a hostile local page or process (issue 8, item 10), over real
sockets: the Host header is checked (DNS rebinding), half-sent requests hold no thread and do
not keep a good request from being served, and nothing is cacheable."""

import socket
import threading
import time
import urllib.request

import pytest

from serene.server.store import Store, db_path
from serene.server.web import WORKERS, WebView


@pytest.fixture
def view(tmp_path):
    Store(db_path(tmp_path)).close()  # an empty database: pages render
    v = WebView(tmp_path, port=0).start()
    yield v
    v.stop()


def raw(port, request, timeout=5):
    """Send `request` as is, return (status, headers dict, body) of the whole answer."""
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
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(port, host, path="/"):
    req = "GET %s HTTP/1.1\r\n" % path
    if host is not None:
        req += "Host: %s\r\n" % host
    return raw(port, (req + "User-Agent: test\r\n\r\n").encode())


def test_host_header_allow_list(view):
    port = view.port
    for host in ("127.0.0.1:%d" % port, "localhost:%d" % port, "LOCALHOST:%d" % port):
        status, headers, body = get(port, host)
        assert status == 200 and b"completeness ledger" in body, host
    # A DNS-rebinding page: the browser sends the attacker's name (with or without a port).
    for host in ("evil.example", "evil.example:%d" % port, "127.0.0.1:%d" % (port + 1),
                 "127.0.0.1", "localhost", "127.0.0.1:%d.evil.example" % port):  # fmt: skip
        status, _, body = get(port, host, "/ledger.json")
        assert status == 421, host
        assert b"devices" not in body
    # No Host, or two: 400.
    assert get(port, None)[0] == 400
    two = "GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nHost: evil.example\r\n\r\n" % port
    assert raw(port, two.encode())[0] == 400
    # urllib (a real client) gets the page.
    with urllib.request.urlopen("http://127.0.0.1:%d/ledger.json" % port, timeout=5) as r:
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"


def test_every_response_is_no_store(view):
    port, host = view.port, "127.0.0.1:%d" % view.port
    answers = [
        get(port, host, "/"),  # 200
        get(port, host, "/ledger.json"),  # 200 JSON
        get(port, host, "/devices/SRN-9999"),  # 404
        get(port, host, "/nope"),  # 404
        get(port, "evil.example"),  # 421
        get(port, None),  # 400
        raw(port, ("POST / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode()),  # 405
        raw(port, b"garbage\r\n\r\n"),  # 400
        raw(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"),  # 431
    ]
    assert [a[0] for a in answers] == [200, 200, 404, 404, 421, 400, 405, 400, 431]
    for status, headers, _ in answers:
        assert headers["Cache-Control"] == "no-store", status
        assert headers["Connection"] == "close" and headers["X-Content-Type-Options"] == "nosniff"


def test_500_half_sent_requests_hold_no_thread_and_a_good_one_is_served(tmp_path):
    Store(db_path(tmp_path)).close()
    before = threading.active_count()
    v = WebView(tmp_path, port=0).start()  # the defaults: 256 connections, 5 s for a head
    half = []
    try:
        for _ in range(500):
            s = socket.create_connection(("127.0.0.1", v.port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Slow: " % v.port)
            half.append(s)
        t0 = time.monotonic()
        status, headers, body = get(v.port, "127.0.0.1:%d" % v.port, "/ledger.json")
        served_s = time.monotonic() - t0
        assert status == 200 and b'"devices"' in body
        assert served_s < 2.0, served_s
        # The selector thread and at most WORKERS workers, whatever the number of sockets.
        assert threading.active_count() <= before + 1 + WORKERS
        # At most 256 heads are read at once: the oldest half-sent ones made room (the good
        # request took a slot too).
        assert v.dropped["too many connections"] == 501 - 256
    finally:
        for s in half:
            s.close()
        v.stop()
    assert threading.active_count() <= before


def test_a_half_sent_request_is_closed_at_its_deadline(tmp_path):
    v = WebView(tmp_path, port=0, header_timeout_s=0.5).start()
    try:
        socks = [socket.create_connection(("127.0.0.1", v.port), timeout=3) for _ in range(5)]
        t0 = time.monotonic()
        for s in socks[1:]:
            s.sendall(b"GET / HTTP/1.1\r\nHost: ")  # a slow client: never finishes
        for s in socks:
            try:
                assert s.recv(1) == b""  # closed by the server, without an answer
            except ConnectionResetError:
                pass
        assert 0.4 <= time.monotonic() - t0 < 2.0
        assert v.dropped["header timeout"] == 5
        for s in socks:
            s.close()
    finally:
        v.stop()
