# Process handling shared by the scripts that run test servers (garage.sh, azurite.sh, fake-gcs.sh,
# apiserver.sh). Sourced, not run.

# A TCP port on 127.0.0.1 that nothing listens on now, chosen at random below the range the kernel takes outgoing
# connections' ports from (ip_local_port_range): a port the kernel picked (bind to port 0) is in that range, and a
# client connection could take it before the server binds it.
free_port() {
  python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(1000):
    port = random.randint(10000, max(low - 1, 10000))
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
else:
    raise SystemExit("no free port on 127.0.0.1 below %d" % low)
'
}

# spawn DIR NAME COMMAND...: run COMMAND in a session of its own, its output in DIR/NAME.log and its pid in
# DIR/NAME.pid. The command records its own pid: `$!` would name setsid when setsid has to fork.
spawn() {
  local dir=$1 name=$2
  shift 2
  rm -f "$dir/$name.pid"
  setsid sh -c 'echo $$ >"$0"; exec "$@"' "$dir/$name.pid" "$@" >"$dir/$name.log" 2>&1 </dev/null &
  for _ in $(seq 1 100); do
    [ -s "$dir/$name.pid" ] && return 0
    sleep 0.05
  done
  echo "$name did not start" >&2
  return 1
}

# running DIR NAME: whether what was spawned as NAME is alive.
running() { [ -f "$1/$2.pid" ] && kill -0 "$(cat "$1/$2.pid")" 2>/dev/null; }

# fail_with_log DIR NAME MESSAGE: say MESSAGE with the end of NAME's log, and fail.
fail_with_log() {
  echo "$3; the end of its log:" >&2
  tail -20 "$1/$2.log" >&2
  exit 1
}

# stop DIR NAME [SECONDS]: SIGTERM to NAME's session; SIGKILL to whatever still runs SECONDS (default 10) later.
stop() {
  local dir=$1 name=$2 grace=${3:-10} pid
  [ -f "$dir/$name.pid" ] || return 0
  pid=$(cat "$dir/$name.pid")
  kill -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 $((grace * 4))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$dir/$name.pid"
}
