"""FHIR R4 (4.0.1) export of one patient's feed over a period, as a transaction Bundle.

Codes: ISO/IEEE 11073-10101 nomenclature (system urn:iso:std:iso:11073:10101, the system the
HL7 Personal Health Device IG uses). Each code is the 32-bit context-free code
(partition * 65536 + term code) as published in the IEEE 11073-10101 nomenclature and its
infusion-pump amendment (11073-10101a), listed in the IHE PCD Rosetta Terminology Mapping
(RTM) / NIST RTMMS, and used that way in IHE PCD-01 infusion pump messages:
    MDC_DEV_PUMP_INFUS_MDS      69985  (partition 1, 4449)  the pump (Device.type)
    MDC_MOC_VMS_MDS_AHD        531981  (partition 8, 7693)  the module: an application
                                        hosting device, as the PHD IG types a gateway (PHG)
    MDC_FLOW_FLUID_PUMP        157784  (partition 2, 26712) programmed rate, ml/h
    MDC_VOL_FLUID_DELIV_TOTAL  157993  (partition 2, 26921) volume delivered, ml
    MDC_VOL_FLUID_TBI          157884  (partition 2, 26812) volume to be infused (dose), ml
    MDC_ATTR_VAL_BATT_CHARGE    67996  (partition 1, 2460)  battery charge, %
    units: MDC_DIM_MILLI_L_PER_HR 265266, MDC_DIM_MILLI_L 263762, MDC_DIM_PERCENT 262688
    (each quantity also carries its UCUM unit, as FHIR requires for valueQuantity.code).

Identifiers are deterministic, as the PHD IG builds them so that re-sending never makes
duplicates: an Observation's id is the SHA-256 (hex, 64 characters: a valid FHIR id) of
"module|patient|code|time|value|unit"; Devices, DeviceMetrics, Provenances and AuditEvents are
named from the module id, the metric code, the (epoch, seq) of a checkpoint or the seq range of
a gap. Entries are PUT to their id: a server that receives the same export twice keeps one copy.
A Provenance per checkpoint carries the checkpoint's COSE_Sign1 bytes (the module's ES256
signature over the chain of the records it covers); AuditEvents report gaps and rejects.
"""

import base64
import datetime
import hashlib
import json

import sqlalchemy as sa

from . import data as D
from . import db

MDC = "urn:iso:std:iso:11073:10101"
UCUM = "http://unitsofmeasure.org"
#: field -> (MDC code, MDC reference id, UCUM unit, MDC unit code, unit refid, scale)
MEASURES = {
    "rate": ("157784", "MDC_FLOW_FLUID_PUMP", "mL/h", "265266", "MDC_DIM_MILLI_L_PER_HR", 0.1),
    "volume": ("157993", "MDC_VOL_FLUID_DELIV_TOTAL", "mL", "263762", "MDC_DIM_MILLI_L",
               0.001),
    "dose": ("157884", "MDC_VOL_FLUID_TBI", "mL", "263762", "MDC_DIM_MILLI_L", 0.001),
    "battery": ("67996", "MDC_ATTR_VAL_BATT_CHARGE", "%", "262688", "MDC_DIM_PERCENT", 1),
}
#: fields exported only when their value changes (the others: every record)
ON_CHANGE = ("dose", "battery")
PUMP_TYPE = ("69985", "MDC_DEV_PUMP_INFUS_MDS")
MODULE_TYPE = ("531981", "MDC_MOC_VMS_MDS_AHD")
SERENE = "urn:serene"


