"""PumpSimulator: the pump model behind the FK-Base ASCII link, on a pty or a serial port.

One worker thread runs both the model (1 s ticks of SIMULATED time, `speed` simulated seconds
per real second) and the link (real time: the driver's time-outs are real). See the package
docstring for the scenario format.
"""

import collections
import json
import os
import pathlib
import random
import select
import threading
import time
import tty

from . import model as m
from .protocol import (
    ACK,
    ENQ,
    ERR_NOT_READY,
    NAK,
    FrameReceiver,
    encode,
)

SCENARIOS_DIR = pathlib.Path(__file__).parent / "scenarios"

#: Link timing of the simulated pump (real seconds).
ACK_TIMEOUT_S = 1.0  # a frame we sent not ACKed in this time: reply dropped, event resent (R)
CONFIRM_TIMEOUT_S = 1.0  # an ACKed event not confirmed with <addr>E in this time is resent (P)
ENQ_IDLE_S = 3.0  # spec: the simulator sends ENQ after 3 s of silence (P)
DC4_DEADLINE_S = 1.0  # an ENQ without DC4 after this is counted unanswered
DC_SETTLE_S = 0.95  # spec: 1 s after DC before the next command; 50 ms of timestamp slack
MAX_REPLY_SENDS = 3  # a reply NAKed this many times is given up (the host will retry)
LOOP_S = 0.005  # worker loop period when the line is quiet

FAULTS = {
    "delay_ms": 0,  # response delay before each reply (real ms)
    "noise": 0.0,  # p. of a burst of random bytes before a frame the pump sends
    "bad_checksum": 0.0,  # p. a frame is first sent with a corrupted checksum
    "control_in_frame": 0.0,  # p. a frame is first sent with a control byte inside
    "too_long": 0.0,  # p. a frame is first sent padded over 80 payload chars
    "drop_ack": 0.0,  # p. a host frame is not ACKed (the reply still comes)
    "drop_reply": 0.0,  # p. a host request is ACKed but never answered
    "nak6": 0.0,  # p. a host frame is answered NAK '6' (receiver not ready); 1.0 = NAK storm
}

ACTIONS = (
    "alarm",
    "clear_alarm",
    "start",
    "pause",
    "stop",
    "set",
    "volume_reset",
    "error",
    "unplug",
    "power_cycle",
    "faults",
)
SETTABLE = ("rate", "dose", "battery", "power", "flush_rate", "flush_volume", "flush_interval")


class ScenarioError(ValueError):
    """A scenario that cannot be loaded: `where` names the file or key."""

    def __init__(self, message, where=""):
        super().__init__("%s: %s" % (where, message) if where else message)
        self.where = where


def scenario_names():
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.json"))


