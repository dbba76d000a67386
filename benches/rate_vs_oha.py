#!/usr/bin/env python3
"""benches/rate.rs against oha -q --latency-correction, the two fixed-rate generators of benches/tail.py.

Same setup as tail.py: nginx (the ~0.8 KB answer) and the generator on core LOAD_CPU (0), a driftguard
with the signals off on core PROXY_CPU (1). For each target (nginx straight, then through the proxy) and
each rate in RATES, ROUNDS times with the two generators in turn (DURATION s each): the delivered rate,
p99, how busy core LOAD_CPU was and the generator's own CPU per request (its process's user + system
time, from the kernel's accounting of waited-for children). Medians over the rounds.

    python3 benches/rate_vs_oha.py                  # RATES="16000 32000 38000" ROUNDS=3 DURATION=5
"""
import os
import resource
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tail  # noqa: E402  (the setup: nginx upstream, driftguard, both generators)

RATES = [int(r) for r in os.environ.get("RATES", "16000 32000 38000").split()]
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one(gen, port, rate):
    c0, l0 = children_cpu(), tail.core_times(tail.LOAD_CPU)
    rps, p99, reqs, bad = tail.rate_gen(port, rate) if gen == "rate" else tail.oha(port, rate)
    busy = tail.busy(l0, tail.core_times(tail.LOAD_CPU))
    return {"rps": rps, "p99": p99, "bad": bad, "busy": busy, "cpu": 1e6 * (children_cpu() - c0) / max(reqs, 1)}


def main():
    tail.RATE = tail.rate_bin()
    if not (tail.OHA and os.path.exists(tail.OHA)):
        sys.exit("oha not found (cargo install oha)")
    up = tail.upstream()
    port, _, _ = tail.driftguard("off", up, "0.0", keep_log=False)
    print(f"generators on core {tail.LOAD_CPU} with nginx; driftguard (signals off) on core {tail.PROXY_CPU}; "
          f"{tail.CONNS} connections, {ROUNDS} x {tail.DURATION} s interleaved, medians")
    for target, p in (("nginx", up), ("driftguard", port)):
        for rate in RATES:
            res = {"rate": [], "oha": []}
            for _ in range(ROUNDS):
                for gen in res:
                    res[gen].append(one(gen, p, rate))
            for gen, runs in res.items():
                m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(f"{target:10} {rate:6d} req/s {gen:4}: delivered {m['rps']:.0f} req/s, p99 {m['p99']:.2f} ms "
                      f"(per round {' '.join('%.2f' % r['p99'] for r in runs)}), core {tail.LOAD_CPU} busy "
                      f"{100 * m['busy']:.0f} %, generator {m['cpu']:.1f} us CPU/request"
                      + (f", non-2xx or errors {m['bad']:.0f}" if m["bad"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(tail.run(main))
