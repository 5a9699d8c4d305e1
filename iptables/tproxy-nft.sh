#!/bin/sh
# Install (up) or remove (down) the TPROXY redirect for tproxyd, nftables flavour.
#
#   iptables/tproxy-nft.sh up      # idempotent: replaces what an earlier `up` left
#   iptables/tproxy-nft.sh down    # removes everything `up` added; safe to repeat
#
# Settings come from the environment (defaults in brackets):
#   TPROXY_PORT   [15353]   tproxyd's relay listen port (config relay.listen)
#   LAN_IF        []        gateway mode: capture UDP arriving on these interfaces
#                           (space-separated), e.g. LAN_IF="br-lan"
#   LOCAL         [0]       1 = local mode: also capture this host's own UDP
#                           (OUTPUT), rerouted through lo by FWMARK
#   FWMARK        [1]       mark that sends captured packets to ROUTE_TABLE
#   SKIP_MARK     [255]     tproxyd's own socket mark (config `mark`): packets
#                           carrying all its bits are never captured (so a
#                           rule's extra mark bits, OR-ed in, are skipped too)
#   ROUTE_TABLE   [100]     policy routing table holding the `local default` route
#   UDP_PORTS     []        capture only these destination ports, e.g. "53,27000-27100";
#                           empty = every UDP port
#   DNS_TCP_PORT  []        also capture TCP to port 53 and deliver it to this port
#   BYPASS4       []        extra IPv4 destinations never captured (CIDRs, space-separated)
#   BYPASS6       []        extra IPv6 destinations never captured
#   DNS_PORTS     [53]      UDP ports of tproxyd's DNS listeners (dns.listen), comma-separated
#   ANTISPOOF     [1]       1 = drop UDP to this host's DNS_PORTS whose source is not routed
#                           back through the interface it came in on (strict reverse path):
#                           nobody on the WAN can pose as a LAN client (and empty its
#                           dns.rate_limit bucket). 0 = leave it to the kernel's rp_filter
#   FAMILIES      [4 6]     which IP families to set up
#   NFT_TABLE     [tproxyd] name of the nftables table (inet family)
#
# Captured traffic fails closed: while tproxyd is not running, it is dropped,
# not forwarded around the proxy. Run `down` to stop capturing.
set -eu

TPROXY_PORT=${TPROXY_PORT:-15353}
LAN_IF=${LAN_IF:-}
LOCAL=${LOCAL:-0}
FWMARK=${FWMARK:-1}
SKIP_MARK=${SKIP_MARK:-255}
ROUTE_TABLE=${ROUTE_TABLE:-100}
UDP_PORTS=${UDP_PORTS:-}
DNS_TCP_PORT=${DNS_TCP_PORT:-}
BYPASS4=${BYPASS4:-}
BYPASS6=${BYPASS6:-}
DNS_PORTS=${DNS_PORTS:-53}
ANTISPOOF=${ANTISPOOF:-1}
FAMILIES=${FAMILIES:-4 6}
NFT_TABLE=${NFT_TABLE:-tproxyd}

here=$(dirname "$0")
# tproxyd's auto_rules feeds the library and this script on stdin together.
# shellcheck source-path=SCRIPTDIR source=lib/policy-routing.sh
command -v policy_routing_up >/dev/null 2>&1 || . "$here/lib/policy-routing.sh"

die() { echo "tproxy-nft: $*" >&2; exit 1; }

# "a b c" -> "a, b, c"
commas() { echo "$*" | sed 's/^ *//; s/ *$//; s/  */, /g'; }

