#!/usr/bin/env python3
"""How long a killed worker's item waits before it is taken back.

Starts `litework run -w 1` on one item that sleeps, kills the worker with
SIGKILL once the item runs, and times how long until the item is no
longer leased to the dead worker (the supervisor requeued it, or the
restarted worker already claimed it again). Prints each of RUNS samples
in milliseconds, sorted.

    python3 benches/rescue.py target/release/litework [RUNS]
"""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time


def one(lw):
    d = tempfile.mkdtemp(prefix="litework-rescue-")
    db = os.path.join(d, "q.db")
    try:
        subprocess.run([lw, "--db", db, "-q", "add"], input=b"x\n", check=True,
                       stderr=subprocess.DEVNULL)
        run = subprocess.Popen(
            [lw, "--db", db, "-q", "run", "-w", "1", "-c", "1", "--progress", "none",
             "--drain-timeout", "0s", "--", "sh", "-c", "sleep 60"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            conn = sqlite3.connect(db, timeout=10)
            deadline = time.monotonic() + 20
            owner = None
            while owner is None:
                if time.monotonic() > deadline:
                    sys.exit("the item did not start within 20 s")
                row = conn.execute(
                    "SELECT lease_owner FROM items WHERE status = 'running'").fetchone()
                owner = row and row[0]
                time.sleep(0.005)
            # With -w 1 the supervisor's only child is the worker.
            found = subprocess.run(["pgrep", "-P", str(run.pid)],
                                   capture_output=True, check=True)
            worker = int(found.stdout.split()[0])
            killed = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            while True:
                status, lease = conn.execute(
                    "SELECT status, lease_owner FROM items").fetchone()
                if status != "running" or lease != owner:
                    return (time.monotonic() - killed) * 1000
                if time.monotonic() - killed > 20:
                    sys.exit("the item was not taken back within 20 s")
                time.sleep(0.0005)
        finally:
            run.send_signal(signal.SIGINT)
            try:
                run.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    lw = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    samples = sorted(one(lw) for _ in range(runs))
    print("rescue after kill -9, ms:", " ".join("%.1f" % s for s in samples))


main()
