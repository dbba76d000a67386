#!/usr/bin/env bash
# Soak: driftguard under mixed traffic for SOAK_SECS (default 600 s), with the faults an operator causes
# in a normal week, while its RSS, open fds and threads are sampled every 10 s. It answers one question:
# does the process hold by itself (no growth, no stray errors) when it runs for a while?
#
# Usage:  benches/soak.sh            env: SOAK_SECS=600   total length (>= 120; the flatness check
#                                                           compares the second minute with the last)
#                                         DG_BIN=path       the binary (default target/release/driftguard,
#                                                           built first unless NO_BUILD=1; an explicit
#                                                           DG_BIN is never built)
#                                         SOAK_PACE=0.02    seconds each load thread sleeps between requests
#                                         SOAK_OUT=file     also copy the report to this file
#                                         SOAK_WRITES_TTL=  writes.ttl for the run (default: the config's
#                                                           48 h, so the receipt file grows all run; e.g.
#                                                           "2m" lets the purge keep it at a steady size)
#
# What runs, all on 127.0.0.1, free ports, one mktemp dir:
#   upstreams  two arms, "baseline" and "canary" (weights 50/50), each a small Python stdlib HTTP/1.1
#              server: `POST /rag` answers a ~2 KB RAG JSON ({"answer", "contexts", "usage"}),
#              `POST /rag/stream` an SSE stream of 12 OpenAI-style delta events 20 ms apart, a final
#              event with contexts and usage and `data: [DONE]`, `POST /ingest` a small JSON receipt.
#   driftguard [runtime] workers = 1, signals on (sample = 1.0), access log to /dev/null, writes.routes =
#              ["POST /ingest"] with the embedded receipt store, a budget it never exhausts, breaker
#              open_for = 5s, and [rules] dry_run = true: the soak injects its own trip, and an automatic
#              one (the restart's 502s are an error-rate rule input) would freeze writes at a moment the
#              report could not tell from a bug.
#   load       a Python stdlib client, 10 threads on keep-alive connections: 4 SSE streams (reads each
#              to `data: [DONE]`), 4 plain `POST /rag`, 2 keyed writes (`POST /ingest` with an
#              idempotency-key; every 4th repeats the previous key and body, i.e. a replay).
#   faults     a config reload every 30 s (changes [pins] BUILD_ID in the file, then alternately SIGHUP
#              and `POST /reload` on the admin port); at 25 % of the run the canary upstream is killed
#              (SIGKILL) and started again 5 s later; at 50 % `POST /trip` (arm canary, admin token), 30 s
#              later `POST /recover`.
#              Each reload is checked: the new BUILD_ID must show in the admin /status within 5 s.
#   samples    every 10 s: VmRSS and Threads from /proc/PID/status, fds = entries of /proc/PID/fd, and
#              the size of the receipt store's file (state_dir/receipts.redb), which grows with every
#              new idempotency key (writes.ttl keeps them 48 h) and whose page cache is part of the RSS.
#
# Verdict:
#   flat       the mean RSS and the mean fd count of the last minute are within 10 % of those of the
#              second minute (the first minute is warm-up: pools, receipt store, windows filling).
#   5xx        zero proxy-made 5xx outside the injected faults. Proxy-made = a JSON body whose "error"
#              field is a driftguard kind. Expected and counted apart: 502 upstream_unreachable / 504
#              upstream_timeout / 503 breaker_open|no_upstream from the kill until 20 s after the restart
#              (breaker open_for 5 s + half-open probes), and 503 writes_frozen between the trip and 2 s
#              after the recovery. SSE streams cut by the kill (the upstream died mid-stream) and client
#              exceptions in the restart window are counted as expected too.
#   INVALID    the load generator itself failed: a connection error, timeout or cut stream outside the
#              restart window, or fewer than 1 request/s on average.
# Exit status: 0 PASS, 1 FAIL, 4 INVALID, 2 on a setup error. Everything started is killed by PID on
# exit (trap); the run is bounded by SOAK_SECS plus about a minute.
set -euo pipefail

