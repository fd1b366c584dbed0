#!/usr/bin/env python3
"""Self-check of cutfs's model: what a cut keeps and drops, in both metadata modes.

Run with the venv's python (tests/run.sh does): selfcheck.py. Mounts cutfs on temp dirs,
ends with 'N passed, N failed' and exits non-zero on a failure.
"""

import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Mount:
    def __init__(self, strict, seed=1):
        self.tmp = tempfile.TemporaryDirectory()
        self.mnt = os.path.join(self.tmp.name, "mnt")
        backing = os.path.join(self.tmp.name, "backing")
        os.makedirs(self.mnt)
        os.makedirs(backing)
        args = [sys.executable, os.path.join(HERE, "cutfs.py"), "--backing", backing,
                "--mount", self.mnt, "--seed", str(seed)] + (["--strict"] if strict else [])
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cutfs did not mount: " + self.proc.stderr.read().decode())
            time.sleep(0.02)

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)

    def cut(self, torn=False):
        with open(self.path(".cutfs"), "w") as f:
            f.write("cut-torn" if torn else "cut")

    def stats(self):
        import json
        with open(self.path(".cutfs")) as f:
            return json.loads(f.read())

    def close(self):
        subprocess.run(["fusermount3", "-u", "-z", self.mnt], check=False)
        self.proc.wait(timeout=30)
        self.tmp.cleanup()


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def records(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return -1
    return len(data) // 100


def writer(m, name, n, sync):
    """Appends n 100-byte records, 'acknowledging' each after write (and fsync if sync)."""
    fd = os.open(m.path(name), os.O_CREAT | os.O_RDWR, 0o644)
    if sync:
        os.fsync(fd)
        fsync_dir(m.mnt)
    for i in range(n):
        os.write(fd, (b"%099d\n" % i))
        if sync:
            os.fdatasync(fd)
    os.close(fd)


def check_unsynced_writer_loses(strict):
    m = Mount(strict)
    try:
        writer(m, "log", 200, sync=False)
        assert records(m.path("log")) == 200
        m.cut()
        assert records(m.path("log")) in (-1, 0), records(m.path("log"))
    finally:
        m.close()


def check_synced_writer_keeps(strict, torn):
    m = Mount(strict, seed=7)
    try:
        writer(m, "log", 200, sync=True)
        # An unsynced tail after the acknowledged records.
        with open(m.path("log"), "ab") as f:
            f.write(b"x" * 50000)
        m.cut(torn)
        with open(m.path("log"), "rb") as f:
            data = f.read()
        assert len(data) >= 20000, len(data)
        for i in range(200):
            assert data[i * 100:(i + 1) * 100] == b"%099d\n" % i, i
    finally:
        m.close()


def check_directory_sync_matters(strict):
    m = Mount(strict)
    try:
        os.mkdir(m.path("d"))
        fsync_dir(m.mnt)
        fd = os.open(m.path("d", "f"), os.O_CREAT | os.O_RDWR)
        os.write(fd, b"data")
        os.fsync(fd)
        os.close(fd)
        m.cut()
        exists = os.path.exists(m.path("d", "f"))
        assert exists == (not strict), (strict, exists)
    finally:
        m.close()


def check_rename_undone():
    m = Mount(False)
    try:
        fd = os.open(m.path("a"), os.O_CREAT | os.O_RDWR)
        os.write(fd, b"1")
        os.fsync(fd)
        os.close(fd)
        os.rename(m.path("a"), m.path("b"))
        m.cut()
        assert os.path.exists(m.path("a")) and not os.path.exists(m.path("b"))
    finally:
        m.close()


def check_torn_keeps_some_pages():
    kept = dropped = 0
    for seed in range(1, 6):
        m = Mount(False, seed=seed)
        try:
            fd = os.open(m.path("f"), os.O_CREAT | os.O_RDWR)
            os.fsync(fd)
            os.write(fd, b"p" * 4096 * 64)
            os.close(fd)
            m.cut(torn=True)
            s = m.stats()
            kept += s["torn_pages_kept"]
            dropped += s["dropped_pages"]
        finally:
            m.close()
    assert kept > 0 and dropped > 0, (kept, dropped)


def main():
    checks = [
        ("unsynced writer loses (ext4)", lambda: check_unsynced_writer_loses(False)),
        ("unsynced writer loses (strict)", lambda: check_unsynced_writer_loses(True)),
        ("synced writer keeps (ext4)", lambda: check_synced_writer_keeps(False, False)),
        ("synced writer keeps (strict)", lambda: check_synced_writer_keeps(True, False)),
        ("synced writer keeps, torn (ext4)", lambda: check_synced_writer_keeps(False, True)),
        ("synced writer keeps, torn (strict)", lambda: check_synced_writer_keeps(True, True)),
        ("a name needs its directory synced (strict)", lambda: check_directory_sync_matters(True)),
        ("a name is durable at any fsync (ext4)", lambda: check_directory_sync_matters(False)),
        ("an unsynced rename is undone", check_rename_undone),
        ("torn cuts keep some pages and drop others", check_torn_keeps_some_pages),
    ]
    passed = failed = 0
    for name, check in checks:
        try:
            check()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAIL {name}: {e!r}")
    print(f"cutfs: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
