use super::*;
use std::path::Path;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("t.toml"))
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_file_gives_defaults() {
    let c = parse("").expect("empty config is valid");
    assert_eq!(c.mark, Mark(0xff));
    assert_eq!(c.relay.listen.0.len(), 2);
    assert_eq!(c.relay.session_capacity.get(), 65_536);
    assert_eq!(c.relay.idle_timeout, Duration::from_secs(120));
}

#[test]
fn relay_section() {
    let c = parse(
        r#"
mark = 7
[relay]
listen = ["127.0.0.1:9000"]
session_capacity = 10
idle_timeout = "1500ms"
reply_sockets = 3
"#,
    )
    .expect("valid");
    assert_eq!(c.mark, Mark(7));
    assert_eq!(c.relay.listen.0, vec!["127.0.0.1:9000".parse().unwrap()]);
    assert_eq!(c.relay.session_capacity.get(), 10);
    assert_eq!(c.relay.idle_timeout, Duration::from_millis(1500));
    assert_eq!(c.relay.reply_sockets.get(), 3);
}

#[test]
fn unknown_key_is_an_error_with_position() {
    let e = error("[relay]\nlisten = [\"0.0.0.0:1\"]\nsession_capacty = 5\n");
    assert!(e.starts_with("t.toml:3:1: "), "{e}");
    assert!(e.contains("session_capacty"), "{e}");
}

#[test]
fn bad_values_point_at_the_value() {
    let e = error("mark = 0\n");
    assert!(e.starts_with("t.toml:1:8: "), "{e}");
    assert!(e.contains("mark must not be 0"), "{e}");

    let e = error("[relay]\nlisten = [\"0.0.0.0:1\", \"nonsense\"]\n");
    assert!(e.starts_with("t.toml:2:"), "{e}");

    let e = error("[relay]\nlisten = []\n");
    assert!(e.contains("at least one address"), "{e}");

    let e = error("[relay]\nlisten = [\"0.0.0.0:0\"]\n");
    assert!(e.contains("port 0"), "{e}");

    let e = error("[relay]\nidle_timeout = \"3 fortnights\"\n");
    assert!(e.starts_with("t.toml:2:16: "), "{e}");

    let e = error("[relay]\nidle_timeout = 0\n");
    assert!(e.contains("greater than zero"), "{e}");

    let e = error("[relay]\nsession_capacity = 0\n");
    assert!(e.starts_with("t.toml:2:"), "{e}");

    let e = error("log_level = \"info,,==\"\n");
    assert!(e.contains("log_level"), "{e}");
}

#[test]
fn syntax_error_has_position() {
    let e = error("mark = \n");
    assert!(e.starts_with("t.toml:1:"), "{e}");
}

#[test]
fn missing_file_names_the_file() {
    let e = Config::load(Path::new("/nonexistent/tproxyd.toml")).unwrap_err();
    assert!(e.to_string().starts_with("/nonexistent/tproxyd.toml: "), "{e}");
}

#[test]
fn shipped_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tproxyd.toml");
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn relay_rules_parse() {
    let c = parse(
        r#"
[relay]
listen = ["0.0.0.0:15353"]
nat = "full-cone"
[[relay.rules]]
clients = ["192.0.2.64/26"]
destinations = ["198.51.100.0/24"]
ports = [3478, "27000-27100"]
family = "ipv4"
action = "redirect"
to = "198.51.100.135:7000"
nat = "symmetric"
idle_timeout = "5m"
[[relay.rules]]
action = "socks5"
socks5 = "198.51.100.135:1080"
username = "u"
password = "p"
[[relay.rules]]
action = "interface"
interface = "wg0"
mark = 512
[[relay.rules]]
ports = ["9"]
action = "drop"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.relay.nat, NatMode::FullCone);
    assert_eq!(c.relay.rules.len(), 4);
    let r = c.relay.rules[0].get_ref();
    assert!(r.ports[1].contains(27050) && !r.ports[1].contains(27101));
    assert_eq!(r.idle_timeout, Some(Duration::from_secs(300)));
}

