#!/usr/bin/env bash
# ehrgate against nginx, on this machine, in the same run.
#
#   bash benches/load.sh            # DURATION=10 CONNS=50 REPEATS=3 RATE=5000 by default
#   QUICK=1 ONLY="nginx haproxy emr ehr" bash benches/load.sh
#                                   # throughput and latency only, of the targets named
#
# Builds ehrgate (release), installs what it lacks (wrk, nginx-light, openssl; oha with
# cargo install unless SKIP_OHA=1), starts one fixed upstream (nginx, plain HTTP) on
# loopback, and measures, each for the same duration and connection count, in
# alternating order, REPEATS times:
#   direct  the upstream itself (plain HTTP, no proxy)
#   nginx   nginx terminating TLS and proxying with keep-alive to the upstream
#   haproxy HAProxy terminating TLS (same certificate), keep-alive to the same upstream
#           (http-reuse always), one thread, on the same core as the other proxies
#   floor   examples/stack_floor.rs: a bare TLS proxy on ehrgate's own packages (tokio,
#           rustls, hyper) doing none of ehrgate's work, one upstream connection per
#           client connection: what the stack itself costs, the floor under emr and ehr
#   emr     ehrgate, EMR host (routing, header rules, EMR session bookkeeping)
#   ehr     ehrgate, viewer host with a live EHR session in vault mode (cookie ->
#           session lookup -> jar merge -> forward): the realistic hot path
#   emr-redis, ehr-redis  the same on a second ehrgate whose sessions live in a local
#           redis-server (session.store = "redis"), measured beside the memory store;
#           redis-server's own CPU per request is reported beside ehrgate's
# With Redis it also measures sign-out propagation: SIGNOUTS sign-outs on one redis
# replica, each timed until an event stream on the other replica says `logout`.
# The proxies run on CPU $PROXY_CPU, the load generator and upstream on $LOAD_CPU. It
# reports medians: requests/s at saturation (wrk), the proxy's CPU time per request
# (utime+stime from /proc over the run / completed requests), p50/p99 at a fixed rate
# (oha -q $RATE), full and resumed TLS handshakes per second (openssl s_time) with CPU
# per handshake, CPU per new connection with one request, and sign-out timings.
# Everything listens on 127.0.0.1 only. Results: target/load/results.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
REPEATS=${REPEATS:-3}
RATE=${RATE:-5000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BULK=${BULK:-10000}
SIGNOUTS=${SIGNOUTS:-1000}
UP_PORT=18080 NGINX_PORT=18443 HAPROXY_PORT=18444 FLOOR_PORT=18445 GATE_PORT=19443 ADMIN_PORT=19090 BASE_PORT=19444 BASE_ADMIN_PORT=19091
REDIS_PORT=16379 RGATE_PORT=19445 RGATE_ADMIN_PORT=19092 RGATE2_PORT=19446 RGATE2_ADMIN_PORT=19093
EMR=emr.bench.localhost EHR=ehr.bench.localhost
OUT=$ROOT/target/load
mkdir -p "$OUT"
RESULTS=$OUT/results.txt
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/upstream.pid" ] && kill "$(cat "$WORK/upstream.pid")" 2>/dev/null || true
  [ -f "$WORK/proxy.pid" ] && kill "$(cat "$WORK/proxy.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '%s\n' "$*" | tee -a "$RESULTS" >&2; }

# --- what it needs ---------------------------------------------------------------
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
need wrk:wrk nginx:nginx-light haproxy:haproxy openssl:openssl curl:curl taskset:util-linux redis-server:redis-server
if ! command -v oha >/dev/null && [ -z "${SKIP_OHA:-}" ]; then
  echo "building oha (a constant-rate load generator; about 7 minutes, once)" >&2
  cargo install oha --locked -q
fi
export PATH="$HOME/.cargo/bin:$PATH"
# GATE_BIN=path measures another ehrgate build (say, an earlier commit's) the same way.
# BASE_BIN=path also measures that build beside this one, in the same run and the same
# alternation (rows emr-base and ehr-base): before/after figures from one run.
if [ -z "${GATE_BIN:-}" ]; then
  cargo build --release --locked -q
  GATE_BIN=$ROOT/target/release/ehrgate
fi

