#!/bin/sh
# CPU time tproxyd spends per relayed datagram, for one or more builds of
# it, at a fixed offered load every build sustains without loss. On a busy
# machine this is steadier than peak throughput: other processes delay
# tproxyd, but they do not add to its own CPU time.
#
#   bench/cpu-per-datagram.sh BINARY...     (as root; e.g. the release and
#                                            release-small builds)
#
# A BINARY of the form floor:LAB[,ARG...] runs the bench's relay floor
# instead (LAB is the bench binary, target/release/deps/lab-HASH; ARGs
# such as --threads,2 or --busy go to the floor, commas for spaces): the
# same kernel calls as tproxyd's fast path and nothing else.
#
# Environment: RATE [20000] datagrams/s, SECS [10], SIZE [64] bytes,
# ROUNDS [3] (the builds take turns, round by round), MODE:
#   forward  [default] iperf3 client → server through tproxyd
#   reverse  iperf3 -R: the server sends, through a pooled upstream socket
#            and a reply socket
#   pingpong sockperf ping-pong, one 64-byte request in flight: CPU per
#            round trip (two relayed datagrams) and its p50 / p99
#   gso      the client sends GSO trains of TRAIN [16] SIZE-byte datagrams
#            (as QUIC stacks do; python3), which cross the veth whole
#   gso-reverse  the same from the server to the client, through a pooled
#            upstream socket and a reply socket
# WINDOW [4M] is iperf3's socket buffer at both ends; WINDOW= (empty)
# leaves the defaults (~208 KiB), where a receiver scheduled late
# overflows.
# STAT=1 also counts the daemon's epoll_wait, recvmmsg, sendmmsg, futex and write calls
# and context switches over the run (perf stat), printed per datagram (per
# round trip in pingpong).
# PERF=PREFIX also records a call-graph profile of each daemon run into
# PREFIX.ROUND.N.data (perf record -g; N counts the builds given).
# Needs iperf3 (sockperf for pingpong, python3 for gso), nftables, iproute2. Touches
# nothing outside its namespaces.
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "cpu-per-datagram: run as root" >&2; exit 1; }
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
RATE=${RATE:-20000} SECS=${SECS:-10} SIZE=${SIZE:-64} ROUNDS=${ROUNDS:-3} MODE=${MODE:-forward}
WINDOW=${WINDOW-4M}

ID=tpdcpu$$
C=${ID}c G=${ID}g S=${ID}s
TMP=$(mktemp -d)
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for ns in $C $G $S; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

for ns in $C $G $S; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$G" link add lan0 type veth peer name lan0 netns "$C"
ip -n "$G" link add wan0 type veth peer name wan0 netns "$S"
ip -n "$G" addr add 192.0.2.1/24 dev lan0
ip -n "$G" addr add 198.51.100.1/24 dev wan0
ip -n "$C" addr add 192.0.2.10/24 dev lan0
ip -n "$S" addr add 198.51.100.7/24 dev wan0
for ns in "$G" "$C"; do ip -n "$ns" link set lan0 up; done
for ns in "$G" "$S"; do ip -n "$ns" link set wan0 up; done
ip -n "$C" route add default via 192.0.2.1
ip -n "$S" route add default via 198.51.100.1
ip netns exec "$G" sysctl -qw net.ipv4.ip_forward=1
# Only the data port is captured; iperf3's TCP control connection is routed.
ip netns exec "$G" env LAN_IF=lan0 FAMILIES=4 UDP_PORTS=5201,5202 iptables/tproxy-nft.sh up
ip netns exec "$S" iperf3 -s -p 5201 >/dev/null 2>&1 &
PIDS="$PIDS $!"
if [ "$MODE" = pingpong ]; then
    ip netns exec "$S" sockperf sr -i 198.51.100.7 -p 5202 >/dev/null 2>&1 &
    PIDS="$PIDS $!"
fi
if [ "$MODE" = gso ]; then
    # Counts what reaches the server, writing the count as it goes.
    ip netns exec "$S" python3 - "$TMP/count" <<'PY' >/dev/null 2>&1 &
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.bind(('198.51.100.7', 5202))
s.settimeout(0.2)
n, last = 0, time.monotonic()
while True:
    try:
        s.recv(65536)
        n += 1
    except socket.timeout:
        pass
    if time.monotonic() - last > 0.2:
        open(sys.argv[1] + '.new', 'w').write('%d\n' % n)
        os.replace(sys.argv[1] + '.new', sys.argv[1])
        last = time.monotonic()