has_family() { case " $FAMILIES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

ruleset() {
    bypass4="0.0.0.0/8, 127.0.0.0/8, 224.0.0.0/4, 255.255.255.255/32"
    # shellcheck disable=SC2086 # the lists are meant to split into words
    [ -n "$BYPASS4" ] && bypass4="$bypass4, $(commas $BYPASS4)"
    bypass6="::1/128, fe80::/10, ff00::/8"
    # shellcheck disable=SC2086
    [ -n "$BYPASS6" ] && bypass6="$bypass6, $(commas $BYPASS6)"
    # Ports first: a packet to a port this table does not capture leaves
    # the chain after one set lookup, before the bypass set and the FIB
    # are consulted (and not a second time on the drop rule). Every
    # packet of every capture table on the host runs these chains inside
    # its sender's system call or softirq; the conditions are all
    # `return`s, so their order does not change what is captured.
    ports_first=""
    [ -n "$UDP_PORTS" ] && ports_first="        udp dport != { $(echo "$UDP_PORTS" | sed 's/,/, /g') } return"
    families=""
    has_family 4 && families="ipv4"
    has_family 6 && families="${families:+$families, }ipv6"

    cat <<NFT
table inet $NFT_TABLE {
    set bypass4 { type ipv4_addr; flags interval; elements = { $bypass4 } }
    set bypass6 { type ipv6_addr; flags interval; elements = { $bypass6 } }

    # Decides whether a packet is diverted to tproxyd.
    chain capture {
        meta nfproto != { $families } return
$ports_first
        ip daddr @bypass4 return
        ip6 daddr @bypass6 return
        fib daddr type { local, broadcast, multicast } return
NFT
    if [ -n "$DNS_TCP_PORT" ]; then
        echo "        tcp dport 53 tproxy to :$DNS_TCP_PORT meta mark set $FWMARK accept"
        echo "        tcp dport 53 drop"
    fi
    cat <<NFT
        meta l4proto udp tproxy to :$TPROXY_PORT meta mark set $FWMARK accept
        # No tproxyd socket to take it: drop rather than let captured traffic
        # leak past the proxy (iptables' TPROXY target does the same).
        meta l4proto udp drop
    }

    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
NFT
    if [ "$ANTISPOOF" = 1 ]; then
        # A DNS query to this host must come in where its source lives
        # (strict reverse path; the host's own queries arrive on lo). The
        # rate limit trusts the source address, so a query from "the LAN"
        # arriving on the WAN is a spoofer spending a LAN client's tokens.
        cat <<NFT
        iif != lo udp dport { $(commas "$(echo "$DNS_PORTS" | tr ',' ' ')") } fib daddr type local fib saddr . iif oif missing counter drop comment "tproxyd antispoof"
NFT
    fi
    cat <<NFT
        meta mark & $SKIP_MARK == $SKIP_MARK return
NFT
    for ifname in $LAN_IF; do
        echo "        iifname \"$ifname\" jump capture"
    done
    if [ "$LOCAL" = 1 ]; then
        echo "        iif lo meta mark $FWMARK jump capture"
    fi
    echo "    }"
    if [ "$LOCAL" = 1 ]; then
        tcp=""
        [ -n "$DNS_TCP_PORT" ] && tcp="        tcp dport 53 meta mark set $FWMARK"
        cat <<NFT

    # Local mode: the host's own packets get FWMARK, which reroutes them
    # through lo into prerouting above. tproxyd's own (SKIP_MARK) never do.
    chain output {
        type route hook output priority mangle; policy accept;
        meta mark & $SKIP_MARK == $SKIP_MARK return
        meta nfproto != { $families } return
$ports_first
        ip daddr @bypass4 return
        ip6 daddr @bypass6 return
        fib daddr type { local, broadcast, multicast } return
$tcp
        meta l4proto udp meta mark set $FWMARK
    }
NFT
    fi
    echo "}"
}

down() {
    nft list table inet "$NFT_TABLE" >/dev/null 2>&1 && nft delete table inet "$NFT_TABLE"
    for f in 4 6; do has_family $f && policy_routing_down "$f"; done
    return 0
}

up() {
    [ -n "$LAN_IF" ] || [ "$LOCAL" = 1 ] || die "nothing to capture: set LAN_IF (gateway mode) and/or LOCAL=1 (local mode)"
    command -v nft >/dev/null || die "nft not found (apt-get install nftables)"
    down
    ruleset | nft -f - || die "nft refused the ruleset (run with 'print' to see it)"
    for f in 4 6; do has_family $f && policy_routing_up "$f"; done
    return 0
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    print) ruleset ;;
    *) echo "usage: $0 up|down|print  (settings via environment; see the header of this file)" >&2; exit 2 ;;
esac
