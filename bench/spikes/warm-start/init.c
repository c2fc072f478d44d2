// Warm-start spike (issue 17): a PID 1 for a template VM. It binds only
// the control port and the balloon, says READY on the console and waits
// for one line on the control port (the host saves the VM meanwhile).
// After a restore the line arrives: `GO <host ns> <64 hex seed> <port>`.
// It then steps the clock, reseeds the RNG, binds virtio-net and virtiofs,
// reaches the host over passt, mounts and writes the share, runs on the
// second CPU, and powers off. Build: gcc -static -O2 -o init init.c
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { VIRTIO_NET = 1, VIRTIO_CONSOLE = 3, VIRTIO_BALLOON = 5, VIRTIO_FS = 26 };

static FILE *con;

static double mono(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void write_file(const char *path, const char *text) {
  int f = open(path, O_WRONLY);
  if (f < 0 || write(f, text, strlen(text)) < 0)
    fprintf(con, "write %s to %s: %s\n", text, path, strerror(errno));
  close(f);
}

static void load_module(const char *name) {
  char path[128];
  snprintf(path, sizeof path, "/m/%s.ko", name);
  int f = open(path, O_RDONLY);
  if (syscall(SYS_finit_module, f, "", 0) && errno != EEXIST)
    fprintf(con, "load %s: %s\n", name, strerror(errno));
  close(f);
}

// Binds every virtio device of type `id` to `driver` (autoprobe is off).
static void bind_virtio(int id, const char *driver) {
  DIR *dir = opendir("/sys/bus/virtio/devices");
  struct dirent *e;
  while (dir && (e = readdir(dir))) {
    if (e->d_name[0] == '.') continue;
    char path[320], type[32] = {0};
    snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
    int f = open(path, O_RDONLY);
    if (read(f, type, sizeof type - 1) < 0) type[0] = 0;
    close(f);
    if (strtol(type, 0, 16) != id) continue;
    snprintf(path, sizeof path, "/sys/bus/virtio/drivers/%s/bind", driver);
    write_file(path, e->d_name);
  }
  if (dir) closedir(dir);
}

static void print_random(const char *label) {
  unsigned char b[8] = {0};
  int f = open("/dev/urandom", O_RDONLY);
  if (read(f, b, sizeof b) != sizeof b) fprintf(con, "urandom: %s\n", strerror(errno));
  close(f);
  fprintf(con, "%s urandom %02x%02x%02x%02x%02x%02x%02x%02x\n", label, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]);
}

static void print_file(const char *label, const char *path) {
  char text[128] = {0};
  int f = open(path, O_RDONLY);
  if (read(f, text, sizeof text - 1) < 0) fprintf(con, "read %s: %s\n", path, strerror(errno));
  close(f);
  fprintf(con, "%s %s", label, text);
}

// Credits `hex` (32 bytes) to the pool and forces a reseed of the CRNG.
static void reseed(const char *hex) {
  struct { int entropy_count, buf_size; unsigned char buf[32]; } e = {256, 32, {0}};
  for (int i = 0; i < 32; i++) {
    unsigned byte;
    sscanf(hex + 2 * i, "%2x", &byte);
    e.buf[i] = byte;
  }
  int f = open("/dev/urandom", O_RDWR);
  if (ioctl(f, RNDADDENTROPY, &e) || ioctl(f, RNDRESEEDCRNG))
    fprintf(con, "reseed: %s\n", strerror(errno));
  close(f);
}

static void eth0_up(const char *address) {
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct ifreq ifr = {0};
  strcpy(ifr.ifr_name, "eth0");
  struct sockaddr_in *a = (struct sockaddr_in *)&ifr.ifr_addr;
  a->sin_family = AF_INET;
  inet_pton(AF_INET, address, &a->sin_addr);
  if (ioctl(s, SIOCSIFADDR, &ifr)) fprintf(con, "address: %s\n", strerror(errno));
  inet_pton(AF_INET, "255.255.255.0", &a->sin_addr);
  ioctl(s, SIOCSIFNETMASK, &ifr);
  ioctl(s, SIOCGIFFLAGS, &ifr);
  ifr.ifr_flags |= IFF_UP;
  if (ioctl(s, SIOCSIFFLAGS, &ifr)) fprintf(con, "up: %s\n", strerror(errno));
  close(s);
}

