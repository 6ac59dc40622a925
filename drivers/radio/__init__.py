# Radios (LoRa, LTE-M, BLE, and their unix-port stand-ins) behind one interface: base.Radio.
# The link layer (firmware/link.py) uses only that interface.
