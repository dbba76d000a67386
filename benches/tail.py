#!/usr/bin/env python3
"""Tail latency and CPU per evaluation with the quality signals on, against the same driftguard with them off.

One nginx upstream answering a ~0.8 KB RAG-shaped JSON to every request, and two driftguards in front of
it (signals off: sample = 0.0; signals on: sample = 1.0, hashed embedder, one evaluation worker), each a
one-core sidecar: pinned to core PROXY_CPU (1) with its evaluation worker, while the load generator and
the upstream share core LOAD_CPU (0). Clients POST a JSON question, 32 connections.

Per target, interleaved ROUNDS times (medians printed):
  sat      wrk -t1 -c32 -d DURATION --latency at saturation: req/s, p99, CPU us/request. (At saturation the
           evaluation worker, running only on idle CPU, evaluates little: the queue is drained during DRAIN.)
  q50/q80  a constant rate of 50 % / 80 % of the signals-off saturated req/s, latency counted from when
           each request was due (so a stall is not hidden by the generator waiting for it: no
           coordinated omission): p99. The generator (GEN) is benches/rate.rs (`rate`, the default)
           or oha -q with --latency-correction (`oha`). Straight to nginx at 16-38 k req/s rate's own
           p99 is 0.37-0.46 ms against oha's 0.99-3.28 ms, for about the same CPU per request; its
           100 us pacing ticks cost more of the shared core at low rates
           (benches/rate_vs_oha.py, benches/results/2026-12-04-rate-vs-oha.txt).
A fixed-rate row where the generator delivered under 95 % of the asked rate is marked INVALID (the
generator on the upstream's core, or the proxy, could not keep it) and fails the run.
For signals on it also prints the share of requests evaluated and the CPU per evaluation, all in: the
process's CPU over the run (plus DRAIN seconds for the queue to empty) minus signals-off CPU/request x
requests, divided by the evaluations done.
A second line per row tells a gap made inside the proxy from one made by the load generator, the sockets
or the host: the client p99 ratio of each round; the p99 of the time the proxy itself took (exact, from
the access log's latency_ms: request head in to response body out, the upstream's time included) and the
share of requests over 2.5 ms (driftguard_request_duration_seconds); the proxy threads' CPU and run-queue wait
per request (/proc/<pid>/task/*/schedstat), the proxy core's steal time and how busy core LOAD_CPU
(generator and upstream) was (/proc/stat). A third line per fixed-rate row is its anchor: the generator
straight to nginx at the same rate, no proxy: the p99 the generator and the upstream make alone on their
core.

Usage (from the project root, after `cargo build --release`):
    python3 benches/tail.py                       # ROUNDS=3 DURATION=5
    ROUNDS=1 DURATION=10 python3 benches/tail.py
    DG_BIN=path/to/driftguard python3 benches/tail.py
Needs wrk and nginx, and cargo to build benches/rate.rs (or oha with GEN=oha: `cargo install oha`). Goals (issue: signals without tail latency): signals-on p99
<= 1.2 x signals-off p99 in each of sat, q50 and q80; <= 20 us CPU per evaluation. Exit 1 when missed.
"""
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "5"))
DRAIN = float(os.environ.get("DRAIN", "1.0"))
PROXY_CPU = os.environ.get("PROXY_CPU", "1")
LOAD_CPU = os.environ.get("LOAD_CPU", "0")
CONNS = int(os.environ.get("CONNS", "32"))
HELD = 0.95
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DG = os.environ.get("DG_BIN", os.path.join(ROOT, "target", "release", "driftguard"))
OHA = os.environ.get("OHA", shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha"))
GEN = os.environ.get("GEN", "rate")
if GEN not in ("rate", "oha"):
    sys.exit(f"GEN={GEN}: rate or oha")
TMP = tempfile.mkdtemp(prefix="driftguard-tail-")
PROCS = []
LOGS = {}  # pid -> the file its stdout (the JSON log) goes to

QUESTION = '{"question": "How do I roll back the docs alias after a bad index build?", "max_tokens": 64}'
ANSWER = json.dumps({
    "answer": "Point the alias docs_live back to docs_vA with a single atomic alias update, then rotate the cache namespace.",
    "contexts": [{"id": i, "text": "To roll back, point the alias docs_live back to docs_vA with a single alias update; chunk %d." % i}
                 for i in range(5)],
    "usage": {"prompt_tokens": 420, "completion_tokens": 64, "total_tokens": 484},
})


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(port, path="/", deadline=20):
    t = time.time()
    while time.time() - t < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            c.getresponse().read()
            return True
        except Exception:
            time.sleep(0.1)
    return False


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def metrics(admin):
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    c.request("GET", "/metrics")
    return c.getresponse().read().decode().splitlines()


def metric(admin, name):
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics(admin)
               if line.startswith(name + " ") or line.startswith(name + "{"))