// The first line the host's server at 10.0.2.2:`port` sends.
static void reach_host(int port) {
  struct sockaddr_in gw = {.sin_family = AF_INET, .sin_port = htons(port)};
  inet_pton(AF_INET, "10.0.2.2", &gw.sin_addr);
  char got[64] = {0};
  for (int i = 0; i < 100 && !got[0]; i++) {
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&gw, sizeof gw) == 0 && read(c, got, sizeof got - 1) < 0) got[0] = 0;
    close(c);
    if (!got[0]) usleep(20000);
  }
  fprintf(con, "net: %s", got[0] ? got : "(nothing)\n");
}

static void use_share(const char *line) {
  mkdir("/work", 0755);
  if (mount("work", "/work", "virtiofs", 0, 0)) {
    fprintf(con, "mount work: %s\n", strerror(errno));
    return;
  }
  print_file("fs:", "/work/hello");
  int f = open("/work/from-guest", O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (write(f, line, strlen(line)) < 0) fprintf(con, "write share: %s\n", strerror(errno));
  close(f);
}

static void wait_for_line(int fd, char *line, int size) {
  for (int n = 0; n < size - 1;) {
    int r = read(fd, line + n, 1);
    if (r <= 0) { usleep(10000); continue; }
    if (line[n++] == '\n') break;
  }
}

int main(void) {
  mount("devtmpfs", "/dev", "devtmpfs", 0, 0);
  mount("proc", "/proc", "proc", 0, 0);
  mount("sysfs", "/sys", "sysfs", 0, 0);
  con = fopen("/dev/ttyS0", "w");
  setvbuf(con, 0, _IONBF, 0);

  // The template: transport up, no driver bound but the control port's and
  // the balloon's.
  write_file("/sys/bus/virtio/drivers_autoprobe", "0");
  load_module("virtio_mmio");
  load_module("virtio_balloon");
  bind_virtio(VIRTIO_CONSOLE, "virtio_console");
  bind_virtio(VIRTIO_BALLOON, "virtio_balloon");
  int ctl = -1;
  for (int i = 0; i < 200 && ctl < 0; i++)
    if ((ctl = open("/dev/vport0p1", O_RDWR)) < 0) usleep(10000);
  print_random("template");
  fprintf(con, "READY %.3f\n", mono());
  char line[256] = {0};
  wait_for_line(ctl, line, sizeof line);

  // Restored: make this VM its own, then bind and use the rest.
  double t0 = mono();
  fprintf(con, "GOT %s", line);
  long long host_ns = 0;
  char seed[65] = {0};
  int port = 0;
  sscanf(line, "GO %lld %64s %d", &host_ns, seed, &port);
  struct timespec before, host = {host_ns / 1000000000LL, host_ns % 1000000000LL};
  clock_gettime(CLOCK_REALTIME, &before);
  clock_settime(CLOCK_REALTIME, &host);
  fprintf(con, "clock was %lld s behind the host\n", (long long)(host.tv_sec - before.tv_sec));
  print_random("restored, before reseed");
  reseed(seed);
  print_random("restored, after reseed");
  print_file("boot_id", "/proc/sys/kernel/random/boot_id");
  double t1 = mono();
  load_module("failover");
  load_module("net_failover");
  load_module("virtio_net");
  bind_virtio(VIRTIO_NET, "virtio_net");
  bind_virtio(VIRTIO_FS, "virtiofs");
  double t2 = mono();
  eth0_up("10.0.2.15");
  reach_host(port);
  double t3 = mono();
  use_share(line);
  double t4 = mono();
  cpu_set_t cpu1;
  CPU_ZERO(&cpu1);
  CPU_SET(1, &cpu1);
  if (sched_setaffinity(0, sizeof cpu1, &cpu1)) fprintf(con, "affinity: %s\n", strerror(errno));
  double s0 = mono();
  usleep(100000);
  fprintf(con, "cpu %d slept %.3f s\n", sched_getcpu(), mono() - s0);
  fprintf(con, "times: reseed %.3f, bind net+fs %.3f, net up %.3f, fs %.3f\n", t1 - t0, t2 - t1, t3 - t2, t4 - t3);
  fprintf(con, "DONE\n");
  sync();
  reboot(RB_POWER_OFF);
  return 0;
}
