#!/bin/sh
# The side-by-side benchmark (by hand, as root; not part of CI).
#
#   bench/run.sh                 two rounds; rewrites the generated part of docs/BENCHMARKS.md
#   bench/run.sh --quick         one short round, printed only
#   bench/run.sh --only udp,dns  some sections (udp, latency, flows, mix, dns, domain, blocklist, abuse)
#
# Needs: iperf3 sockperf socat dnsperf dnsmasq dnsdist unbound nstat nftables iproute2.
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: run as root (it builds network namespaces)" >&2; exit 1; }
for cmd in iperf3 sockperf socat dnsperf dnsmasq dnsdist unbound nstat nft ip; do
    command -v "$cmd" >/dev/null || { echo "bench: '$cmd' not found: apt-get install -y iperf3 sockperf socat dnsperf dnsmasq-base dnsdist unbound nftables iproute2" >&2; exit 1; }
done
exec cargo bench --bench lab -- "$@"
