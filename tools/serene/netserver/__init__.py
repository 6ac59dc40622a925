"""A stand-in LoRaWAN network server (+ join server) speaking ChirpStack v4's MQTT integration.

ChirpStack is not installable here; this stand-in lets the medical server be written against
exactly what a real ChirpStack v4 publishes, so it works unchanged against one. Integration
format (ChirpStack v4 docs, "Integrations > MQTT", JSON marshaler; the fields are the JSON
names of chirpstack_api integration.proto ``UplinkEvent``, ``JoinEvent``, ``AckEvent``,
``TxAckEvent`` and ``DownlinkCommand``, docs.rs/chirpstack_api integration):

- ``application/{applicationId}/device/{devEui}/event/up``: {"deduplicationId", "time",
  "deviceInfo": {"tenantId", "tenantName", "applicationId", "applicationName",
  "deviceProfileId", "deviceProfileName", "deviceName", "devEui", "tags"}, "devAddr", "adr",
  "dr", "fCnt", "fPort", "confirmed", "data" (base64), "rxInfo": [{"gatewayId", "uplinkId",
  "rssi", "snr", "channel", "context", "crcStatus"}], "txInfo": {"frequency", "modulation":
  {"lora": {"bandwidth", "spreadingFactor", "codeRate"}}}}
- ``.../event/join``: {"deduplicationId", "time", "deviceInfo", "devAddr"}
- ``.../event/ack``: {"deduplicationId", "time", "deviceInfo", "queueItemId", "acknowledged",
  "fCntDown"}
- ``.../event/txack``: {"downlinkId", "time", "deviceInfo", "queueItemId", "fCntDown",
  "gatewayId", "txInfo"}
- downlinks from ``application/{applicationId}/device/{devEui}/command/down``: {"devEui",
  "confirmed", "fPort", "data" (base64)}.

Gateways speak the Semtech UDP protocol (packet_forwarder PROTOCOL.TXT v2). See
serene.netserver.server for what is checked (MIC, FCnt, DevNonce) and counted.
"""
