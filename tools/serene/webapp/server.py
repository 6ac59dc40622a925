"""Serve the application: werkzeug's threaded WSGI server, 127.0.0.1 by default; TLS when
bound to any other address (refused without --tls-cert/--tls-key).

    AppServer(home, port=0, host="127.0.0.1", tls=None).start() -> .port, .url; .stop()
"""

import ipaddress
import threading

from werkzeug.serving import make_server


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AppServer:
    def __init__(self, home, port=0, host="127.0.0.1", tls=None, db_url=None, **config):
        if not is_loopback(host) and not tls:
            raise ValueError("serving on %s needs TLS (--tls-cert and --tls-key)" % host)
        self.home, self.host, self.port, self.tls = home, host, port, tls
        self.db_url, self.config = db_url, config
        self._srv = self._thread = None

    def start(self):
        import logging

        from . import create_app

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

        self.app = create_app(self.home, self.db_url, SESSION_COOKIE_SECURE=bool(self.tls),
                              **self.config)
        self._srv = make_server(self.host, self.port, self.app, threaded=True,
                                ssl_context=tuple(self.tls) if self.tls else None)
        self.port = self._srv.server_port
        hosts = {"%s:%d" % (self.host, self.port)}
        if is_loopback(self.host):
            hosts |= {"127.0.0.1:%d" % self.port, "localhost:%d" % self.port}
        hosts |= set(self.config.get("EXTRA_HOSTS", ()))
        self.app.config["ALLOWED_HOSTS"] = hosts
        self._thread = threading.Thread(target=self._srv.serve_forever, name="webapp",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def url(self):
        return "%s://%s:%d/" % ("https" if self.tls else "http",
                                "127.0.0.1" if is_loopback(self.host) else self.host,
                                self.port)

    def stop(self):
        if self._srv:
            self._srv.shutdown()
            self._srv.server_close()
            self._thread.join(5)
            self._srv = None