def load_scenario(scenario):
    """A validated scenario dict from a name (scenarios/NAME.json), a path, or a dict."""
    where = "scenario"
    if isinstance(scenario, dict):
        data = json.loads(json.dumps(scenario))
    else:
        path = pathlib.Path(scenario)
        if not (path.suffix == ".json" or os.sep in str(scenario)):
            path = SCENARIOS_DIR / (str(scenario) + ".json")
            if not path.exists():
                raise ScenarioError(
                    "unknown scenario %r (known: %s)" % (scenario, ", ".join(scenario_names()))
                )
        where = str(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ScenarioError(e.strerror or str(e), where) from None
        except ValueError as e:
            raise ScenarioError("not JSON: %s" % e, where) from None
    if not isinstance(data, dict):
        raise ScenarioError("top level must be an object", where)
    unknown = set(data) - {"description", "identity", "initial", "faults", "actions"}
    if unknown:
        raise ScenarioError("unknown keys %s" % sorted(unknown), where)
    bad = set(data.get("faults", {})) - set(FAULTS)
    if bad:
        raise ScenarioError("unknown faults %s" % sorted(bad), where)
    for i, act in enumerate(data.get("actions", [])):
        if not isinstance(act, dict) or not isinstance(act.get("at"), (int, float)):
            raise ScenarioError("action %d needs a numeric 'at'" % i, where)
        check_action(act, "%s: action %d" % (where, i))
    data["actions"] = sorted(data.get("actions", []), key=lambda a: a["at"])
    return data


def check_action(act, where="action"):
    if act.get("do") not in ACTIONS:
        raise ScenarioError("'do' must be one of %s" % (ACTIONS,), where)
    if act["do"] == "set" and set(act) - {"at", "do"} - set(SETTABLE):
        raise ScenarioError("set: unknown keys %s" % sorted(set(act) - {"at", "do"}), where)
    if act["do"] == "faults" and set(act.get("set", {})) - set(FAULTS):
        raise ScenarioError("faults: unknown keys %s" % sorted(act["set"]), where)


class _Pty:
    """The simulator's end of a pty; the firmware opens `path`. The slave stays open here so
    that the firmware can close and reopen it, and is raw so nothing echoes."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)

    def fileno(self):
        return self.master

    def read(self):
        try:
            return os.read(self.master, 4096)
        except (BlockingIOError, OSError):
            return b""

    def write(self, data):
        try:
            os.write(self.master, data)
        except BlockingIOError:
            pass  # nobody reading and the pty buffer full: the bytes are lost, as on a line

    def close(self):
        os.close(self.master)
        os.close(self.slave)


class _Serial:
    """A real serial port (pyserial): 19200 7E1 (spec (R))."""

    def __init__(self, port):
        import serial  # pyserial, only needed for a real port

        self.s = serial.Serial(
            port, 19200, bytesize=serial.SEVENBITS, parity=serial.PARITY_EVEN, timeout=0
        )
        self.path = port

    def fileno(self):
        return self.s.fileno()

    def read(self):
        return self.s.read(4096)

    def write(self, data):
        self.s.write(data)

    def close(self):
        self.s.close()


class PumpSimulator:
    """See the package docstring. Thread-safe: snapshot(), act() and log from any thread."""

    def __init__(self, scenario="normal-feed", speed=1.0, port=None, seed=0):
        self.scenario = load_scenario(scenario)
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.speed = float(speed)
        self.port = port
        self.rng = random.Random(seed)
        ident = {"device_type": "APPLIX", "serial": "AX0001", "firmware": "1.0.0"}
        ident.update(self.scenario.get("identity", {}))
        self.identity = ident
        self.address = b"1"
        self.model = m.PumpModel(self.scenario.get("initial"))
        self.faults = dict(FAULTS)
        self.faults.update(self.scenario.get("faults", {}))
        self._actions = collections.deque(self.scenario["actions"])
        self.log = []
        self.device_path = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        self._io = None
        # link state
        self._rx = FrameReceiver(self.address)
        self._replies = collections.deque()  # (due real time, payload, is the DC reply)
        self._out = None  # frame awaiting ACK: dict(kind, payload, sent, sends)
        self._events = collections.deque()  # event payloads; [0] in flight
        self._confirm_by = None  # real-time deadline for <addr>E after an event's ACK
        self._enq_at = None
        self._last_activity = 0.0
        self.session_open = False
        self.subscribed = ""
        self._dc_at = 0.0
        self._unplugged_until = None  # sim time
        self._off_until = None  # sim time (power cycle)
        self.stats = {
            "frames_received": 0,
            "commands": collections.Counter(),
            "naks_sent": collections.Counter(),
            "naks_received": collections.Counter(),
            "acks_received": 0,
            "replies_sent": 0,
            "events_sent": 0,
            "event_resends": 0,
            "events_confirmed": 0,
            "enq_sent": 0,
            "enq_unanswered": 0,
            "dc4_latency_ms": [],
            "early_commands": 0,
            "request_before_ack": 0,
            "bytes_discarded": 0,
        }

    # --- public -------------------------------------------------------------------------
    def start(self):
        self._io = _Serial(self.port) if self.port else _Pty()
        self.device_path = self._io.path
        self._t0 = time.monotonic()
        self._last_activity = self._t0
        with self._lock:
            self._advance(self._t0)
        self._thread = threading.Thread(target=self._loop, name="pumpsim", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
            self._thread = None
        if self._io:
            self._io.close()
            self._io = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def snapshot(self):
        """The model's true state now, and the link's statistics."""
        with self._lock:
            snap = self.model.snapshot()
            snap.update(
                session_open=self.session_open,
                subscribed=self.subscribed,
                unplugged=self._unplugged_until is not None,
                powered_off=self._off_until is not None,
                events_pending=len(self._events),
                faults=dict(self.faults),
                identity=dict(self.identity),
            )
            st = dict(self.stats)
            for k in ("commands", "naks_sent", "naks_received"):
                st[k] = dict(st[k])
            st["dc4_latency_ms"] = list(st["dc4_latency_ms"])
            snap["stats"] = st
            return snap

    def act(self, action):
        """Apply a scenario action now (same dict format, without 'at')."""
        check_action(action)
        with self._lock:
            self._apply(action)

    # --- time and scenario ----------------------------------------------------------------
    def _note(self, what):
        self.log.append((self.model.sim_time_s, what))

    def _advance(self, now):
        target = int((now - self._t0) * self.speed)
        mod = self.model
        while True:
            while self._actions and self._actions[0]["at"] <= mod.sim_time_s:
                self._apply(self._actions.popleft())
            if self._off_until is not None and mod.sim_time_s >= self._off_until:
                self._off_until = None
                self._power_on()
            if self._unplugged_until is not None and mod.sim_time_s >= self._unplugged_until:
                self._unplugged_until = None
                self._note("plugged back in")
            if mod.sim_time_s >= target:
                break
            mod.tick()

    def _apply(self, a):
        mod = self.model
        do = a["do"]
        self._note("%s %s" % (do, {k: v for k, v in a.items() if k not in ("at", "do")}))
        if do == "alarm":
            mod.set_alarm(int(a.get("bits", 1)))
        elif do == "clear_alarm":
            mod.clear_alarm(a.get("bits"))
        elif do == "start":
            mod.start()
        elif do == "pause":
            mod.pause()
        elif do == "stop":
            mod.stop()
        elif do == "set":
            for k in SETTABLE:
                if k in a:
                    if k == "power":
                        mod.set_power(int(a[k]))
                    elif k == "battery":
                        mod.battery = float(a[k])
                    else:
                        setattr(mod, k, int(a[k]))
        elif do == "volume_reset":
            mod.reset_volume()
        elif do == "error":
            mod.set_error(int(a.get("code", 1)))
        elif do == "unplug":
            self._unplugged_until = mod.sim_time_s + float(a.get("for", 60))
            self._line_down()
        elif do == "power_cycle":
            # Off now: RAM (session, subscriptions, unsent events) lost, delivery stopped.
            self._off_until = mod.sim_time_s + float(a.get("off_s", 5))
            self._line_down()
            mod.reboot()
            mod.changes.clear()
            self._events.clear()
            self.session_open = False
            self.subscribed = ""
        elif do == "faults":
            self.faults.update(a.get("set", {}))

    def _power_on(self):
        self._note("power on after power cycle %d: no session, volume 0" % self.model.power_cycles)

    def _line_down(self):
        self._rx.reset()
        self._replies.clear()
        self._out = None
        self._confirm_by = None
        self._enq_at = None

    def _silent(self):
        return self._unplugged_until is not None or self._off_until is not None

    # --- worker ---------------------------------------------------------------------------
    def _loop(self):
        fd = self._io.fileno()
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([fd], [], [], LOOP_S)
            except (OSError, ValueError):
                return
            data = self._io.read() if r else b""
            now = time.monotonic()
            with self._lock:
                self._advance(now)
                if data:
                    if self._silent():
                        self.stats["bytes_discarded"] += len(data)
                    else:
                        self._last_activity = now
                        for item in self._rx.feed(data, now):
                            self._on_item(item, now)
                if not self._silent():
                    self._service(now)

    def _write(self, data, now):
        self._last_activity = now
        self._io.write(data)

    def _chance(self, fault):
        p = self.faults.get(fault, 0.0)
        return p > 0 and self.rng.random() < p

    # --- receive ----------------------------------------------------------------------------
    def _on_item(self, item, now):
        kind = item[0]
        st = self.stats
        if kind == "frame":
            st["frames_received"] += 1
            self._on_frame(item[1], now)
        elif kind == "ack":
            st["acks_received"] += 1
            if self._out is not None:
                if self._out["kind"] == "event":
                    self._confirm_by = now + CONFIRM_TIMEOUT_S
                self._out = None
        elif kind == "nak":
            st["naks_received"][chr(item[1])] += 1
            out = self._out
            if out is not None:
                if out["kind"] == "reply" and out["sends"] >= MAX_REPLY_SENDS:
                    self._out = None
                else:
                    self._send(out, now, clean=True)
        elif kind == "dc4":
            if self._enq_at is not None:
                lat = st["dc4_latency_ms"]
                lat.append((now - self._enq_at) * 1000.0)
                del lat[:-1000]
                self._enq_at = None
        elif kind == "bad":
            st["naks_sent"][item[1].decode()] += 1
            self._write(bytes([NAK]) + item[1], now)
            self._note("NAK %s to host: %s" % (item[1].decode(), item[2]))

    def _on_frame(self, payload, now):
        st = self.stats
        if payload == b"E":  # the host's event confirmation
            self._write(bytes([ACK]), now)
            if self._confirm_by is not None and self._events:
                self._events.popleft()
                self._confirm_by = None
                st["events_confirmed"] += 1
            return
        cmd = payload.split(b";")[0].decode("latin-1")
        st["commands"][cmd] += 1
        if self._out is not None and self._out["kind"] == "reply":
            st["request_before_ack"] += 1  # the host did not ACK our reply first
        if self._chance("nak6"):
            st["naks_sent"]["6"] += 1
            self._write(bytes([NAK]) + ERR_NOT_READY, now)
            self._note("fault nak6 to %s" % cmd)
            return
        if self._chance("drop_ack"):
            self._note("fault drop_ack of %s" % cmd)
        else:
            self._write(bytes([ACK]), now)
        if self._chance("drop_reply"):
            self._note("fault drop_reply to %s" % cmd)
            return
        reply = self._execute(cmd, payload, now)
        due = now + self.faults.get("delay_ms", 0) / 1000.0
        self._replies.append((due, reply, cmd == "DC"))

    def _execute(self, cmd, payload, now):
        mod = self.model
        args = payload[len(cmd) + 1 :].decode("latin-1") if b";" in payload else None
        if cmd == "DC":
            self.session_open = True
            self._dc_at = float("inf")  # until its reply is sent
            return b"C"
        if not self.session_open:
            return b"I;0D"
        if now - self._dc_at < DC_SETTLE_S:
            self.stats["early_commands"] += 1
            return b"I;03"
        if cmd == "FC":
            self.session_open = False
            return b"C"
        if cmd == "LF":
            if not args:
                return b"I;04"
            names = {"b": "device_type", "n": "serial", "f": "firmware"}
            if any(c not in names for c in args):
                return b"I;0A"
            return ("C" + "".join(";%s%s" % (c, self.identity[names[c]]) for c in args)).encode()
        if cmd == "LE":
            if not args:
                return b"I;04"
            vals = [(c, mod.var(c)) for c in args]
            if any(v is None for _, v in vals):
                return b"I;0B"
            return ("C" + "".join(";%s%X" % (c, v) for c, v in vals)).encode()
        if cmd == "DE":
            if not args or any(mod.var(c) is None for c in args):
                return b"I;0B"
            self.subscribed = args
            return b"C"
        if cmd == "AE":
            self.subscribed = ""
            return b"C"
        if cmd == "LH":
            try:
                index = int(args or "", 16)
            except ValueError:
                return b"I;1A"
            if not 1 <= index <= m.LOG_SIZE:
                return b"I;1A"
            entry = mod.log_entry(index)
            return ("C" + "".join(";%s%X" % kv for kv in entry.items())).encode()
        # Commands that change the therapy: the simulated pump obeys; the module never sends them.
        if cmd == "MO" and args in ("1", "2"):
            mod._set(m=int(args))
            return b"C"
        if cmd == "RV":
            mod.reset_volume()
            return b"C"
        if cmd == "PR":
            try:
                mod.rate = int(args or "", 16)
            except ValueError:
                return b"I;04"
            return b"C"
        if cmd == "PO":
            mod.pause()
            return b"C"
        if cmd == "PB":
            return b"C"
        if cmd == "SI":
            mod.clear_alarm(1 << 7)
            return b"C"
        return b"I;01"

    # --- send -------------------------------------------------------------------------------
    def _send(self, out, now, clean=False):
        """(Re)send the frame in `out`; faults only on its first transmission."""
        payload = out["payload"]
        wire = encode(self.address, payload)
        pre = b""
        if not clean:
            if self._chance("noise"):
                pre = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 16)))
                self._note("fault noise %d bytes" % len(pre))
            if self._chance("too_long"):
                wire = encode(self.address, payload + b";w0" * 30)
                self._note("fault too_long %r" % payload)
            elif self._chance("bad_checksum"):
                wire = wire[:-3] + (b"00" if wire[-3:-1] != b"00" else b"01") + wire[-1:]
                self._note("fault bad_checksum %r" % payload)
            elif self._chance("control_in_frame"):
                k = self.rng.randint(2, len(wire) - 2)
                ctl = bytes([self.rng.choice([0x00, 0x01, 0x04, 0x10, 0x11, 0x1B, 0x7F])])
                wire = wire[:k] + ctl + wire[k:]
                self._note("fault control_in_frame %r" % payload)
        out["sends"] += 1
        out["sent"] = now
        self._out = out
        self._write(pre + wire, now)

    def _service(self, now):
        st = self.stats
        mod = self.model
        # subscribed changes become events
        while mod.changes:
            change = mod.changes.popleft()
            if self.session_open and self.subscribed:
                fields = [(k, v) for k, v in change.items() if k in self.subscribed]
                if fields:
                    self._events.append(("E" + "".join(";%s%X" % kv for kv in fields)).encode())
        # time-outs of what we sent
        out = self._out
        if out is not None and now - out["sent"] > ACK_TIMEOUT_S:
            self._out = None
            if out["kind"] == "event":
                st["event_resends"] += 1
        if self._confirm_by is not None and now > self._confirm_by:
            self._confirm_by = None
            st["event_resends"] += 1
        if self._enq_at is not None and now - self._enq_at > DC4_DEADLINE_S:
            st["enq_unanswered"] += 1
            self._enq_at = None
        if self._out is not None:
            return
        # a due reply first, then the event in flight (if not waiting for its confirmation)
        if self._replies and self._replies[0][0] <= now:
            _, payload, is_dc = self._replies.popleft()
            self._send({"kind": "reply", "payload": payload, "sends": 0}, now)
            st["replies_sent"] += 1
            if is_dc:
                self._dc_at = now  # the 1 s settle counts from the DC reply
            return
        if self._events and self._confirm_by is None and not self._replies:
            if self.session_open:
                self._send({"kind": "event", "payload": self._events[0], "sends": 0}, now)
                st["events_sent"] += 1
            return
        if (
            not self._replies
            and self._confirm_by is None
            and self._enq_at is None
            and now - self._last_activity >= ENQ_IDLE_S
        ):
            self._enq_at = now
            st["enq_sent"] += 1
            self._write(bytes([ENQ]), now)
