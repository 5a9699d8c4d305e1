//! The command line: `tproxyd check` and config errors as a user sees them.

use std::path::PathBuf;
use std::process::{Command, Output};

use tempfile::TempDir;

fn tproxyd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tproxyd"))
        .args(args)
        .output()
        .expect("running tproxyd")
}

/// A directory of this test's own, removed when it is dropped (tests run in
/// parallel: a shared directory let two tests overwrite each other's files).
fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("tproxyd-cli-")
        .tempdir()
        .expect("temp dir")
}

fn write_config(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tproxyd.toml");
    let out = tproxyd(&["check", "--config", example]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
}

#[test]
fn check_rejects_a_bad_config_with_file_line_and_column() {
    let dir = scratch();
    let path = write_config(
        &dir,
        "bad.toml",
        "mark = 255\n\n[relay]\nlisten = [\"0.0.0.0:15353\"]\nidle_timeout = \"forever\"\n",
    );
    let out = tproxyd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:5:16: ", path.display());
    assert!(stderr.starts_with(&expected), "expected {expected:?}, got {stderr:?}");
    assert!(stderr.contains("invalid duration"), "{stderr}");
}

#[test]
fn check_rejects_unknown_keys() {
    let dir = scratch();
    let path = write_config(
        &dir,
        "typo.toml",
        "[relay]\nlisten = [\"0.0.0.0:1\"]\nidle_timout = \"5s\"\n",
    );
    let out = tproxyd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with(&format!("{}:3:1: ", path.display())), "{stderr}");
    assert!(stderr.contains("idle_timout"), "{stderr}");
}

#[test]
fn running_with_a_bad_config_refuses_to_start() {
    let dir = scratch();
    let path = write_config(&dir, "bad-run.toml", "mark = 0\n");
    let out = tproxyd(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":1:8: mark must not be 0"));
}

