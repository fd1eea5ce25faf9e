# Sourced by scripts/test.sh: a throw-away three-member etcd cluster for the
# etcd store's tests, every member on loopback with mutual TLS for clients
# and peers, its files in a temp dir, stopped (and removed) by
# etcd_env_stop, which the caller runs on exit. Exports where it is:
#   CUTOVER_TEST_ETCD_ENDPOINTS  https://127.0.0.1:PORT,... (the 3 members)
#   CUTOVER_TEST_ETCD_CA         the CA that signed every certificate (PEM)
#   CUTOVER_TEST_ETCD_CERT       a client certificate, CN cutover-coordinator
#   CUTOVER_TEST_ETCD_KEY        its private key (PEM, PKCS#8)
#   CUTOVER_TEST_ETCD_MEMBERS    a file with one line per member:
#                                NAME PID CLIENT_URL PEER_URL DATA_DIR LOG
# so a test can kill a member and start it again: beside that file,
# NAME.cmd runs that member in the foreground exactly as it was first
# started (`DIR/NAME.cmd &`), appending to its log. Its data dir already
# holds the cluster, so etcd ignores the --initial-cluster flags and the
# member rejoins. etcd_env_stop also stops members started that way.
# Debian's etcd-server and etcd-client are installed where missing (as
# root); the package's own etcd is not used, and stopped if the install
# started it.

etcd_env_dir=""

etcd_env_install() { # packages...
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: etcd is missing (Debian packages $*); install them, or run this as root on Debian" >&2
    return 1
  fi
  echo "installing $*" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The pids of the running etcd processes, one a line.
etcd_env_etcd_pids() {
  local exe pid
  for exe in /proc/[0-9]*/exe; do
    pid=${exe#/proc/}
    pid=${pid%/exe}
    case "$(readlink "$exe" 2>/dev/null)" in
      */etcd) echo "$pid" ;;
    esac
  done
  return 0
}

# The pids of our members: every process with a data dir in our temp dir,
# whoever started it (a test restarting a member too).
etcd_env_own_pids() {
  local cmdline pid args
  for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}
    pid=${pid%/cmdline}
    if [ "$pid" = "$$" ] || [ "$pid" = "$BASHPID" ]; then continue; fi
    mapfile -d '' args 2>/dev/null <"$cmdline" || continue
    case " ${args[*]:-} " in
      *" --data-dir=$etcd_env_dir/"*) echo "$pid" ;;
    esac
  done
  return 0
}

