# Health counters: every failure the module survives is named and counted here, logged when
# it happens, and reported in a periodic health record (record.KIND_MODULE / MOD_HEALTH).
#
# Counter codes are the keys of the health record's counters map; their names are for logs
# and for the host tools (tools/serene/records.py mirrors this table).
from micropython import const

POLLS = const(1)  # successful status polls
POLL_FAILURES = const(2)  # polls that ended in a pump error
PUMP_EVENTS = const(3)  # spontaneous pump events received
LINK_CONDITIONS = const(4)  # pump link conditions reported by the driver
RECONNECTS = const(5)  # pump sessions reopened
TASK_RESTARTS = const(6)  # a long-lived task died on an unexpected error and was restarted
RECORDS = const(7)  # records produced
RECORDS_LOST = const(8)  # records that could not be stored (reported, never silent)
SE_ERRORS = const(9)  # secure-element failures
# Memory gauges (bytes). micropython.mem_peak() is not used: on the unix port it adds up
# allocations and never subtracts what the collector reclaims, so it only grows.
MEM_CODE = const(10)  # heap held after boot imports (code loaded from .mpy; 0 when frozen)
MEM_LIVE_MAX = const(11)  # largest live heap seen right after a collection
MEM_HIGH = const(12)  # largest heap in use seen before a collection (live + garbage)
# Acks refused by the module (forged, replayed, other epoch, malformed), cumulative: a rise the
# server did not expect tells it its acks are not taking effect (ledger: acks_failing).
ACKS_REJECTED = const(13)

NAMES = {
    POLLS: "polls", POLL_FAILURES: "poll_failures", PUMP_EVENTS: "pump_events",
    LINK_CONDITIONS: "link_conditions", RECONNECTS: "reconnects",
    TASK_RESTARTS: "task_restarts", RECORDS: "records", RECORDS_LOST: "records_lost",
    SE_ERRORS: "se_errors", MEM_CODE: "mem_code", MEM_LIVE_MAX: "mem_live_max",
    MEM_HIGH: "mem_high", ACKS_REJECTED: "acks_rejected",
}


class Health:
    def __init__(self):
        self.counters = {code: 0 for code in NAMES}

    def count(self, code, n=1):
        self.counters[code] += n

    def gauge(self, code, value):
        self.counters[code] = value
