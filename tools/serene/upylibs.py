"""Fetch the MicroPython-side libraries the firmware needs on the unix port, by name from PyPI.

micropython-lib's PyPI packages are old upip-style sdists that pip refuses to install
(TOOLCHAIN.md). We do what upip did: ask PyPI's JSON API for the pinned release, check the
sdist's sha256 against the digest PyPI publishes, and unpack only the module files into a
git-ignored folder that goes on MICROPYPATH. On a board the same libraries come from
`mpremote mip install` (see serene.deploy).
"""

import hashlib
import io
import json
import pathlib
import sys
import tarfile
import urllib.request

#: name on PyPI, pinned version, files to take (path inside the package dir -> path under lib)
LIBRARIES = (
    ("micropython-umqtt.simple", "1.3.4", {"umqtt/simple.py": "umqtt/simple.py"}),
)

#: The name mip uses for each, for a board with network (serene.deploy).
MIP_NAMES = {"micropython-umqtt.simple": "umqtt.simple"}

_TIMEOUT_S = 60


class FetchError(Exception):
    pass


def _sdist_url(name, version):
    # The project endpoint lists every release; the per-version endpoint is not always served.
    url = "https://pypi.org/pypi/%s/json" % name
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as rsp:
        meta = json.load(rsp)
    for f in meta["releases"].get(version, ()):
        if f["packagetype"] == "sdist":
            return f["url"], f["digests"]["sha256"]
    raise FetchError("%s %s has no sdist on PyPI" % (name, version))


def fetch(lib_dir):
    lib_dir = pathlib.Path(lib_dir)
    for name, version, files in LIBRARIES:
        stamp = lib_dir / (".%s-%s" % (name, version))
        if stamp.exists() and all((lib_dir / dst).exists() for dst in files.values()):
            continue
        url, sha256 = _sdist_url(name, version)
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as rsp:
            blob = rsp.read()
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise FetchError("%s %s: sha256 mismatch" % (name, version))
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
            for src, dst in files.items():
                if src not in members:
                    raise FetchError("%s %s: no %s in the sdist" % (name, version, src))
                out = lib_dir / dst
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(members[src]).read())
        stamp.write_text(url + "\n")
        print("upylibs: %s %s -> %s" % (name, version, lib_dir))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    lib_dir = argv[0] if argv else ".lib"
    try:
        fetch(lib_dir)
    except (OSError, FetchError, KeyError, ValueError) as e:
        print("upylibs: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
