"""The medical server (bench and reference): ingest, storage, completeness ledger.

    store.Store(path)                SQLite: objects stored once, epochs, checkpoints, rejects,
                                     counters; Store.ledger() = the completeness ledger
    ingest.Ingest(verifier, store, clock, worker_id, max_epoch_step)
                                     .process(topic, payload) -> [(down topic, ack)], never
                                     raises, not committed; .commit() then publish;
                                     .refuse(dev, reason, size); .due_acks(); .handle() =
                                     process + commit
    service.IngestService(...)       the ingest on MQTT (paho): serene/+/up in, acks out
    cli                              `serene server --home DIR`
    report                           `serene report --home DIR [--json]`

Uplink frames are parsed with serene.linkframe, objects verified with serene.verifier, record
fields decoded with serene.records. Every module is untrusted input (see ingest.py).
"""