: > "$RESULTS"
log "# ehrgate load benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
log "versions: $($GATE_BIN --version), $(nginx -v 2>&1 | cut -d' ' -f3), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(command -v oha >/dev/null && oha --version || echo 'oha absent'), $(openssl version | cut -d' ' -f1-2)"
log "settings: DURATION=${DURATION}s CONNS=$CONNS REPEATS=$REPEATS RATE=$RATE/s proxy on CPU $PROXY_CPU, load and upstream on CPU $LOAD_CPU"

# --- key material (made here, deleted at exit) and the fixed upstream ---------------
make_keys
start_upstream "$UP_PORT" "$LOAD_CPU"

# --- nginx as the TLS reverse proxy (the reference) --------------------------------
start_nginx_proxy "$NGINX_PORT"

# --- HAProxy as the second reference -------------------------------------------------
HAPROXY_PID=$(start_haproxy "$HAPROXY_PORT")
PIDS+=("$HAPROXY_PID")
FLOOR_PID=$(start_floor "$FLOOR_PORT")
PIDS+=("$FLOOR_PID")

# --- ehrgate -----------------------------------------------------------------------
gate_config "$GATE_PORT" "$ADMIN_PORT" ehrgate
GATE_PID=$(start_gate "$GATE_BIN" ehrgate)
PIDS+=("$GATE_PID")
# A local Redis (its own port and directory, no persistence) and two replicas on it.
head -c 32 /dev/urandom > "$WORK/store.key"
taskset -c "$LOAD_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
  --dir "$WORK" --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
for _ in $(seq 100); do [ -s "$WORK/redis.pid" ] && redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS_PID=$(cat "$WORK/redis.pid")
PIDS+=("$REDIS_PID")
REDIS_SESSION="store = \"redis\"
redis_url = \"redis://127.0.0.1:$REDIS_PORT/0\"
store_key = \"$WORK/store.key\""
gate_config "$RGATE_PORT" "$RGATE_ADMIN_PORT" redis "$REDIS_SESSION"
RGATE_PID=$(start_gate "$GATE_BIN" redis)
PIDS+=("$RGATE_PID")
gate_config "$RGATE2_PORT" "$RGATE2_ADMIN_PORT" redis2 "$REDIS_SESSION"
RGATE2_PID=$(start_gate "$GATE_BIN" redis2)
PIDS+=("$RGATE2_PID")
BASE_PID=""
if [ -n "${BASE_BIN:-}" ]; then
  gate_config "$BASE_PORT" "$BASE_ADMIN_PORT" base
  BASE_PID=$(start_gate "$BASE_BIN" base)
  PIDS+=("$BASE_PID")
fi

cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
TICK=$(getconf CLK_TCK)

TOKEN=$(new_session bench-hot-path "$GATE_PORT")
[ -n "$TOKEN" ] || { echo "could not open a viewer session" >&2; cat "$WORK/ehrgate.err" >&2; exit 1; }
RTOKEN=$(new_session bench-redis-path "$RGATE_PORT")
[ -n "$RTOKEN" ] || { echo "could not open a viewer session on the redis store" >&2; cat "$WORK/redis.err" >&2; exit 1; }
TARGETS="direct nginx haproxy floor emr ehr emr-redis ehr-redis"
if [ -n "$BASE_PID" ]; then
  BASE_TOKEN=$(new_session bench-base-path "$BASE_PORT")
  [ -n "$BASE_TOKEN" ] || { echo "could not open a viewer session on BASE_BIN" >&2; cat "$WORK/base.err" >&2; exit 1; }
  TARGETS="$TARGETS emr-base ehr-base"
fi
TARGETS=${ONLY:-$TARGETS}

