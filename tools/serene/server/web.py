"""A small read-only web view of the ledger and the data, on loopback.

    serene server --home DIR --http 8080      then http://127.0.0.1:8080/
    WebView(home, port=0).start() -> .port; .stop()

    GET /                      every device: objects, ranges, gaps, duplicates, rejects, status
    GET /ledger.json           the same as `serene report --json` (without audit)
    GET /devices/<id>          one device: its ledger, recent rejects, newest records decoded
    GET /devices/<id>.json     the same as JSON ({"ledger": ..., "records": [...]})

It only reads (a read-only SQLite connection per request), binds 127.0.0.1 only, takes no
input but the path, and escapes everything it prints: the data came from modules, which are
untrusted, and a record's text field must never become markup.

Until the clinicians' application replaces it, it also holds against a hostile local page or
process (issue 8, item 10):
- the Host header must be 127.0.0.1:<port> or localhost:<port> (the address it serves):
  a DNS-rebinding page in a local browser sends Host: evil.example and gets 421;
- one selector thread reads every request's line and headers without blocking, each within
  HEADER_TIMEOUT_S of its connection (else closed); at most MAX_CONNECTIONS are being read
  (a new one closes the oldest); complete requests go to WORKERS threads (at most
  MAX_PENDING waiting, else 503), each sending its page within SEND_TIMEOUT_S. So 500
  half-sent requests hold 500 sockets and no thread, and a good request is still served;
- every response says Cache-Control: no-store (patient data stays out of browser caches) and
  Connection: close.
"""

import collections
import concurrent.futures
import html
import http
import http.client
import io
import json
import re
import selectors
import socket
import threading
import time

from .report import registered_devices
from .store import Store, StoreError, db_path

RECORDS_SHOWN = 200
_DEVICE_PATH = re.compile(r"^/devices/([A-Za-z0-9][A-Za-z0-9_.-]{0,63}?)(\.json)?$")

_STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eee}.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}
code{font-size:90%}"""


def _e(x):
    return html.escape("" if x is None else str(x), quote=True)


def _ranges(rs):
    return ", ".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in rs) or "-"


def _status(d):
    if not d["registered"]:
        return "bad", "unregistered"
    if d["checkpoint_mismatches"]:
        return "bad", "checkpoint mismatch"
    if not d["epochs"]:
        return "bad", "nothing received"
    return ("ok", "complete") if d["complete"] else ("bad", "incomplete")


def _page(title, body):
    return ("<!doctype html><html><head><meta charset='utf-8'><title>%s</title>"
            "<style>%s</style></head><body><h1>%s</h1>%s<p><small>generated %s</small></p>"
            "</body></html>" % (_e(title), _STYLE, _e(title), body,
                                _e(time.strftime("%Y-%m-%d %H:%M:%S"))))


HEADER_TIMEOUT_S = 5.0  # a request line + headers must arrive within this (a browser: ms)
MAX_HEADER_BYTES = 8192  # request line + headers (a browser's GET: well under 2 KiB)
MAX_CONNECTIONS = 256  # connections whose request is still arriving; a new one drops the oldest
WORKERS = 4  # threads that build and send pages (each page is one SQLite read)
MAX_PENDING = 32  # complete requests waiting for a worker; beyond, 503 at once
SEND_TIMEOUT_S = 5.0  # a page must be taken by the client within this (sendall's total)
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
    ("Cache-Control", "no-store"),
    ("Connection", "close"),
)


class _Conn:
    __slots__ = ("sock", "buf", "deadline")

    def __init__(self, sock, deadline):
        self.sock = sock
        self.buf = bytearray()
        self.deadline = deadline


def _response(status, ctype, body, head=False):
    data = body.encode() if isinstance(body, str) else body
    lines = ["HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase),
             "Content-Type: %s; charset=utf-8" % ctype, "Content-Length: %d" % len(data)]
    lines += ["%s: %s" % kv for kv in _SECURITY_HEADERS]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else data)


def _parse(buf):
    """(method, target, Host values) of a request head, or an (status, reason) error."""
    end = buf.find(b"\r\n\r\n")
    line, _, rest = bytes(buf[:end + 2]).partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None, (400, "bad request line")
    method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException:
        return None, (400, "bad headers")
    return (method, target, headers.get_all("Host") or []), None


class WebView:
    def __init__(self, home, port=0, host="127.0.0.1", header_timeout_s=HEADER_TIMEOUT_S,
                 max_connections=MAX_CONNECTIONS, workers=WORKERS):  # fmt: skip
        self.home = home
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._sock = socket.create_server((host, port), backlog=128)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        names = {host, "127.0.0.1", "localhost"}
        self.allowed_hosts = {"%s:%d" % (n, self.port) for n in names}
        if self.port == 80:
            self.allowed_hosts |= names
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, "accept")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns = collections.OrderedDict()  # fd -> _Conn, oldest first
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "serene-web-worker")
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._running = False
        self._thread = threading.Thread(target=self._serve, name="serene-web", daemon=True)
        self.dropped = collections.Counter()  # why connections were closed unanswered

    def start(self):
        self._running = True
        self._thread.start()
        return self

    def stop(self):
        self._running = False
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(5)
        self._pool.shutdown(wait=True)
        for c in list(self._conns.values()):
            self._close(c)
        self._sel.close()
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()

    # --- the selector loop: accept, read request heads, enforce deadlines ------------------

    def _serve(self):
        while self._running:
            timeout = 0.5
            if self._conns:
                oldest = next(iter(self._conns.values()))
                timeout = max(0.0, min(timeout, oldest.deadline - time.monotonic()))
            for key, _ in self._sel.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    try:
                        self._wake_r.recv(64)
                    except OSError:
                        pass
                else:
                    self._read(key.data)
            now = time.monotonic()
            while self._conns:  # deadlines are in arrival order: the oldest expires first
                c = next(iter(self._conns.values()))
                if c.deadline > now:
                    break
                self.dropped["header timeout"] += 1
                self._close(c)

    def _accept(self):
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: try again at the next event
                return
            if len(self._conns) >= self.max_connections:
                self.dropped["too many connections"] += 1
                self._close(next(iter(self._conns.values())))
            sock.setblocking(False)
            c = _Conn(sock, time.monotonic() + self.header_timeout_s)
            self._conns[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _read(self, c):
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
            return
        c.buf += data
        if b"\r\n\r\n" not in c.buf:
            if len(c.buf) > MAX_HEADER_BYTES:
                self._answer_now(c, 431, "request header fields too large")
            return
        if c.buf.find(b"\r\n\r\n") > MAX_HEADER_BYTES:
            self._answer_now(c, 431, "request header fields too large")
            return
        self._detach(c)
        if not self._pending.acquire(blocking=False):
            self._answer_now(c, 503, "busy", detached=True)
            return
        self._pool.submit(self._handle, c)

    def _detach(self, c):
        self._conns.pop(c.sock.fileno(), None)
        self._sel.unregister(c.sock)

    def _close(self, c):
        if self._conns.pop(c.sock.fileno(), None) is not None:
            self._sel.unregister(c.sock)
        c.sock.close()

    def _answer_now(self, c, status, text, detached=False):
        """A short error from the selector thread: one non-blocking send, then close."""
        try:
            c.sock.send(_response(status, "text/plain", text))
        except OSError:
            pass
        if detached:
            c.sock.close()
        else:
            self._close(c)

    # --- workers: one complete request each ----------------------------------------------

    def _handle(self, c):
        try:
            try:
                data = self.respond(c.buf)
            except Exception as e:  # a bug in a page: answered, counted, not a dead worker
                self.dropped["internal error: %s" % type(e).__name__] += 1
                data = _response(500, "text/plain", "internal error")
            c.sock.setblocking(True)
            c.sock.settimeout(SEND_TIMEOUT_S)  # Python >= 3.5: the total of a sendall
            c.sock.sendall(data)
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            c.sock.close()
            self._pending.release()

    def respond(self, head):
        """The whole response (bytes) to a request head (request line + headers + CRLF)."""
        req, err = _parse(head)
        if err:
            return _response(err[0], "text/plain", err[1])
        method, target, hosts = req
        if len(hosts) != 1:
            return _response(400, "text/plain", "one Host header is required")
        if hosts[0].strip().lower() not in self.allowed_hosts:
            return _response(421, "text/plain", "this server answers only for %s"
                             % " and ".join(sorted(self.allowed_hosts)))
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain", "read-only: GET only")
        try:
            status, ctype, body = self.route(target.split("?", 1)[0])
        except StoreError as e:
            status, ctype, body = 503, "text/plain", "no data yet: %s" % e
        return _response(status, ctype, body, head=method == "HEAD")

    # --- pages ---------------------------------------------------------------------------

    def _store(self):
        return Store(db_path(self.home), readonly=True)

    def route(self, path):
        if path == "/ledger.json":
            return 200, "application/json", json.dumps(
                {"devices": self.ledger(), "generated_at": time.time()}, indent=2,
                sort_keys=True)
        if path == "/":
            return 200, "text/html", self.index()
        m = _DEVICE_PATH.match(path)
        if m:
            dev = m.group(1)
            led, recs = self.device(dev)
            if led is None:
                return 404, "text/plain", "no such device"
            if m.group(2):
                return 200, "application/json", json.dumps({"ledger": led, "records": recs},
                                                           indent=2, sort_keys=True)
            return 200, "text/html", self.device_page(led, recs)
        return 404, "text/plain", "not found"

    def ledger(self):
        st = self._store()
        try:
            return st.ledger(registered_devices(self.home))
        finally:
            st.close()

    def device(self, dev):
        reg = registered_devices(self.home)
        st = self._store()
        try:
            if dev not in reg and dev not in st.devices():
                return None, None
            recs = st.records(dev)[-RECORDS_SHOWN:]
            return st.device_ledger(dev, dev in reg), recs
        finally:
            st.close()

    def index(self):
        rows = []
        for dev, d in self.ledger().items():
            cls, status = _status(d)
            epochs = d["epochs"] or [None]
            for i, e in enumerate(epochs):
                rows.append("<tr>%s<td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td>%s</tr>"
                            % ("<td rowspan=%d><a href='/devices/%s'>%s</a></td>"
                               % (len(epochs), _e(dev), _e(dev)) if i == 0 else "",
                               _e(e and e["epoch"]), _e(e and e["objects"]),
                               _e(_ranges(e["received"]) if e else "-"),
                               _e(_ranges(e["gaps"]) if e else "-"),
                               _e(e and e["duplicates"]),
                               "<td rowspan=%d>%s</td><td rowspan=%d class=%s>%s</td>"
                               % (len(epochs), _e(", ".join("%s: %d" % kv for kv in sorted(
                                   d["rejects"].items())) or "-"), len(epochs), cls,
                                  _e(status)) if i == 0 else ""))
        body = ("<p>Completeness per device and epoch. <a href='/ledger.json'>JSON</a></p>"
                "<table><tr><th>device</th><th>epoch</th><th>objects</th><th>received</th>"
                "<th>gaps</th><th>duplicates</th><th>rejects</th><th>status</th></tr>%s"
                "</table>" % "".join(rows))
        return _page("serene: completeness ledger", body)

    def device_page(self, d, recs):
        cls, status = _status(d)
        cp = d["last_checkpoint"]
        parts = ["<p>Status: <span class=%s>%s</span>; %d objects, %d missing, %d duplicates, "
                 "%d rejected. <a href='/devices/%s.json'>JSON</a> · <a href='/'>all devices"
                 "</a></p>" % (cls, _e(status), d["objects"], d["missing"], d["duplicates"],
                               d["rejected"], _e(d["device"]))]
        parts.append("<p>Last checkpoint verified: %s</p>" % (
            _e("epoch %d seq %d, covering %d-%d (%d objects)" % (
                cp["epoch"], cp["seq"], cp["first_seq"], cp["seq"] - 1, cp["count"]))
            if cp else "none"))
        parts.append("<h2>Epochs</h2><table><tr><th>epoch</th><th>objects</th><th>received"
                     "</th><th>gaps</th><th>never sealed</th><th>checkpoints</th></tr>")
        for e in d["epochs"]:
            c = e["checkpoints"]
            parts.append("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td>"
                         "<td>%d verified, %d pending, %d mismatch</td></tr>"
                         % (_e(e["epoch"]), _e(e["objects"]), _e(_ranges(e["received"])),
                            _e(_ranges(e["gaps"])), _e(_ranges(e["never_sealed"])),
                            c["verified"], c["pending"], c["mismatch"]))
        parts.append("</table><h2>Recent rejects</h2><table><tr><th>when</th><th>reason</th>"
                     "<th>detail</th><th>epoch/seq</th><th>bytes</th><th>first bytes</th></tr>")
        for r in d["recent_rejects"]:
            where = "-" if r["epoch"] is None else "%s/%s" % (r["epoch"], r["seq"])
            parts.append("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td>"
                         "<td><code>%s</code></td></tr>"
                         % (_e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))),
                            _e(r["reason"]), _e(r["detail"]), _e(where), _e(r["size"]),
                            _e(r["head"])))
        parts.append("</table><h2>Records (newest %d)</h2><table><tr><th>epoch</th><th>seq"
                     "</th><th>received</th><th>fields</th></tr>" % RECORDS_SHOWN)
        for r in reversed(recs):
            fields = r["fields"]
            shown = ("<span class=bad>undecodable: %s</span>" % _e(r["decode_error"])
                     if fields is None else _e(", ".join(
                         "%s=%s" % (k, v) for k, v in sorted(fields.items()))))
            parts.append("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>" % (
                _e(r["epoch"]), _e(r["seq"]),
                _e(time.strftime("%H:%M:%S", time.localtime(r["received_at"]))), shown))
        parts.append("</table>")
        return _page("serene: " + d["device"], "".join(parts))