#[test]
fn check_loads_the_files_the_config_names() {
    let dir = scratch();
    let path = write_config(
        &dir,
        "lists.toml",
        "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n\
         [[dns.rules]]\nlists = [\"/nonexistent/blocklist.txt\"]\naction = \"block\"\n",
    );
    let out = tproxyd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // At the line naming the file, with the reason once.
    let expected = format!(
        "{}:5:10: cannot read list file /nonexistent/blocklist.txt: No such file or directory",
        path.display()
    );
    assert!(stderr.starts_with(&expected), "expected {expected:?}, got {stderr:?}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn missing_hosts_and_ca_files_are_reported_where_the_config_names_them() {
    let dir = scratch();
    for (text, at, what) in [
        (
            "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n\
             [[dns.rules]]\nhosts = [\"/nonexistent/hosts\"]\naction = \"answer\"\n",
            "5:10",
            "cannot read hosts file /nonexistent/hosts: No such file or directory",
        ),
        (
            "[dns]\n[dns.upstreams.default]\nservers = [\"tls://198.51.100.53\"]\ntls_name = \"dns.example\"\n\
             ca_file = \"/nonexistent/ca.pem\"\n",
            "5:11",
            "cannot read CA file /nonexistent/ca.pem: No such file or directory",
        ),
    ] {
        let path = write_config(&dir, "files.toml", text);
        let out = tproxyd(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected = format!("{}:{at}: {what}", path.display());
        assert!(stderr.starts_with(&expected), "expected {expected:?}, got {stderr:?}");
        assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    }
}

#[test]
fn a_bare_address_where_a_cidr_is_expected_says_what_to_write() {
    let dir = scratch();
    for (text, line, needle) in [
        (
            "[[relay.rules]]\nclients = [\"192.0.2.32\"]\naction = \"drop\"\n",
            2,
            "\"192.0.2.32\" is an address: expected a CIDR such as 192.0.2.32/32",
        ),
        (
            "[[relay.rules]]\ndestinations = [\"2001:db8::7\"]\naction = \"drop\"\n",
            2,
            "expected a CIDR such as 2001:db8::7/128",
        ),
        (
            "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n\
             [[dns.rules]]\nclients = [\"192.0.2.0/24\", \"192.0.2.32\"]\ndomains = [\"a.example\"]\naction = \"block\"\n",
            5,
            "expected a CIDR such as 192.0.2.32/32",
        ),
    ] {
        let path = write_config(&dir, "cidr.toml", text);
        let out = tproxyd(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(&format!("{}:{line}:", path.display())), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
}

#[test]
fn a_cidr_with_host_bits_set_is_accepted_with_a_warning() {
    let dir = scratch();
    let path = write_config(
        &dir,
        "hostbits.toml",
        "[[relay.rules]]\nclients = [\"192.0.2.0/26\", \"192.0.2.33/26\"]\naction = \"drop\"\n",
    );
    let out = tproxyd(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:2:28: warning: \"192.0.2.33/26\" has host bits set: it matches all of 192.0.2.0/26",
        path.display()
    );
    assert!(stderr.starts_with(&expected), "expected {expected:?}, got {stderr:?}");
    assert!(stderr.contains("or 192.0.2.33/32 for the one address"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "only the one with host bits: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
}

#[test]
fn check_warns_when_the_pid_file_cannot_be_written() {
    let dir = scratch();
    let pid = dir.path().join("missing").join("tproxyd.pid");
    let path = write_config(&dir, "pid.toml", &format!("pid_file = {:?}\n", pid.to_str().unwrap()));
    let out = tproxyd(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}: warning: pid_file {}: directory ", path.display(), pid.display());
    assert!(stderr.starts_with(&expected), "expected {expected:?}, got {stderr:?}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("RuntimeDirectory=tproxyd"), "{stderr}");
}

#[test]
fn the_shipped_unit_and_example_agree_on_the_pid_file() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tproxyd.service")).unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tproxyd.toml")).unwrap();
    assert!(unit.lines().any(|l| l == "RuntimeDirectory=tproxyd"), "{unit}");
    assert!(unit.lines().any(|l| l == "DynamicUser=yes"));
    assert!(
        example
            .lines()
            .any(|l| l == "# pid_file = \"/run/tproxyd/tproxyd.pid\""),
        "the example's pid_file must lie in the unit's RuntimeDirectory"
    );
}

#[test]
fn check_rejects_dns_rules_that_cannot_work() {
    for (text, line, needle) in [
        (
            "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n[[dns.rules]]\ndomains = [\"a.lan\"]\naction = \"answer\"\n",
            4,
            "needs a, aaaa, cname or hosts",
        ),
        ("mark = 1\n[dns]\nports = [53]\n", 2, "no upstream group \"default\""),
        (
            "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n[[dns.rules]]\naction = \"forward\"\nupstream = \"nope\"\n",
            6,
            // The same fix as for a missing top-level group, at the rule's `upstream`.
            "6:12: no upstream group \"nope\": add [dns.upstreams.nope] with servers = [...]",
        ),
        (
            "[dns]\n[dns.upstreams.default]\nservers = [\"tls://198.51.100.53\"]\n",
            3,
            "set tls_name",
        ),
        (
            "[dns]\n[dns.upstreams.default]\nservers = [\"dns.example\"]\n",
            3,
            "needs an IP address",
        ),
        (
            "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n[[dns.rules]]\ndomains = [\"bad name\"]\naction = \"block\"\n",
            5,
            "not a valid domain name",
        ),
        (
            "[dns]\nmax_udp_payload = 65535\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n",
            2,
            "max_udp_payload 65535 is above 4096",
        ),
    ] {
        let dir = scratch();
        let path = write_config(&dir, "dnsrule.toml", text);
        let out = tproxyd(&["check", "--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let prefix = format!("{}:{line}:", path.display());
        assert!(stderr.starts_with(&prefix), "expected {prefix}..., got {stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
}

const EXPLAIN_CONFIG: &str = r#"mark = 255

[relay]
listen = ["0.0.0.0:15353"]

[[relay.rules]]
clients = ["192.0.2.32/28"]
action = "direct"
nat = "full-cone"
idle_timeout = "5m"

[[relay.rules]]
ports = ["27000-27100"]
action = "interface"
interface = "wg0"

[dns]
allow = ["192.0.2.0/24"]
[dns.upstreams.default]
servers = ["198.51.100.53", "tls://198.51.100.54"]
tls_name = "dns.example"

[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]

[[dns.rules]]
clients = ["192.0.2.64/26"]
lists = ["LIST"]
action = "block"
"#;

fn explain(args: &[&str]) -> String {
    let dir = scratch();
    let list = write_config(&dir, "explain-list.txt", "||games.example^\nads.example\n");
    let cfg = write_config(
        &dir,
        "explain.toml",
        &EXPLAIN_CONFIG.replace("LIST", list.to_str().unwrap()),
    );
    let mut all = vec!["explain", "--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = tproxyd(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).replace(cfg.to_str().unwrap(), "CFG")
}

#[test]
fn explain_says_which_dns_rule_decides_and_what_the_answer_is() {
    let blocked = explain(&["--client", "192.0.2.70", "--query", "www.games.example", "A"]);
    assert!(blocked.contains("rule 2 (CFG:28, 2 names) matches: block"), "{blocked}");
    assert!(blocked.contains("→ NXDOMAIN, no records"), "{blocked}");

    let adult = explain(&["--client", "192.0.2.10", "--query", "www.games.example"]);
    assert!(adult.contains("no rule matches"), "{adult}");
    assert!(
        adult.contains("forwarded to upstream group \"default\" (udp://198.51.100.53:53, tls://198.51.100.54:853)"),
        "{adult}"
    );

    let printer = explain(&["--query", "printer.lan", "AAAA"]);
    assert!(printer.contains("rule 1 (CFG:23, 1 name) matches: answer"), "{printer}");
    assert!(printer.contains("→ NOERROR, no records"), "{printer}");
    let printer_a = explain(&["--query", "printer.lan"]);
    assert!(printer_a.contains("printer.lan. 300 A 192.0.2.50"), "{printer_a}");

    let stranger = explain(&["--client", "203.0.113.9", "--query", "printer.lan"]);
    assert!(stranger.contains("203.0.113.9 is outside dns.allow"), "{stranger}");
    assert!(stranger.contains("→ REFUSED, no records"), "{stranger}");
}

#[test]
fn explain_says_which_flow_rule_decides_and_where_the_flow_goes() {
    let console = explain(&["--client", "192.0.2.33:5000", "--dst", "198.51.100.7:27015"]);
    assert!(console.contains("rule 1 (CFG:6) matches"), "{console}");
    assert!(console.contains("NAT full-cone"), "{console}");
    assert!(console.contains("idle timeout 300s"), "{console}");

    let game = explain(&["--client", "192.0.2.10", "--dst", "198.51.100.7:27015"]);
    assert!(game.contains("rule 2 (CFG:12) matches"), "{game}");
    assert!(game.contains("through interface wg0"), "{game}");

    let other = explain(&["--dst", "198.51.100.7:443"]);
    assert!(other.contains("no rule matches: the defaults apply"), "{other}");
    assert!(other.contains("direct to the original destination"), "{other}");

    let dns = explain(&["--dst", "8.8.8.8:53"]);
    assert!(dns.contains("answered by the DNS engine"), "{dns}");
}
