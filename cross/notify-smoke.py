#!/usr/bin/env python3
"""sd_notify smoke test: runs the agent as systemd would run it for the unit's Type=notify and
WatchdogSec=, with a fake NOTIFY_SOCKET, and checks the protocol:

  READY=1 only after the agent is up (its "edge-agent ready" log line is written before it),
  WATCHDOG=1 repeatedly while idle (at least every WATCHDOG_USEC/2), STOPPING=1 on SIGTERM,
  then exit 0.

Usage: notify-smoke.py CONFIG_EXAMPLE AGENT [WRAPPER ARGS...]
  AGENT may be a command prefix, e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu path/to/edge-agent`.
The config is CONFIG_EXAMPLE (config/edge-agent.toml) with data_dir and both listen addresses
moved to a temporary directory and free loopback ports.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

WATCHDOG_SEC = 2.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    example, agent = sys.argv[1], sys.argv[2:]
    text = open(example, encoding="utf-8").read()
    with tempfile.TemporaryDirectory() as tmp:
        mqtt, metrics = free_port(), free_port()
        text = re.sub(r"^data_dir\s*=.*$", "", text, flags=re.M)
        text = f'data_dir = "{tmp}/data"\n' + text
        n_mqtt = len(re.findall(r'"127\.0\.0\.1:1883"', text))
        n_metrics = len(re.findall(r'"127\.0\.0\.1:9898"', text))
        if n_mqtt != 1 or n_metrics != 1:
            sys.exit(f"notify-smoke: expected the default listen addresses 127.0.0.1:1883 and "
                     f"127.0.0.1:9898 once each in {example}")
        text = text.replace("127.0.0.1:1883", f"127.0.0.1:{mqtt}")
        text = text.replace("127.0.0.1:9898", f"127.0.0.1:{metrics}")
        config = os.path.join(tmp, "edge-agent.toml")
        open(config, "w", encoding="utf-8").write(text)

        sock_path = os.path.join(tmp, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(0.2)
        log_path = os.path.join(tmp, "agent.log")
        env = dict(os.environ, NOTIFY_SOCKET=sock_path,
                   WATCHDOG_USEC=str(int(WATCHDOG_SEC * 1e6)), RUST_LOG="info")
        env.pop("WATCHDOG_PID", None)
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(agent + ["run", "--config", config], env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=log)
        got = []  # (seconds since start, message)
        failures = []

        def receive(until, stop_when=None):
            while time.monotonic() < until:
                try:
                    msg = sock.recv(4096).decode()
                except socket.timeout:
                    if proc.poll() is not None:
                        return
                    continue
                got.append((time.monotonic() - t0, msg))
                if stop_when and stop_when(msg):
                    return

        def log_text():
            return open(log_path, encoding="utf-8", errors="replace").read()

        try:
            receive(time.monotonic() + 60, lambda m: "READY=1" in m.split("\n"))
            ready = [t for t, m in got if "READY=1" in m.split("\n")]
            if not ready:
                failures.append("no READY=1 within 60 s")
            elif "edge-agent ready" not in log_text():
                failures.append("READY=1 came before the agent logged 'edge-agent ready'")
            # Idle for 3 watchdog periods: the pipeline is idle, the watchdog must keep coming.
            start_idle = time.monotonic()
            receive(start_idle + 3 * WATCHDOG_SEC)
            pets = [t for t, m in got if m == "WATCHDOG=1" and t >= start_idle - t0]
            if len(pets) < 4:
                failures.append(f"{len(pets)} WATCHDOG=1 in {3 * WATCHDOG_SEC:.0f} s idle "
                                f"(want >= 4: at least one per {WATCHDOG_SEC / 2:.0f} s)")
            gaps = [b - a for a, b in zip(pets, pets[1:])]
            if gaps and max(gaps) > WATCHDOG_SEC * 0.75:
                failures.append(f"largest gap between pets {max(gaps):.2f} s > 0.75 x WatchdogSec")
            proc.send_signal(signal.SIGTERM)
            receive(time.monotonic() + 30, lambda m: "STOPPING=1" in m.split("\n"))
            if not any("STOPPING=1" in m.split("\n") for _, m in got):
                failures.append("no STOPPING=1 after SIGTERM")
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "killed after 30 s"
            if rc != 0:
                failures.append(f"exit status {rc} after SIGTERM (want 0)")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t, m in got:
            if m != "WATCHDOG=1":
                print(f"  {t:6.2f}s  {m!r}")
        print(f"  {sum(1 for _, m in got if m == 'WATCHDOG=1')} x WATCHDOG=1")
        if failures:
            print("notify-smoke FAILED:\n  " + "\n  ".join(failures))
            print("agent log:\n" + log_text()[-3000:])
            sys.exit(1)
        print("notify-smoke: READY=1 after start-up, watchdog petted while idle, STOPPING=1, exit 0")


if __name__ == "__main__":
    main()
