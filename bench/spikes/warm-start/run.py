#!/usr/bin/env python3
"""Warm-start spike (issue 17): boot a template VM to READY, save it, then
restore it twice with fresh helpers and report what each restored VM saw.

    sudo bench/spikes/warm-start/run.py [IMAGE_DIR]

IMAGE_DIR is an agentvm base image (its vmlinux and modules/), by default
the newest base-* in the tests' cache. Needs gcc, cpio, QEMU, passt and
virtiofsd; writes under /tmp/agentvm-warm-spike and /dev/shm."""
import glob, json, os, pwd, secrets, shutil, socket, subprocess, sys, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = "/tmp/agentvm-warm-spike"
MEM = "1024M"
MODULES = ["virtio_mmio", "virtio_balloon", "failover", "net_failover", "virtio_net"]


def build_initramfs(image):
    """init.c, static, with the modules it loads, as a newc cpio."""
    root = os.path.join(WORK, "root")
    os.makedirs(os.path.join(root, "m"))
    for d in ("dev", "proc", "sys"):
        os.makedirs(os.path.join(root, d))
    subprocess.run(["gcc", "-static", "-O2", "-o", os.path.join(root, "init"), os.path.join(HERE, "init.c")], check=True)
    for m in MODULES:
        shutil.copy(os.path.join(image, "modules", m + ".ko"), os.path.join(root, "m"))
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    initrd = os.path.join(WORK, "initrd")
    with open(initrd, "wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names, stdout=out, check=True)
    return initrd


def qmp(path):
    """A QMP session on `path`: a function that runs one command."""
    s = socket.socket(socket.AF_UNIX)
    for _ in range(500):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.01)
    f = s.makefile("rw")
    f.readline()

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r

    cmd("qmp_capabilities")
    return cmd


def wait_migration(cmd):
    while True:
        status = cmd("query-migrate")["return"].get("status")
        if status in ("completed", "failed"):
            return status
        time.sleep(0.005)


def helpers(tag):
    """A fresh passt and virtiofsd in a dir of their own (passt run as
    root drops to nobody, so the dir is nobody's)."""
    d = os.path.join(WORK, tag)
    os.makedirs(os.path.join(d, "share"))
    nobody = pwd.getpwnam("nobody")
    os.chown(d, nobody.pw_uid, nobody.pw_gid)
    open(os.path.join(d, "share", "hello"), "w").write(f"hello from host share {tag}\n")
    passt = subprocess.Popen(["passt", "-f", "-q", "-s", f"{d}/passt.sock", "-a", "10.0.2.15", "-n", "24",
                              "-g", "10.0.2.2", "--no-dhcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs = subprocess.Popen(["virtiofsd", f"--socket-path={d}/fs.sock", f"--shared-dir={d}/share", "--cache=auto",
                           "--sandbox=none"], stderr=subprocess.DEVNULL)
    for sock in ("passt.sock", "fs.sock"):
        while not os.path.exists(os.path.join(d, sock)):
            time.sleep(0.01)
    return d, [passt, fs]


