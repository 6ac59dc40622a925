"""Host side of the unix-port I2C bridge (wire protocol in drivers/unix/i2c_bridge.py).

An emulated I2C device is any object with two methods:
    i2c_write(data: bytes) -> bool          True = ACK, False = address NACK (busy)
    i2c_read(n: int) -> bytes | None        n bytes, or None = address NACK (busy)
An address with no device NACKs, as on a real bus. One thread per connection; device calls
are serialised with a lock, since a real bus carries one transfer at a time.
"""

import socket
import struct
import threading

OP_WRITE = ord("W")
OP_READ = ord("R")
ACK, NACK = 0, 1


class I2CBridgeServer:
    def __init__(self, devices, host="127.0.0.1", port=0):
        self.devices = dict(devices)
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._threads = []
        self._closed = False
        self.transfers = 0

    def start(self):
        t = threading.Thread(target=self._accept_loop, name="i2c-bridge", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def serve_forever(self):
        self._accept_loop()

    def close(self):
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def _accept_loop(self):
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _recv_exact(conn, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _serve(self, conn):
        with conn:
            try:
                while True:
                    op, addr, n = struct.unpack(">BBH", self._recv_exact(conn, 4))
                    if op == OP_WRITE:
                        data = self._recv_exact(conn, n)
                        conn.sendall(bytes([ACK if self._write(addr, data) else NACK]))
                    elif op == OP_READ:
                        data = self._read(addr, n)
                        if data is None:
                            conn.sendall(bytes([NACK]))
                        else:
                            conn.sendall(bytes([ACK]) + bytes(data[:n]).ljust(n, b"\xff"))
                    else:
                        return  # not our protocol: drop the connection
            except (EOFError, OSError):
                return

    def _write(self, addr, data):
        dev = self.devices.get(addr)
        with self._lock:
            self.transfers += 1
            return dev is not None and dev.i2c_write(data)

    def _read(self, addr, n):
        dev = self.devices.get(addr)
        with self._lock:
            self.transfers += 1
            return None if dev is None else dev.i2c_read(n)
