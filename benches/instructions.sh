#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind: a figure this
# machine's noise does not move (CPU time here moves 10-20% between runs), to compare
# builds and to find where ehrgate's own work goes. Same set-up as benches/profile.sh
# (fixed nginx upstream, one live EHR session), but the program runs under callgrind
# (about 50 times slower), with instrumentation on only while wrk makes the measured
# requests. The measured run opens its CONNS connections anew, so their TLS handshakes
# are in the count (the same for every build; about 1% at the defaults).
#
#   bash benches/instructions.sh          # TARGET=ehr (viewer host), emr or floor; DURATION=5 CONNS=10
#   GATE_BIN=path bash benches/instructions.sh     # another ehrgate build
#   FLOOR_BIN=path TARGET=floor bash benches/instructions.sh
#   TOP=40 bash benches/instructions.sh   # also the functions with the most instructions
#
# Prints instructions per request; keeps the callgrind file in target/load/ for
# callgrind_annotate (e.g. --tree=caller to see who calls what).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
one_gate_script
DURATION=${DURATION:-5}
CONNS=${CONNS:-10}
TARGET=${TARGET:-ehr}
UP_PORT=18094 GATE_PORT=19460 ADMIN_PORT=19099 FLOOR_PORT=19461

need valgrind:valgrind nginx:nginx-light wrk:wrk openssl:openssl curl:curl
make_keys
start_upstream "$UP_PORT" "$LOAD_CPU"
CG_OUT=$OUT/callgrind-$TARGET.out
rm -f "$CG_OUT"*

# under_callgrind NAME PROGRAM ARGS...: starts it with instrumentation off, waits until
# it says it serves; its pid is in GATE_PID (so the clean-up stops it).
under_callgrind() {
  local name=$1
  shift
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$CG_OUT" "$@" \
    > "$WORK/$name.out" 2> "$WORK/$name.err" &
  GATE_PID=$!
  for _ in $(seq 600); do grep -q serving "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
  grep -q serving "$WORK/$name.out" || { cat "$WORK/$name.err" >&2; exit 1; }
}

case $TARGET in
  ehr | emr)
    if [ -z "${GATE_BIN:-}" ]; then
      cargo build --release --locked -q
      GATE_BIN=$ROOT/target/release/ehrgate
    fi
    gate_config "$GATE_PORT" "$ADMIN_PORT" ehrgate
    under_callgrind ehrgate "$GATE_BIN" run --config "$WORK/ehrgate.toml"
    VERSION=$($GATE_BIN --version)
    if [ "$TARGET" = ehr ]; then
      TOKEN=$(new_session bench-instructions "$GATE_PORT")
      [ -n "$TOKEN" ] || { echo "could not open a viewer session" >&2; exit 1; }
      ARGS=(-H "Host: $EHR:$GATE_PORT" -H "Cookie: __Host-ehrgate=$TOKEN" "https://127.0.0.1:$GATE_PORT/chart")
    else
      ARGS=(-H "Host: $EMR:$GATE_PORT" "https://127.0.0.1:$GATE_PORT/oscar/provider/providercontrol.jsp")
    fi ;;
  floor)
    if [ -z "${FLOOR_BIN:-}" ]; then
      cargo build --release --locked -q --example stack_floor
      FLOOR_BIN=$ROOT/target/release/examples/stack_floor
    fi
    under_callgrind floor "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$UP_PORT" "$WORK/server.crt" "$WORK/server.key"
    VERSION="examples/stack_floor.rs"
    ARGS=(-H "Host: $EHR" "https://127.0.0.1:$FLOOR_PORT/chart") ;;
  *) echo "TARGET is ehr, emr or floor" >&2; exit 2 ;;
esac

# A warm-up (the upstream pool filled, code paths touched), then the measured run.
taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "${ARGS[@]}" > /dev/null
callgrind_control -i on "$GATE_PID" > /dev/null 2>&1
out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "${ARGS[@]}")
callgrind_control -i off "$GATE_PID" > /dev/null 2>&1
callgrind_control -d "$GATE_PID" > /dev/null 2>&1
if grep -q "Non-2xx" <<< "$out"; then echo "non-2xx answers:" >&2; echo "$out" >&2; exit 1; fi
reqs=$(awk '/requests in/ {print $1}' <<< "$out")
# The dump is the file with the largest total (the others are the empty start-up part).
total=0
file=""
for f in "$CG_OUT"*; do
  t=$(awk '/^totals:/ {print $2; exit}' "$f")
  if [ -n "$t" ] && [ "$t" -gt "$total" ]; then total=$t; file=$f; fi
done
{
  echo "# instructions of $TARGET — $(date -u +%Y-%m-%dT%H:%M:%SZ), $VERSION"
  awk -v t="$total" -v r="$reqs" 'BEGIN {printf "%d requests, %.0f instructions per request (user space, callgrind)\n", r, t / r}'
  if [ -n "${TOP:-}" ]; then
    echo
    callgrind_annotate --threshold=100 "$file" 2>/dev/null | awk '/file:function/ {on=1; next} on && NF' \
      | head -"$TOP" | cut -c1-160
  fi
} | tee "$OUT/instructions-$TARGET.txt"
