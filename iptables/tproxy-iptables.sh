#!/bin/sh
# Install (up) or remove (down) the TPROXY redirect for tproxyd, iptables flavour
# (works with iptables-legacy and iptables-nft alike).
#
#   iptables/tproxy-iptables.sh up      # idempotent: replaces what an earlier `up` left
#   iptables/tproxy-iptables.sh down    # removes everything `up` added; safe to repeat
#   iptables/tproxy-iptables.sh print   # shows the commands `up` runs; changes nothing
#
# Settings are the same environment variables as tproxy-nft.sh (see its
# header): TPROXY_PORT LAN_IF LOCAL FWMARK SKIP_MARK ROUTE_TABLE UDP_PORTS
# DNS_TCP_PORT DNS_PORTS ANTISPOOF BYPASS4 BYPASS6 FAMILIES (ANTISPOOF uses the
# rpfilter match), and like it fails closed (the TPROXY
# target drops what no socket takes), plus
#   IPTABLES      [iptables]    e.g. iptables-legacy
#   IP6TABLES     [ip6tables]   e.g. ip6tables-legacy
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
IPTABLES=${IPTABLES:-iptables}
IP6TABLES=${IP6TABLES:-ip6tables}

here=$(dirname "$0")
# shellcheck source-path=SCRIPTDIR source=lib/policy-routing.sh
. "$here/lib/policy-routing.sh"

die() { echo "tproxy-iptables: $*" >&2; exit 1; }
has_family() { case " $FAMILIES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# 1 while printing: ipt shows each command instead of running it.
PRINT=0

# ipt FAMILY ARGS... : the mangle table of that family.
ipt() {
    f=$1; shift
    if [ "$f" = 4 ]; then bin=$IPTABLES; else bin=$IP6TABLES; fi
    if [ "$PRINT" = 1 ]; then
        echo "$bin -w -t mangle $*"
        return 0
    fi
    "$bin" -w -t mangle "$@"
}

# Appends to CHAIN a return for UDP to a port outside UDP_PORTS, when set.
# It comes first (see tproxy-nft.sh): such a packet leaves after one
# match instead of passing every bypass rule and then failing the port
# match; the rules are all returns, so what is captured does not change.
# iptables spells port ranges with ':'.
ports_first() {
    f=$1; chain=$2
    [ -n "$UDP_PORTS" ] || return 0
    ipt "$f" -A "$chain" -p udp -m multiport ! --dports "$(echo "$UDP_PORTS" | tr '-' ':')" -j RETURN
}

down_family() {
    f=$1
    while ipt "$f" -D PREROUTING -j TPROXYD_PRE 2>/dev/null; do :; done
    while ipt "$f" -D OUTPUT -j TPROXYD_OUT 2>/dev/null; do :; done
    for chain in TPROXYD_PRE TPROXYD_OUT TPROXYD_CAPTURE; do
        ipt "$f" -F "$chain" 2>/dev/null || true
        ipt "$f" -X "$chain" 2>/dev/null || true
    done
    policy_routing_down "$f"
}

# Appends "never capture" rules for reserved and BYPASS destinations to CHAIN.
bypass_rules() {
    f=$1; chain=$2
    if [ "$f" = 4 ]; then
        nets="0.0.0.0/8 127.0.0.0/8 224.0.0.0/4 255.255.255.255/32 $BYPASS4"
    else
        nets="::1/128 fe80::/10 ff00::/8 $BYPASS6"
    fi
    for net in $nets; do ipt "$f" -A "$chain" -d "$net" -j RETURN; done
    ipt "$f" -A "$chain" -m addrtype --dst-type LOCAL -j RETURN
    if [ "$f" = 4 ]; then ipt "$f" -A "$chain" -m addrtype --dst-type BROADCAST -j RETURN; fi
}

# The rules of one family (what `up` adds after clearing, and `print` shows).
rules_family() {
    f=$1
    {
        ipt "$f" -N TPROXYD_CAPTURE
        ports_first "$f" TPROXYD_CAPTURE
        bypass_rules "$f" TPROXYD_CAPTURE
        if [ -n "$DNS_TCP_PORT" ]; then
            ipt "$f" -A TPROXYD_CAPTURE -p tcp --dport 53 -j TPROXY --on-port "$DNS_TCP_PORT" --tproxy-mark "$FWMARK"
        fi
        ipt "$f" -A TPROXYD_CAPTURE -p udp -j TPROXY --on-port "$TPROXY_PORT" --tproxy-mark "$FWMARK"

        ipt "$f" -N TPROXYD_PRE
        if [ "$ANTISPOOF" = 1 ]; then
            # A DNS query to this host must come in where its source lives
            # (strict reverse path): see ANTISPOOF in tproxy-nft.sh.
            ipt "$f" -A TPROXYD_PRE ! -i lo -p udp -m multiport --dports "$DNS_PORTS" \
                -m addrtype --dst-type LOCAL -m rpfilter --invert -j DROP
        fi
        ipt "$f" -A TPROXYD_PRE -m mark --mark "$SKIP_MARK/$SKIP_MARK" -j RETURN
        for ifname in $LAN_IF; do
            ipt "$f" -A TPROXYD_PRE -i "$ifname" -j TPROXYD_CAPTURE
        done
        if [ "$LOCAL" = 1 ]; then
            ipt "$f" -A TPROXYD_PRE -i lo -m mark --mark "$FWMARK" -j TPROXYD_CAPTURE
        fi
        ipt "$f" -I PREROUTING -j TPROXYD_PRE

        if [ "$LOCAL" = 1 ]; then
            ipt "$f" -N TPROXYD_OUT
            ipt "$f" -A TPROXYD_OUT -m mark --mark "$SKIP_MARK/$SKIP_MARK" -j RETURN
            ports_first "$f" TPROXYD_OUT
            bypass_rules "$f" TPROXYD_OUT
            if [ -n "$DNS_TCP_PORT" ]; then
                ipt "$f" -A TPROXYD_OUT -p tcp --dport 53 -j MARK --set-mark "$FWMARK"
            fi
            ipt "$f" -A TPROXYD_OUT -p udp -j MARK --set-mark "$FWMARK"
            ipt "$f" -I OUTPUT -j TPROXYD_OUT
        fi
    }
}

up_family() {
    f=$1
    down_family "$f"
    rules_family "$f"
    policy_routing_up "$f"
}

print_family() {
    f=$1
    if [ "$f" = 4 ]; then any=0.0.0.0/0; else any=::/0; fi
    echo "# IPv$f"
    PRINT=1
    rules_family "$f"
    PRINT=0
    echo "ip -$f rule add fwmark $FWMARK lookup $ROUTE_TABLE"
    echo "ip -$f route replace local $any dev lo table $ROUTE_TABLE"
}

case "${1:-}" in
    up)
        [ -n "$LAN_IF" ] || [ "$LOCAL" = 1 ] || die "nothing to capture: set LAN_IF (gateway mode) and/or LOCAL=1 (local mode)"
        command -v "$IPTABLES" >/dev/null || die "$IPTABLES not found (apt-get install iptables)"
        for f in 4 6; do has_family $f && up_family $f; done
        ;;
    down)
        for f in 4 6; do has_family $f && down_family $f; done
        ;;
    print)
        for f in 4 6; do has_family $f && print_family $f; done
        ;;
    *) echo "usage: $0 up|down|print  (settings via environment; see the header of this file)" >&2; exit 2 ;;
esac
exit 0
