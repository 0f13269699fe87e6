#!/usr/bin/env bash
# A reload under load (DESIGN §10): oha at a fixed RATE (5,000 req/s) for DURATION
# seconds against ehrgate's EMR and viewer hosts (a live EHR session), and at the middle
# of the run a SIGHUP with a real change (a second authority). Reports failed requests
# and the p99 latency of the second in which the reload happened against the median of
# the other seconds' p99. REPEATS runs; medians. Loopback only.
#
#   bash benches/reload.sh          # RATE=5000 DURATION=10 REPEATS=3
#
# Needs oha (cargo install oha --locked), nginx-light and curl; builds ehrgate release.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
one_gate_script
RATE=${RATE:-5000}
REPEATS=${REPEATS:-3}
UP_PORT=18081 GATE_PORT=19447 ADMIN_PORT=19094
RESULTS=$OUT/reload.txt
log() { printf '%s\n' "$*" | tee -a "$RESULTS" >&2; }

need nginx:nginx-light curl:curl openssl:openssl
export PATH="$HOME/.cargo/bin:$PATH"
command -v oha >/dev/null || cargo install oha --locked -q
cargo build --release --locked -q
BIN=$ROOT/target/release/ehrgate

make_keys
start_upstream "$UP_PORT" "$LOAD_CPU"

gate_config "$GATE_PORT" "$ADMIN_PORT" ehrgate
GATE_PID=$(start_gate "$BIN" ehrgate)

# A viewer session, as a browser opens it (launch, then the binding round trip).
resolve=(--resolve "$EMR:$GATE_PORT:127.0.0.1" --resolve "$EHR:$GATE_PORT:127.0.0.1")
loc=$(curl -sk "${resolve[@]}" -c "$WORK/jar" -H "Cookie: JSESSIONID=bench" -H "Sec-Fetch-Site: same-origin" \
  -o /dev/null -w '%{redirect_url}' "https://$EMR:$GATE_PORT/oscar/clinicalConnectEHRViewer.do?demographicNo=1001")
curl -sk "${resolve[@]}" -b "$WORK/jar" -c "$WORK/jar" -L --max-redirs 5 -o /dev/null "$loc"
TOKEN=$(awk -F'\t' '$6 == "__Host-ehrgate" { print $7 }' "$WORK/jar" | tail -1)
[ -n "$TOKEN" ] || { echo "no viewer session" >&2; exit 1; }

: > "$RESULTS"
log "# reload under load — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "oha -q $RATE -c $CONNS -z ${DURATION}s on the viewer host (live EHR session); SIGHUP with a new authority at $((DURATION / 2)) s; proxy on CPU $PROXY_CPU, load on CPU $LOAD_CPU"
declare -a FAILED RELOAD_P99 OTHER_P99
for rep in $(seq "$REPEATS"); do
  # Alternate the change, so every SIGHUP really changes the configuration.
  if [ $((rep % 2)) -eq 1 ]; then
    extra='[[authority]]
id = "2.16.840.1.113883.3.239.9:102"
name = "Riverside Walk-in Clinic"'
  else
    extra=""
  fi
  before=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^ehrgate_config_reload_total\{result="ok"\}/ {print $2}')
  start=$(date +%s.%N)
  taskset -c "$LOAD_CPU" oha --no-tui --insecure --output-format csv -q "$RATE" -c "$CONNS" -z "${DURATION}s" \
    -H "Host: $EHR:$GATE_PORT" -H "Cookie: __Host-ehrgate=$TOKEN" "https://127.0.0.1:$GATE_PORT/chart" > "$WORK/run.csv" 2>/dev/null &
  OHA=$!
  sleep "$((DURATION / 2))"
  gate_config "$GATE_PORT" "$ADMIN_PORT" ehrgate "" "$extra"
  reload_at=$(date +%s.%N)
  kill -HUP "$GATE_PID"
  wait "$OHA"
  after=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^ehrgate_config_reload_total\{result="ok"\}/ {print $2}')
  [ "$after" -gt "$before" ] || { echo "the reload did not happen" >&2; cat "$WORK/ehrgate.err" >&2; exit 1; }
  read -r failed n p99_reload p99_other < <(python3 - "$WORK/run.csv" "$start" "$reload_at" <<'PY'
import csv, sys
path, start, reload_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = list(csv.DictReader(open(path)))
# Columns: request-start (s from the run's start), DNS, connection, request time, status.
key_start = next(k for k in rows[0] if "start" in k.lower())
key_dur = next(k for k in rows[0] if "duration" in k.lower() or k.lower().startswith("request-time") or "response-time" in k.lower())
key_status = next(k for k in rows[0] if "status" in k.lower())
by_second, failed = {}, 0
for r in rows:
    if not r[key_status].startswith("2"):
        failed += 1
    by_second.setdefault(int(float(r[key_start])), []).append(float(r[key_dur]))
def p99(v):
    v = sorted(v); return v[min(len(v) - 1, int(0.99 * len(v)))] * 1e3
second = int(reload_at - start)
others = sorted(p99(v) for s, v in by_second.items() if s != second and len(v) > 100)
mid = others[len(others) // 2] if others else float("nan")
print(failed, len(rows), f"{p99(by_second.get(second, [0])):.3f}", f"{mid:.3f}")
PY
)
  log "  run $rep: $n requests, $failed failed; p99 in the reload's second ${p99_reload} ms, median p99 of the other seconds ${p99_other} ms"
  FAILED+=("$failed"); RELOAD_P99+=("$p99_reload"); OTHER_P99+=("$p99_other")
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
log ""
log "summary (medians of $REPEATS): failed requests ${FAILED[*]}; p99 in the reload's second $(echo "${RELOAD_P99[*]}" | median) ms vs $(echo "${OTHER_P99[*]}" | median) ms in the other seconds"