target_args() { # name -> URL and headers for wrk/oha
  case $1 in
    direct) echo "http://127.0.0.1:$UP_PORT/chart" ;;
    nginx) echo "https://127.0.0.1:$NGINX_PORT/chart|Host: $EHR" ;;
    haproxy) echo "https://127.0.0.1:$HAPROXY_PORT/chart|Host: $EHR" ;;
    floor) echo "https://127.0.0.1:$FLOOR_PORT/chart|Host: $EHR" ;;
    emr) echo "https://127.0.0.1:$GATE_PORT/oscar/provider/providercontrol.jsp|Host: $EMR:$GATE_PORT" ;;
    ehr) echo "https://127.0.0.1:$GATE_PORT/chart|Host: $EHR:$GATE_PORT|Cookie: __Host-ehrgate=$TOKEN" ;;
    emr-base) echo "https://127.0.0.1:$BASE_PORT/oscar/provider/providercontrol.jsp|Host: $EMR:$BASE_PORT" ;;
    ehr-base) echo "https://127.0.0.1:$BASE_PORT/chart|Host: $EHR:$BASE_PORT|Cookie: __Host-ehrgate=$BASE_TOKEN" ;;
    emr-redis) echo "https://127.0.0.1:$RGATE_PORT/oscar/provider/providercontrol.jsp|Host: $EMR:$RGATE_PORT" ;;
    ehr-redis) echo "https://127.0.0.1:$RGATE_PORT/chart|Host: $EHR:$RGATE_PORT|Cookie: __Host-ehrgate=$RTOKEN" ;;
  esac
}
proxy_pids() { case $1 in direct) echo "" ;; nginx) nginx_pids ;; haproxy) echo "$HAPROXY_PID" ;; floor) echo "$FLOOR_PID" ;; *-base) echo "$BASE_PID" ;; *-redis) echo "$RGATE_PID" ;; *) echo "$GATE_PID" ;; esac; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

declare -A RPS CPU P50 P99 SCPU
run_wrk() { # target extra-header -> "rps cpu_us_per_req redis_cpu_us_per_req"
  local spec url h=() pids t0 t1 s0 s1 out reqs
  IFS='|' read -r -a spec <<< "$(target_args "$1")"
  url=${spec[0]}
  for x in "${spec[@]:1}"; do h+=(-H "$x"); done
  [ -n "${2:-}" ] && h+=(-H "$2")
  pids=$(proxy_pids "$1")
  t0=$( [ -n "$pids" ] && cpu_ticks $pids || echo 0)
  s0=$(cpu_ticks "$REDIS_PID")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "${h[@]}" "$url")
  t1=$( [ -n "$pids" ] && cpu_ticks $pids || echo 0)
  s1=$(cpu_ticks "$REDIS_PID")
  if grep -q "Non-2xx" <<< "$out"; then echo "$1: non-2xx answers:" >&2; echo "$out" >&2; exit 1; fi
  reqs=$(awk '/requests in/ {print $1}' <<< "$out")
  awk -v r="$reqs" -v d="$DURATION" -v dt="$((t1 - t0))" -v ds="$((s1 - s0))" -v hz="$TICK" \
    'BEGIN {printf "%.0f %.2f %.2f\n", r / d, (r > 0 ? dt / hz / r * 1e6 : 0), (r > 0 ? ds / hz / r * 1e6 : 0)}'
}

log ""
log "## Saturation (wrk -t1 -c$CONNS, ${DURATION}s, keep-alive), $REPEATS alternating repeats"
for rep in $(seq "$REPEATS"); do
  for t in $TARGETS; do
    read -r rps cpu scpu < <(run_wrk "$t")
    RPS[$t]+="$rps "; CPU[$t]+="$cpu "; SCPU[$t]+="$scpu "
    log "  run $rep $t: $rps req/s, proxy CPU ${cpu} µs/req, redis-server CPU ${scpu} µs/req"
  done
done

if command -v oha >/dev/null; then
  log ""
  log "## Fixed rate (oha -q $RATE -c $CONNS, ${DURATION}s): latency"
  for rep in $(seq "$REPEATS"); do
    for t in $TARGETS; do
      IFS='|' read -r -a spec <<< "$(target_args "$t")"
      h=(); for x in "${spec[@]:1}"; do h+=(-H "$x"); done
      json=$(taskset -c "$LOAD_CPU" oha --no-tui --output-format json --insecure -z "${DURATION}s" -q "$RATE" -c "$CONNS" "${h[@]}" "${spec[0]}" 2>/dev/null)
      read -r p50 p99 ok < <(python3 -c 'import json,sys; d=json.load(sys.stdin); p=d["latencyPercentiles"]; s=d["statusCodeDistribution"]; print(round(p["p50"]*1e3,3), round(p["p99"]*1e3,3), sum(v for k,v in s.items() if k.startswith("2")))' <<< "$json")
      P50[$t]+="$p50 "; P99[$t]+="$p99 "
      log "  run $rep $t: p50 ${p50} ms, p99 ${p99} ms ($ok answered 2xx)"
    done
  done
