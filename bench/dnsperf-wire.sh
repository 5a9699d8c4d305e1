#!/bin/sh
# A `dnsperf` in front of the real one, for the DNS section of the bench:
# it records each latency run (the ones with -Q) together with the wire,
# so that a slow answer in dnsperf's own figures can be told apart from a
# slow answer on the wire. Put its directory first in PATH under the name
# `dnsperf`:
#
#   mkdir -p /tmp/wire/bin && cp bench/dnsperf-wire.sh /tmp/wire/bin/dnsperf
#   PATH=/tmp/wire/bin:$PATH WIRE_OUT=/tmp/wire \
#     BENCH_DNS_ONLY="cached,tproxyd (hijacked),dnsdist" \
#     target/release/deps/lab-HASH --quick --only dns
#
# For each latency run WIRE_OUT gets N.txt (dnsperf's output), N.args,
# N.pcap (the client's lan0) and N.gw.pcap (the gateway's interfaces),
# the first 400 packets each. It runs inside the client namespace; the
# gateway namespace is found by the lab's naming (…c → …g).
out=${WIRE_OUT:-/tmp/wire}
mkdir -p "$out"
case "$*" in
*-Q*)
    n=$(date +%s%N)
    me=$(ip netns identify $$)
    gw=${me%c}g
    tcpdump --immediate-mode -i lan0 -n -s 128 -c 400 -w "$out/$n.pcap" >/dev/null 2>&1 &
    client=$!
    ip netns exec "$gw" tcpdump --immediate-mode -i any -n -s 128 -c 400 -w "$out/$n.gw.pcap" >/dev/null 2>&1 &
    gateway=$!
    sleep 0.3
    echo "$*" >"$out/$n.args"
    /usr/bin/dnsperf "$@" | tee "$out/$n.txt"
    kill -INT "$client" "$gateway" 2>/dev/null
    ;;
*) exec /usr/bin/dnsperf "$@" ;;
esac