# SIGTERM, then SIGKILL for what is still there after 10 s.
etcd_env_kill() { # pids...
  [ $# -gt 0 ] || return 0
  local pid
  kill "$@" 2>/dev/null || true
  for _ in $(seq 100); do
    sleep 0.1
    for pid in "$@"; do
      # A zombie is dead: only its parent's wait is missing.
      if kill -0 "$pid" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
        continue 2
      fi
    done
    return 0
  done
  kill -9 "$@" 2>/dev/null || true
}

# Installing etcd-server may start the package's own etcd (on
# 127.0.0.1:2379, as the etcd user, through systemd or its init script)
# where nothing forbids it: stopped, so only our members run. Not with
# `/etc/init.d/etcd stop`: that SIGKILLs every /usr/bin/etcd on the
# machine after 30 s, whoever started it.
etcd_env_stop_system() { # pids of etcd that ran before the install
  local before=" $* " pid started=()
  for pid in $(etcd_env_etcd_pids); do
    case "$before" in *" $pid "*) continue ;; esac
    # Another run's members, started meanwhile, are not the package's.
    if [ "$(stat -c %U "/proc/$pid" 2>/dev/null)" = etcd ]; then started+=("$pid"); fi
  done
  [ ${#started[@]} -gt 0 ] || return 0
  echo "installing etcd-server started the system's etcd (pid ${started[*]}, on 127.0.0.1:2379); stopping it, the tests run their own" >&2
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    # Through its unit: a unit whose process is killed is restarted.
    systemctl stop etcd.service >/dev/null 2>&1 || true
  fi
  etcd_env_kill "${started[@]}"
}

etcd_env_wait() { # what, seconds, command...
  local what=$1 deadline=$((SECONDS + $2)) dead
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$what did not come up" >&2
      return 1
    fi
    # A member that exited (a port taken, a bad flag) will not come up.
    dead=$(etcd_env_dead)
    if [ -n "$dead" ]; then
      echo "$what did not come up: $dead exited" >&2
      return 1
    fi
    sleep 0.2
  done
}

# The names of the members (from the members file) whose process is gone,
# on one line.
etcd_env_dead() {
  local name pid _ dead=()
  while read -r name pid _; do
    kill -0 "$pid" 2>/dev/null || dead+=("$name")
  done <"$etcd_env_dir/members"
  echo "${dead[*]}"
}

# Every member answers, over mutual TLS.
etcd_env_healthy() (
  # An ETCDCTL_* variable that sets a flag given here is an error.
  unset "${!ETCDCTL_@}"
  ETCDCTL_API=3 etcdctl --endpoints="$CUTOVER_TEST_ETCD_ENDPOINTS" \
    --cacert="$CUTOVER_TEST_ETCD_CA" --cert="$CUTOVER_TEST_ETCD_CERT" --key="$CUTOVER_TEST_ETCD_KEY" \
    --dial-timeout=2s --command-timeout=3s endpoint health
)

# A CA, one certificate every member serves and dials its peers with
# (127.0.0.1 and localhost, server and client use), and the tests' client
# certificate; EC P-256, valid for two days.
etcd_env_certs() {
  local dir=$etcd_env_dir/tls name
  mkdir -m 700 "$dir"
  cat >"$dir/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
  for name in ca server client; do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/$name.key" 2>/dev/null || return 1
    chmod 600 "$dir/$name.key"
  done
  openssl req -new -x509 -config "$dir/openssl.cnf" -extensions ca -key "$dir/ca.key" \
    -subj "/CN=cutover test etcd CA" -days 2 -out "$dir/ca.pem" || return 1
  local cn
  for name in server client; do
    cn=cutover-etcd
    [ "$name" = server ] || cn=cutover-coordinator
    openssl req -new -config "$dir/openssl.cnf" -key "$dir/$name.key" -subj "/CN=$cn" -out "$dir/$name.csr" || return 1
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days 2 \
      -extfile "$dir/openssl.cnf" -extensions "$name" -out "$dir/$name.pem" 2>/dev/null || return 1
  done
}

# Six free ports on loopback, none of them etcd's own 2379 and 2380: picked
# below the kernel's ephemeral range, so no outgoing connection (the
# members dialing each other) takes one between the pick and the listen.
etcd_env_ports() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
picked = []
while len(picked) < 6:
    port = random.randrange(20000, low) if low > 21000 else 0
    if port in (2379, 2380):
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    picked.append(s)
print(" ".join(str(s.getsockname()[1]) for s in picked))
PY
}

etcd_env_start() {
  if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
    local before
    before=$(etcd_env_etcd_pids)
    # etcdctl is in etcd-client.
    etcd_env_install etcd-server etcd-client || return 1
    if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
      echo "error: installing etcd-server and etcd-client gave no etcd or etcdctl" >&2
      return 1
    fi
    # shellcheck disable=SC2086 # one pid a word
    etcd_env_stop_system $before
  fi
  command -v openssl >/dev/null 2>&1 || {
    echo "error: openssl is missing (Debian package openssl), needed for the etcd test certificates" >&2
    return 1
  }
  etcd_env_dir=$(mktemp -d /tmp/cutover-etcd.XXXXXX)
  etcd_env_certs || { echo "error: openssl could not make the etcd test certificates" >&2; return 1; }
  local tls=$etcd_env_dir/tls picked ports etcd
  picked=$(etcd_env_ports) || return 1
  read -ra ports <<<"$picked"
  etcd=$(command -v etcd)
  local names=(etcd1 etcd2 etcd3) i cluster="" endpoints=""
  for i in 0 1 2; do
    cluster+="${cluster:+,}${names[i]}=https://127.0.0.1:${ports[i * 2 + 1]}"
    endpoints+="${endpoints:+,}https://127.0.0.1:${ports[i * 2]}"
  done
  # Defaults kept (heartbeat, election, fsync; 3.4 has no
  # --unsafe-no-fsync anyway): the tests' failover is etcd's own. The token
  # is the temp dir's, so members of another run can never join this
  # cluster.
  local name client peer data log cmd
  : >"$etcd_env_dir/members"
  for i in 0 1 2; do
    name=${names[i]}
    client=https://127.0.0.1:${ports[i * 2]}
    peer=https://127.0.0.1:${ports[i * 2 + 1]}
    data=$etcd_env_dir/$name.data
    log=$etcd_env_dir/$name.log
    cmd=$etcd_env_dir/$name.cmd
    # --data-dir=DIR as one word: etcd_env_own_pids finds members by it.
    # zap: 3.4's default logger, capnslog, warns that it is deprecated.
    # Metrics stay on the client port (no --listen-metrics-urls).
    {
      echo '#!/usr/bin/env bash'
      # etcd 3.4 refuses to start when an ETCD_* variable in the caller's
      # environment (ETCD_NAME, say) sets a flag it is also given.
      # shellcheck disable=SC2016 # expanded when the member starts
      printf 'unset "${!ETCD_@}"; exec'
      printf ' %q' "$etcd" --name="$name" --data-dir="$data" --logger=zap --log-outputs=stderr \
        --listen-client-urls="$client" --advertise-client-urls="$client" \
        --listen-peer-urls="$peer" --initial-advertise-peer-urls="$peer" \
        --initial-cluster="$cluster" --initial-cluster-state=new \
        --initial-cluster-token="cutover-test-${etcd_env_dir##*.}" \
        --client-cert-auth --trusted-ca-file="$tls/ca.pem" \
        --cert-file="$tls/server.pem" --key-file="$tls/server.key" \
        --peer-client-cert-auth --peer-trusted-ca-file="$tls/ca.pem" \
        --peer-cert-file="$tls/server.pem" --peer-key-file="$tls/server.key"
      printf ' >>%q 2>&1\n' "$log"
    } >"$cmd"
    chmod 700 "$cmd"
    "$cmd" </dev/null &
    echo "$name $! $client $peer $data $log" >>"$etcd_env_dir/members"
  done
  export CUTOVER_TEST_ETCD_ENDPOINTS=$endpoints
  export CUTOVER_TEST_ETCD_CA=$tls/ca.pem
  export CUTOVER_TEST_ETCD_CERT=$tls/client.pem
  export CUTOVER_TEST_ETCD_KEY=$tls/client.key
  export CUTOVER_TEST_ETCD_MEMBERS=$etcd_env_dir/members
  if ! etcd_env_wait "the etcd cluster" 60 etcd_env_healthy; then
    for name in "${names[@]}"; do
      echo "--- $etcd_env_dir/$name.log" >&2
      tail -20 "$etcd_env_dir/$name.log" >&2
    done
    return 1
  fi
  echo "etcd $("$etcd" --version | awk '/^etcd Version/ {print $3}') cluster on $CUTOVER_TEST_ETCD_ENDPOINTS (3 members, mutual TLS, files in $etcd_env_dir)" >&2
}

etcd_env_stop() {
  [ -n "$etcd_env_dir" ] || return 0
  # One member at a time: a leader told to stop hands its leadership to a
  # live member first, and waits 7 s for one stopping at the same time.
  local pid
  for pid in $(etcd_env_own_pids); do etcd_env_kill "$pid"; done
  rm -rf "$etcd_env_dir"
  etcd_env_dir=""
}
