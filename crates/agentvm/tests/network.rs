//! End-to-end tests of the guest's network, each under both back ends
//! (passt and slirp). Only loopback listeners that the test starts, and
//! listeners in the guest.

use agentvm_testkit::servers::{free_port, tcp_counting_server, tcp_token_server};
use agentvm_testkit::*;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A launch using network back end `backend`.
fn launch(backend: &str) -> Launch {
    Launch::new().env("AGENTVM_NET_BACKEND", backend)
}

/// One `#[test]` per back end for each test body `name(backend)`; each
/// boots a VM.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod passt {
            $(#[test] #[ignore = "boots a VM: scripts/test runs it"] fn $name() { super::$name("passt") })*
        }
        mod slirp {
            $(#[test] #[ignore = "boots a VM: scripts/test runs it"] fn $name() { super::$name("slirp") })*
        }
    };
}

both_backends!(
    guest_has_an_address_route_and_dns_and_the_hosts_loopback_only_under_slirp,
    host_port_opens_that_host_port_under_its_name_and_nothing_else,
    published_port_reaches_a_server_in_the_guest,
    network_none_leaves_only_loopback_and_host_ports_still_work,
);

fn guest_has_an_address_route_and_dns_and_the_hosts_loopback_only_under_slirp(backend: &str) {
    let port = tcp_token_server("HOST-LOOPBACK-TOKEN");
    let script = format!(
        "ip -o -4 addr show dev eth0 | grep -o 'inet [0-9./]*'; ip route | grep -c '^default via'; \
         grep '^nameserver' /etc/resolv.conf; \
         timeout 5 bash -c 'cat < /dev/tcp/10.0.2.2/{port}' 2>&1; \
         timeout 5 bash -c 'cat < /dev/tcp/host.agentvm.internal/{port}' 2>&1; true"
    );
    let out = launch(backend).shell(&script).run();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(text.contains("inet 10.0.2.15/24"), "{text}");
    assert!(text.lines().any(|l| l == "1"), "no default route: {text}");
    assert!(text.contains("nameserver 10.0.2.3"), "{text}");
    // Never through the name without --host-port.
    assert!(text.matches("HOST-LOOPBACK-TOKEN").count() <= 1, "{text}");
    if backend == "passt" {
        assert!(!text.contains("HOST-LOOPBACK-TOKEN"), "the guest reached the host's loopback: {text}");
        assert!(!stderr(&out).contains("slirp"), "{}", stderr(&out));
    } else {
        // slirp cannot close it: it is open, and the user is told so.
        assert!(text.contains("HOST-LOOPBACK-TOKEN"), "{text}");
        assert!(
            stderr(&out).contains("warning: the slirp network back end cannot close the host's loopback"),
            "{}",
            stderr(&out)
        );
    }
}

fn host_port_opens_that_host_port_under_its_name_and_nothing_else(backend: &str) {
    let opened = tcp_token_server("OPENED-PORT-TOKEN");
    let closed = tcp_token_server("CLOSED-PORT-TOKEN");
    let counting = tcp_counting_server();
    // 1 MB up, half-close, the answer back: both directions and the EOF.
    let upload = format!(
        "python3 -c \"import socket; s = socket.create_connection(('host.agentvm.internal', {counting})); \
         s.sendall(b'x' * 1000000); s.shutdown(socket.SHUT_WR); print(s.makefile().read())\""
    );
    let script = format!(
        "getent hosts host.agentvm.internal; \
         timeout 5 bash -c 'cat < /dev/tcp/host.agentvm.internal/{opened}' 2>&1; echo; \
         timeout 5 bash -c 'cat < /dev/tcp/host.agentvm.internal/{closed}' 2>&1; \
         {upload}; true"
    );
    let l = launch(backend);
    let (opened, counting) = (opened.to_string(), counting.to_string());
    let args = [
        "run",
        "--memory",
        "512M",
        "--host-port",
        &opened,
        "--host-port",
        &counting,
        "shell",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let out = l.agentvm(&args);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.contains("127.0.2.2       host.agentvm.internal") || text.contains("127.0.2.2 "), "{text}");
    assert!(text.contains("OPENED-PORT-TOKEN"), "{text}");
    assert!(!text.contains("CLOSED-PORT-TOKEN"), "a port that was not opened was reached: {text}");
    assert!(text.contains("GOT 1000000"), "{text}");
    l.assert_no_leftovers();
}

fn published_port_reaches_a_server_in_the_guest(backend: &str) {
    let host_port = free_port();
    let l = launch(backend);
    let script =
        "cd /tmp && echo GUEST-SERVER-TOKEN > t && touch /work/ready && exec timeout 120 python3 -m http.server 8000";
    let publish = format!("{host_port}:8000");
    let args = ["run", "--memory", "512M", "-p", &publish, "shell", "--", "sh", "-c", script];
    let child = spawn_until_marker(&l, &args, "ready", Duration::from_secs(180));
    http_get_until(host_port, "/t", "GUEST-SERVER-TOKEN", Duration::from_secs(60));
    child.signal(libc::SIGTERM);
    let out = child.wait_with_output();
    assert_ne!(out.status.code(), Some(125), "{}", stderr(&out));
    l.assert_no_leftovers();
}

fn network_none_leaves_only_loopback_and_host_ports_still_work(backend: &str) {
    let opened = tcp_token_server("NO-NETWORK-HOST-PORT-TOKEN");
    let script = format!("ls /sys/class/net; timeout 5 bash -c 'cat < /dev/tcp/host.agentvm.internal/{opened}'");
    let opened = opened.to_string();
    let args =
        ["run", "--memory", "512M", "--network", "none", "--host-port", &opened, "shell", "--", "sh", "-c", &script];
    let out = launch(backend).agentvm(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "lo\nNO-NETWORK-HOST-PORT-TOKEN");
}

#[test]
fn bad_or_busy_published_ports_fail_before_boot() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let cases = [
        (vec!["-p".to_string(), "70000:80".into()], "\"70000:80\"".to_string()),
        (vec!["-p".into(), format!("{busy_port}:80")], format!("cannot listen on 127.0.0.1:{busy_port}")),
        (vec!["-p".into(), "18000:80".into(), "-p".into(), "18000:81".into()], "published twice".into()),
        (vec!["--network".into(), "none".into(), "-p".into(), "18001:80".into()], "need the network".into()),
    ];
    let host_ports = [(
        vec!["--host-port".to_string(), "5432".into(), "--host-port".into(), "5432".into()],
        "host port 5432 is given twice".to_string(),
    )];
    for (args, needle) in cases.into_iter().chain(host_ports) {
        let l = Launch::new();
        let started = Instant::now();
        let mut all = vec!["run".to_string()];
        all.extend(args.clone());
        all.push("shell".into());
        let out = l.agentvm(&all);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(stderr(&out).contains(&needle), "{args:?}: {}", stderr(&out));
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?} was slow");
    }
    // Not a port at all: refused by the argument parser in one line that
    // names the flag, with agentvm's own failure status.
    let out = Launch::new().agentvm(&["run", "--host-port", "0", "shell"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("--host-port") && stderr(&out).trim().lines().count() == 1, "{}", stderr(&out));
}