def proxy_p99(pid, start):
    """p99 of latency_ms over the access lines the proxy wrote from byte `start` of its log on: the
    request's time inside the proxy (head in to body out, the upstream's time included), exact."""
    with open(LOGS[pid], "rb") as f:
        f.seek(start)
        data = f.read()
    lat = []
    for line in data.splitlines():
        if b'"driftguard::access"' in line and b'"latency_ms":' in line:
            try:
                lat.append(json.loads(line)["latency_ms"])
            except (ValueError, KeyError):
                pass
    lat.sort()
    return lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")


def duration_buckets(admin):
    """Cumulative counts of driftguard_request_duration_seconds by `le`, all arms summed."""
    out = {}
    for line in metrics(admin):
        if line.startswith("driftguard_request_duration_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def steal_ms():
    """Milliseconds the hypervisor ran something else while core PROXY_CPU wanted to run (`steal` of
    /proc/stat; 0 on bare metal): a stall no guest-side measure sees."""
    for line in open("/proc/stat"):
        f = line.split()
        if f[0] == f"cpu{PROXY_CPU}":
            return int(f[8]) * 1e3 / os.sysconf("SC_CLK_TCK")
    return 0.0


def core_times(core):
    """(busy, all) jiffies of `core` from /proc/stat: busy is all but idle and iowait."""
    for line in open("/proc/stat"):
        f = line.split()
        if f[0] == f"cpu{core}":
            ticks = [int(x) for x in f[1:9]]
            return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    return 0, 1


def busy(t0, t1):
    return (t1[0] - t0[0]) / max(t1[1] - t0[1], 1)


def runq_wait(pid):
    """(on-CPU, waiting) nanoseconds of the proxy's threads (all but the evaluation and log threads),
    from /proc/<pid>/task/*/schedstat: what the request path itself costs, and how long it waited
    runnable for a CPU, e.g. kept off it by the worker."""
    ran = waited = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            if comm not in ("driftguard-eval", "driftguard-log"):
                f = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
                ran, waited = ran + int(f[0]), waited + int(f[1])
        except OSError:
            pass
    return ran, waited


def start(argv, stdout=subprocess.DEVNULL, **kw):
    p = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.DEVNULL, **kw)
    PROCS.append(p)
    return p


def upstream():
    port = free_port()
    conf = os.path.join(TMP, "nginx.conf")
    open(conf, "w").write(f"""master_process off;
daemon off;
worker_processes 1;
pid {TMP}/nginx.pid;
error_log {TMP}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
    location / {{ default_type application/json; return 200 '{ANSWER}'; }} }}
}}
""")
    start(["taskset", "-c", LOAD_CPU, "nginx", "-p", TMP, "-c", conf])
    if not wait_http(port):
        sys.exit("nginx did not start")
    return port


def driftguard(label, up, sample, keep_log=True):
    """Starts a driftguard in front of `up`; with `keep_log` its JSON log goes to a file (see `measure`),
    otherwise nowhere."""
    port, admin = free_port(), free_port()
    d = os.path.join(TMP, label)
    os.makedirs(d)
    cfg = os.path.join(d, "driftguard.toml")
    open(cfg, "w").write(f"""state_dir = "{d}/state"
[listen]
proxy = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
[pins]
BUILD_ID = "b-77"
GIT_SHA = "abc1234"
PROMPT_VER = "p7"
MODEL_VER = "m3"
[[arms]]
name = "live"
upstream = "http://127.0.0.1:{up}"
weight = 100
[arms.pins]
INDEX_HASH = "idx-a1"
[signals]
sample = {sample}
""")
    # The JSON log goes to a file: its access lines carry each request's latency as the proxy timed it.
    # Appending (O_APPEND), so that truncating it after each measurement (`measure`) keeps it small.
    log = open(os.path.join(d, "stdout.log"), "ab") if keep_log else subprocess.DEVNULL
    p = start(["taskset", "-c", PROXY_CPU, DG, "run", "--config", cfg], cwd=d, stdout=log)
    if keep_log:
        LOGS[p.pid] = log.name
    if not wait_http(admin, "/healthz"):
        sys.exit(f"driftguard {label} did not start")
    return port, admin, p.pid


