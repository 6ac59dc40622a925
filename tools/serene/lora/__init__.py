"""The simulated LoRa RF medium and Semtech UDP packet-forwarder gateways (CPython).

- ``serene.lora.airtime``: LoRa time on air (SX1261/2 datasheet §6.1.4), written independently
  of the firmware's drivers/lorawan/eu868.py so each checks the other.
- ``serene.lora.medium``: the UDP RF medium the unix-port modem shim
  (drivers/unix/lora_udp.py) talks to, with loss, duplication, outages and collisions, and
  one or more gateways speaking the Semtech UDP protocol (packet_forwarder PROTOCOL.TXT v2:
  PUSH_DATA / PUSH_ACK / PULL_DATA / PULL_ACK / PULL_RESP / TX_ACK with JSON rxpk / txpk).
"""
