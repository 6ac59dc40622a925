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
"""

import html
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class WebView:
    def __init__(self, home, port=0, host="127.0.0.1"):
        self.home = home
        view = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                try:
                    status, ctype, body = view.route(self.path.split("?", 1)[0])
                except StoreError as e:
                    status, ctype, body = 503, "text/plain", "no data yet: %s" % e
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype + "; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Security-Policy", "default-src 'none'; "
                                 "style-src 'unsafe-inline'")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt, *args):
                pass  # quiet: the server's own log is about modules

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="serene-web",
                                        daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

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
