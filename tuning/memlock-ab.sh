#!/usr/bin/env bash
# memlock-ab.sh -- A/B of ringbd with registered buffers (root, or LimitMEMLOCK=infinity)
# against the fallback to unregistered buffers (a non-root user with the default 8 MiB
# RLIMIT_MEMLOCK), on a RAM export so that the disk does not hide the difference.
#
# Usage (as root): tuning/memlock-ab.sh [ROUNDS=3] [SECONDS=5]
#   env: RINGBD_BIN (default target/release/ringbd), USER_ID (default 65534, nobody),
#        WORKLOADS (default "randread:4k:32 randwrite:4k:32 read:1m:8"),
#        EXPORT=memory (default: memory:1G, buffered RAM) or EXPORT=file (a 1 GiB file written
#        here and served with O_DIRECT, where registration saves pinning pages per I/O)
#
# For each round and workload it runs fio's nbd engine against ringbd started (a) as root and
# (b) as USER_ID with `ulimit -l 8192`, alternating a/b, and prints IOPS and server CPU per IO
# (utime+stime of the server from /proc/PID/stat over the fio run). The b server's log shows
# the warning ringbd prints when registration fails. Everything is on a unix socket in a
# private temporary directory; the servers are stopped by PID.
set -euo pipefail

ROUNDS=${1:-3}
SECONDS_PER_JOB=${2:-5}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RINGBD_BIN=${RINGBD_BIN:-$HERE/../target/release/ringbd}
USER_ID=${USER_ID:-65534}
WORKLOADS=${WORKLOADS:-"randread:4k:32 randwrite:4k:32 read:1m:8"}
EXPORT=${EXPORT:-memory}
CLK_TCK=$(getconf CLK_TCK)

[[ $(id -u) -eq 0 ]] || { echo "run as root (it starts one server as root, one as uid $USER_ID)" >&2; exit 1; }
[[ -x $RINGBD_BIN ]] || { echo "no $RINGBD_BIN (cargo build --release)" >&2; exit 1; }

DIR=$(mktemp -d /tmp/memlock-ab.XXXXXX)
chmod 0755 "$DIR"
SRV_PID=
case $EXPORT in
  memory) EXPORT_ARG=memory:1G ;;
  file)
    EXPORT_ARG=$DIR/img
    fio --name=mk --filename="$EXPORT_ARG" --size=1g --rw=write --bs=1m --direct=1 \
      --ioengine=io_uring --iodepth=8 --refill_buffers=1 --output=/dev/null
    chown "$USER_ID" "$EXPORT_ARG" ;;
  *) echo "EXPORT must be memory or file" >&2; exit 2 ;;
esac
cleanup() {
  if [[ -n $SRV_PID ]]; then kill -TERM "$SRV_PID" 2>/dev/null || true; wait "$SRV_PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT

start_server() {  # $1 = a|b
  local sock=$DIR/$1/sock i
  mkdir -p "$DIR/$1"
  if [[ $1 == a ]]; then
    "$RINGBD_BIN" serve --unix "$sock" --log-level warn "$EXPORT_ARG" 2>"$DIR/$1.log" &
  else
    chown "$USER_ID" "$DIR/$1"
    setpriv --reuid="$USER_ID" --regid="$USER_ID" --clear-groups \
      bash -c "ulimit -l 8192 && exec \"$RINGBD_BIN\" serve --unix \"$sock\" --log-level warn \"$EXPORT_ARG\"" \
      2>"$DIR/$1.log" &
  fi
  SRV_PID=$!
  for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && return 0; sleep 0.1; done
  echo "server $1 did not start:" >&2; cat "$DIR/$1.log" >&2; exit 1
}

stop_server() {
  kill -TERM "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "variant,round,workload,iops,srv_cpu_us_per_io"
for ((round = 1; round <= ROUNDS; round++)); do
  for variant in a b; do
    start_server "$variant"
    for w in $WORKLOADS; do
      IFS=: read -r rw bs qd <<<"$w"
      c0=$(cpu_ticks "$SRV_PID")
      out=$(fio --name=ab --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/$variant/sock" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --time_based --runtime="$SECONDS_PER_JOB" \
        --norandommap --output-format=json 2>/dev/null | sed -n '/^{/,$p')
      c1=$(cpu_ticks "$SRV_PID")
      jq -r --arg v "$variant" --arg r "$round" --arg w "$w" --arg c "$((c1 - c0))" --arg hz "$CLK_TCK" \
        '.jobs[0] as $j | ($j.read.total_ios + $j.write.total_ios) as $n |
         "\($v),\($r),\($w),\(($j.read.iops + $j.write.iops) | round),\(($c | tonumber) / ($hz | tonumber) / $n * 1e6 * 100 | round / 100)"' <<<"$out"
    done
    stop_server
  done
done
echo "--- server b (uid $USER_ID, memlock 8 MiB) log:"
cat "$DIR/b.log"
