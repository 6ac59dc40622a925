"""The home hub (`serene hub`): an untrusted relay between the modules' BLE service and the
broker. See serene.hub.relay (the relay), serene.hub.backends (the simulator's socket and
bleak) and docs/ble.md."""
