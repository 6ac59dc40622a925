"""The simulated enteral pump: delivery, dose, battery, alarms and its 64-entry event log.

Units are the wire's (specs/pump-protocol.md "Var" table): rate in 0.1 ml/h, volumes in
0.001 ml (integers), battery in %. One tick = one simulated second.
"""

import collections

#: Alarm bits of var `a` (P) that stop delivery (alarm hold, state 6).
ALARM_BITS = {
    "downstream_occlusion": 0,
    "upstream_occlusion": 1,
    "air_in_line": 2,
    "door_open": 3,
    "battery_low": 4,
    "battery_empty": 5,
    "dose_complete": 6,
    "idle_reminder": 7,
    "mains_lost": 8,
    "technical_fault": 9,
    "clamp": 10,
}
STOPPING = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 9) | (1 << 10)

STANDBY, PAUSED, RUNNING, PRIMING, FLUSH, DOSE_COMPLETE, ALARM_HOLD = range(7)

#: Battery drain calibrated so that a full battery lasts 24 h at 125 ml/h (spec): the running
#: pump draws DRAIN_BASE + DRAIN_PER_RATE * rate; an idle pump DRAIN_BASE.
FULL_DAY_S = 24 * 3600
RATE_CAL = 1250  # 125.0 ml/h in 0.1 ml/h
DRAIN_AT_CAL = 100.0 / FULL_DAY_S  # % per second at 125 ml/h
DRAIN_BASE = 0.2 * DRAIN_AT_CAL
DRAIN_PER_RATE = 0.8 * DRAIN_AT_CAL / RATE_CAL
CHARGE_PER_S = 100.0 / (4 * 3600)  # back to full in 4 h on mains
BATTERY_LOW = 15.0

LOG_SIZE = 64  # LH entries 01..40 hex (P)


