"""Pump simulator: an enteral pump speaking the FK-Base ASCII profile (specs/pump-protocol.md).

    from serene.pumpsim import PumpSimulator
    sim = PumpSimulator(scenario="normal-feed", speed=1.0, port=None, seed=0)
    sim.start()            # worker thread; makes a pty unless `port` (a serial device) is given
    sim.device_path        # what the firmware opens (drivers.unix.serial_port.open_serial)
    sim.snapshot()         # the model's true state now + link statistics (dict)
    sim.act({"do": "alarm", "bits": 1})   # apply a scenario action now
    sim.log                # [(sim_time_s, what)] scenario actions and injected faults
    sim.stop()

    serene pumpsim --scenario NAME|PATH [--speed X] [--port DEV] [--duration S] [--seed N]

Model (model.py): a 1 s tick of SIMULATED time; `speed` = simulated seconds per real second.
While running (u 2/3/4) the volume grows by rate/3600 ml a second, exactly (integer 0.001 ml
with the remainder carried); reaching the dose sets state 5 and alarm bit 6. On battery the
charge drains so that 100 % lasts 24 h at 125 ml/h (20 % of that drain when idle); below 15 %
alarm bit 4, at 0 % bit 5 (alarm hold); on mains it recharges in 4 h. Alarm bits 0-3, 5, 9, 10
stop delivery (state 6). Every change of a, u, e, z or m goes to a 64-entry event log (LH;01 =
newest: C;q<seq>;g<age s>;a;u;r;e) and, for vars subscribed with DE, to a spontaneous E;...
frame, resent until the host ACKs it and confirms with <addr>E.

Link (sim.py, REAL time): ACK/NAK every host frame (NAK '2' checksum, '4' address, '7' over 80
chars, '8' control byte, '1' 8-bit byte); replies after `delay_ms`; a NAKed frame is resent
clean; ENQ after 3 s of silence, DC4 latency measured; DC opens the session and a command
within 1 s of the DC reply is refused I;03 (counted as `early_commands`); any command but DC
outside a session gets I;0D. Therapy commands (RV PR PO PB SI MO) are obeyed and counted in
stats["commands"]: the module must never send them.

Scenario file (scenarios/NAME.json; or a path, or the same dict in Python):
    {
      "description": "...",
      "identity": {"device_type": "APPLIX", "serial": "...", "firmware": "..."},
      "initial": {"rate": 1250, "volume": 100000, "dose": 1000000, "state": 2, "alarms": 0,
                  "battery": 100, "power": 1, "mode": 1, "error": 0,
                  "flush_rate": 0, "flush_volume": 0, "flush_interval": 0},
      "faults": {FAULT: value, ...},       # in force from the start
      "actions": [{"at": SIM_SECONDS, "do": ACTION, ...}, ...]
    }
  Units are the wire's: rate 0.1 ml/h, volumes 0.001 ml, battery %.
  ACTION:
    alarm {"bits": n}            set alarm bits (stopping bits -> state 6)
    clear_alarm {"bits": n}      clear them (all if absent); alarm hold -> paused
    start | pause | stop         delivery state 2 / 1 / 0
    set {"rate"|"dose"|"battery"|"power"|"flush_rate"|"flush_volume"|"flush_interval": v}
    volume_reset                 volume counter to 0 (as RV)
    error {"code": n}            technical error e=n and alarm bit 9 (0 clears)
    unplug {"for": s}            line dead for s simulated seconds (input discarded)
    power_cycle {"off_s": s}     off now (session, subscriptions, unsent events lost, volume 0,
                                 standby), silent for s simulated seconds, then back with no
                                 session: the host gets I;0D until it sends DC
    faults {"set": {FAULT: value}}
  FAULT (probabilities are per frame, decided with the seeded RNG; NAKed frames are resent
  clean, so a fault hits only a first transmission):
    delay_ms            response delay before each reply (real ms)
    noise               burst of 1-16 random bytes before a frame the pump sends
    bad_checksum        frame sent with a wrong checksum
    control_in_frame    frame sent with a control byte inside
    too_long            frame sent padded to over 80 payload chars
    drop_ack            host frame not ACKed (its reply still comes)
    drop_reply          host request ACKed but never answered
    nak6                host frame answered NAK '6' (1.0 = a NAK storm)

Scenarios: normal-feed, occlusion-alarm (occlusion at 2 min), unplugged (silent for a simulated
minute from 1 min), noisy-line (every fault, alarm at 1 min), power-cycle (off at 1 min for
10 s), battery-drain (24 h on battery at 125 ml/h; run with --speed 3600).
"""

from .sim import (
    FAULTS,
    SCENARIOS_DIR,
    PumpSimulator,
    ScenarioError,
    load_scenario,
    scenario_names,
)

__all__ = [
    "FAULTS",
    "SCENARIOS_DIR",
    "PumpSimulator",
    "ScenarioError",
    "load_scenario",
    "scenario_names",
]
