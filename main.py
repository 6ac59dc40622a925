# Board entry point: build the application from its config and run it (firmware/app.py).
# On the board the config is /flash/config.json, written by `serene deploy --config`; on the
# unix port the bench passes a path: `micropython main.py CONFIG.json`.
import sys

from firmware import app

app.main(sys.argv[1] if len(sys.argv) > 1 else "config.json")
