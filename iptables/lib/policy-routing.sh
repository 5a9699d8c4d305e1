#!/bin/sh
# Policy routing shared by both rule flavours (sourced, not run).
#
# Packets carrying FWMARK are looked up in ROUTE_TABLE, whose only route says
# "every address is local": that is what lets the kernel deliver a diverted
# packet to tproxyd's socket although it is addressed to a remote host.

policy_routing_up() { # family: 4|6
    f=$1
    if [ "$f" = 4 ]; then any=0.0.0.0/0; else any=::/0; fi
    policy_routing_down "$f"
    ip -"$f" rule add fwmark "$FWMARK" lookup "$ROUTE_TABLE"
    ip -"$f" route replace local "$any" dev lo table "$ROUTE_TABLE"
}

policy_routing_down() { # family: 4|6
    f=$1
    while ip -"$f" rule del fwmark "$FWMARK" lookup "$ROUTE_TABLE" 2>/dev/null; do :; done
    ip -"$f" route flush table "$ROUTE_TABLE" 2>/dev/null || true
}
