#!/usr/bin/env python3
"""cutfs: a FUSE filesystem that simulates a power cut, for durability tests.

Every operation is applied at once to real files under BACKING/live (the "live" view a running
process sees, and the kernel's page cache in a real machine). What would survive the plug being
pulled is kept apart (the "durable" view, in memory):

- file data becomes durable only at fsync/fdatasync of that file (the 4 KiB pages written since
  the file's last sync are copied, with its size). sync_file_range never reaches FUSE, so it
  makes nothing durable, as on a drive whose cache it does not flush;
- name changes (create, mkdir, rename, unlink, rmdir) become durable in order: ext4-like
  (default) at the next fsync of any file or directory (one journal commit carries them all);
  --strict only when their parent directory is fsynced.

Writing "cut" to MNT/.cutfs rebuilds the live view from the durable one: unsynced writes and
name changes are gone. "cut-torn" does the same but keeps a random subset of each file's
unsynced pages (seeded: --seed and the cut number) and either size. File handles opened before
a cut fail with EIO afterwards (their process was killed). Reading MNT/.cutfs gives one JSON
line of counters.

Usage: cutfs.py --backing DIR --mount MNT [--strict] [--seed N]  (foreground, until unmounted)
"""

import argparse
import errno
import json
import os
import random
import shutil
import stat
import sys

from mfusepy import FUSE, FuseOSError, Operations

PAGE = 4096
CONTROL = "/.cutfs"


def parent(path):
    return os.path.dirname(path) or "/"


