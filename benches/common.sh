# Shared by the load scripts (sourced): what they install, the key material and the
# fixed upstream. Expects WORK (a scratch directory), EMR and EHR (host names), which
# one_gate_script sets for the scripts that run one ehrgate.

# one_gate_script: what a script that runs one ehrgate (its pid in GATE_PID) in front
# of the fixed upstream shares: its settings (each may come from the environment), a
# scratch folder WORK, the results folder OUT, and a clean-up at exit.
one_gate_script() {
  DURATION=${DURATION:-10}
  CONNS=${CONNS:-50}
  PROXY_CPU=${PROXY_CPU:-0}
  LOAD_CPU=${LOAD_CPU:-1}
  EMR=emr.bench.localhost EHR=ehr.bench.localhost
  WORK=$(mktemp -d)
  OUT=$ROOT/target/load
  mkdir -p "$OUT"
  trap one_gate_cleanup EXIT
}

one_gate_cleanup() {
  local p f
  for p in "${GATE_PID:-}" "${FLOOR_PID:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for f in upstream proxy haproxy; do
    [ -f "$WORK/$f.pid" ] && kill "$(head -1 "$WORK/$f.pid")" 2>/dev/null || true
  done
  rm -rf "$WORK"
}

# need COMMAND:PACKAGE...: installs the Debian packages whose command is missing
# (idempotent), and stops the services packages start (these scripts run their own
# instances, on their own ports).
need() {
  local missing=() pair sudo=""
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  for service in nginx redis-server haproxy; do $sudo service "$service" stop >/dev/null 2>&1 || true; done
}

# make_keys: a server certificate for EMR, EHR and 127.0.0.1, its key, and a context
# signing key, all in $WORK (made at run time, deleted with it).
make_keys() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench \
    -addext "subjectAltName=DNS:$EMR,DNS:$EHR,IP:127.0.0.1" \
    -keyout "$WORK/server.key" -out "$WORK/server.crt" 2>/dev/null
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/signing.pem" 2>/dev/null
}

# nginx_head NAME: the start of an nginx configuration with one worker, its pid in
# $WORK/NAME.pid and its errors in $WORK/NAME.err, open at the http block.
nginx_head() {
  cat <<CONF
worker_processes 1;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections 8192; }
http {
  access_log off;
CONF
}

# start_upstream PORT CPU: the EMR and the viewer as one nginx with fixed answers
# (whoami, demographics, the viewer's launch and logout, a 512-byte page), plain HTTP,
# on loopback, pinned to CPU. Its pid is in $WORK/upstream.pid.
start_upstream() {
  local body
  body=$(head -c 512 /dev/zero | tr '\0' 'x')
  { nginx_head upstream; cat <<CONF
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$1;
    location = /oscar/ws/rs/providerService/provider/me { default_type application/json; return 200 '{"providerNo":"999998"}'; }
    location ^~ /oscar/ws/rs/demographics/ { default_type application/json; return 200 '{"hin":"9876543217","ver":"AB","dobYear":"1958","dobMonth":"03","dobDay":"14","sex":"F","providerNo":"999998","lastName":"Bench","firstName":"Patient"}'; }
    location = /launch { add_header Set-Cookie "VSESSION=bench-viewer-session-0123456789abcdef; Path=/; HttpOnly; Secure"; return 302 /chart; }
    location = /logout { return 200 'signed out'; }
    location / { default_type text/plain; return 200 '$body'; }
  }
}
CONF
  } > "$WORK/upstream.conf"
  taskset -c "$2" nginx -p "$WORK" -c "$WORK/upstream.conf"
}

# start_nginx_proxy PORT: the reference, nginx terminating TLS with the key from
# make_keys and proxying with keep-alive to the fixed upstream on $UP_PORT, one worker on
# CPU $PROXY_CPU. Its master's pid is in $WORK/proxy.pid.
start_nginx_proxy() {
  { nginx_head proxy; cat <<EOF
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$1 ssl http2;
    ssl_certificate $WORK/server.crt;
    ssl_certificate_key $WORK/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto https;
    }
  }
}
EOF
  } > "$WORK/proxy.conf"
  taskset -c "$PROXY_CPU" nginx -p "$WORK" -c "$WORK/proxy.conf"
}

# nginx_pids: the reference nginx's master and worker.
nginx_pids() { local m; m=$(cat "$WORK/proxy.pid"); echo "$m $(pgrep -P "$m" | xargs)"; }

