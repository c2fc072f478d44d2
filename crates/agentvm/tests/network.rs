//! End-to-end tests of the guest's network (passt). Only loopback
//! listeners that the test starts, and listeners in the guest.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A host listener on 127.0.0.1 that sends `token` to whoever connects.
fn host_token_server(token: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(token.as_bytes());
        }
    });
    port
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn guest_has_an_address_route_and_dns_but_not_the_hosts_loopback() {
    let port = host_token_server("HOST-LOOPBACK-TOKEN");
    let script = format!(
        "ip -o -4 addr show dev eth0 | grep -o 'inet [0-9./]*'; ip route | grep -c '^default via'; \
         grep '^nameserver' /etc/resolv.conf; \
         timeout 5 bash -c 'cat < /dev/tcp/10.0.2.2/{port}' 2>&1; \
         timeout 5 bash -c 'cat < /dev/tcp/host.agentvm.internal/{port}' 2>&1; true"
    );
    let out = Launch::new().shell(&script).run();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(text.contains("inet 10.0.2.15/24"), "{text}");
    assert!(text.lines().any(|l| l == "1"), "no default route: {text}");
    assert!(text.contains("nameserver 10.0.2.3"), "{text}");
    assert!(!text.contains("HOST-LOOPBACK-TOKEN"), "the guest reached the host's loopback: {text}");
}

#[test]
fn published_port_reaches_a_server_in_the_guest() {
    let host_port = free_port();
    let l = Launch::new();
    let script = "cd /tmp && echo GUEST-SERVER-TOKEN > t && touch /work/ready && exec timeout 120 python3 -m http.server 8000";
    let mut child = l
        .command_with(&["run", "--memory", "512M", "-p", &format!("{host_port}:8000"), "shell", "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !l.work.join("ready").exists() {
        assert!(Instant::now() < deadline, "the guest never started");
        assert!(child.try_wait().unwrap().is_none(), "agentvm exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut body = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !body.contains("GUEST-SERVER-TOKEN") {
        assert!(Instant::now() < deadline, "the published port never answered: {body:?}");
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", host_port)) {
            let _ = s.write_all(b"GET /t HTTP/1.0\r\n\r\n");
            body.clear();
            let _ = s.read_to_string(&mut body);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(l.leftover_processes().is_empty(), "{:?}", l.leftover_processes());
}

#[test]
fn network_none_leaves_only_loopback() {
    let l = Launch::new();
    let out = l
        .command_with(&["run", "--memory", "512M", "--network", "none", "shell", "--", "sh", "-c", "ls /sys/class/net"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "lo\n");
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
    for (args, needle) in cases {
        let l = Launch::new();
        let started = Instant::now();
        let mut all = vec!["run".to_string()];
        all.extend(args.clone());
        all.push("shell".into());
        let out = l.command_with(&all).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(stderr(&out).contains(&needle), "{args:?}: {}", stderr(&out));
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?} was slow");
    }
}
