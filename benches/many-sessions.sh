#!/usr/bin/env bash
# CPU per viewer request when the sessions are many and each connection brings its own
# (issue 13's "also measure"): SESSIONS live EHR sessions (100,000 by default) opened as
# browsers open them, then wrk on the viewer host with a different session per request
# (a Lua script picks one at random), so the session look-up is rarely in cache; beside
# it, in the same run and alternation, the same load with one session for all. Memory
# store. Medians of REPEATS; loopback only. Results: target/load/many-sessions.txt.
#
#   bash benches/many-sessions.sh      # SESSIONS=100000 DURATION=10 REPEATS=3 CONNS=50
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
one_gate_script
SESSIONS=${SESSIONS:-100000}
REPEATS=${REPEATS:-3}
UP_PORT=18082 GATE_PORT=19448 ADMIN_PORT=19096
RESULTS=$OUT/many-sessions.txt
log() { printf '%s\n' "$*" | tee -a "$RESULTS" >&2; }

need nginx:nginx-light wrk:wrk openssl:openssl
cargo build --release --locked -q
BIN=$ROOT/target/release/ehrgate

make_keys
start_upstream "$UP_PORT" "$LOAD_CPU"
gate_config "$GATE_PORT" "$ADMIN_PORT" ehrgate
GATE_PID=$(start_gate "$BIN" ehrgate)

: > "$RESULTS"
log "# many sessions — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
started=$(date +%s)
# Sessions as browsers open them: launch, then the binding round trip; their cookies kept.
taskset -c "$LOAD_CPU" python3 - "$GATE_PORT" "$EMR" "$EHR" "$SESSIONS" "$WORK/tokens" <<'PY'
import http.client, ssl, sys, concurrent.futures as cf
port, emr, ehr, n, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ctx = ssl._create_unverified_context()
def cookie(r, name):
    for k, v in r.getheaders():
        if k.lower() == "set-cookie" and v.startswith(name + "="):
            return v.split(";", 1)[0]
def path(loc):
    return loc.split(str(port), 1)[1]
def worker(ids):
    e = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    v = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    got = []
    for i in ids:
        e.request("GET", "/oscar/clinicalConnectEHRViewer.do?demographicNo=1001",
                  headers={"Host": f"{emr}:{port}", "Cookie": f"JSESSIONID=many-{i}", "Sec-Fetch-Site": "same-origin"})
        r = e.getresponse(); loc = r.getheader("Location"); r.read()
        marker = cookie(r, "__Host-ehrgate-emr")
        v.request("GET", path(loc), headers={"Host": f"{ehr}:{port}"})
        r = v.getresponse(); r.read(); bind = cookie(r, "__Host-ehrgate-bind")
        e.request("GET", path(r.getheader("Location")), headers={"Host": f"{emr}:{port}", "Cookie": marker})
        c = e.getresponse(); c.read()
        v.request("GET", path(c.getheader("Location")), headers={"Host": f"{ehr}:{port}", "Cookie": bind})
        r = v.getresponse(); r.read()
        assert r.status == 302, r.status
        got.append(cookie(r, "__Host-ehrgate").split("=", 1)[1])
    return got
with cf.ThreadPoolExecutor(16) as pool:
    tokens = [t for part in pool.map(worker, [range(k, n, 16) for k in range(16)]) for t in part]
open(out, "w").write("\n".join(tokens) + "\n")
PY
log "$SESSIONS sessions opened in $(( $(date +%s) - started )) s; ehrgate RSS $(awk '/VmRSS/ {print $2}' "/proc/$GATE_PID/status") KiB"

# wrk's Lua: every request carries a session picked at random among them all.
cat > "$WORK/many.lua" <<'EOF'
local tokens = {}
for line in io.lines(os.getenv("TOKENS")) do tokens[#tokens + 1] = line end
math.randomseed(os.time())
request = function()
  local t = tokens[math.random(#tokens)]
  return wrk.format("GET", "/chart", { ["Host"] = os.getenv("HOSTHDR"), ["Cookie"] = "__Host-ehrgate=" .. t })
end
EOF
ONE=$(head -1 "$WORK/tokens")
TICK=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$GATE_PID/stat"; }
run() { # many|one -> "rps cpu_us"
  local t0 t1 out reqs
  t0=$(cpu)
  if [ "$1" = many ]; then
    out=$(TOKENS="$WORK/tokens" HOSTHDR="$EHR:$GATE_PORT" taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$WORK/many.lua" "https://127.0.0.1:$GATE_PORT/chart")
  else
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Host: $EHR:$GATE_PORT" -H "Cookie: __Host-ehrgate=$ONE" "https://127.0.0.1:$GATE_PORT/chart")
  fi
  t1=$(cpu)
  if grep -q "Non-2xx" <<< "$out"; then echo "$1: non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
  reqs=$(awk '/requests in/ {print $1}' <<< "$out")
  awk -v r="$reqs" -v d="$DURATION" -v dt="$((t1 - t0))" -v hz="$TICK" 'BEGIN {printf "%.0f %.2f\n", r / d, dt / hz / r * 1e6}'
}
declare -A RPS CPU
for rep in $(seq "$REPEATS"); do
  for t in one many; do
    read -r rps c < <(run "$t")
    RPS[$t]+="$rps "; CPU[$t]+="$c "
    log "  run $rep $t: $rps req/s, ehrgate CPU $c µs/req"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
log ""
log "medians of $REPEATS: one session for all $(echo "${CPU[one]}" | median) µs/req ($(echo "${RPS[one]}" | median) req/s); a random one of $SESSIONS per request $(echo "${CPU[many]}" | median) µs/req ($(echo "${RPS[many]}" | median) req/s)"