def _h(*parts):
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _iso(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def _entry(resource):
    rid = "%s/%s" % (resource["resourceType"], resource["id"])
    return {"fullUrl": rid, "resource": resource, "request": {"method": "PUT", "url": rid}}


def _num(x):
    # JSON numbers: an int when exact, else a decimal with the record's precision
    return int(x) if float(x).is_integer() else round(x, 3)


def export(conn, home, patient, t0, t1):
    subject = {"identifier": {"system": SERENE + ":mrn", "value": patient.mrn},
               "display": patient.display_name}
    entries = []
    spans = D._spans(conn, patient.id, t0, t1)
    for device in sorted({d for d, _a, _b in spans}):
        recs = D.records(conn, patient.id, t0, t1)
        recs = [r for r in recs if r["_device"] == device]
        ident = next((r.get("text") for r in recs if r.get("kind") == "identity"), None)
        module_id = "module-" + _h(device)[:40]
        pump_id = "pump-" + _h(device, "pump")[:40]
        entries.append(_entry({
            "resourceType": "Device", "id": module_id,
            "identifier": [{"system": SERENE + ":module", "value": device}],
            "type": {"coding": [{"system": MDC, "code": MODULE_TYPE[0],
                                 "display": MODULE_TYPE[1]}], "text": "serene module"},
            "deviceName": [{"name": "serene module %s" % device, "type": "user-friendly-name"}],
            "patient": {"identifier": subject["identifier"]}}))
        pump = {"resourceType": "Device", "id": pump_id,
                "type": {"coding": [{"system": MDC, "code": PUMP_TYPE[0],
                                     "display": PUMP_TYPE[1]}],
                         "text": "enteral nutrition pump"},
                "parent": {"reference": "Device/" + module_id},
                "patient": {"identifier": subject["identifier"]}}
        if ident:
            parts = ident.split("/")
            pump["deviceName"] = [{"name": parts[0], "type": "model-name"}]
            if len(parts) > 1:
                pump["serialNumber"] = parts[1]
        entries.append(_entry(pump))
        for field, (code, ref, ucum, ucode, uref, _s) in MEASURES.items():
            entries.append(_entry({
                "resourceType": "DeviceMetric", "id": "metric-" + _h(device, code)[:40],
                "type": {"coding": [{"system": MDC, "code": code, "display": ref}]},
                "unit": {"coding": [{"system": MDC, "code": ucode, "display": uref},
                                    {"system": UCUM, "code": ucum}]},
                "source": {"reference": "Device/" + pump_id},
                "parent": {"reference": "Device/" + module_id},
                "operationalStatus": "on",
                "category": "setting" if field in ("rate", "dose") else "measurement"}))
        obs_by_seq = {}
        last = {}
        for r in recs:
            if r.get("kind") != "status":
                continue
            for field, (code, ref, ucum, ucode, uref, scale) in MEASURES.items():
                if field not in r:
                    continue
                if field in ON_CHANGE and last.get(field) == r[field]:
                    continue
                last[field] = r[field]
                value = _num(r[field] * scale)
                oid = _h(device, patient.mrn, code, r["time"], value, ucum)
                entries.append(_entry({
                    "resourceType": "Observation", "id": oid,
                    "identifier": [{"system": SERENE + ":observation", "value": oid}],
                    "status": "final",
                    "code": {"coding": [{"system": MDC, "code": code, "display": ref}]},
                    "subject": subject,
                    "effectiveDateTime": _iso(r["time"]),
                    "valueQuantity": {"value": value, "unit": ucum, "system": UCUM,
                                      "code": ucum},
                    "device": {"reference": "Device/" + pump_id},
                    "extension": [{
                        "url": "http://hl7.org/fhir/StructureDefinition/observation-"
                               "gatewayDevice",
                        "valueReference": {"reference": "Device/" + module_id}}]}))
                obs_by_seq.setdefault((r["_epoch"], r["_seq"]), []).append(oid)
        entries += _provenances(conn, device, module_id, obs_by_seq)
        entries += _audit_events(conn, home, device, module_id, recs, t0, t1)
    bundle_id = _h("bundle", patient.mrn, int(t0), int(t1))[:64]
    return {"resourceType": "Bundle", "id": bundle_id, "type": "transaction",
            "timestamp": _iso(t1),
            "identifier": {"system": SERENE + ":bundle", "value": bundle_id},
            "entry": entries}


def _provenances(conn, device, module_id, obs_by_seq):
    out = []
    if not obs_by_seq:
        return out
    epochs = sorted({e for e, _s in obs_by_seq})
    for epoch in epochs:
        seqs = sorted(s for e, s in obs_by_seq if e == epoch)
        rows = conn.execute(sa.text(
            "SELECT c.seq, c.first_seq, c.received_at, c.checked_at, o.sealed FROM checkpoints c "
            "JOIN objects o ON o.device = c.device AND o.epoch = c.epoch AND o.seq = c.seq "
            "WHERE c.device = :d AND c.epoch = :e AND c.state = 'verified' AND c.seq > :lo "
            "AND c.first_seq <= :hi ORDER BY c.seq"),
            {"d": device, "e": epoch, "lo": seqs[0], "hi": seqs[-1]}).all()
        for seq, first, received_at, checked_at, sealed in rows:
            targets = [oid for s in seqs if first <= s < seq for oid in obs_by_seq[(epoch, s)]]
            if not targets:
                continue
            when = _iso(checked_at or received_at)
            out.append(_entry({
                "resourceType": "Provenance", "id": "checkpoint-" + _h(device, epoch, seq)[:40],
                "target": [{"reference": "Observation/" + t} for t in targets],
                "recorded": when,
                "agent": [{"type": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                    "code": "device"}]}, "who": {"reference": "Device/" + module_id}}],
                "signature": [{
                    "type": [{"system": "urn:iso-astm:E1762-95:2013",
                              "code": "1.2.840.10065.1.12.1.5", "display": "Verification "
                              "Signature"}],
                    "when": when, "who": {"reference": "Device/" + module_id},
                    "sigFormat": "application/cose",
                    "data": base64.b64encode(bytes(sealed)).decode()}],
                "entity": [{"role": "source", "what": {
                    "identifier": {"system": SERENE + ":checkpoint",
                                   "value": "%s/%d/%d-%d" % (device, epoch, first, seq)}}}]}))
    return out


