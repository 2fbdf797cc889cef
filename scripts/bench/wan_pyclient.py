#!/usr/bin/env python3
"""Case (i) of the WAN benchmark (scripts/bench/wan.sh): a disk pulled the
way python-ovmexporterclient's `download` pulls it, with the same library
(requests) and the same request pattern:

- log in, then GET the snapshot with `squashChunks=True` (and `compareTo`
  for an incremental pull: the chunks then include the zeroed ranges, which
  an old client copies as bytes);
- HEAD the disk for its size, create or extend the replica to that size;
- for every chunk, one after the other: one `requests.get` (a new session,
  so a new TCP connection and TLS handshake per chunk) with
  `Range: bytes=start-end`, streamed 1 MiB at a time into the replica.

This is a re-statement of that client's behaviour for the benchmark, not
its code. Prints one JSON line: chunks, bytes of data received, seconds.

usage: wan_pyclient.py URL USER PASSWORD CA_FILE VM SNAP OUT_DIR [BASE_SNAP]
"""
import json
import os
import sys
import time

import requests


def main():
    url, user, password, ca, vm, snap, out_dir = sys.argv[1:8]
    base = sys.argv[8] if len(sys.argv) > 8 else None
    t0 = time.monotonic()
    r = requests.post(f"{url}/api/v1/auth/login", verify=ca,
                      json={"username": user, "password": password})
    r.raise_for_status()
    auth = {"Authorization": "Bearer %s" % r.json()["token"]}
    params = {"squashChunks": True}
    if base is not None:
        params["compareTo"] = base
    r = requests.get(f"{url}/api/v1/vms/{vm}/snapshots/{snap}/", headers=auth,
                     verify=ca, params=params)
    r.raise_for_status()
    os.makedirs(out_dir, exist_ok=True)
    chunks = received = 0
    for disk in r.json()["disks"]:
        disk_url = f"{url}/api/v1/vms/{vm}/snapshots/{snap}/disks/{disk['name']}"
        h = requests.head(disk_url, headers=auth, verify=ca)
        h.raise_for_status()
        size = int(h.headers["content-length"])
        path = os.path.join(out_dir, disk["name"].lstrip("/"))
        with open(path, "r+b" if os.path.isfile(path) else "wb") as fd:
            if fd.seek(0, 2) > size:
                raise ValueError("cannot shrink disk")
            fd.truncate(size)
        with open(path, "r+b") as fd:
            for c in disk["chunks"]:
                fd.seek(c["start"])
                headers = dict(auth)
                headers["Range"] = "bytes=%d-%d" % (c["start"], c["start"] + c["length"] - 1)
                with requests.get(disk_url, headers=headers, verify=ca, stream=True) as dl:
                    dl.raise_for_status()
                    for data in dl.iter_content(chunk_size=1 << 20):
                        fd.write(data)
                        received += len(data)
                chunks += 1
    print(json.dumps({"chunks": chunks, "bytes": received,
                      "seconds": round(time.monotonic() - t0, 3)}))


if __name__ == "__main__":
    main()
