#!/usr/bin/python3
"""A FUSE filesystem with one file, `disk.img`, backed by a real file, that
answers EIO for chosen byte ranges: a faulty block device for the tests of
the store's recovery (tests/heal.rs), put under a loop device holding a
filesystem (this kernel has no device-mapper, whose `error` target would do
the same).

    faultyfs.py BACKING MOUNTPOINT CONTROL

CONTROL is a JSON file, read again whenever it changes:
    {"write": [[start, end], ...], "read": [[start, end], ...]}
byte ranges (end exclusive) of disk.img whose writes or reads fail with
EIO. A missing or empty file means a healthy disk. Runs in the foreground
until unmounted; Debian's python3-fusepy (scripts/deps.sh).
"""

import errno
import json
import os
import stat
import sys
import threading

import fusepy
from fusepy import FUSE, FuseOSError, Operations

NAME = "/disk.img"


class Faulty(Operations):
    def __init__(self, backing, control):
        self.fd = os.open(backing, os.O_RDWR)
        self.control = control
        self.stamp = None
        self.ranges = {"write": [], "read": []}
        self.lock = threading.Lock()

    def _bad(self, kind, off, size):
        with self.lock:
            try:
                st = os.stat(self.control)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp != self.stamp:
                self.stamp = stamp
                ranges = {"write": [], "read": []}
                if stamp is not None:
                    try:
                        with open(self.control) as f:
                            text = f.read().strip()
                        if text:
                            ranges.update(json.loads(text))
                    except (OSError, ValueError) as e:
                        print(f"faultyfs: bad control file: {e}", file=sys.stderr)
                self.ranges = ranges
            return any(off < e and s < off + size for s, e in self.ranges.get(kind, []))

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != NAME:
            raise FuseOSError(errno.ENOENT)
        st = os.fstat(self.fd)
        return {
            "st_mode": stat.S_IFREG | 0o600,
            "st_nlink": 1,
            "st_size": st.st_size,
            "st_mtime": st.st_mtime,
            "st_ctime": st.st_ctime,
            "st_atime": st.st_atime,
        }

    def readdir(self, path, fh):
        return [".", "..", NAME[1:]]

    def open(self, path, flags):
        if path != NAME:
            raise FuseOSError(errno.ENOENT)
        return 0

    def read(self, path, size, offset, fh):
        if self._bad("read", offset, size):
            raise FuseOSError(errno.EIO)
        return os.pread(self.fd, size, offset)

    def write(self, path, data, offset, fh):
        if self._bad("write", offset, len(data)):
            raise FuseOSError(errno.EIO)
        return os.pwrite(self.fd, data, offset)

    def truncate(self, path, length, fh=None):
        os.ftruncate(self.fd, length)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(self.fd)
        return 0


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    backing, mountpoint, control = sys.argv[1:]
    FUSE(Faulty(backing, control), mountpoint, foreground=True, nothreads=False,
         allow_other=False, direct_io=True)


if __name__ == "__main__":
    main()
