#!/usr/bin/env bash
# Where ehrgate's CPU goes on one hot path, before choosing what to change (issue 13):
# the same set-up as benches/load.sh (fixed nginx upstream on CPU $LOAD_CPU, ehrgate
# pinned to CPU $PROXY_CPU, one live EHR session), wrk saturating TARGET while
# `perf record -e cpu-clock` samples ehrgate; then ehrgate's user and system time
# per request, and perf's flat profile. Loopback only. TARGET=nginx or haproxy profiles
# the reference in the same place (same upstream, certificate, pinning and load), for
# its user and system split beside ehrgate's; TARGET=floor profiles examples/stack_floor.rs,
# a bare proxy on ehrgate's own packages (tokio, rustls, hyper) doing none of its work.
#
#   bash benches/profile.sh            # TARGET=ehr (viewer host), emr, nginx, haproxy or floor; DURATION=10 CONNS=50
#   GATE_BIN=path bash benches/profile.sh   # another build
#   PERF=0 bash benches/profile.sh          # user and system time only, without perf
#   PERF_G=1 PERF_STACK=32768 bash benches/profile.sh   # with DWARF call graphs (stack bytes copied per sample)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
one_gate_script
TARGET=${TARGET:-ehr}
UP_PORT=18084 GATE_PORT=19450 ADMIN_PORT=19098 NGINX_PORT=19451 HAPROXY_PORT=19452 FLOOR_PORT=19453

need nginx:nginx-light haproxy:haproxy wrk:wrk openssl:openssl curl:curl perf:linux-perf
if [ -z "${GATE_BIN:-}" ]; then
  cargo build --release --locked -q
  GATE_BIN=$ROOT/target/release/ehrgate
fi

make_keys
start_upstream "$UP_PORT" "$LOAD_CPU"
gate_config "$GATE_PORT" "$ADMIN_PORT" ehrgate
GATE_PID=$(start_gate "$GATE_BIN" ehrgate)

case $TARGET in
  ehr)
    TOKEN=$(new_session bench-profile "$GATE_PORT")
    [ -n "$TOKEN" ] || { echo "could not open a viewer session" >&2; exit 1; }
    ARGS=(-H "Host: $EHR:$GATE_PORT" -H "Cookie: __Host-ehrgate=$TOKEN" "https://127.0.0.1:$GATE_PORT/chart") ;;
  emr) ARGS=(-H "Host: $EMR:$GATE_PORT" "https://127.0.0.1:$GATE_PORT/oscar/provider/providercontrol.jsp") ;;
  nginx)
    start_nginx_proxy "$NGINX_PORT"
    for _ in $(seq 50); do [ -n "$(nginx_pids | cut -d' ' -f2)" ] && break; sleep 0.1; done
    ARGS=(-H "Host: $EHR" "https://127.0.0.1:$NGINX_PORT/chart") ;;
  haproxy)
    HAPROXY_PID=$(start_haproxy "$HAPROXY_PORT")
    ARGS=(-H "Host: $EHR" "https://127.0.0.1:$HAPROXY_PORT/chart") ;;
  floor)
    FLOOR_PID=$(start_floor "$FLOOR_PORT")
    ARGS=(-H "Host: $EHR" "https://127.0.0.1:$FLOOR_PORT/chart") ;;
  *) echo "TARGET is ehr, emr, nginx, haproxy or floor" >&2; exit 2 ;;
esac
# The process measured: ehrgate, or the reference's worker.
case $TARGET in
  nginx) PROF_PID=$(nginx_pids | cut -d' ' -f2); VERSION=$(nginx -v 2>&1 | cut -d' ' -f3) ;;
  haproxy) PROF_PID=$HAPROXY_PID; VERSION=$(haproxy -v | head -1 | cut -d' ' -f1-3) ;;
  floor) PROF_PID=$FLOOR_PID; VERSION="examples/stack_floor.rs" ;;
  *) PROF_PID=$GATE_PID; VERSION=$($GATE_BIN --version) ;;
esac

# A warm-up, then the measured run under perf.
taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "${ARGS[@]}" >/dev/null
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$PROF_PID/stat")
PERF_PID=""
if [ "${PERF:-1}" != 0 ]; then
  perf record -q -e cpu-clock -F ${FREQ:-2999} ${PERF_G:+--call-graph dwarf,${PERF_STACK:-8192}} -p "$PROF_PID" -o "$WORK/perf.data" -- sleep "$DURATION" 2>/dev/null &
  PERF_PID=$!
fi
out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "${ARGS[@]}")
[ -n "$PERF_PID" ] && { wait "$PERF_PID" || true; }
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$PROF_PID/stat")
reqs=$(awk '/requests in/ {print $1}' <<< "$out")
hz=$(getconf CLK_TCK)
{
  echo "# profile of $TARGET — $(date -u +%Y-%m-%dT%H:%M:%SZ), $VERSION"
  awk -v r="$reqs" -v d="$DURATION" -v u="$((u1 - u0))" -v s="$((s1 - s0))" -v hz="$hz" \
    'BEGIN {printf "%.0f req/s; user %.2f µs/req, system %.2f µs/req\n", r / d, u / hz / r * 1e6, s / hz / r * 1e6}'
  [ -z "$PERF_PID" ] && exit 0
  echo "(perf's sampling adds to both)"
  echo
  echo "share of samples: user space (the program and its libraries) vs kernel"
  perf report -i "$WORK/perf.data" --sort dso --stdio 2>/dev/null | grep -v '^#' | awk 'NF {printf "  %-8s %s\n", $1, $2}' | head -6 || true
  echo
  perf report -i "$WORK/perf.data" --sort symbol --percent-limit 0.6 --stdio -g none 2>/dev/null \
    | grep -v '^#' | awk 'NF {$1=$1; print "  " substr($0, 1, 150)}' | head -70 || true
  echo
  echo "user-space samples by crate (% of all samples)"
  perf report -i "$WORK/perf.data" --sort dso,symbol --stdio 2>/dev/null | python3 -c '
import re, sys, collections
by = collections.Counter()
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if not m or m.group(3) == "k":
        continue
    sym = re.sub(r"\s+-\s+-\s*$", "", m.group(4).strip()).lstrip("<")
    if sym.startswith(("mi_", "_mi_")):
        sym = "mimalloc"
    elif sym.startswith("aws_lc"):
        sym = "aws-lc"
    crate = m.group(2) if m.group(2) not in ("ehrgate", "stack_floor") else re.split(r"::|<| as ", sym)[0] or sym
    by[crate] += float(m.group(1))
for crate, share in by.most_common(16):
    print(f"  {share:6.2f}%  {crate}")
'
} | tee "$OUT/profile-$TARGET.txt"
[ -f "$WORK/perf.data" ] && cp "$WORK/perf.data" "$OUT/perf-$TARGET.data"
