"""Start a multi-process (pod-layout) run on this machine: N processes of `experiments.train`, each with its own
simulated CPU devices, joined over a free loopback port.

Each process gets `--coordinator 127.0.0.1:PORT --num-processes N --process-id I` after the train flags,
JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D. Their output is forwarded line
by line with a "[pI]" prefix. When one process fails, the others get --grace seconds to notice and stop on
their own (a process whose peer is gone exits by itself after the trainer's --peer-timeout), then they are
killed. SIGINT or SIGTERM to the launcher is passed on as SIGTERM to every process: they checkpoint at the
same step and exit (a second SIGINT kills them).

Example (what a TPU v4-8 run over 2 hosts of 2 chips does, on one machine):
  python -m experiments.launch_local --processes 2 --devices-per-process 2 -- \\
      --config tiny --data synthetic --stage=2 --mesh tpu_v4_8 --max-steps 6 --out runs/two_hosts
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

PREFIX = "[launch]"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int, base: dict | None = None) -> dict:
    """The environment of one process: CPU platform with `devices` simulated devices, unbuffered output."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _forward(stream, prefix: str, out) -> None:
    for line in stream:  # text mode: "\r" of progress bars ends a line too
        line = line.rstrip("\n")
        if line:
            out.write(f"{prefix} {line}\n")
            out.flush()


def _say(msg: str) -> None:
    sys.stderr.write(f"{PREFIX} {msg}\n")
    sys.stderr.flush()


def launch(processes: int, devices_per_process: int, flags: list[str], module: str = "experiments.train",
           port: int | None = None, grace: float = 10.0) -> int:
    """Run the processes to the end; the exit status is 0 when all succeeded, else the first failure's."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    env = child_env(devices_per_process)
    env["JAX_COORDINATOR_BIND_ADDRESS"] = address  # the coordination service listens on loopback only
    procs: list[subprocess.Popen] = []
    threads = []
    _say(f"{processes} processes x {devices_per_process} CPU devices, coordinator {address}, module {module}")
    for i in range(processes):
        cmd = [sys.executable, "-m", module, *flags, "--coordinator", address, "--num-processes", str(processes),
               "--process-id", str(i)]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                             start_new_session=True)  # the terminal's Ctrl-C reaches the launcher only
        procs.append(p)
        _say(f"process {i}: pid {p.pid}")
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_forward, args=(stream, f"[p{i}]", out), daemon=True)
            t.start()
            threads.append(t)

    interrupts = {"n": 0}

    def on_signal(signum, _frame):
        interrupts["n"] += 1
        if interrupts["n"] == 1:
            _say(f"got {signal.Signals(signum).name}: passing SIGTERM to every process (checkpoint, then exit)")
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        else:
            _say("second signal: killing every process")
            for p in procs:
                if p.poll() is None:
                    p.kill()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status, failed_at = 0, None
    reported: set[int] = set()
    try:
        while True:
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None or i in reported:
                    continue
                reported.add(i)
                if code != 0:
                    _say(f"process {i} {describe_exit(code)}")
                    if failed_at is None:
                        status, failed_at = (code if code > 0 else 128 - code), time.monotonic()
                        if len(reported) < len(procs):
                            _say(f"giving the other processes {grace:.0f} s to stop on their own")
            if len(reported) == len(procs):
                break
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        _say(f"process {i} still running {grace:.0f} s after a failure: killing it")
                        p.kill()
                failed_at = float("inf")  # killed: only wait for them now
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
        for t in threads:
            t.join(timeout=5)
    _say("all processes finished" if status == 0 else f"failed (exit status {status})")
    return status


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, flags = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(prog="python -m experiments.launch_local", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s [--processes N] [--devices-per-process D] [...] -- TRAIN_FLAGS")
    ap.add_argument("--processes", type=int, default=2, help="processes (simulated hosts), default 2")
    ap.add_argument("--devices-per-process", type=int, default=2, help="simulated CPU devices each, default 2")
    ap.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds the others get to stop on their own after "
                    "one process failed, before they are killed (default 10)")
    ap.add_argument("--module", default="experiments.train", help="module each process runs (python -m MODULE "
                    "TRAIN_FLAGS --coordinator ... --num-processes N --process-id I)")
    args = ap.parse_args(argv)
    if args.processes < 1 or args.devices_per_process < 1:
        ap.error(f"--processes {args.processes} and --devices-per-process {args.devices_per_process} must be >= 1")
    taken = [f for f in flags if f.split("=")[0] in ("--coordinator", "--num-processes", "--process-id")]
    if taken:
        ap.error(f"{', '.join(taken)}: the launcher sets these itself; leave them out of TRAIN_FLAGS")
    return launch(args.processes, args.devices_per_process, flags, module=args.module, port=args.port,
                  grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
