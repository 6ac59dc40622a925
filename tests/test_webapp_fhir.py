"""FHIR R4 export: validated by fhir.resources' R4 (4.0.1) models and by our own checks of
the coded values (the models check structure and types, not codes); deterministic ids."""

import base64
import json
import re
import time

import cbor2
import pytest
import sqlalchemy as sa

from webapp_fixtures import add_patient, add_user, feed, provision_home, status

fhir_bundle = pytest.importorskip("fhir.resources.bundle")

from serene.webapp import create_app, fhir  # noqa: E402

DEV = "SRN-0001"
ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@pytest.fixture(scope="module")
def world(tmp_path_factory, database_module):  # SQLite, then PostgreSQL
    home = provision_home(tmp_path_factory.mktemp("fhir"), [DEV])
    t = time.time()
    recs = [status(t - 3600 + 60 * i, rate=1000 + 10 * (i // 20), volume=16_667 * i,
                   battery=90 - i // 30) for i in range(40)]
    # seq 5 sealed and checkpointed, never sent: a gap the ledger and the export report
    feed(home, DEV, recs, skip={5})
    app = create_app(home)
    _s, uid = add_user(app.engine, "nurse", "clinician")
    pid = add_patient(app.engine, "MRN-F", "Fhir Patient", DEV, [uid])
    return {"home": home, "app": app, "pid": pid, "t": t, "recs": recs}


def export(world):
    with world["app"].engine.begin() as conn:
        p = conn.execute(sa.text("SELECT * FROM app_patients WHERE id=:i"),
                         {"i": world["pid"]}).first()
        return fhir.export(conn, world["home"], p, world["t"] - 7200, world["t"])


def test_bundle_validates_and_codes_are_ieee_11073(world):
    b = export(world)
    fhir_bundle.Bundle.parse_obj(b)  # raises on any structural or type error (R4 4.0.1)
    kinds = {}
    for e in b["entry"]:
        r = e["resource"]
        kinds[r["resourceType"]] = kinds.get(r["resourceType"], 0) + 1
        assert ID.match(r["id"]), r["id"]
        assert e["request"] == {"method": "PUT", "url": "%s/%s" % (r["resourceType"], r["id"])}
    ids = {"%s/%s" % (e["resource"]["resourceType"], e["resource"]["id"]) for e in b["entry"]}
    assert len(ids) == len(b["entry"])
    obs = [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Observation"]
    by_code = {}
    for o in obs:
        (c,) = o["code"]["coding"]
        assert c["system"] == "urn:iso:std:iso:11073:10101"
        table = {v[0]: v for v in fhir.MEASURES.values()}
        code, ref, ucum = table[c["code"]][:3]
        assert c["display"] == ref and o["valueQuantity"]["code"] == ucum
        assert o["valueQuantity"]["system"] == "http://unitsofmeasure.org"
        assert o["device"]["reference"] in ids
        by_code.setdefault(ref, []).append(o)
    # 39 status records arrived (seq 5 never did): rate and volume for each, in ml/h and ml
    assert len(by_code["MDC_FLOW_FLUID_PUMP"]) == 39
    assert len(by_code["MDC_VOL_FLUID_DELIV_TOTAL"]) == 39
    rates = sorted({o["valueQuantity"]["value"] for o in by_code["MDC_FLOW_FLUID_PUMP"]})
    assert rates == [100, 101]
    vol = {o["effectiveDateTime"]: o["valueQuantity"]["value"]
           for o in by_code["MDC_VOL_FLUID_DELIV_TOTAL"]}
    assert max(vol.values()) == pytest.approx(16_667 * 39 / 1000)
    assert [o["valueQuantity"]["value"] for o in by_code["MDC_VOL_FLUID_TBI"]] == [1000]
    devices = {e["resource"]["type"]["coding"][0]["code"] for e in b["entry"]
               if e["resource"]["resourceType"] == "Device"}
    assert devices == {"69985", "531981"}
    assert kinds["DeviceMetric"] == 4
    # Provenance: the checkpoint's COSE_Sign1, its targets our observations
    provs = [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Provenance"]
    assert provs
    for p in provs:
        sig = base64.b64decode(p["signature"][0]["data"])
        tag = cbor2.loads(sig)
        assert tag.tag == 18 and len(tag.value[3]) == 64  # COSE_Sign1, ES256 r||s
        assert all(t["reference"] in ids for t in p["target"])
    # AuditEvent for the gap (seq 5)
    gaps = [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "AuditEvent"]
    assert [g["type"]["code"] for g in gaps] == ["gap"]
    details = {d["type"]: d["valueString"] for d in gaps[0]["entity"][0]["detail"]}
    assert (details["first_seq"], details["last_seq"]) == ("5", "5")


def test_two_exports_of_a_period_have_identical_identifiers(world):
    a, b = export(world), export(world)
    assert [e["fullUrl"] for e in a["entry"]] == [e["fullUrl"] for e in b["entry"]]
    assert a["id"] == b["id"]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_export_over_http_is_audited_and_only_for_the_care_team(world):
    import re as _re

    app = world["app"]
    add_user(app.engine, "other", "clinician")
    for who, code in (("nurse", 200), ("other", 403)):
        c = app.test_client()
        tok = _re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
        c.post("/login", data={"username": who, "password": "correct horse battery staple",
                               "csrf_token": tok})
        r = c.get("/patients/%d/fhir?from=%d&to=%d" % (world["pid"], world["t"] - 7200,
                                                       world["t"]))
        assert r.status_code == code
        if code == 200:
            fhir_bundle.Bundle.parse_obj(json.loads(r.data))
    with app.engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT username FROM app_audit WHERE action = "
                                    "'patient.export.fhir'")).all()
    assert rows == [("nurse",)]