def _audit(device, module_id, kind, key, recorded, outcome, description, details):
    return _entry({
        "resourceType": "AuditEvent", "id": kind + "-" + _h(device, kind, key)[:40],
        "type": {"system": SERENE + ":audit-event", "code": kind},
        "recorded": recorded, "outcome": outcome, "outcomeDesc": description,
        "agent": [{"who": {"reference": "Device/" + module_id}, "requestor": False}],
        "source": {"observer": {"reference": "Device/" + module_id}},
        "entity": [{"what": {"reference": "Device/" + module_id},
                    "detail": [{"type": k, "valueString": str(v)} for k, v in details]}]})


def _audit_events(conn, home, device, module_id, recs, t0, t1):
    from flask import current_app, has_app_context

    from ..server.store import Store, StoreError, db_url

    try:
        st = Store(current_app.config["DB_URL"] if has_app_context() else db_url(home),
                   readonly=True)
    except StoreError:
        return []
    try:
        led = st.device_ledger(device)
    finally:
        st.close()
    out = []
    epochs = {r["_epoch"] for r in recs}
    for e in led["epochs"]:
        if e["epoch"] not in epochs:
            continue
        for a, b, tb, ta in D.gap_times(conn, device, e["epoch"], e["gaps"]):
            out.append(_audit(device, module_id, "gap", "%d/%d-%d" % (e["epoch"], a, b),
                              _iso(ta or tb or t1), "4",
                              "records %d to %d of epoch %d were not received"
                              % (a, b, e["epoch"]),
                              [("epoch", e["epoch"]), ("first_seq", a), ("last_seq", b),
                               ("after", _iso(tb) if tb else ""),
                               ("before", _iso(ta) if ta else "")]))
    for r in led["recent_rejects"]:
        if not t0 <= r["at"] < t1:
            continue
        out.append(_audit(device, module_id, "reject", "%s/%s/%s/%s" % (
            r["at"], r["epoch"], r["seq"], r["reason"]), _iso(r["at"]), "8",
            "refused by the server: %s" % r["reason"],
            [("reason", r["reason"]), ("detail", r["detail"] or ""),
             ("epoch", r["epoch"]), ("seq", r["seq"])]))
    return out


def dumps(bundle):
    return json.dumps(bundle, indent=1, sort_keys=True)


__all__ = ["export", "MEASURES", "MDC", "db"]