SOAK_SECS=${SOAK_SECS:-600}
SOAK_PACE=${SOAK_PACE:-0.02}
SOAK_OUT=${SOAK_OUT:-}
SOAK_WRITES_TTL=${SOAK_WRITES_TTL:-}
TTL_LINE=
[[ -z $SOAK_WRITES_TTL ]] || TTL_LINE="ttl = \"$SOAK_WRITES_TTL\""
NO_BUILD=${NO_BUILD:-}
DG_BIN=${DG_BIN:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "soak.sh: $*" >&2; exit 2; }
note() { echo "== $*" >&2; }
[[ $SOAK_SECS =~ ^[0-9]+$ && $SOAK_SECS -ge 120 ]] || die "SOAK_SECS must be a whole number >= 120"
command -v python3 > /dev/null || die "python3 is needed (stdlib only)"
command -v curl > /dev/null || die "curl is needed"

if [[ -n $DG_BIN ]]; then
    DG=$DG_BIN
    [[ $DG == /* ]] || DG="$PWD/$DG"
else
    DG=$ROOT/target/release/driftguard
    if [[ -z $NO_BUILD ]]; then
        note "cargo build --release"
        (cd "$ROOT" && cargo build --release --bin driftguard) >&2 || die "cargo build failed"
    fi
fi
[[ -x $DG ]] || die "$DG missing (build failed?)"

TMP=$(mktemp -d /tmp/driftguard-soak.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2> /dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 2' INT TERM
forget() { local keep=() p; for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done; PIDS=("${keep[@]}"); }

# free_port: a port nothing listens on now (bound and released by the kernel).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    local port=$1 what=$2 i
    for i in $(seq 100); do
        (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null && return 0
        sleep 0.1
    done
    die "$what did not listen on 127.0.0.1:$port within 10 s"
}

cat > "$TMP/upstream.py" <<'PY'
import http.server, json, socketserver, sys, time
port, arm = int(sys.argv[1]), sys.argv[2]
CONTEXTS = [{"text": "Connection pooling keeps idle upstream connections open so later requests skip the "
             "TCP and TLS handshakes; the idle timeout and max_idle bound how many stay open. " * 2}
            for _ in range(4)]
ANSWER = ("Connection pooling keeps idle upstream connections open, so later requests skip the handshakes; "
          "the idle timeout and max_idle bound how many stay open.")
RAG = json.dumps({"answer": ANSWER, "contexts": CONTEXTS,
                  "usage": {"prompt_tokens": 400, "completion_tokens": 40}}).encode()
WORDS = ANSWER.split(" ")
PIECES = [" ".join(WORDS[i:i + 2]) + " " for i in range(0, len(WORDS), 2)][:12]

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def reply(self, body, ctype="application/json"):
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(b'{"ok": true}')
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path.startswith("/rag/stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            events = [{"choices": [{"delta": {"content": p}}]} for p in PIECES]
            events.append({"choices": [], "contexts": CONTEXTS,
                           "usage": {"prompt_tokens": 400, "completion_tokens": 40}})
            for ev in events:
                data = ("data: " + json.dumps(ev) + "\n\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.02)
            data = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        elif self.path.startswith("/ingest"):
            self.reply(json.dumps({"ingested": len(body), "arm": arm}).encode())
        else:
            self.reply(RAG)

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

Server(("127.0.0.1", port), Handler).serve_forever()
PY

cat > "$TMP/load.py" <<'PY'
# The load: per-second buckets of outcomes, written as JSON lines to argv[3] when the run ends.
import collections, http.client, json, sys, threading, time
port, secs, out, pace = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
end = time.time() + secs
lock = threading.Lock()
buckets = collections.Counter()   # (second, category, outcome) -> count
QUESTION = json.dumps({"question": "How does connection pooling skip the handshakes for later requests?"})

def record(cat, outcome):
    with lock:
        buckets[(int(time.time()), cat, outcome)] += 1

def outcome_of(status, ctype, body):
    if status < 400:
        return str(status)
    kind = "-"
    if ctype.startswith("application/json"):
        try:
            kind = json.loads(body).get("error") or "-"
        except (ValueError, AttributeError):
            kind = "-"
    return f"{status}:{kind}"

def worker(cat, n):
    conn = None
    seq = 0
    last = None
    while time.time() < end:
        seq += 1
        headers = {"content-type": "application/json", "x-user-id": f"u{n}-{seq % 97}"}
        if cat == "sse":
            path, body = "/rag/stream", QUESTION
            headers["accept"] = "text/event-stream"
        elif cat == "write":
            if last is not None and seq % 4 == 0:
                key, body = last
            else:
                key, body = f"soak-{n}-{seq}-{time.time_ns()}", json.dumps({"doc": f"d{n}-{seq}", "text": "x" * 200})
            last = (key, body)
            headers["idempotency-key"] = key
            path = "/ingest"
        else:
            path, body = "/rag", QUESTION
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            ctype = resp.getheader("content-type") or ""
            outcome = outcome_of(resp.status, ctype, data)
            if cat == "sse" and resp.status == 200 and not data.rstrip().endswith(b"data: [DONE]"):
                outcome = "stream_cut"
            if resp.getheader("idempotent-replay") == "true":
                outcome += ":replay"
            record(cat, outcome)
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except Exception as e:  # every failure of the client side is an outcome to count, not a crash
            record(cat, "exc:" + type(e).__name__)
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.1)
        time.sleep(pace)

threads = [threading.Thread(target=worker, args=(cat, i), daemon=True)
           for i, cat in enumerate(["sse"] * 4 + ["post"] * 4 + ["write"] * 2)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=max(1.0, end - time.time() + 15))
with lock, open(out, "w") as f:
    for (sec, cat, outcome), count in sorted(buckets.items()):
        f.write(json.dumps([sec, cat, outcome, count]) + "\n")
PY

cat > "$TMP/report.py" <<'PY'
# Reads the samples, the events and the load's buckets; prints the tables and the verdict; exit code.
import collections, json, sys
samples_f, events_f, load_f, secs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
samples = [tuple(float(x) for x in l.split()) for l in open(samples_f) if l.strip()]
events = {}
for l in open(events_f):
    t, name = l.split(maxsplit=1)
    events[name.strip()] = float(t)
start = events["start"]
rows = [json.loads(l) for l in open(load_f) if l.strip()]

print("samples (every 10 s; t from the start of the load)")
print(f"{'t_s':>5} {'rss_MB':>8} {'fds':>5} {'threads':>7} {'store_MB':>8}")
for t, rss, fds, thr, store in samples:
    print(f"{t:5.0f} {rss / 1024:8.1f} {fds:5.0f} {thr:7.0f} {store / 1024:8.1f}")

def mean(col, lo, hi):
    vals = [s[col] for s in samples if lo <= s[0] < hi]
    return sum(vals) / len(vals) if vals else float("nan")

second = (60, 120)
last = (secs - 60, secs + 1)
verdict_flat = True
print()
print(f"{'':8} {'2nd minute':>11} {'last minute':>12} {'change':>8}")
for col, name, scale in [(1, "rss_MB", 1024), (2, "fds", 1), (3, "threads", 1), (4, "store_MB", 1024)]:
    a, b = mean(col, *second), mean(col, *last)
    change = (b - a) / a * 100 if a else float("nan")
    flag = ""
    if name in ("rss_MB", "fds"):
        ok = abs(change) <= 10.0
        verdict_flat &= ok
        flag = "ok" if ok else "NOT FLAT"
    print(f"{name:8} {a / scale:11.1f} {b / scale:12.1f} {change:+7.1f}% {flag}")

kill, up = events.get("upstream_kill"), events.get("upstream_up")
trip, recover = events.get("trip"), events.get("recover")
def in_restart(sec):
    return kill is not None and up is not None and kill - 1 <= sec <= up + 20
def in_trip(sec):
    return trip is not None and recover is not None and trip - 1 <= sec <= recover + 2

RESTART_KINDS = {"upstream_unreachable", "upstream_timeout", "breaker_open", "no_upstream"}
by = collections.Counter()
total = collections.Counter()
for sec, cat, outcome, n in rows:
    total[cat] += n
    status = outcome.split(":")[0]
    if outcome.startswith("exc:") or outcome == "stream_cut":
        key = ("expected: upstream restart" if in_restart(sec) else "LOAD ERROR", cat, outcome)
    elif status.isdigit() and int(status) >= 500:
        kind = outcome.split(":")[1]
        if kind in RESTART_KINDS and in_restart(sec):
            key = ("expected: upstream restart", cat, outcome)
        elif kind == "writes_frozen" and in_trip(sec):
            key = ("expected: trip", cat, outcome)
        elif kind == "-":
            key = ("UNEXPECTED 5xx (not proxy-made)", cat, outcome)
        else:
            key = ("UNEXPECTED proxy-made 5xx", cat, outcome)
    else:
        key = ("ok" if status.startswith("2") else "other", cat, outcome)
    by[key] += n

duration = secs
print()
print(f"requests: {sum(total.values())} in {duration} s ({sum(total.values()) / duration:.0f}/s): "
      + ", ".join(f"{c} {n}" for c, n in sorted(total.items())))
print(f"{'class':34} {'route':6} {'outcome':36} {'count':>8}")
for (klass, cat, outcome), n in sorted(by.items()):
    print(f"{klass:34} {cat:6} {outcome:36} {n:8}")
print()
for name in ["upstream_kill", "upstream_up", "trip", "recover"]:
    if name in events:
        print(f"event {name:14} t = {events[name] - start:6.1f} s")
reloads = [k for k in events if k.startswith("reload")]
print(f"reloads: {len(reloads)} ({sum(1 for k in reloads if 'SIGHUP' in k)} SIGHUP, "
      f"{sum(1 for k in reloads if 'POST' in k)} POST /reload), each seen applied in /status")

load_errors = sum(n for (k, _, _), n in by.items() if k == "LOAD ERROR")
unexpected = sum(n for (k, _, _), n in by.items() if k.startswith("UNEXPECTED"))
if load_errors or sum(total.values()) < duration:
    print(f"\nINVALID: {load_errors} load-generator errors outside the restart window "
          f"(or under 1 request/s)")
    sys.exit(4)
print(f"\nflat (RSS and fds, last minute within 10 % of the second): {'PASS' if verdict_flat else 'FAIL'}")
print(f"proxy-made 5xx outside the injected faults: {unexpected} -> {'PASS' if unexpected == 0 else 'FAIL'}")
ok = verdict_flat and unexpected == 0
print("SOAK", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY

BASE_PORT=$(free_port); CANARY_PORT=$(free_port); PROXY_PORT=$(free_port); ADMIN_PORT=$(free_port)
start_arm() { # start_arm NAME PORT -> sets ARM_PID
    python3 "$TMP/upstream.py" "$2" "$1" > /dev/null 2> "$TMP/upstream-$1.log" &
    ARM_PID=$!
    PIDS+=("$ARM_PID")
    wait_port "$2" "upstream $1"
}
start_arm baseline "$BASE_PORT"; BASE_PID=$ARM_PID
start_arm canary "$CANARY_PORT"; CANARY_PID=$ARM_PID

TOKEN=soak-$RANDOM$RANDOM
CONF=$TMP/driftguard.toml
write_config() { # write_config BUILD_ID
    cat > "$CONF.new" <<EOF
state_dir = "$TMP/state"

[listen]
proxy = "127.0.0.1:$PROXY_PORT"
admin = "127.0.0.1:$ADMIN_PORT"

[runtime]
workers = 1

[log]
access = true

[pins]
BUILD_ID = "$1"

[[arms]]
name = "baseline"
upstream = "http://127.0.0.1:$BASE_PORT"
weight = 50
baseline = true
[arms.pins]
MODEL_VER = "m-1"
PROMPT_VER = "p1"
INDEX_HASH = "h1"

[[arms]]
name = "canary"
upstream = "http://127.0.0.1:$CANARY_PORT"
weight = 50
[arms.pins]
MODEL_VER = "m-2"
PROMPT_VER = "p2"
INDEX_HASH = "h2"

[signals]
sample = 1.0

[budget]
tokens_per_minute = 1000000000000
burst = 1000000000000

[breaker]
open_for = "5s"

[writes]
routes = ["POST /ingest"]
$TTL_LINE

[rules]
dry_run = true
EOF
    mv "$CONF.new" "$CONF"
}
write_config soak-0
"$DG" check -c "$CONF" > /dev/null || die "driftguard rejected the soak config"
DRIFTGUARD_ADMIN_TOKEN=$TOKEN "$DG" run -c "$CONF" > /dev/null 2> "$TMP/driftguard.log" &
DG_PID=$!
PIDS+=("$DG_PID")
wait_port "$PROXY_PORT" driftguard
wait_port "$ADMIN_PORT" "driftguard admin"

admin_post() { # admin_post PATH [BODY]: the HTTP status
    local body=${2:-'{}'}
    curl -s -o "$TMP/admin-reply.json" -w '%{http_code}' --max-time 10 -X POST \
        -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
        --data "$body" "http://127.0.0.1:$ADMIN_PORT$1"
}
EVENTS=$TMP/events.txt
SAMPLES=$TMP/samples.txt
: > "$SAMPLES"
event() { echo "$(date +%s.%N) $*" >> "$EVENTS"; }
sample() { # sample T
    local rss thr fds store
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$DG_PID/status")
    thr=$(awk '/^Threads:/ {print $2}' "/proc/$DG_PID/status")
    fds=$(ls "/proc/$DG_PID/fd" | wc -l)
    store=$(du -k --apparent-size "$TMP/state/receipts.redb" 2> /dev/null | cut -f1)
    echo "$1 $rss $fds $thr ${store:-0}" >> "$SAMPLES"
}

reload_applied() { # reload_applied N: /status shows BUILD_ID soak-N
    local st
    st=$(curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/status") || return 1
    [[ $st == *"\"BUILD_ID\":\"soak-$1\""* ]]
}

KILL_AT=$((SOAK_SECS / 4)); TRIP_AT=$((SOAK_SECS / 2)); RECOVER_AT=$((SOAK_SECS / 2 + 30))
note "soak: ${SOAK_SECS}s against $DG (pid $DG_PID), proxy :$PROXY_PORT admin :$ADMIN_PORT"
event start
T0=$(date +%s)
python3 "$TMP/load.py" "$PROXY_PORT" "$SOAK_SECS" "$TMP/load.jsonl" "$SOAK_PACE" 2> "$TMP/load.log" &
LOAD_PID=$!
PIDS+=("$LOAD_PID")

reloads=0
for ((t = 0; t <= SOAK_SECS; t++)); do
    # Sleep to the next whole second of the run, so the actions do not drift with their own cost.
    now=$(date +%s.%N)
    delay=$(awk -v t0="$T0" -v t="$t" -v now="$now" 'BEGIN { d = t0 + t - now; print (d > 0 ? d : 0) }')
    sleep "$delay"
    kill -0 "$DG_PID" 2> /dev/null || die "driftguard exited during the soak (log: $(tail -5 "$TMP/driftguard.log"))"
    ((t % 10 == 0)) && sample "$t"
    if ((t > 0 && t % 30 == 0 && t < SOAK_SECS)); then
        reloads=$((reloads + 1))
        write_config "soak-$reloads"
        if ((reloads % 2)); then
            kill -HUP "$DG_PID"
            event "reload-$reloads SIGHUP"
        else
            code=$(admin_post /reload)
            [[ $code == 200 ]] || die "POST /reload answered $code: $(cat "$TMP/admin-reply.json")"
            event "reload-$reloads POST"
        fi
        # The reload took: the new pin shows in /status within a few seconds, or the soak stops here.
        for _ in $(seq 50); do
            reload_applied "$reloads" && break
            sleep 0.1
        done
        reload_applied "$reloads" ||
            die "reload $reloads: BUILD_ID soak-$reloads is not in /status 5 s later"
    fi
    if ((t == KILL_AT)); then
        kill -KILL "$CANARY_PID"; wait "$CANARY_PID" 2> /dev/null || true; forget "$CANARY_PID"
        event upstream_kill
        note "t=${t}s: canary upstream killed"
    fi
    if ((t == KILL_AT + 5)); then
        start_arm canary "$CANARY_PORT"; CANARY_PID=$ARM_PID
        event upstream_up
        note "t=${t}s: canary upstream restarted"
    fi
    if ((t == TRIP_AT)); then
        code=$(admin_post /trip '{"reason": "soak", "arm": "canary"}')
        [[ $code == 200 ]] || die "POST /trip answered $code: $(cat "$TMP/admin-reply.json")"
        event trip
        note "t=${t}s: tripped"
    fi
    if ((t == RECOVER_AT)); then
        code=$(admin_post /recover)
        [[ $code == 200 ]] || die "POST /recover answered $code: $(cat "$TMP/admin-reply.json")"
        event recover
        note "t=${t}s: recovered"
    fi
done

# The load stops by itself at SOAK_SECS; give it its join margin, then stop it regardless.
for _ in $(seq 30); do kill -0 "$LOAD_PID" 2> /dev/null || break; sleep 1; done
kill -0 "$LOAD_PID" 2> /dev/null && die "the load generator did not stop (log: $(tail -5 "$TMP/load.log"))"
wait "$LOAD_PID" || die "the load generator failed: $(tail -5 "$TMP/load.log")"
forget "$LOAD_PID"
[[ -s $TMP/load.jsonl ]] || die "the load generator wrote no results"

status=0
{
    echo "driftguard soak: ${SOAK_SECS} s, $DG, SOAK_PACE=$SOAK_PACE, $(nproc) cores"
    python3 "$TMP/report.py" "$SAMPLES" "$EVENTS" "$TMP/load.jsonl" "$SOAK_SECS"
} > "$TMP/report.txt" || status=$?
cat "$TMP/report.txt"
[[ -n $SOAK_OUT ]] && cp "$TMP/report.txt" "$SOAK_OUT"
exit "$status"