#[test]
fn relay_rule_mistakes_point_at_the_rule() {
    let cases = [
        ("action = \"redirect\"\n", "needs to ="),
        (
            "action = \"redirect\"\nto = \"198.51.100.7:9\"\nnat = \"full-cone\"\n",
            "full-cone",
        ),
        ("action = \"redirect\"\nto = \"127.0.0.1:15353\"\n", "would loop"),
        ("action = \"direct\"\nto = \"198.51.100.7:9\"\n", "to does not apply"),
        ("action = \"interface\"\n", "needs interface"),
        ("action = \"interface\"\ninterface = \"a/b\"\n", "not a valid interface"),
        ("action = \"socks5\"\n", "needs socks5"),
        (
            "action = \"socks5\"\nsocks5 = \"198.51.100.7:1080\"\nusername = \"u\"\n",
            "go together",
        ),
        ("action = \"drop\"\nmark = 3\n", "mark does not apply"),
    ];
    for (body, needle) in cases {
        let text = format!("[relay]\nlisten = [\"0.0.0.0:15353\"]\n\n[[relay.rules]]\n{body}");
        let e = error(&text);
        assert!(e.starts_with("t.toml:4:1: "), "{body}: {e}");
        assert!(e.contains(needle), "{body}: {e}");
    }
    let e = error("[[relay.rules]]\nports = [\"100-1\"]\naction = \"drop\"\n");
    assert!(e.starts_with("t.toml:2:"), "{e}");
}

#[test]
fn admin_endpoint_is_loopback_only() {
    let c = parse("[admin]\nlisten = \"127.0.0.1:9153\"\n").unwrap();
    assert_eq!(c.admin.unwrap().listen.0.port(), 9153);
    let e = error("[admin]\nlisten = \"0.0.0.0:9153\"\n");
    assert!(
        e.starts_with("t.toml:2:10: ") && e.contains("not a loopback address"),
        "{e}"
    );
}

#[test]
fn auto_rules_are_checked_against_the_rest() {
    assert!(parse("[auto_rules]\nlan_interfaces = [\"br-lan\"]\n").is_ok());
    let e = error("[auto_rules]\n");
    assert!(e.contains("captures nothing"), "{e}");
    let e = error("mark = 3\n[auto_rules]\nlocal = true\nfwmark = 7\n");
    assert!(e.contains("must not carry all bits of mark"), "{e}");
    let e = error("[relay]\nlisten = [\"0.0.0.0:1\", \"[::]:2\"]\n[auto_rules]\nlocal = true\n");
    assert!(e.contains("same port"), "{e}");
}

#[test]
fn dns_max_udp_payload_above_4096_is_refused_at_its_value() {
    let ok = parse("[dns]\nmax_udp_payload = 4096\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n").unwrap();
    assert_eq!(*ok.dns().unwrap().max_udp_payload.get_ref(), 4096);
    let e = error("[dns]\nmax_udp_payload = 65535\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n");
    assert!(e.starts_with("t.toml:2:19: "), "{e}");
    assert!(e.contains("4096"), "{e}");
}

#[test]
fn dns_defaults_allow_only_private_networks_and_bound_the_cache() {
    let c = parse("[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n").unwrap();
    let dns = c.dns().unwrap();
    let allowed = |ip: &str| {
        dns.allow
            .iter()
            .any(|n| n.contains(&ip.parse::<std::net::IpAddr>().unwrap()))
    };
    for ip in [
        "127.0.0.1",
        "10.1.2.3",
        "172.31.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "::1",
        "fd00::1",
        "fe80::1",
    ] {
        assert!(allowed(ip), "{ip}");
    }
    for ip in ["192.0.2.10", "8.8.8.8", "172.32.0.1", "2001:db8::1"] {
        assert!(!allowed(ip), "{ip}");
    }
    assert_eq!(dns.cache.max_bytes, 32 << 20);
    assert_eq!(dns.rate_limit.qps, 200);
    assert_eq!(dns.tcp.max_per_client, 16);
}

