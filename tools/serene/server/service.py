"""The ingest on MQTT: subscribe to `serene/+/up`, hand each uplink to Ingest, publish acks.

    svc = IngestService(ingest, port, username, password).start()
    ...
    svc.stop()

paho's network thread only queues (topic, payload); one worker thread owns the Ingest and its
SQLite connection, so objects are processed one at a time in arrival order. The queue is
bounded: when the worker falls behind by QUEUE_MAX uplinks, new ones are dropped and counted
(the modules retransmit whatever is not acknowledged). paho reconnects by itself; the
subscription is renewed on every connection.
"""

import logging
import queue
import threading

import paho.mqtt.client as mqtt

log = logging.getLogger("serene.server")

QUEUE_MAX = 10000
UP_FILTER = "serene/+/up"


class IngestService:
    def __init__(self, make_ingest, port, username, password, host="127.0.0.1",
                 client_id="serene-server", tls_ca=None):
        """make_ingest: a callable returning the Ingest, called in the worker thread (SQLite
        connections belong to the thread that made them)."""
        self.make_ingest = make_ingest
        self.host, self.port = host, port
        self.queue = queue.Queue(QUEUE_MAX)
        self.dropped = 0
        self.processed = 0
        self.acks_sent = 0
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._worker = threading.Thread(target=self._work, name="serene-ingest", daemon=True)
        self._error = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def start(self, timeout=10.0):
        self._worker.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError("ingest did not start: %s" % self._error)
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            self.stop()
            raise RuntimeError("no subscription to %s on %s:%d within %.0f s"
                               % (UP_FILTER, self.host, self.port, timeout))
        return self

    def stop(self):
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
        if self._worker.is_alive():
            self._worker.join(10)

    def wait_idle(self, timeout=10.0):
        """Block until every queued uplink has been processed (tests, the bench)."""
        done = threading.Event()

        def waiter():
            self.queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    # --- paho's thread -----------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason, props):
        if reason.is_failure:
            log.error("broker refused the server: %s", reason)
            return
        self.connected.set()
        client.subscribe(UP_FILTER, qos=1)

    def _on_disconnect(self, client, userdata, flags, reason, props):
        self.connected.clear()
        self.subscribed.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); paho reconnects", reason)

    def _on_message(self, client, userdata, msg):
        try:
            self.queue.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self.dropped += 1

    # --- the worker ------------------------------------------------------------------------

    def _work(self):
        try:
            ingest = self.make_ingest()
        except Exception as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()
            return
        self.ingest = ingest
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    topic, payload = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    for t, ack in ingest.handle(topic, payload):
                        self.client.publish(t, ack, qos=1)
                        self.acks_sent += 1
                    self.processed += 1
                finally:
                    self.queue.task_done()
        finally:
            ingest.store.close()