fi

m() { echo "$1" | tr ' ' '\n' | { grep -v '^$' || true; } | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b + 0 == 0 || a == "n/a") print "n/a"; else printf "%.2f", a / b}'; }
summary() {
  log ""
  log "## Summary (medians of $REPEATS)"
  log ""
  log "| target | req/s | proxy CPU µs/req | p50 ms @${RATE}/s | p99 ms @${RATE}/s | req/s ÷ nginx | CPU ÷ nginx | p50 ÷ nginx | p99 ÷ nginx |"
  log "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for t in $TARGETS; do
    r=$(m "${RPS[$t]}"); c=$(m "${CPU[$t]}"); a=$(m "${P50[$t]:-}"); b=$(m "${P99[$t]:-}")
    if [ "$t" = direct ]; then c="—"; fi
    log "| $t | $r | $c | $a | $b | $(ratio "$r" "$(m "${RPS[nginx]:-}")") | $( [ "$t" = direct ] && echo — || ratio "$c" "$(m "${CPU[nginx]:-}")") | $(ratio "$a" "$(m "${P50[nginx]:-}")") | $(ratio "$b" "$(m "${P99[nginx]:-}")") |"
  done
  [ -n "${CPU[haproxy]:-}" ] || return 0
  log ""
  log "| against HAProxy | req/s ÷ haproxy | CPU ÷ haproxy | p50 ÷ haproxy | p99 ÷ haproxy |"
  log "| --- | --- | --- | --- | --- |"
  for t in $TARGETS; do
    case $t in direct | haproxy) continue ;; esac
    log "| $t | $(ratio "$(m "${RPS[$t]}")" "$(m "${RPS[haproxy]:-}")") | $(ratio "$(m "${CPU[$t]}")" "$(m "${CPU[haproxy]:-}")") | $(ratio "$(m "${P50[$t]:-}")" "$(m "${P50[haproxy]:-}")") | $(ratio "$(m "${P99[$t]:-}")" "$(m "${P99[haproxy]:-}")") |"
  done
}
if [ -n "${QUICK:-}" ]; then
  summary
  echo "results: $RESULTS" >&2
  exit 0
fi

log ""
log "## TLS handshakes (openssl s_time, ${DURATION}s each; CPU of the proxy per handshake)"
log "  (resumption is measured over TLS 1.2: s_time keeps the session before a TLS 1.3 ticket arrives)"
declare -A HS
for mode in "new" "new -tls1_2" "reuse -tls1_2"; do
  for t in nginx ehrgate; do
    port=$([ $t = nginx ] && echo $NGINX_PORT || echo $GATE_PORT)
    pids=$([ $t = nginx ] && nginx_pids || echo "$GATE_PID")
    t0=$(cpu_ticks $pids)
    # shellcheck disable=SC2086
    out=$(taskset -c "$LOAD_CPU" openssl s_time -connect "127.0.0.1:$port" -$mode -time "$DURATION" 2>/dev/null | grep 'connections in' | tail -1)
    t1=$(cpu_ticks $pids)
    n=$(awk '{print $1}' <<< "$out"); secs=$(awk '{print $4}' <<< "$out")
    line=$(awk -v n="$n" -v s="$secs" -v dt="$((t1 - t0))" -v hz="$TICK" 'BEGIN {printf "%.0f/s, %.0f µs CPU each", n / s, dt / hz / n * 1e6}')
    HS["$mode $t"]=$line
    log "  $mode $t: $line"
  done
done
log "## New connection + one request (wrk with Connection: close)"
for t in nginx emr; do
  read -r rps cpu _ < <(run_wrk "$t" "Connection: close")
  HS[close-$t]="$rps conn/s, $cpu µs CPU each"
  log "  $t: ${HS[close-$t]}"
done