#[test]
fn dns_cache_max_bytes_takes_units() {
    let c = |v: &str| {
        parse(&format!(
            "[dns]\n[dns.cache]\nmax_bytes = {v}\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n"
        ))
    };
    assert_eq!(c("1024").unwrap().dns().unwrap().cache.max_bytes, 1024);
    assert_eq!(c("\"512KiB\"").unwrap().dns().unwrap().cache.max_bytes, 512 << 10);
    assert_eq!(c("\"32MiB\"").unwrap().dns().unwrap().cache.max_bytes, 32 << 20);
    let e = c("\"32 parsecs\"").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:3:"), "{e}");
}

#[test]
fn nft_sets_on_dns_rules() {
    let base = "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n";
    let c = parse(&format!(
        "{base}[[dns.rules]]\ndomains = [\"*.game.example\"]\naction = \"forward\"\nnft_set = \"game\"\n\
         [[dns.rules]]\ndomains = [\"voip.example\"]\naction = \"forward\"\nnft_set = [\"voip\", \"game\"]\n"
    ))
    .unwrap();
    let dns = c.dns().unwrap();
    assert_eq!(dns.nft_sets(), vec!["game", "voip"]);
    assert_eq!(dns.nft.table, "tproxyd_dns");
    assert!(dns.nft.wait);
    assert_eq!(dns.names.grace, std::time::Duration::from_secs(300));

    let e = error(&format!(
        "{base}[[dns.rules]]\naction = \"forward\"\nnft_set = \"9lives\"\n"
    ));
    assert!(e.contains(":6:") && e.contains("not a valid set name"), "{e}");
    let e = error(&format!("{base}[[dns.rules]]\naction = \"block\"\nnft_set = \"x\"\n"));
    assert!(e.contains("block rule answers no addresses"), "{e}");
    let e = error(&format!("{base}[dns.nft]\ntable = \"a b\"\n"));
    assert!(e.contains("not a valid nftables table name"), "{e}");
    // The redirect script replaces its table whole: the sets cannot live there.
    let e = error(&format!(
        "{base}[dns.nft]\ntable = \"tproxyd\"\n[[dns.rules]]\naction = \"forward\"\nnft_set = \"x\"\n\
         [auto_rules]\nlan_interfaces = [\"lan0\"]\n"
    ));
    assert!(e.contains("auto_rules' table"), "{e}");
}

#[test]
fn dns_stale_defaults_and_the_rule_opt_out() {
    let base = "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n";
    let c = parse(base).unwrap();
    let stale = &c.dns().unwrap().stale;
    assert!(stale.enabled);
    assert_eq!(stale.answer_after, std::time::Duration::from_millis(1_800));
    assert_eq!(stale.max_age, std::time::Duration::from_secs(86_400));
    assert_eq!(stale.ttl, std::time::Duration::from_secs(30));
    let ok = parse(&format!(
        "{base}[[dns.rules]]\ndomains = [\"a.example\"]\naction = \"forward\"\nstale = false\n"
    ));
    assert_eq!(ok.unwrap().dns().unwrap().rules[0].get_ref().stale, Some(false));
    let e = error(&format!(
        "{base}[[dns.rules]]\ndomains = [\"a.example\"]\naction = \"block\"\nstale = false\n"
    ));
    assert!(e.starts_with("t.toml:4:") && e.contains("forward rules only"), "{e}");
}

