"""serene fleet: a load generator of N simulated modules, each with its own identity.

identity.py makes the fleet home once (certificates from the home's CA with provision.py's own
builder, registry.json with first_epoch, broker accounts, a software key store); sim.py runs
the modules (genuine v2 epoch records, sealed status records, checkpoints, in v2 link frames,
QoS 1) on one selector of paho clients and checks every ack; cli.py is `serene fleet`.
"""
