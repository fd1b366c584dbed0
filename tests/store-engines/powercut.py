#!/usr/bin/env python3
"""Power-cut trials for store-engines on cutfs (tests/powercut/cutfs.py).

One trial = one fresh cutfs mount (ext4-like or --strict) and one engine: CUTS times, start
`store-engines write`, let it commit for a random while, kill -9 it, cut the filesystem
(plain: drop every unsynced write and name; torn: keep a random part of the unsynced pages),
then `store-engines verify --acked <last acked seq>`. Cuts accumulate: the next writer goes on
from what the store holds. Prints one JSON line per trial.

Usage: powercut.py --bin BIN --cutfs CUTFS_PY --python PY --work DIR --engine E
                   --metadata ext4|strict --torn 0|1 [--cuts N] [--seed S]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time


def is_mounted(path):
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == target for line in f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--cutfs", required=True)
    ap.add_argument("--python", default="python3")
    ap.add_argument("--work", required=True)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--metadata", choices=["ext4", "strict"], required=True)
    ap.add_argument("--torn", type=int, default=0)
    ap.add_argument("--cuts", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()

    rng = random.Random(a.seed)
    backing, mnt = os.path.join(a.work, "backing"), os.path.join(a.work, "mnt")
    os.makedirs(backing, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    cmd = [a.python, a.cutfs, "--backing", backing, "--mount", mnt, "--seed", str(a.seed)]
    if a.metadata == "strict":
        cmd.append("--strict")
    log = open(os.path.join(a.work, "cutfs.log"), "w")
    fs = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    result = {"engine": a.engine, "metadata": a.metadata, "torn": bool(a.torn), "cuts": 0,
              "acked": 0, "lost_max": 0, "failed_cuts": 0, "opened_ok": 0, "torn_pages": 0,
              "notes": []}
    try:
        deadline = time.time() + 30
        while not is_mounted(mnt):
            if fs.poll() is not None or time.time() > deadline:
                raise SystemExit("cutfs did not mount: " + open(log.name).read()[-2000:])
            time.sleep(0.1)
        store = os.path.join(mnt, "store")
        acked_max = None  # highest seq ever acked (across writer sessions)
        for cut in range(a.cuts):
            w = subprocess.Popen([a.bin, "write", "--engine", a.engine, "--dir", store,
                                  "--batch", str(a.batch)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            last = [None]

            def reader():
                for line in w.stdout:
                    if line.startswith("acked "):
                        last[0] = int(line.split()[1])

            t = threading.Thread(target=reader, daemon=True)
            t.start()
            # Wait for the first ack (the open can take a while on FUSE), then a random while.
            start = time.time()
            while last[0] is None and w.poll() is None and time.time() - start < 60:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.2, 2.0))
            w.kill()
            w.wait()
            t.join()
            err = w.stderr.read().strip()
            if w.returncode != -9 and err:
                result["notes"].append(f"cut {cut}: writer exited {w.returncode}: {err[-300:]}")
            if last[0] is not None:
                acked_max = last[0] if acked_max is None else max(acked_max, last[0])
            word = "cut-torn" if a.torn else "cut"
            with open(os.path.join(mnt, ".cutfs"), "w") as f:
                f.write(word)
            result["cuts"] += 1
            vcmd = [a.bin, "verify", "--engine", a.engine, "--dir", store]
            if acked_max is not None:
                vcmd += ["--acked", str(acked_max)]
            try:
                v = subprocess.run(vcmd, capture_output=True, text=True, timeout=120)
                out, verr, vrc = v.stdout, v.stderr, v.returncode
            except subprocess.TimeoutExpired:
                out, verr, vrc = "FAIL: verify timed out\n", "", None
            # The last "verify k=v ..." line; a crash (abort, signal) leaves none.
            summary = [line for line in out.splitlines() if line.startswith("verify ")]
            fields = dict(kv.split("=", 1) for kv in summary[-1].split()[1:]) if summary \
                else {"ok": "0", "opened": "0", "missing": "0"}
            if fields.get("opened") == "1":
                result["opened_ok"] += 1
            if fields.get("ok") != "1":
                result["failed_cuts"] += 1
                result["lost_max"] = max(result["lost_max"], int(fields.get("missing", 0)))
                fails = [line for line in out.splitlines() if line.startswith("FAIL")]
                if not summary:
                    fails.append(f"verify exit {vrc}: {verr.strip()[-300:]}")
                result["notes"].append(f"cut {cut}: " + "; ".join(fails)[:300])
                # The next cut writes on top of the same store all the same.
        result["acked"] = 0 if acked_max is None else acked_max + 1
        with open(os.path.join(mnt, ".cutfs")) as f:
            stats = json.loads(f.read().strip())
        result["torn_pages"] = stats.get("torn_pages_kept", 0)
        result["dropped_pages"] = stats.get("dropped_pages", 0)
        result["syncs"] = stats.get("syncs", 0)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        try:
            fs.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fs.kill()
            fs.wait()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