log ""
log "## Sign-out"
victim=$(new_session bench-logout "$GATE_PORT")
t_logout=$(curl -sk --resolve "$EMR:$GATE_PORT:127.0.0.1" -H "Cookie: JSESSIONID=bench-logout" -o /dev/null -w '%{time_total}' "https://$EMR:$GATE_PORT/oscar/logout.jsp")
next=$(curl -sk --resolve "$EHR:$GATE_PORT:127.0.0.1" -H "Cookie: __Host-ehrgate=$victim" -o /dev/null -w '%{http_code}' "https://$EHR:$GATE_PORT/chart")
log "  EMR logout request: ${t_logout}s end to end (viewer logout call included); next viewer request: $next"
rss0=$(awk '/VmRSS/ {print $2}' "/proc/$GATE_PID/status")
python3 - "$GATE_PORT" "$EMR" "$EHR" "$BULK" <<'PY'
import http.client, ssl, sys, concurrent.futures as cf
port, emr, ehr, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl._create_unverified_context()
def worker(ids):
    e = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    v = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    def cookie(r, name):
        for k, val in r.getheaders():
            if k.lower() == "set-cookie" and val.startswith(name + "="):
                return val.split(";", 1)[0]
        return None
    for i in ids:
        e.request("GET", "/oscar/clinicalConnectEHRViewer.do?demographicNo=1001",
                  headers={"Host": f"{emr}:{port}", "Cookie": f"JSESSIONID=bulk-{i}",
                           "Sec-Fetch-Site": "same-origin"})
        r = e.getresponse(); loc = r.getheader("Location"); r.read()
        assert r.status == 303, r.status
        marker = cookie(r, "__Host-ehrgate-emr")
        # The binding round trip, as a browser follows it (an older ehrgate answers the
        # first enter at once).
        v.request("GET", loc.split(str(port), 1)[1], headers={"Host": f"{ehr}:{port}"})
        r = v.getresponse(); r.read()
        if r.status == 303:
            bind = cookie(r, "__Host-ehrgate-bind")
            e.request("GET", r.getheader("Location").split(str(port), 1)[1],
                      headers={"Host": f"{emr}:{port}", "Cookie": marker})
            c = e.getresponse(); c.read()
            assert c.status == 303, c.status
            v.request("GET", c.getheader("Location").split(str(port), 1)[1],
                      headers={"Host": f"{ehr}:{port}", "Cookie": bind})
            r = v.getresponse(); r.read()
        assert r.status == 302, r.status
with cf.ThreadPoolExecutor(16) as pool:
    list(pool.map(worker, [range(k, n, 16) for k in range(16)]))
PY
rss1=$(awk '/VmRSS/ {print $2}' "/proc/$GATE_PID/status")
log "  ehrgate RSS: ${rss0} KiB before, ${rss1} KiB with $BULK more EHR sessions (includes buffers)"
out=$(curl -s -X POST -o "$WORK/admin.json" -w '%{time_total}' "http://127.0.0.1:$ADMIN_PORT/admin/logout?user=999998")
log "  admin sign-out of $(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["signed_out"])' "$WORK/admin.json") sessions of one user: ${out}s end to end (viewer logout calls and audit lines included)"
next=$(curl -sk --resolve "$EHR:$GATE_PORT:127.0.0.1" -H "Cookie: __Host-ehrgate=$TOKEN" -o /dev/null -w '%{http_code}' "https://$EHR:$GATE_PORT/chart")
log "  next viewer request of a signed-out session: $next"

