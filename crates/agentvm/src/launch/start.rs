//! The fifth stage: the helpers (virtiofsd per share, passt, the
//! forwarding channel's threads, the console recorder) and QEMU, started
//! from the plan. Dropping [`Started`] stops and reaps every one of them.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::fds::QemuEnds;
use super::plan::Plan;
use super::resources::Resources;
use super::warm::{self, Restore, WarmError};
use crate::clipboard;
use crate::image::template::Template;
use crate::instance::console_log;
use crate::net::egress::{self, AllowList};
use crate::net::plan::{Interface, NetworkPlan};
use crate::net::shield::Shield;
use crate::net::{self, forwarding, NetError};
use crate::relay::{self, Relay, Streams};
use crate::sys::{self, SignalFd};
use crate::vm::process::{self, Helper};
use crate::vm::share::{self, ShareError};
use crate::watch::{WatchPlan, Watcher};

/// Capacity asked for the console pipe.
const CONSOLE_PIPE_BYTES: usize = 1 << 20;
/// How long the console's last bytes may take to reach the log after QEMU
/// exited.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);
/// How long a helper may take to exit after SIGTERM before it is killed.
const HELPER_GRACE: Duration = Duration::from_secs(2);

/// Something could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what}: {source}")]
    Os { what: &'static str, source: io::Error },
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot start QEMU: {0}")]
    Qemu(#[source] io::Error),
    #[error(transparent)]
    Warm(Box<WarmError>),
}

impl From<WarmError> for StartError {
    fn from(e: WarmError) -> StartError {
        StartError::Warm(Box::new(e))
    }
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> StartError {
    move |source| StartError::Os { what, source }
}

/// What the network needs besides the plan: the proxy's allow list and the
/// shield (`--network allow`, `--shield-secrets`).
#[derive(Clone)]
pub struct Egress<'a> {
    pub allow: &'a AllowList,
    pub shield: Option<Arc<Shield>>,
}

/// The running VM and its helpers.
pub struct Started {
    /// Signals are read from here from before the first helper started, so
    /// no helper thread takes one; helper processes unblock them.
    signals: SignalFd,
    pub qemu: Helper,
    pub helpers: Vec<Helper>,
    /// Our end of the control port.
    control: Option<OwnedFd>,
    console: Option<console_log::Recorder>,
    console_path: PathBuf,
}

impl Started {
    /// Starts the helpers, then QEMU with `initramfs`, in the instance dir;
    /// with `template`, QEMU loads its state into a copy of its RAM (made
    /// while the helpers and QEMU start) and the guest gets the spec over
    /// the control port (dropping the result on an error stops everything
    /// started).
    pub fn start(
        plan: &Plan,
        res: &Resources,
        egress: Egress<'_>,
        dir: &Path,
        initramfs: &[u8],
        template: Option<&Template>,
        watch: Option<&OwnedFd>,
    ) -> Result<Started, StartError> {
        let signals = SignalFd::block_and_open(relay::SIGNALS_AND_CHILDREN).map_err(os("signalfd"))?;
        // After the signals are blocked: the copy's thread inherits that.
        let restore = template.map(Restore::new).transpose()?;
        let initramfs = sys::memfd_with("agentvm-initramfs", initramfs).map_err(os("memfd_create"))?;
        let mut helpers = Vec::new();
        for s in &plan.shares {
            helpers.push(share::start(s, res.ids, dir)?.0);
        }
        let network = start_network(&plan.network, dir, &mut helpers)?;
        let (control, control_qemu) = sys::socketpair().map_err(os("socketpair"))?;
        let (console_ours, console_qemu) = sys::pipe(CONSOLE_PIPE_BYTES).map_err(os("pipe"))?;
        let console_path = dir.join(console_log::LOG);
        let console = console_log::Recorder::start(std::fs::File::from(console_ours), &console_path)
            .map_err(os("record the guest console"))?;
        let forwarding = start_forwarding(&plan.network, egress, dir)?;
        let clipboard = start_clipboard(plan, res)?;
        let watch = watch.map(OwnedFd::try_clone).transpose().map_err(os("dup the watch channel"))?;
        let ends =
            QemuEnds { control: control_qemu, initramfs, network, forwarding, console: console_qemu, clipboard, watch };
        let mut cmd = Command::new(&res.qemu);
        cmd.args(plan.qemu_args());
        let mut pass = plan.fds.pass(&ends);
        if let Some(r) = &restore {
            let qemu_ends = [(&r.qmp_qemu, warm::QMP_FD), (&r.ram, warm::RAM_FD)];
            pass.extend(qemu_ends.into_iter().filter_map(|(fd, target)| Some((fd.as_ref()?.as_fd(), target))));
        }
        let qemu = process::spawn("QEMU", cmd, &pass, &dir.join("qemu.log")).map_err(StartError::Qemu)?;
        drop(pass);
        drop(ends);
        let started = Started { signals, qemu, helpers, control: Some(control), console: Some(console), console_path };
        if let Some(mut r) = restore {
            r.qemu_has_its_ends();
            r.load(&dir.join("qemu.log"))?;
            warm::hand_over(started.control.as_ref().expect("not relayed yet"), &plan.spec)?;
        }
        Ok(started)
    }

    /// Relays the terminal or the streams until QEMU exits.
    pub fn relay(&mut self, tty: bool) -> Result<super::outcome::End, StartError> {
        let control = self.control.take().expect("relayed once");
        let streams = Streams::inherited().map_err(os("stdio"))?;
        let mut relay = Relay::new(control, &self.signals, streams, tty).map_err(os("fcntl(O_NONBLOCK)"))?;
        Ok(super::watch::watch(&mut relay, &mut self.qemu, &mut self.helpers))
    }

    /// Stops and reaps the helpers and waits for the console's last bytes;
    /// the console log's path and how much the guest wrote, when known.
    pub fn stop(&mut self) -> (&Path, Option<u64>) {
        for h in &mut self.helpers {
            h.signal(libc::SIGTERM);
        }
        for h in &mut self.helpers {
            h.stop(HELPER_GRACE);
        }
        self.qemu.signal(libc::SIGTERM);
        self.qemu.stop(HELPER_GRACE);
        let total = self.console.take().and_then(|c| c.finish(CONSOLE_DRAIN));
        (&self.console_path, total)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts passt when the guest's interface is behind it; QEMU's end of
/// the connection.
fn start_network(net: &NetworkPlan, dir: &Path, helpers: &mut Vec<Helper>) -> Result<Option<OwnedFd>, StartError> {
    let Interface::Passt(bin) = &net.interface else { return Ok(None) };
    let (passt, fd) = net::start_passt(bin, &net.published, dir)?;
    helpers.push(passt);
    Ok(Some(fd))
}

/// Starts answering the guest's clipboard tools when the clipboard is
/// shared; QEMU's end of their channel.
fn start_clipboard(plan: &Plan, res: &Resources) -> Result<Option<OwnedFd>, StartError> {
    if !plan.clipboard.is_on() {
        return Ok(None);
    }
    let looked_for = res.clipboard.clone();
    let host = looked_for.unwrap_or_else(|| clipboard::HostClipboard::missing("it was not looked for".into()));
    let (ours, theirs) = sys::socketpair().map_err(os("socketpair"))?;
    let service = clipboard::Service { mode: plan.clipboard, host };
    service.serve(UnixStream::from(ours)).map_err(os("start the clipboard service"))?;
    Ok(Some(theirs))
}

/// The watch channel of a launch: QEMU's end, and ours with the project's
/// watches, served once the VM started.
pub struct WatchChannel {
    /// QEMU's end (kept for a second start after a failed warm one).
    pub qemu: OwnedFd,
    service: Option<(Watcher, UnixStream)>,
}

impl WatchChannel {
    /// Starts sending the changes, on a thread made now: after the start
    /// blocked the signals its signalfd takes, so the thread inherits that
    /// mask and a SIGTERM cannot end agentvm through it.
    pub fn serve(self) {
        if let Some((watcher, port)) = self.service {
            watcher.serve(port);
        }
    }
}

/// The project's watches and the channel to the guest when the plan
/// watches. Watching that cannot start is a line, never a failed run: the
/// guest then finds its port closed.
pub fn watch_channel(plan: &Plan, warn: &mut dyn FnMut(String)) -> Result<Option<WatchChannel>, StartError> {
    let project = match &plan.watch {
        WatchPlan::On { project } => project,
        WatchPlan::Off { why, tell } => {
            if *tell {
                warn(format!("watch: off: {why}"));
            }
            return Ok(None);
        }
    };
    let (ours, qemu) = sys::socketpair().map_err(os("socketpair"))?;
    let service = match Watcher::new(project, warn) {
        Ok(watcher) => Some((watcher, UnixStream::from(ours))),
        Err(e) => {
            warn(e.to_string());
            None
        }
    };
    Ok(Some(WatchChannel { qemu, service }))
}

/// Starts serving the forwarding channel when the plan uses it; QEMU's end.
fn start_forwarding(net: &NetworkPlan, egress: Egress<'_>, dir: &Path) -> Result<Option<OwnedFd>, StartError> {
    if !net.uses_channel() {
        return Ok(None);
    }
    let routes = forwarding::Routes {
        host_ports: net.host_ports.clone(),
        proxy: net.proxy.then(|| {
            egress::Proxy::new(egress.allow.clone(), egress.shield, &egress::log_path(dir))
                .through(net.upstream_proxy())
        }),
        published: forwarding::bind_published(net.channel_published()).map_err(os("listen on a published port"))?,
    };
    let (ours, theirs) = sys::socketpair().map_err(os("socketpair"))?;
    forwarding::serve(UnixStream::from(ours), routes).map_err(os("start port forwarding"))?;
    Ok(Some(theirs))
}