class PumpModel:
    """State of the pump. Changes of the event vars (a, u, e, z, m) are appended to
    `changes` as dicts {var: value}: the link turns them into E;... frames for subscribed
    vars, and each one also goes to the 64-entry event log."""

    def __init__(self, initial=None):
        initial = initial or {}
        self.sim_time_s = 0
        self.rate = int(initial.get("rate", 0))
        self.volume = int(initial.get("volume", 0))
        self._vol_frac = 0  # volume remainder, in 1/3600 of 0.001 ml
        self.dose = int(initial.get("dose", 0))
        self.state = int(initial.get("state", STANDBY))
        self.alarms = int(initial.get("alarms", 0))
        self.error = int(initial.get("error", 0))
        self.mode = int(initial.get("mode", 1))
        self.battery = float(initial.get("battery", 100))
        self.power = int(initial.get("power", 1))
        self.flush_rate = int(initial.get("flush_rate", 0))
        self.flush_volume = int(initial.get("flush_volume", 0))
        self.flush_interval = int(initial.get("flush_interval", 0))
        self.power_cycles = 0
        self.changes = collections.deque()
        self.log = collections.deque(maxlen=LOG_SIZE)  # newest last
        self.log_seq = 0

    # --- derived ------------------------------------------------------------------------
    def remaining_min(self):
        if self.rate <= 0 or self.dose <= 0 or self.volume >= self.dose:
            return 0
        return (self.dose - self.volume) * 60 // (self.rate * 100)

    def var(self, vid):
        """Integer value of a var id, or None if the pump does not know it."""
        return {
            "d": self.rate,
            "r": self.volume,
            "v": self.dose,
            "t": self.remaining_min(),
            "a": self.alarms,
            "e": self.error,
            "m": self.mode,
            "u": self.state,
            "y": int(self.battery),
            "z": self.power,
            "k": self.flush_rate,
            "s": self.flush_volume,
            "w": self.flush_volume,
            "x": self.flush_interval,
        }.get(vid)

    # --- changes ------------------------------------------------------------------------
    def _set(self, **kv):
        """Set event vars (a=, u=, e=, z=, m=); record those that changed."""
        names = {"a": "alarms", "u": "state", "e": "error", "z": "power", "m": "mode"}
        changed = {}
        for vid, value in kv.items():
            attr = names[vid]
            if getattr(self, attr) != value:
                setattr(self, attr, value)
                changed[vid] = value
        if changed:
            self.changes.append(changed)
            self.log_seq += 1
            self.log.append(
                {
                    "q": self.log_seq,
                    "time": self.sim_time_s,
                    "a": self.alarms,
                    "u": self.state,
                    "r": self.volume,
                    "e": self.error,
                }
            )
        return changed

    def set_alarm(self, bits):
        alarms = self.alarms | bits
        state = ALARM_HOLD if alarms & STOPPING else self.state
        self._set(a=alarms, u=state)

    def clear_alarm(self, bits=None):
        alarms = self.alarms & ~(bits if bits is not None else -1)
        state = self.state
        if state == ALARM_HOLD and not alarms & STOPPING:
            state = PAUSED
        self._set(a=alarms, u=state)

    def start(self):
        if self.rate > 0 and not self.alarms & STOPPING and self.state != DOSE_COMPLETE:
            self._set(u=RUNNING)

    def pause(self):
        if self.state in (RUNNING, PRIMING, FLUSH):
            self._set(u=PAUSED)

    def stop(self):
        self._set(u=STANDBY)

    def set_power(self, power):
        alarms = self.alarms | (1 << 8) if power == 0 else self.alarms & ~(1 << 8)
        self._set(z=power, a=alarms)

    def set_error(self, code):
        alarms = self.alarms | (1 << 9) if code else self.alarms & ~(1 << 9)
        state = ALARM_HOLD if alarms & STOPPING else self.state
        self._set(e=code, a=alarms, u=state)

    def reset_volume(self):
        self.volume = 0
        self._vol_frac = 0

    def reboot(self):
        """Power cycle: RAM state lost, volume counter reset, delivery stopped. The program
        (rate, dose) and the event log are kept, as in a pump's non-volatile memory."""
        self.power_cycles += 1
        self.reset_volume()
        self.changes.clear()
        self._set(u=STANDBY, a=self.alarms & ((1 << 4) | (1 << 5) | (1 << 8)), e=0)

    # --- time ---------------------------------------------------------------------------
    def tick(self):
        """One simulated second."""
        self.sim_time_s += 1
        running = self.state in (RUNNING, PRIMING, FLUSH)
        if running:
            self._vol_frac += self.rate * 100  # 0.1 ml/h -> 0.001 ml/s = rate*100/3600
            self.volume += self._vol_frac // 3600
            self._vol_frac %= 3600
            if self.dose and self.volume >= self.dose:
                self.volume = self.dose
                self._vol_frac = 0
                self._set(u=DOSE_COMPLETE, a=self.alarms | (1 << 6))
                running = False
        if self.power == 0:
            drain = DRAIN_BASE + (DRAIN_PER_RATE * self.rate if running else 0.0)
            self.battery = max(0.0, self.battery - drain)
            if self.battery <= 0.0 and not self.alarms & (1 << 5):
                self.set_alarm(1 << 5)
            elif self.battery < BATTERY_LOW and not self.alarms & (1 << 4):
                self.set_alarm(1 << 4)
        elif self.battery < 100.0:
            self.battery = min(100.0, self.battery + CHARGE_PER_S)
            if self.battery >= BATTERY_LOW and self.alarms & ((1 << 4) | (1 << 5)):
                self.clear_alarm((1 << 4) | (1 << 5))

    def log_entry(self, index):
        """Entry `index` (1 = most recent) as {var: int} with g = age in seconds; {} if empty."""
        if index > len(self.log):
            return {}
        e = self.log[-index]
        return {
            "q": e["q"],
            "g": self.sim_time_s - e["time"],
            "a": e["a"],
            "u": e["u"],
            "r": e["r"],
            "e": e["e"],
        }

    def snapshot(self):
        return {
            "rate": self.rate,
            "volume": self.volume,
            "dose": self.dose,
            "remaining": self.remaining_min(),
            "state": self.state,
            "alarms": self.alarms,
            "error": self.error,
            "mode": self.mode,
            "battery": int(self.battery),
            "battery_exact": self.battery,
            "power": self.power,
            "flush_rate": self.flush_rate,
            "flush_volume": self.flush_volume,
            "sim_time_s": self.sim_time_s,
            "power_cycles": self.power_cycles,
            "log_entries": len(self.log),
        }
