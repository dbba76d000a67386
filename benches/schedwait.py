#!/usr/bin/env python3
"""Who keeps the proxy thread off its core: `perf sched` on the proxy's core while a load holds a fixed rate.

The same one-core sidecar setup as benches/tail.py (proxy and evaluation worker on core PROXY_CPU, nginx
upstream and the load generator on LOAD_CPU). For each binary in DG_BINS (space-separated; default the
release build) and each `signals.sample` in SAMPLES (default "1.0"; "0.0 1.0" compares off and on),
interleaved ROUNDS times: tail.py's fixed-rate generator (GEN: benches/rate.rs, or oha) at SHARE (0.8) of
the signals-off saturated rate for DURATION (7) s, `perf sched record` of all cores for the middle
4 s, then from `perf sched timehist --state`:
- wake-ups: how long the proxy thread waited for its core after each wake-up (sch delay);
- preemptions: every time the proxy thread was switched out still runnable, how long until it ran again
  and which tasks ran on its core meanwhile. Waits over 0.5 ms are listed by the tasks that took the CPU
  — `driftguard-eval` there is the evaluation worker delaying traffic.

Usage (from the project root, as root for perf):
    python3 benches/schedwait.py
    DG_BINS="/tmp/old/driftguard target/release/driftguard" ROUNDS=3 python3 benches/schedwait.py
Needs perf, wrk and nginx (and oha with GEN=oha; the results of 2026-12-04 were made with oha). A
diagnostic, not a pass/fail benchmark.
"""
import collections
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tail  # noqa: E402  (the setup: nginx upstream, driftguard configs, wrk and fixed-rate runs)

ROUNDS = int(os.environ.get("ROUNDS", "2"))
# The load runs 1.5 s before and after the 4 s recorded.
tail.DURATION = int(os.environ.get("DURATION", "7"))
SHARE = float(os.environ.get("SHARE", "0.8"))
BINS = [os.path.abspath(b) for b in os.environ.get("DG_BINS", tail.DG).split()]
SAMPLES = os.environ.get("SAMPLES", "1.0").split()
LONG_MS = 0.5


def proxy_waits(data, pid):
    """(wake-up delays in ms, preemptions, waits over LONG_MS in ms, CPU ms per task that ran on the
    proxy's core during those waits)."""
    out = subprocess.run(["perf", "sched", "timehist", "--state", "-i", data],
                         capture_output=True, text=True).stdout.splitlines()[3:]
    preempted_at, between, waits, blame, count = None, collections.Counter(), [], collections.Counter(), 0
    delays = []
    cpu = f"[{int(tail.PROXY_CPU):04d}]"
    for line in out:
        f = line.split()
        if len(f) < 7 or f[1] != cpu:
            continue
        t, task, state, run = float(f[0]), f[2], f[-1], float(f[-2]) / 1e3
        name = task.split("[", 1)[0]
        # The proxy runs on the main thread: `name[pid]` (other threads are `name[tid/pid]`).
        if task.endswith(f"[{pid}]"):
            delays.append(float(f[4]))
            if preempted_at is not None:
                count += 1
                wait = (t - run - preempted_at) * 1e3
                if wait > LONG_MS:
                    waits.append(wait)
                    blame.update(between)
            preempted_at = t if state == "R" else None
            between = collections.Counter()
        elif preempted_at is not None:
            between[name] += run * 1e3
    return delays, count, waits, blame


def main():
    if not BINS:
        sys.exit("DG_BINS is empty")
    if tail.GEN == "rate":
        tail.RATE = tail.rate_bin()
    up = tail.upstream()
    tail.DG = BINS[0]
    # No log file here (tail.py keeps one to read latencies): its writes would compete for the core.
    port, _, probe = tail.driftguard("probe", up, "0.0", keep_log=False)
    rate = SHARE * tail.wrk(port)[0]
    os.kill(probe, 15)
    targets = []
    for i, b in enumerate(BINS):
        for sample in SAMPLES:
            tail.DG = b
            targets.append((f"{b} sample {sample}", tail.driftguard(f"dg-{len(targets)}", up, sample, keep_log=False)))
    print(f"{tail.GEN} at {rate:.0f} req/s ({100 * SHARE:.0f} % of saturation); perf sched of all cores, the proxy on core {tail.PROXY_CPU}")
    for r in range(ROUNDS):
        for i, (b, (port, admin, pid)) in enumerate(targets):
            data = os.path.join(tail.TMP, f"sched-{i}-{r}.data")
            result = {}
            load = threading.Thread(target=lambda: result.update(zip(("rps", "p99", "reqs", "bad"), tail.fixed_rate(port, rate))))
            load.start()
            time.sleep(1.5)
            subprocess.run(["taskset", "-c", tail.LOAD_CPU, "perf", "sched", "record", "-a", "-o", data,
                            "--", "sleep", "4"], capture_output=True)
            load.join()
            delays, count, waits, blame = proxy_waits(data, pid)
            print(f"{b} round {r + 1}: {result.get('rps', 0):.0f} req/s, p99 {result.get('p99', 0):.2f} ms; "
                  f"wake-ups {len(delays)}, waiting for the core {1e3 * sum(delays) / max(len(delays), 1):.1f} us on "
                  f"average, max {max(delays, default=0):.3f} ms; "
                  f"preempted {count} times, {len(waits)} waits > {LONG_MS} ms (total {sum(waits):.1f} ms, "
                  f"max {max(waits, default=0):.2f} ms); CPU taken meanwhile: "
                  + (", ".join(f"{k} {v:.1f} ms" for k, v in blame.most_common(5)) or "-"))
    return 0


if __name__ == "__main__":
    sys.exit(tail.run(main))