def wrk(port):
    script = os.path.join(TMP, "post.lua")
    open(script, "w").write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                            f"wrk.body = '{QUESTION}'\n")
    r = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNS}", f"-d{DURATION}s", "--latency",
                        "-s", script, f"http://127.0.0.1:{port}/v1/ask"], capture_output=True, text=True,
                       timeout=DURATION + 30)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", r.stdout).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", r.stdout)
    p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
    reqs = int(re.search(r"(\d+) requests in", r.stdout).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    return rps, p99, reqs, int(bad.group(1)) if bad else 0


def oha(port, rate):
    r = subprocess.run(["taskset", "-c", LOAD_CPU, OHA, "-z", f"{DURATION}s", "-c", str(CONNS), "-q", str(int(rate)),
                        "--latency-correction", "--no-tui", "--output-format", "json", "-m", "POST",
                        "-T", "application/json", "-d", QUESTION, f"http://127.0.0.1:{port}/v1/ask"],
                       capture_output=True, text=True, timeout=DURATION + 60)
    doc = json.loads(r.stdout)
    p99 = doc["latencyPercentiles"]["p99"] * 1e3
    codes = doc.get("statusCodeDistribution", {})
    reqs = sum(codes.values())
    bad = sum(n for c, n in codes.items() if not c.startswith("2"))
    return doc["summary"]["requestsPerSec"], p99, reqs, bad


def rate_bin():
    """Builds benches/rate.rs (bench profile) and returns its executable's path. Cargo builds a package's
    binaries for its benches: this also brings target/release/driftguard (the default DG_BIN) up to date
    with the working tree."""
    r = subprocess.run(["cargo", "bench", "--bench", "rate", "--no-run", "--message-format=json"],
                       cwd=ROOT, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "rate" \
                and msg.get("executable"):
            return msg["executable"]
    sys.exit("could not build benches/rate.rs:\n" + r.stderr[-2000:])


RATE = None  # the built benches/rate.rs, set by main when GEN is rate


def rate_gen(port, rate):
    r = subprocess.run(["taskset", "-c", LOAD_CPU, RATE, f"http://127.0.0.1:{port}/v1/ask", str(int(rate)),
                        str(DURATION), str(CONNS), QUESTION], capture_output=True, text=True, timeout=DURATION + 60)
    if r.returncode != 0:
        raise RuntimeError(f"rate: {r.stderr.strip()}")
    doc = json.loads(r.stdout)
    # A transport error (a refused or reset connection, no response within 2 s) counts as a failed
    # request, like a non-2xx response.
    return doc["rps"], doc["p99_ms"], doc["requests"], doc["non2xx"] + doc["errors"]


def fixed_rate(port, rate):
    return rate_gen(port, rate) if GEN == "rate" else oha(port, rate)


def measure(kind, port, admin, pid, rate=None):
    e0 = metric(admin, "driftguard_evaluations_total")
    b0, w0, s0 = duration_buckets(admin), runq_wait(pid), steal_ms()
    log0 = os.path.getsize(LOGS[pid])
    c0, l0 = cpu(pid), core_times(LOAD_CPU)
    rps, p99, reqs, bad = wrk(port) if kind == "sat" else fixed_rate(port, rate)
    c1, l1 = cpu(pid), core_times(LOAD_CPU)
    b1, w1, s1 = duration_buckets(admin), runq_wait(pid), steal_ms()
    seen = max(b1.get("+Inf", 0) - b0.get("+Inf", 0), 1)
    # The share of requests the proxy itself timed (request in to body out) over 2.5 ms: whether a
    # client-side p99 gap happened inside the proxy or in the generator and the sockets.
    slow = (seen - (b1.get("0.0025", 0) - b0.get("0.0025", 0))) / seen
    time.sleep(DRAIN)
    c2 = cpu(pid)
    inside = proxy_p99(pid, log0)
    os.truncate(LOGS[pid], 0)  # ~70 MB per 5 s at saturation: keep only what the next row reads
    ev = metric(admin, "driftguard_evaluations_total") - e0
    # The share of the asked rate the generator delivered: below HELD the row did not measure the rate it names
    # (the generator, sharing core LOAD_CPU with the upstream, or the proxy could not keep it).
    held = rps / rate if rate else 1.0
    return {"rps": rps, "p99": p99, "reqs": reqs, "bad": bad, "cpu_req": 1e6 * (c1 - c0) / max(reqs, 1),
            "cpu_all": 1e6 * (c2 - c0), "evals": ev, "rate": rate or 0.0, "held": held,
            "slow": slow, "runq_us": (w1[1] - w0[1]) / 1e3 / max(reqs, 1),
            "path_us": (w1[0] - w0[0]) / 1e3 / max(reqs, 1), "steal": s1 - s0, "inside": inside,
            "load_busy": busy(l0, l1)}


def direct(up, rate):
    """The anchor of a fixed-rate row: the generator straight to nginx at the same rate, no proxy. Core LOAD_CPU
    does about the same work as with a proxy between (the generator's and the upstream's sides), so
    this p99 is what the generator and the upstream alone make of the rate."""
    t0 = core_times(LOAD_CPU)
    rps, p99, reqs, bad = fixed_rate(up, rate)
    return {"rps": rps, "p99": p99, "reqs": reqs, "bad": bad, "load_busy": busy(t0, core_times(LOAD_CPU))}


def main():
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    kinds = ("sat", "q50", "q80")
    global RATE
    if GEN == "rate":
        RATE = rate_bin()
    elif not (OHA and os.path.exists(OHA)):
        print("oha not found (cargo install oha): the fixed-rate rows q50/q80 are SKIPPED, the run fails")
        kinds = ("sat",)
    up = upstream()
    targets = {"off": driftguard("off", up, "0.0"), "on": driftguard("on", up, "1.0")}
    for label, (port, admin, pid) in targets.items():
        measure("sat", port, admin, pid)  # warm-up
    res = {(k, t): [] for k in kinds for t in (*targets, "direct")}
    for _ in range(ROUNDS):
        for label, (port, admin, pid) in targets.items():
            res[("sat", label)].append(measure("sat", port, admin, pid))
        sat = statistics.median(r["rps"] for r in res[("sat", "off")])
        for kind, share in (("q50", 0.5), ("q80", 0.8)):
            if kind not in kinds:
                continue
            for label, (port, admin, pid) in targets.items():
                res[(kind, label)].append(measure(kind, port, admin, pid, rate=share * sat))
            res[(kind, "direct")].append(direct(up, share * sat))
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in res.items() if v}
    print(f"driftguard {DG}; proxy + evaluation worker on core {PROXY_CPU}, load ({GEN} at fixed rates) + nginx upstream on core {LOAD_CPU}; "
          f"{CONNS} connections, {ROUNDS} x {DURATION} s interleaved, medians; load average now {os.getloadavg()[0]:.1f}")
    ok = len(kinds) == 3
    for kind in kinds:
        off, on = med[(kind, "off")], med[(kind, "on")]
        evald = on["evals"] / max(on["reqs"], 1)
        per_eval = (on["cpu_all"] - off["cpu_req"] * on["reqs"]) / on["evals"] if on["evals"] else float("inf")
        ratio = on["p99"] / off["p99"] if off["p99"] > 0 else float("inf")
        held = min(off["held"], on["held"])
        ok = ok and ratio <= 1.2 and off["bad"] == 0 and on["bad"] == 0 and held >= HELD
        print(f"{kind}: off {off['rps']:.0f} req/s p99 {off['p99']:.2f} ms cpu {off['cpu_req']:.1f} us/req | "
              f"on {on['rps']:.0f} req/s p99 {on['p99']:.2f} ms cpu {on['cpu_req']:.1f} us/req, "
              f"evaluated {100 * evald:.1f} %, {per_eval:.1f} us CPU/evaluation | p99 on/off {ratio:.2f} (goal <= 1.2)"
              + (f" | non-2xx off {off['bad']:.0f} on {on['bad']:.0f}" if off["bad"] or on["bad"] else "")
              + (f" | INVALID: {GEN} held {100 * held:.0f} % of {off['rate']:.0f} req/s" if held < HELD else ""))
        rounds = list(zip(res[(kind, "off")], res[(kind, "on")]))
        print(f"     per round p99 on/off: {' '.join('%.2f' % (b['p99'] / a['p99']) for a, b in rounds)} "
              f"(proxy-timed {' '.join('%.2f' % (b['inside'] / a['inside']) for a, b in rounds)}); "
              f"proxy-timed p99 off {off['inside']:.2f} on {on['inside']:.2f} ms ({on['inside'] / off['inside']:.2f}), "
              f"> 2.5 ms off {100 * off['slow']:.2f} % on {100 * on['slow']:.2f} %; "
              f"proxy threads' CPU off {off['path_us']:.1f} on {on['path_us']:.1f} us/request, "
              f"run-queue wait off {off['runq_us']:.2f} on {on['runq_us']:.2f} us/request; "
              f"core {PROXY_CPU} steal off {off['steal']:.0f} on {on['steal']:.0f} ms; "
              f"core {LOAD_CPU} (generator + upstream) busy off {100 * off['load_busy']:.0f} % on {100 * on['load_busy']:.0f} %")
        if res[(kind, "direct")]:
            d = med[(kind, "direct")]
            print(f"     anchor, {GEN} straight to nginx at {d['rps']:.0f} req/s (no proxy): p99 {d['p99']:.2f} ms, "
                  f"core {LOAD_CPU} busy {100 * d['load_busy']:.0f} %"
                  + (f", non-2xx {d['bad']:.0f}" if d["bad"] else ""))
        ok = ok and per_eval <= 20
    return 0 if ok else 1


def run(entry=None):
    """Runs `entry` (default: this script's `main`), then stops every process started and removes TMP."""
    try:
        return (entry or main)()
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.terminate()
        for p in PROCS:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run())
