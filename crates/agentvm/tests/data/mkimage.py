"""Writes a docker-archive image holding /usr/bin/echo and its libraries."""
import hashlib, io, json, os, subprocess, sys, tarfile

out = sys.argv[1]
ldd = subprocess.run(["ldd", "/usr/bin/echo"], capture_output=True, text=True, check=True).stdout
paths = ["/usr/bin/echo"] + [w for line in ldd.splitlines() for w in line.split() if w.startswith("/")]
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w") as t:
    for p in paths:
        t.add(os.path.realpath(p), arcname=p.lstrip("/"))
layer = buf.getvalue()
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Cmd": ["/usr/bin/echo", "hello"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
}).encode()
config_name = hashlib.sha256(config).hexdigest() + ".json"
manifest = json.dumps([{"Config": config_name, "RepoTags": ["localhost/mini:latest"], "Layers": ["layer.tar"]}]).encode()
with tarfile.open(out, "w") as t:
    for name, data in [("layer.tar", layer), (config_name, config), ("manifest.json", manifest)]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
