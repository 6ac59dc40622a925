# Pump drivers. base.py: the protocol-independent interface the application uses; fkbase.py:
# the "FK-Base ASCII" profile (specs/pump-protocol.md). Import the one the board profile names.