PY
    PIDS="$PIDS $!"
fi
if [ "$MODE" = gso-reverse ]; then
    # On "go RATE SECS SIZE TRAIN", sends GSO trains to whoever asked,
    # then "done N" (N datagrams sent).
    ip netns exec "$S" python3 - <<'PY' >/dev/null 2>&1 &
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
s.bind(('198.51.100.7', 5202))
while True:
    msg, peer = s.recvfrom(100)
    rate, secs, size, train = (int(a) for a in msg.split()[1:5])
    buf, cmsg = bytes(size * train), [(17, 103, size.to_bytes(2, 'little'))]
    sent, start = 0, time.monotonic()
    while time.monotonic() - start < secs:
        if sent < (time.monotonic() - start) * rate:
            s.sendmsg([buf], cmsg, 0, peer)
            sent += train
        else:
            time.sleep(0.0005)
    time.sleep(0.5)
    s.sendto(b'done %d' % sent, peer)
PY
    PIDS="$PIDS $!"
fi
printf 'mark = 255\nlog_level = "warn"\n[relay]\nlisten = ["0.0.0.0:15353"]\n' > "$TMP/tproxyd.toml"
sleep 0.5

ticks_per_s=$(getconf CLK_TCK)
round=1
while [ "$round" -le "$ROUNDS" ]; do
    for bin in "$@"; do
        case $bin in
        floor:*)
            spec=${bin#floor:}
            fargs=$(case $spec in *,*) echo "${spec#*,}" | tr ',' ' ' ;; esac)
            # shellcheck disable=SC2086 # the floor's arguments, one word each
            ip netns exec "$G" "${spec%%,*}" relay-floor --listen 0.0.0.0:15353 $fargs 2>"$TMP/log" & ;;
        *) ip netns exec "$G" "$bin" --config "$TMP/tproxyd.toml" 2>"$TMP/log" & ;;
        esac
        pid=$!
        sleep 1
        # utime + stime, fields 14 and 15 of /proc/PID/stat (the name in
        # field 2 has no spaces here).
        before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        nbin=$((${nbin:-0} + 1))
        if [ -n "${PERF:-}" ]; then
            perf record -q -g -p "$pid" -o "$PERF.$round.$nbin.data" -- sleep "$SECS" 2>/dev/null &
        fi
        if [ -n "${STAT:-}" ]; then
            perf stat -x, -o "$TMP/stat" -p "$pid" -e syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_sendmmsg,syscalls:sys_enter_futex,syscalls:sys_enter_write,syscalls:sys_enter_sched_yield,net:net_dev_xmit,context-switches,task-clock -- sleep "$SECS" 2>/dev/null &
            statpid=$!
            for ns in $C $G $S; do
                ip netns exec "$ns" nstat -az UdpRcvbufErrors | awk '/UdpRcvbufErrors/ {print $2}' > "$TMP/rcvbuf.$ns"
            done
        fi
        case $MODE in
        gso)
            c0=$(cat "$TMP/count" 2>/dev/null || echo 0)
            out=$(ip netns exec "$C" python3 - "$RATE" "$SECS" "$SIZE" "${TRAIN:-16}" <<'PY'
import socket, sys, time
rate, secs, size, train = (int(a) for a in sys.argv[1:5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
buf, cmsg = bytes(size * train), [(17, 103, size.to_bytes(2, 'little'))]  # SOL_UDP, UDP_SEGMENT
sent, start = 0, time.monotonic()
while time.monotonic() - start < secs:
    if sent < (time.monotonic() - start) * rate:
        s.sendmsg([buf], cmsg, 0, ('198.51.100.7', 5202))
        sent += train
    else:
        time.sleep(0.0005)
print('"packets": %d' % sent)
PY
)
            sleep 1
            got=$(cat "$TMP/count" 2>/dev/null || echo 0)
            out="$out \"lost_packets\": $(( $(echo "$out" | grep -o '[0-9]*$') - got + c0 ))" ;;
        gso-reverse)
            out=$(ip netns exec "$C" python3 - "$RATE" "$SECS" "$SIZE" "${TRAIN:-16}" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.settimeout(int(sys.argv[2]) + 5)
s.sendto(b'go ' + ' '.join(sys.argv[1:5]).encode(), ('198.51.100.7', 5202))
got, sent = 0, 0
while True:
    try:
        msg = s.recv(65536)
    except socket.timeout:
        break
    if msg.startswith(b'done '):
        sent = int(msg.split()[1])
        break
    got += 1
print('"packets": %d "lost_packets": %d' % (sent, sent - got))
PY
) ;;
        pingpong)
            out=$(ip netns exec "$C" sockperf pp -i 198.51.100.7 -p 5202 -m 64 -t "$SECS" --full-rtt 2>&1) ;;
        reverse)
            out=$(ip netns exec "$C" iperf3 -u -c 198.51.100.7 -p 5201 -l "$SIZE" \
                -b "$((RATE * SIZE * 8))" -t "$SECS" ${WINDOW:+-w "$WINDOW"} -R -J) ;;
        *)
            out=$(ip netns exec "$C" iperf3 -u -c 198.51.100.7 -p 5201 -l "$SIZE" \
                -b "$((RATE * SIZE * 8))" -t "$SECS" ${WINDOW:+-w "$WINDOW"} -J) ;;
        esac
        after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        kill -TERM "$pid"; wait "$pid" || true
        if [ -n "${STAT:-}" ]; then
            wait "$statpid" || true
            counts=$(awk -F, '/sys_enter|net_dev_xmit|context-switches|task-clock/ { split($3, e, ":"); k = (e[2] != "" ? e[2] : $3); printf "%s=%s ", (k == "task-clock" ? "task-clock-us" : k), (k == "task-clock" ? $1 * 1000 : $1) }' "$TMP/stat")
            # Where datagrams died: a full socket queue per namespace.
            for ns in $C $G $S; do
                d=$(ip netns exec "$ns" nstat -az UdpRcvbufErrors | awk '/UdpRcvbufErrors/ {print $2}')
                counts="$counts rcvbuf_drops_${ns#"$ID"}=$((${d:-0} - $(cat "$TMP/rcvbuf.$ns")))"
            done
        fi
        if [ "$MODE" = pingpong ]; then
            # "[Valid Duration] RunTime=... ; SentMessages=N ; ReceivedMessages=M"
            trips=$(echo "$out" | grep -o 'ReceivedMessages=[0-9]*' | tail -1 | grep -o '[0-9]*$')
            p50=$(echo "$out" | grep -o 'percentile 50.000 = *[0-9.]*' | grep -o '[0-9.]*$')
            p99=$(echo "$out" | grep -o 'percentile 99.000 = *[0-9.]*' | grep -o '[0-9.]*$')
            awk -v b="$bin" -v r="$round" -v t="$((after - before))" -v hz="$ticks_per_s" -v n="${trips:-0}" \
                -v p50="${p50:-?}" -v p99="${p99:-?}" \
                -v c="${counts:-}" \
                'BEGIN { printf "round %d %s: %d round trips, %.2f s CPU, %.2f us per round trip (%.2f per datagram), RTT p50 %s p99 %s us\n",
                         r, b, n, t / hz, (n > 0 ? t / hz / n * 1e6 : 0), (n > 0 ? t / hz / n / 2 * 1e6 : 0), p50, p99
                         k = split(c, kv, " ")
                         for (i = 1; i <= k; i++) { split(kv[i], x, "="); if (n > 0) printf "    %s per round trip: %.3f\n", x[1], x[2] / n } }'
            continue
        fi
        packets=$(echo "$out" | grep -o '"packets":[[:space:]]*[0-9]*' | tail -1 | grep -o '[0-9]*$')
        lost=$(echo "$out" | grep -o '"lost_packets":[[:space:]]*[0-9]*' | tail -1 | grep -o '[0-9]*$')
        awk -v b="$bin" -v r="$round" -v t="$((after - before))" -v hz="$ticks_per_s" -v p="$packets" -v l="$lost" \
            -v c="${counts:-}" \
            'BEGIN { printf "round %d %s: %d datagrams sent, %d lost, %.2f s CPU, %.2f us per datagram\n",
                     r, b, p, l, t / hz, (p > 0 ? t / hz / p * 1e6 : 0)
                     n = split(c, kv, " ")
                     for (i = 1; i <= n; i++) { split(kv[i], x, "="); if (p > 0) printf "    %s per datagram: %.3f\n", x[1], x[2] / p } }'
    done
    nbin=0
    round=$((round + 1))
done