class CutFs(Operations):
    use_ns = True

    def __init__(self, backing, strict, seed):
        self.live_root = os.path.join(backing, "live")
        shutil.rmtree(self.live_root, ignore_errors=True)
        os.makedirs(self.live_root)
        self.strict = strict
        self.seed = seed
        # Live namespace: path -> inode id (files); dirs by path.
        self.next_ino = 1
        self.live_files = {}
        # Durable view.
        self.dur_files = {}  # path -> ino
        self.dur_dirs = {"/"}
        self.dur_data = {}  # ino -> bytearray
        # Unsynced state.
        self.dirty = {}  # ino -> set of page numbers
        self.pending = []  # (op, args, parents)
        # Open handles: fh -> (ino or None, generation).
        self.handles = {}
        self.gen = 0
        self.stats = {"cuts": 0, "syncs": 0, "dropped_pages": 0, "torn_pages_kept": 0,
                      "dropped_names": 0}

    # -- helpers -------------------------------------------------------------------------
    def real(self, path):
        return os.path.join(self.live_root, path.lstrip("/"))

    def handle(self, fh):
        entry = self.handles.get(fh)
        if entry is None or entry[1] != self.gen:
            raise FuseOSError(errno.EIO)
        return entry[0]

    def mark(self, ino, offset, length):
        if length <= 0:
            return
        pages = self.dirty.setdefault(ino, set())
        pages.update(range(offset // PAGE, (offset + length - 1) // PAGE + 1))

    def record(self, op, args, parents):
        self.pending.append((op, args, set(parents)))

    def apply(self, op, args):
        if op == "create":
            path, ino = args
            self.dur_files[path] = ino
            self.dur_data.setdefault(ino, bytearray())
        elif op == "mkdir":
            self.dur_dirs.add(args[0])
        elif op == "unlink":
            self.dur_files.pop(args[0], None)
        elif op == "rmdir":
            self.dur_dirs.discard(args[0])
        elif op == "rename":
            old, new, ino = args
            if ino is not None:
                self.dur_files.pop(old, None)
                self.dur_files[new] = ino
                self.dur_data.setdefault(ino, bytearray())
            else:
                moved = {p: i for p, i in self.dur_files.items()
                         if p == old or p.startswith(old + "/")}
                for p, i in moved.items():
                    del self.dur_files[p]
                    self.dur_files[new + p[len(old):]] = i
                dirs = {d for d in self.dur_dirs if d == old or d.startswith(old + "/")}
                self.dur_dirs -= dirs
                self.dur_dirs |= {new + d[len(old):] for d in dirs}
                self.dur_dirs.add(new)

    def commit_names(self, synced_dir=None):
        """ext4-like: every pending name change; strict: those whose parents are synced_dir."""
        keep = []
        for op, args, parents in self.pending:
            if synced_dir is None or parents <= {synced_dir}:
                self.apply(op, args)
            else:
                parents.discard(synced_dir)
                keep.append((op, args, parents))
        self.pending = keep

    def sync_data(self, ino, path_fd):
        data = self.dur_data.setdefault(ino, bytearray())
        size = os.fstat(path_fd).st_size
        for page in sorted(self.dirty.pop(ino, ())):
            chunk = os.pread(path_fd, PAGE, page * PAGE)
            end = page * PAGE + len(chunk)
            if len(data) < end:
                data.extend(b"\0" * (end - len(data)))
            data[page * PAGE:end] = chunk
        del data[size:]
        if len(data) < size:
            data.extend(b"\0" * (size - len(data)))
        self.stats["syncs"] += 1

    def cut(self, torn):
        self.stats["cuts"] += 1
        rng = random.Random(self.seed * 1000003 + self.stats["cuts"])
        if torn:
            live_by_ino = {i: p for p, i in self.live_files.items()}
            for ino, pages in self.dirty.items():
                path = live_by_ino.get(ino)
                if path is None or ino not in self.dur_data:
                    self.stats["dropped_pages"] += len(pages)
                    continue
                data = self.dur_data[ino]
                with open(self.real(path), "rb") as f:
                    live = f.read()
                for page in sorted(pages):
                    if rng.random() < 0.5:
                        chunk = live[page * PAGE:(page + 1) * PAGE]
                        end = page * PAGE + len(chunk)
                        if len(data) < end:
                            data.extend(b"\0" * (end - len(data)))
                        data[page * PAGE:end] = chunk
                        self.stats["torn_pages_kept"] += 1
                    else:
                        self.stats["dropped_pages"] += 1
                if rng.random() < 0.5:
                    del data[len(live):]
                    if len(data) < len(live):
                        data.extend(b"\0" * (len(live) - len(data)))
        else:
            self.stats["dropped_pages"] += sum(len(p) for p in self.dirty.values())
        self.stats["dropped_names"] += len(self.pending)
        self.dirty.clear()
        self.pending.clear()
        self.gen += 1
        # Rebuild the live view from the durable one.
        shutil.rmtree(self.live_root)
        os.makedirs(self.live_root)
        for d in sorted(self.dur_dirs, key=len):
            os.makedirs(self.real(d), exist_ok=True)
        for path, ino in self.dur_files.items():
            if parent(path) not in self.dur_dirs and parent(path) != "/":
                continue
            with open(self.real(path), "wb") as f:
                f.write(self.dur_data.get(ino, b""))
        self.live_files = {p: i for p, i in self.dur_files.items()
                           if os.path.exists(self.real(p))}
        live_inos = set(self.live_files.values())
        self.dur_data = {i: d for i, d in self.dur_data.items() if i in live_inos}

    # -- the control file ----------------------------------------------------------------
    def control_attr(self):
        return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 4096,
                "st_uid": 0, "st_gid": 0, "st_atime": 0, "st_mtime": 0, "st_ctime": 0}

    # -- FUSE operations -----------------------------------------------------------------
    def getattr(self, path, fh=None):
        if path == CONTROL:
            return self.control_attr()
        try:
            st = os.lstat(self.real(path))
        except OSError as e:
            raise FuseOSError(e.errno)
        return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid",
                                              "st_gid", "st_atime", "st_mtime", "st_ctime")}

    def readdir(self, path, fh):
        try:
            return [".", ".."] + os.listdir(self.real(path))
        except OSError as e:
            raise FuseOSError(e.errno)

    def access(self, path, amode):
        if path != CONTROL and not os.path.lexists(self.real(path)):
            raise FuseOSError(errno.ENOENT)
        return 0

    def statfs(self, path):
        st = os.statvfs(self.live_root)
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize",
                                              "f_favail", "f_ffree", "f_files", "f_flag",
                                              "f_frsize", "f_namemax")}

    def chmod(self, path, mode):
        if path != CONTROL:
            os.chmod(self.real(path), mode)
        return 0

    def chown(self, path, uid, gid):
        if path != CONTROL:
            os.chown(self.real(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        if path != CONTROL:
            os.utime(self.real(path), ns=None if times is None else times)
        return 0

    def mknod(self, path, mode, dev):
        # Sockets (the agent's admin socket) and fifos: live only, a reboot does not keep them.
        os.mknod(self.real(path), mode, dev)
        return 0

    def mkdir(self, path, mode):
        os.mkdir(self.real(path), mode)
        self.record("mkdir", (path,), [parent(path)])
        return 0

    def rmdir(self, path):
        os.rmdir(self.real(path))
        self.record("rmdir", (path,), [parent(path)])
        return 0

    def unlink(self, path):
        os.unlink(self.real(path))
        self.live_files.pop(path, None)
        self.record("unlink", (path,), [parent(path)])
        return 0

    def rename(self, old, new):
        os.rename(self.real(old), self.real(new))
        ino = self.live_files.pop(old, None)
        if ino is not None:
            self.live_files[new] = ino
        else:
            moved = {p: i for p, i in self.live_files.items() if p.startswith(old + "/")}
            for p, i in moved.items():
                del self.live_files[p]
                self.live_files[new + p[len(old):]] = i
        self.record("rename", (old, new, ino), [parent(old), parent(new)])
        return 0

    def create(self, path, mode, fi=None):
        if path == CONTROL:
            return self.open(path, os.O_WRONLY)
        fd = os.open(self.real(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        ino = self.next_ino
        self.next_ino += 1
        self.live_files[path] = ino
        self.record("create", (path, ino), [parent(path)])
        self.handles[fd] = (ino, self.gen)
        return fd

    def open(self, path, flags):
        if path == CONTROL:
            fd = os.open("/dev/null", os.O_RDWR)
            self.handles[fd] = ("control", self.gen)
            return fd
        ino = self.live_files.get(path)
        fd = os.open(self.real(path), os.O_RDWR if ino is not None else os.O_RDONLY)
        if ino is not None and flags & os.O_TRUNC:
            size = os.fstat(fd).st_size
            os.ftruncate(fd, 0)
            self.mark(ino, 0, size)
        self.handles[fd] = (ino, self.gen)
        return fd

    def opendir(self, path):
        fd = os.open(self.real(path), os.O_RDONLY | os.O_DIRECTORY)
        self.handles[fd] = (None, self.gen)
        return fd

    def read(self, path, size, offset, fh):
        ino = self.handle(fh)
        if ino == "control":
            text = (json.dumps(self.stats) + "\n").encode()
            return text[offset:offset + size]
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        ino = self.handle(fh)
        if ino == "control":
            word = bytes(data).decode().strip()
            if word not in ("cut", "cut-torn"):
                raise FuseOSError(errno.EINVAL)
            self.cut(word == "cut-torn")
            return len(data)
        if ino is None:
            raise FuseOSError(errno.EBADF)
        n = os.pwrite(fh, data, offset)
        self.mark(ino, offset, n)
        return n

    def truncate(self, path, length, fh=None):
        if path == CONTROL:
            return 0
        if fh is not None:
            ino = self.handle(fh)
            old = os.fstat(fh).st_size
            os.ftruncate(fh, length)
        else:
            ino = self.live_files.get(path)
            old = os.stat(self.real(path)).st_size
            os.truncate(self.real(path), length)
        if ino is not None:
            lo, hi = min(old, length), max(old, length)
            self.mark(ino, lo, max(hi - lo, 1))
        return 0

    def fallocate(self, path, mode, offset, size, fh):
        ino = self.handle(fh)
        if mode != 0:
            raise FuseOSError(errno.EOPNOTSUPP)
        os.posix_fallocate(fh, offset, size)
        self.mark(ino, offset, size)
        return 0

    def fsync(self, path, datasync, fh):
        ino = self.handle(fh)
        if ino == "control":
            return 0
        if not self.strict:
            self.commit_names()
        if ino is not None:
            self.sync_data(ino, fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        self.handle(fh)
        self.commit_names(None if not self.strict else path)
        self.stats["syncs"] += 1
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        self.handles.pop(fh, None)
        try:
            os.close(fh)
        except OSError:
            pass
        return 0

    def releasedir(self, path, fh):
        return self.release(path, fh)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backing", required=True)
    ap.add_argument("--mount", required=True)
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    fs = CutFs(os.path.abspath(args.backing), args.strict, args.seed)
    FUSE(fs, args.mount, foreground=True, nothreads=True, direct_io=True,
         attr_timeout=0, entry_timeout=0, negative_timeout=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