log ""
log "## Sign-out propagation between replicas (Redis): $SIGNOUTS sign-outs on one replica,"
log "   each timed from the logout request until the other replica's event stream says logout"
PROP=$(python3 - "$RGATE_PORT" "$RGATE2_PORT" "$EMR" "$EHR" "$SIGNOUTS" <<'PY'
import http.client, ssl, sys, time
a, b, emr, ehr, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
ctx = ssl._create_unverified_context()
def cookie(r, name):
    for k, val in r.getheaders():
        if k.lower() == "set-cookie" and val.startswith(name + "="):
            return val.split(";", 1)[0]
    return None
def path(loc):
    return "/" + loc.split("://", 1)[1].split("/", 1)[1]
e = http.client.HTTPSConnection("127.0.0.1", a, context=ctx)
v = http.client.HTTPSConnection("127.0.0.1", a, context=ctx)
times = []
for i in range(n):
    jsession = f"JSESSIONID=prop-{i}"
    e.request("GET", "/oscar/clinicalConnectEHRViewer.do?demographicNo=1001",
              headers={"Host": f"{emr}:{a}", "Cookie": jsession, "Sec-Fetch-Site": "same-origin"})
    r = e.getresponse(); loc = r.getheader("Location"); r.read()
    assert r.status == 303, r.status
    marker = cookie(r, "__Host-ehrgate-emr")
    v.request("GET", path(loc), headers={"Host": f"{ehr}:{a}"})
    r = v.getresponse(); r.read(); bind = cookie(r, "__Host-ehrgate-bind")
    e.request("GET", path(r.getheader("Location")), headers={"Host": f"{emr}:{a}", "Cookie": marker})
    c = e.getresponse(); c.read()
    v.request("GET", path(c.getheader("Location")), headers={"Host": f"{ehr}:{a}", "Cookie": bind})
    r = v.getresponse(); r.read(); session = cookie(r, "__Host-ehrgate")
    assert r.status == 302 and session, r.status
    s = http.client.HTTPSConnection("127.0.0.1", b, context=ctx, timeout=30)
    s.request("GET", "/.ehrgate/events", headers={"Host": f"{ehr}:{b}", "Cookie": session})
    stream = s.getresponse()
    assert stream.status == 200, stream.status
    while b"connected" not in stream.readline():
        pass
    t0 = time.perf_counter()
    e.request("GET", "/oscar/logout.jsp", headers={"Host": f"{emr}:{a}", "Cookie": jsession})
    while True:
        line = stream.readline()
        if line.startswith(b"event: logout"):
            times.append(time.perf_counter() - t0)
            break
        assert line, "stream ended without logout"
    r = e.getresponse(); r.read()
    s.close()
times.sort()
q = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e3
print(f"{q(0.5):.2f} {q(0.99):.2f} {times[-1] * 1e3:.2f} {len(times)}")
PY
)
read -r PROP50 PROP99 PROPMAX PROPN <<< "$PROP"
log "  p50 ${PROP50} ms, p99 ${PROP99} ms, max ${PROPMAX} ms over $PROPN sign-outs"

# --- summary -----------------------------------------------------------------------
summary
log ""
log "| redis store vs memory store | ehrgate CPU µs/req (memory) | ehrgate CPU µs/req (redis) | + redis-server µs/req | (redis + redis-server) ÷ memory | p50 added ms @${RATE}/s | p99 added ms @${RATE}/s |"
log "| --- | --- | --- | --- | --- | --- | --- |"
for h in emr ehr; do
  c=$(m "${CPU[$h-redis]}"); sc=$(m "${SCPU[$h-redis]}"); cm=$(m "${CPU[$h]}")
  total=$(awk -v a="$c" -v b="$sc" 'BEGIN {printf "%.2f", a + b}')
  d50=$(awk -v a="$(m "${P50[$h-redis]:-}")" -v b="$(m "${P50[$h]:-}")" 'BEGIN {if (a == "n/a" || b == "n/a") print "n/a"; else printf "%.3f", a - b}')
  d99=$(awk -v a="$(m "${P99[$h-redis]:-}")" -v b="$(m "${P99[$h]:-}")" 'BEGIN {if (a == "n/a" || b == "n/a") print "n/a"; else printf "%.3f", a - b}')
  log "| $h host | $cm | $c | $sc | $(ratio "$total" "$cm") | $d50 | $d99 |"
done
log ""
log "sign-out propagation to another replica's event stream: p50 ${PROP50} ms, p99 ${PROP99} ms (max ${PROPMAX} ms, $PROPN sign-outs)"
log ""
log "| TLS | nginx | ehrgate |"
log "| --- | --- | --- |"
log "| full handshakes, TLS 1.3 | ${HS[new nginx]} | ${HS[new ehrgate]} |"
log "| full handshakes, TLS 1.2 | ${HS[new -tls1_2 nginx]} | ${HS[new -tls1_2 ehrgate]} |"
log "| resumed handshakes, TLS 1.2 | ${HS[reuse -tls1_2 nginx]} | ${HS[reuse -tls1_2 ehrgate]} |"
log "| new connection + one request | ${HS[close-nginx]} | ${HS[close-emr]} |"
echo >&2
echo "results: $RESULTS" >&2
