#!/bin/sh
# tproxyd demo: builds a three-namespace lab (client, gateway, server), puts
# the TPROXY rules from iptables/ on the gateway, starts tproxyd there with an
# embedded config, sends UDP from the client and shows that the reply comes
# back from the server's address although tproxyd relayed it.
#
#   sudo demo/run.sh
#
# Then it does the same for DNS: a device that has 203.0.113.53 hard-coded
# as its resolver is answered by tproxyd's rules (override, block) and
# cache/upstream (dnsmasq in the server namespace), "from" 203.0.113.53.
#
# Needs root (network namespaces), iproute2, nftables, socat, dnsmasq, dig
# and cargo (found under sudo too: rustup's ~/.cargo/bin of root or of
# $SUDO_USER, or $CARGO); tcpdump is used when present. Touches nothing outside its own namespaces,
# which it removes on exit.
set -eu
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }

# The Debian package that provides each tool the demo runs.
for pair in ip:iproute2 nft:nftables socat:socat dnsmasq:dnsmasq-base dig:dnsutils; do
    cmd=${pair%%:*}
    command -v "$cmd" >/dev/null || { echo "demo: '$cmd' not found (apt-get install ${pair#*:})" >&2; exit 1; }
done

# cargo: sudo resets PATH, so rustup's ~/.cargo/bin (root's, or that of the
# user who ran sudo) is not on it. $CARGO, when set, wins.
find_cargo() {
    if [ -n "${CARGO:-}" ]; then echo "$CARGO"; return 0; fi
    if command -v cargo >/dev/null; then command -v cargo; return 0; fi
    for home in "${HOME:-/root}" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)"}; do
        if [ -x "$home/.cargo/bin/cargo" ]; then
            echo "$home/.cargo/bin/cargo"
            return 0
        fi
    done
    return 1
}
CARGO=$(find_cargo) || {
    cat >&2 <<'EOF'
demo: cargo not found. The apt-get line in the README installs the test tools,
not Rust: install a Rust toolchain (1.85 or newer) with rustup (https://rustup.rs)
as your user, then run `sudo demo/run.sh` again (it looks in ~/.cargo/bin of the
user who ran sudo), or point CARGO at it: sudo CARGO=/path/to/cargo demo/run.sh
EOF
    exit 1
}
# rustup's cargo finds its toolchains through RUSTUP_HOME, next to ~/.cargo.
rustup_home=$(dirname "$(dirname "$(dirname "$CARGO")")")/.rustup
if [ -z "${RUSTUP_HOME:-}" ] && [ -d "$rustup_home" ]; then export RUSTUP_HOME="$rustup_home"; fi

# Bold headings on a terminal; plain text in a log or a pipe.
if [ -t 1 ]; then
    step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
    step() { printf '\n== %s\n' "$*"; }
fi

step "Building tproxyd (release; the first build takes a few minutes)"
"$CARGO" build --release
BIN=$PWD/target/release/tproxyd

ID=tpddemo$$
C=${ID}c G=${ID}g S=${ID}s
TMP=$(mktemp -d)
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    sleep 0.2
    for ns in $C $G $S; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

step "Lab: client 192.0.2.10 -- 192.0.2.1 gateway 198.51.100.1 -- 198.51.100.7 server"
for ns in $C $G $S; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$G" link add lan0 type veth peer name lan0 netns "$C"
ip -n "$G" link add wan0 type veth peer name wan0 netns "$S"
ip -n "$G" addr add 192.0.2.1/24 dev lan0
ip -n "$G" addr add 198.51.100.1/24 dev wan0
ip -n "$C" addr add 192.0.2.10/24 dev lan0
ip -n "$S" addr add 198.51.100.7/24 dev wan0
ip -n "$S" addr add 198.51.100.53/24 dev wan0
# shellcheck disable=SC2086 # "ns link" splits into the two arguments
for l in "$G lan0" "$G wan0" "$C lan0" "$S wan0"; do set -- $l; ip -n "$1" link set "$2" up; done
ip -n "$C" route add default via 192.0.2.1
ip netns exec "$G" sysctl -qw net.ipv4.ip_forward=1
echo "(the server has no route to the client: only a proxy on the gateway can answer it)"

step "Gateway: LAN_IF=lan0 DNS_TCP_PORT=15354 iptables/tproxy-nft.sh up"
ip netns exec "$G" env LAN_IF=lan0 DNS_TCP_PORT=15354 FAMILIES=4 iptables/tproxy-nft.sh up
ip netns exec "$G" nft list chain inet tproxyd capture | sed 's/^/    /'

step "Gateway: starting tproxyd"
cat > "$TMP/tproxyd.toml" <<'TOML'
mark = 255
[relay]
listen = ["0.0.0.0:15353"]
idle_timeout = "30s"

[dns]
ports = [53]
allow = ["192.0.2.0/24"]
tcp_listen = ["0.0.0.0:15354"]
[dns.upstreams.default]
servers = ["198.51.100.53"]
[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]
[[dns.rules]]
domains = ["*.ads.example"]
action = "block"
TOML
ip netns exec "$G" "$BIN" --config "$TMP/tproxyd.toml" 2>"$TMP/tproxyd.log" &
PIDS="$PIDS $!"
for _ in $(seq 50); do grep -q "tproxyd ready" "$TMP/tproxyd.log" && break; sleep 0.1; done
sed 's/^/    /' "$TMP/tproxyd.log"

step "Server: UDP echo on 198.51.100.7:7000 (reports who it sees)"
# shellcheck disable=SC2016 # socat's shell expands these, not this one
ip netns exec "$S" socat UDP4-RECVFROM:7000,fork \
    SYSTEM:'echo "    server saw a datagram from $SOCAT_PEERADDR:$SOCAT_PEERPORT" >&2; cat' &
PIDS="$PIDS $!"
sleep 0.3

if command -v tcpdump >/dev/null; then
    ip netns exec "$C" tcpdump -l -n -q -i lan0 -c 2 udp port 7000 2>/dev/null | sed 's/^/    client wire: /' &
    PIDS="$PIDS $!"
    sleep 0.5
fi

step "Client: sends 'hello' to 198.51.100.7:7000 on a connected socket"
echo "(a connected UDP socket only accepts replies whose source is exactly 198.51.100.7:7000)"
reply=$(echo hello | ip netns exec "$C" socat -T 2 - UDP4:198.51.100.7:7000,bind=192.0.2.10:40000)
sleep 0.3
echo "    client got: '$reply'"
[ "$reply" = hello ] || { echo "demo: no reply came back" >&2; cat "$TMP/tproxyd.log" >&2; exit 1; }

step "Server: dnsmasq at 198.51.100.53, the real upstream (www.example.test = 203.0.113.80)"
ip netns exec "$S" dnsmasq --no-daemon --no-resolv --no-hosts --bind-interfaces \
    --listen-address=198.51.100.53 --user=root --local=/example.test/ --local-ttl=300 \
    --host-record=www.example.test,203.0.113.80 --log-queries --log-facility="$TMP/dnsmasq.log" 2>/dev/null &
PIDS="$PIDS $!"
sleep 0.5

step "Client: its resolver is hard-coded to 203.0.113.53, which does not exist here"
for q in "www.example.test" "printer.lan" "tracker.ads.example" "+tcp printer.lan"; do
    echo "    \$ dig @203.0.113.53 $q"
    # shellcheck disable=SC2086 # "+tcp printer.lan" is two arguments
    ip netns exec "$C" dig +time=2 +tries=1 @203.0.113.53 $q | grep -E "status:|^[a-z].*IN|SERVER:" | sed 's/^/      /'
done
echo "    dnsmasq was asked only what no rule answered, by the gateway:"
grep -o "query\[.*" "$TMP/dnsmasq.log" | sed 's/^/      /'

step "Stopping tproxyd (SIGTERM) and its final counters"
kill -TERM "$(pgrep -f "$TMP/tproxyd.toml" | head -1)"
sleep 0.5
grep -o "final counters: .*" "$TMP/tproxyd.log" | tr ' ' '\n' | grep -E "=[1-9]" | sed 's/^/    /'

step "Done: replies came back from the addresses the client asked (198.51.100.7:7000, 203.0.113.53:53), while servers only ever talked to the gateway (198.51.100.1)"