# start_haproxy PORT: the second reference, HAProxy terminating TLS (same certificate)
# with keep-alive to the same upstream, one thread on CPU $PROXY_CPU; prints its pid.
start_haproxy() {
  cat "$WORK/server.crt" "$WORK/server.key" > "$WORK/server.pem"
  cat > "$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
  pidfile $WORK/haproxy.pid
defaults
  mode http
  timeout connect 5s
  timeout client 75s
  timeout server 60s
  timeout http-keep-alive 75s
  option http-keep-alive
frontend tls
  bind 127.0.0.1:$1 ssl crt $WORK/server.pem alpn h2,http/1.1 ssl-min-ver TLSv1.2
  option forwardfor
  http-request set-header X-Forwarded-Proto https
  default_backend up
backend up
  http-reuse always
  server up 127.0.0.1:$UP_PORT
EOF
  taskset -c "$PROXY_CPU" haproxy -D -f "$WORK/haproxy.cfg" >&2
  local _
  for _ in $(seq 50); do [ -s "$WORK/haproxy.pid" ] && break; sleep 0.1; done
  head -1 "$WORK/haproxy.pid"
}

# start_floor PORT: examples/stack_floor.rs (a bare TLS proxy on ehrgate's own packages,
# doing none of its work: what the stack itself costs per request) in front of the fixed
# upstream on $UP_PORT, on CPU $PROXY_CPU, built unless FLOOR_BIN names a build; prints
# its pid.
start_floor() {
  local bin=${FLOOR_BIN:-$ROOT/target/release/examples/stack_floor}
  [ -n "${FLOOR_BIN:-}" ] || cargo build --release --locked -q --example stack_floor >&2
  taskset -c "$PROXY_CPU" "$bin" "127.0.0.1:$1" \
    "127.0.0.1:$UP_PORT" "$WORK/server.crt" "$WORK/server.key" > "$WORK/floor.out" 2> "$WORK/floor.err" &
  local pid=$! _
  for _ in $(seq 100); do grep -q serving "$WORK/floor.out" 2>/dev/null && break; sleep 0.1; done
  grep -q serving "$WORK/floor.out" || { cat "$WORK/floor.err" >&2; exit 1; }
  echo "$pid"
}

# gate_config PORT ADMIN_PORT NAME [SESSION_LINES] [MORE_TABLES]: $WORK/NAME.toml, an
# ehrgate in front of the fixed upstream on $UP_PORT with the keys from make_keys.
gate_config() {
  cat > "$WORK/$3.toml" <<CONF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
tls_cert = "$WORK/server.crt"
tls_key = "$WORK/server.key"
[emr]
host = "$EMR"
upstream = "http://127.0.0.1:$UP_PORT"
logout_paths = ["/oscar/logout.jsp"]
[ehr]
host = "$EHR"
upstream = "http://127.0.0.1:$UP_PORT"
[[authority]]
id = "2.16.840.1.113883.3.239.9:101"
name = "Maple Family Health Team"
default = true
${5:-}
[session]
${4:-}
[context]
signing_key = "$WORK/signing.pem"
[audit]
path = "$WORK/audit-$3/audit.jsonl"
[log]
filter = "warn"
CONF
}

# start_gate BINARY NAME: runs ehrgate with $WORK/NAME.toml on CPU $PROXY_CPU (output in
# $WORK/NAME.out and .err), waits until it serves, and prints its pid.
start_gate() {
  taskset -c "$PROXY_CPU" "$1" run --config "$WORK/$2.toml" > "$WORK/$2.out" 2> "$WORK/$2.err" &
  local pid=$!
  for _ in $(seq 100); do grep -q serving "$WORK/$2.out" 2>/dev/null && break; sleep 0.1; done
  grep -q serving "$WORK/$2.out" || { cat "$WORK/$2.err" >&2; exit 1; }
  echo "$pid"
}

# A viewer session, as a browser gets one: launch on the EMR host (from the EMR's own
# page: same-origin), then enter on the viewer's, following the binding round trip
# (enter -> EMR host's confirm -> enter) with a cookie jar, as a browser does.
new_session() { # $1: the EMR session cookie value, $2: the port; prints the __Host-ehrgate value
  local loc jar=$WORK/jar-$1 port=$2
  local resolve=(--resolve "$EMR:$port:127.0.0.1" --resolve "$EHR:$port:127.0.0.1")
  rm -f "$jar"
  loc=$(curl -sk "${resolve[@]}" -c "$jar" -H "Cookie: JSESSIONID=$1" -H "Sec-Fetch-Site: same-origin" \
    -o /dev/null -w '%{redirect_url}' \
    "https://$EMR:$port/oscar/clinicalConnectEHRViewer.do?demographicNo=1001")
  curl -sk "${resolve[@]}" -b "$jar" -c "$jar" -L --max-redirs 5 -o /dev/null "$loc"
  awk -F'\t' '$6 == "__Host-ehrgate" { print $7 }' "$jar" | tail -1
}