#[test]
fn relay_domain_rules_load_their_names() {
    let e = error("[[relay.rules]]\ndomains = [\"*.game.example\"]\naction = \"drop\"\n");
    assert!(e.contains(":1:") && e.contains("add a [dns] section"), "{e}");
    let base = "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n";
    let e = error(&format!(
        "{base}[[relay.rules]]\nlists = [\"/nonexistent/game.txt\"]\naction = \"drop\"\n"
    ));
    assert!(e.contains(":4:") && e.contains("/nonexistent/game.txt"), "{e}");
    let e = error(&format!(
        "{base}[[relay.rules]]\ndomains = [\"not a name\"]\naction = \"drop\"\n"
    ));
    assert!(e.contains("not a valid domain name"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("game.txt");
    std::fs::write(&list, "play.game.example\n||voice.example^\n").unwrap();
    let c = parse(&format!(
        "{base}[[relay.rules]]\ndomains = [\"a.example\"]\nlists = [{:?}]\naction = \"drop\"\n",
        list.display().to_string()
    ))
    .unwrap();
    let names = c.relay.rules[0].get_ref().names.as_ref().unwrap();
    assert!(names.matches("a.example") && names.matches("play.game.example") && names.matches("voice.example"));
    assert!(!names.matches("b.example"));
}

#[test]
fn nice_is_optional_and_must_be_in_the_kernels_range() {
    assert_eq!(parse("").unwrap().nice, None);
    assert_eq!(parse("nice = 0\n").unwrap().nice.map(|n| n.get()), Some(0));
    assert_eq!(parse("nice = -20\n").unwrap().nice.map(|n| n.get()), Some(-20));
    let e = error("nice = -21\n");
    assert!(e.starts_with("t.toml:1:8: "), "{e}");
    assert!(e.contains("between -20 and 19"), "{e}");
    let e = error("nice = 99999999999\n");
    assert!(e.contains("between -20 and 19"), "{e}");
    let e = error("nice = \"high\"\n");
    assert!(e.starts_with("t.toml:1:8: "), "{e}");
}

#[test]
fn own_socket_ports_default_to_dns_and_are_checked() {
    let c = parse("").unwrap();
    assert_eq!(c.relay.own_socket_ports, vec![udp::PortRange { first: 53, last: 53 }]);
    assert_eq!(c.relay.own_socket_idle_timeout, Duration::from_secs(30));
    let c = parse("[relay]\nown_socket_ports = [53, 123, \"5000-5010\"]\nown_socket_idle_timeout = \"10s\"\n").unwrap();
    assert_eq!(c.relay.own_socket_ports.len(), 3);
    assert!(c.relay.own_socket_ports[2].contains(5005));
    assert_eq!(c.relay.own_socket_idle_timeout, Duration::from_secs(10));
    assert!(
        parse("[relay]\nown_socket_ports = []\n")
            .unwrap()
            .relay
            .own_socket_ports
            .is_empty()
    );
    for (value, needle) in [
        ("own_socket_ports = [0]", "invalid port range"),
        ("own_socket_ports = [\"60-50\"]", "invalid port range"),
        ("own_socket_ports = [70000]", "invalid port range"),
        ("own_socket_ports = 53", "invalid type"),
        ("own_socket_idle_timeout = \"0s\"", "greater than zero"),
    ] {
        let e = error(&format!("[relay]\n{value}\n"));
        assert!(e.starts_with("t.toml:2:"), "{value}: {e}");
        assert!(e.contains(needle), "{value}: {e}");
    }
}

#[test]
fn a_rules_own_socket_is_for_symmetric_flows_from_our_sockets() {
    let ok = "[[relay.rules]]\nports = [123]\naction = \"direct\"\nown_socket = true\n\
              [[relay.rules]]\nports = [53]\naction = \"redirect\"\nto = \"198.51.100.53:53\"\nown_socket = false\n";
    let c = parse(ok).unwrap();
    assert_eq!(c.relay.rules[0].get_ref().own_socket, Some(true));
    assert_eq!(c.relay.rules[1].get_ref().own_socket, Some(false));
    let cases = [
        ("action = \"drop\"\nown_socket = true\n", "a dropped flow has no socket"),
        (
            "action = \"socks5\"\nsocks5 = \"198.51.100.7:1080\"\nown_socket = true\n",
            "leaves from the port its proxy picks",
        ),
        (
            "action = \"direct\"\nnat = \"full-cone\"\nown_socket = false\n",
            "a full-cone flow has a socket of its own already",
        ),
        ("action = \"direct\"\nown_socket = \"yes\"\n", "invalid type"),
    ];
    for (body, needle) in cases {
        let e = error(&format!(
            "[relay]\nlisten = [\"0.0.0.0:15353\"]\n\n[[relay.rules]]\n{body}"
        ));
        assert!(e.starts_with("t.toml:"), "{body}: {e}");
        assert!(e.contains(needle), "{body}: {e}");
    }
    // The relay's NAT mode counts when the rule sets none.
    let e = error("[relay]\nnat = \"full-cone\"\n[[relay.rules]]\naction = \"direct\"\nown_socket = true\n");
    assert!(e.starts_with("t.toml:3:1: ") && e.contains("full-cone"), "{e}");
}