def tsc_khz():
    """The host's TSC rate, as agentvm passes it: under TCG the microvm
    machine hangs in some boots without it ("tsc: No reference")."""
    mhz = next(l for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")).split(":")[1]
    return int(float(mhz) * 1000)


def qemu(image, initrd, d, ram, extra):
    """agentvm's machine and devices (2 CPUs, control port, balloon, net,
    one share), RAM in a shared file."""
    return ["qemu-system-x86_64", "-machine", "microvm,acpi=on,pit=off,pic=off,rtc=on,isa-serial=on,memory-backend=mem",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", MEM,
            "-object", f"memory-backend-file,id=mem,size={MEM},mem-path={ram},share=on",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-kernel", f"{image}/vmlinux", "-initrd", initrd,
            "-append", f"console=ttyS0 panic=-1 rdinit=/init pci=off quiet tsc_early_khz={tsc_khz()}",
            "-serial", f"file:{d}/console.log",
            "-device", "virtio-serial-device,max_ports=2",
            "-chardev", f"socket,id=ctl,server=on,wait=off,path={d}/ctl.sock",
            "-device", "virtserialport,chardev=ctl,name=org.agentvm.ctl",
            "-device", "virtio-balloon-device,free-page-reporting=on",
            "-netdev", f"stream,id=net0,addr.type=unix,addr.path={d}/passt.sock",
            "-device", "virtio-net-device,netdev=net0",
            "-chardev", f"socket,id=fs,path={d}/fs.sock", "-device", "vhost-user-fs-device,chardev=fs,tag=work",
            "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off"] + extra


def wait_console(d, word, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(f"{d}/console.log") and word in open(f"{d}/console.log").read():
            return
        time.sleep(0.005)
    sys.exit(f"no {word} on the console in {timeout} s: see {d}/console.log")


def host_server():
    """A TCP server on the host's loopback that greets each connection."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()

    def serve():
        while True:
            c, _ = s.accept()
            c.sendall(b"HELLO-FROM-HOST\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return s.getsockname()[1]


def make_template(image, initrd, ram, state):
    d, procs = helpers("template")
    t = time.monotonic()
    vm = subprocess.Popen(qemu(image, initrd, d, ram, []))
    wait_console(d, "READY")
    boot = time.monotonic() - t
    cmd = qmp(f"{d}/qmp.sock")
    cmd("stop")
    cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    cmd("migrate", uri=f"file:{state}")
    status = wait_migration(cmd)
    cmd("quit")
    vm.wait()
    for p in procs:
        p.kill()
    touched = int(subprocess.check_output(["du", "-k", ram]).split()[0]) // 1024
    print(f"template: cold boot to READY {boot:.2f} s; save {status}; device state {os.path.getsize(state)} B; "
          f"RAM file {touched} MiB touched")
    print(open(f"{d}/console.log").read())


def restore(tag, image, initrd, template_ram, state, port):
    d, procs = helpers(tag)
    ram = f"/dev/shm/agentvm-warm-spike-{tag}.ram"
    t = time.monotonic()
    subprocess.run(["cp", "--sparse=always", template_ram, ram], check=True)
    copied = time.monotonic() - t
    vm = subprocess.Popen(qemu(image, initrd, d, ram, ["-incoming", "defer"]))
    cmd = qmp(f"{d}/qmp.sock")
    cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    cmd("migrate-incoming", uri=f"file:{state}")
    status = wait_migration(cmd)
    cmd("cont")
    ctl = socket.socket(socket.AF_UNIX)
    ctl.connect(f"{d}/ctl.sock")
    ctl.sendall(f"GO {time.time_ns()} {secrets.token_hex(32)} {port}\n".encode())
    sent = time.monotonic() - t
    vm.wait(timeout=120)
    total = time.monotonic() - t
    for p in procs:
        p.kill()
    os.unlink(ram)
    back = os.path.join(d, "share", "from-guest")
    written = open(back).read().strip() if os.path.exists(back) else "(nothing)"
    print(f"--- restore {tag}: restore {status}; RAM copy {copied:.3f} s; line sent {sent:.3f} s after start; "
          f"powered off at {total:.2f} s (QEMU status {vm.returncode}); the share got: {written}")
    print(open(f"{d}/console.log").read())


def main():
    image = sys.argv[1] if len(sys.argv) > 1 else max(
        glob.glob("/var/tmp/agentvm-test-cache/agentvm/images/base-*"), key=os.path.getmtime)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    os.chmod(WORK, 0o755)
    initrd = build_initramfs(image)
    template_ram, state = "/dev/shm/agentvm-warm-spike-template.ram", os.path.join(WORK, "state")
    port = host_server()
    make_template(image, initrd, template_ram, state)
    for tag in ("a", "b"):
        restore(tag, image, initrd, template_ram, state, port)
    os.unlink(template_ram)


if __name__ == "__main__":
    main()
