//! End-to-end tests of container runtimes in the guest (`--cri`): a tiny
//! image made in the guest (no registry is reachable), run as the agent user
//! without sudo, still there in the next run, and a container's port
//! reached from the host through agentvm's own -p.

use agentvm_testkit::servers::free_port;
use agentvm_testkit::*;
use std::time::{Duration, Instant};

/// Writes a docker-archive image (`localhost/mini`: /usr/bin/echo and its
/// libraries) to the path given; every runtime here can load that format.
const MKIMAGE: &str = include_str!("data/mkimage.py");

fn with_mkimage(l: Launch) -> Launch {
    std::fs::write(l.work.join("mkimage.py"), MKIMAGE).unwrap();
    l
}

fn run_script(l: &Launch, cri: &str, script: &str) -> std::process::Output {
    l.agentvm(&["run", "--memory", "2G", "--cri", cri, "shell", "--", "sh", "-c", script])
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn docker_runs_a_local_image_publishes_its_port_and_keeps_the_image() {
    let l = with_mkimage(Launch::new());
    let host_port = free_port();
    // On failure, dockerd's log says why.
    let script = "trap '[ $? -eq 0 ] || tail -n 40 /var/log/dockerd.log >&2' EXIT; set -e; id -nG > /work/groups; \
        python3 /work/mkimage.py /tmp/mini.tar; docker load -q -i /tmp/mini.tar; \
        docker run --rm localhost/mini /usr/bin/echo hello-from-docker > /work/echo.txt; \
        mkdir -p /tmp/www; echo CONTAINER-PORT-TOKEN > /tmp/www/t; \
        docker run -d -p 8000:8000 -v /usr:/usr:ro -v /tmp/www:/www:ro -w /www localhost/mini \
          /usr/bin/python3 -m http.server 8000 > /dev/null; \
        touch /work/ready; exec sleep 300";
    let publish = format!("{host_port}:8000");
    let args = ["run", "--memory", "2G", "--cri", "docker", "-p", &publish, "shell", "--", "sh", "-c", script];
    let child = spawn_until_marker(&l, &args, "ready", Duration::from_secs(300));
    http_get_until(host_port, "/t", "CONTAINER-PORT-TOKEN", Duration::from_secs(60));
    child.signal(libc::SIGTERM);
    let out = child.wait_with_output();
    assert_ne!(out.status.code(), Some(125), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(l.work.join("echo.txt")).unwrap(), "hello-from-docker\n");
    let groups = std::fs::read_to_string(l.work.join("groups")).unwrap();
    assert!(groups.split_whitespace().any(|g| g == "docker"), "{groups}");

    // The next run of the project finds the image on its container disk.
    let next = Launch::new().work_dir(&l.work).same_data_as(&l);
    let out = run_script(&next, "docker", "docker image ls --format '{{.Repository}}'");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).lines().any(|r| r == "localhost/mini"), "{}", stdout(&out));
    l.assert_no_leftovers();

    // cri prune reclaims the disk; the next prune finds none.
    let disks = l.data.join("agentvm/containers");
    assert_eq!(
        std::fs::read_dir(&disks)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("ext4".as_ref()))
            .count(),
        1
    );
    let work = l.work.to_str().unwrap();
    let out = l.agentvm(&["cri", "prune", "-w", work]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("removed "), "{}", stdout(&out));
    assert!(!std::fs::read_dir(&disks).unwrap().any(|e| e.unwrap().path().extension() == Some("ext4".as_ref())));
    let out = l.agentvm(&["cri", "prune", "-w", work]);
    assert!(stdout(&out).starts_with("no container disk"), "{}", stdout(&out));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn podman_and_containerd_with_crun_run_local_images_that_persist() {
    let l = with_mkimage(Launch::new());
    let script = "set -e; echo \"$CONTAINER_HOST\"; python3 /work/mkimage.py /tmp/mini.tar; \
        podman load -q -i /tmp/mini.tar >/dev/null; \
        podman run --rm localhost/mini /usr/bin/echo hello-from-podman; \
        ctr images import /tmp/mini.tar >/dev/null; \
        ctr run --rm localhost/mini:latest c1 /usr/bin/echo hello-from-crun";
    let out = run_script(&l, "podman, crun", script);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "unix:///run/podman/podman.sock\nhello-from-podman\nhello-from-crun\n");

    // Next run: both images are still there, and plain containerd (runc) runs too.
    let next = Launch::new().work_dir(&l.work).same_data_as(&l);
    let script = "set -e; podman image ls --format '{{.Repository}}'; ctr images ls -q; \
        ctr run --rm localhost/mini:latest c2 /usr/bin/echo hello-from-containerd";
    let out = run_script(&next, "podman,containerd", script);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().any(|r| r == "localhost/mini"), "podman lost its image: {text}");
    assert!(text.lines().any(|r| r == "localhost/mini:latest"), "containerd lost its image: {text}");
    assert!(text.ends_with("hello-from-containerd\n"), "{text}");
}

#[test]
fn unknown_runtime_fails_before_boot_naming_it() {
    let l = Launch::new();
    let started = Instant::now();
    let out = l.agentvm(&["run", "--cri", "docker,rkt", "shell"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("container runtime \"rkt\" (from --cri) is unknown"), "{}", stderr(&out));
    let out = l.run_command(l.command_with(&["run", "shell"]).env("ENABLE_CRI", "crio"));
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("does not package CRI-O"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
}
