"""The simulated BLE medium (CPython) the unix-port aioble shim and the hubs meet on.

- ``serene.ble.gatt``: the module's GATT service as the host tools know it (UUIDs, the status
  record's layout, time on air on the LE 1M PHY), written independently of drivers/radio/ble.py
  so each checks the other.
- ``serene.ble.medium``: the medium: advertising, connections that come and go on a schedule,
  MTU exchange, pairing, indications confirmed after the connection events they need, writes,
  reads, with everything counted (docs/ble.md).
- ``serene.ble.client``: a hub's view of the medium (scan, connect, discover, subscribe,
  write, read), the socket backend of ``serene hub``.
"""
