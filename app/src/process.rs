//! What a supervisor sees of the process: `sd_notify` states (systemd `Type=notify`) and a PID
//! file written once the process serves.
//!
//! Upgrade under systemd (deploy/systemd/): `ExecReload` starts the new binary with
//! `--upgrade` beside the old one and sends the old one SIGQUIT. The old one says RELOADING
//! and hands its listeners over; the new one, once it has them, says `MAINPID=<itself>` and
//! READY (so systemd follows it: the unit needs `NotifyAccess=all`) and writes the PID file.
//! The old one then drains and exits without STOPPING (that would stop the whole unit).

use std::io::Write;
use std::path::{Path, PathBuf};

use sd_notify::NotifyState;
use tollgate_proxy::Stop;

/// Serving. After an upgrade the new process also takes over as the unit's main process.
pub(crate) fn ready(upgraded: bool) {
    let pid = std::process::id();
    let mut states = vec![NotifyState::Ready, NotifyState::Status("serving")];
    if upgraded {
        states.insert(0, NotifyState::MainPid(pid));
    }
    send(&states);
}

/// A signal arrived. A proxy's upgrade hands over (RELOADING; the successor says READY);
/// every other stop, and SIGQUIT to a process that cannot hand over (control, dev), is the unit
/// stopping.
pub(crate) fn stopping(how: Stop, upgradable: bool) {
    match how {
        Stop::Upgrade if upgradable => reloading("handing the listeners to the new process"),
        _ => send(&[NotifyState::Stopping, NotifyState::Status("stopping")]),
    }
}

/// Waits (at most 10 s) until something accepts connections on each of `addrs` (the
/// unspecified address is tried on loopback): READY must not come before the listeners.
pub(crate) async fn wait_accepting(addrs: &[std::net::SocketAddr]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    for addr in addrs {
        let target = reachable(*addr);
        loop {
            let attempt = tokio::time::timeout(
                std::time::Duration::from_millis(500),
                tokio::net::TcpStream::connect(target),
            )
            .await;
            if matches!(attempt, Ok(Ok(_))) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("nothing accepts connections on {addr} after the start");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Whether anything accepts on `addr` now (one try, 1 s at most).
pub(crate) async fn accepting(addr: std::net::SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::net::TcpStream::connect(reachable(addr)),
        )
        .await,
        Ok(Ok(_))
    )
}

fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// RELOADING with the monotonic time systemd asks for; READY must follow.
pub(crate) fn reloading(status: &str) {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status(status)];
    if let Ok(t) = NotifyState::monotonic_usec_now() {
        states.push(t);
    }
    send(&states);
}

/// Back to serving after an in-process reload (certificates).
pub(crate) fn reloaded() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

fn send(states: &[NotifyState]) {
    // Without NOTIFY_SOCKET this does nothing; a supervisor that cannot be told is logged.
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// The PID file: written (atomically, by rename) when the process serves; removed at exit
/// only if it still names this process (an upgraded successor has written its own).
pub(crate) struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Checks, before anything starts, that the PID file can be written where asked (a process
    /// that has taken an old one's listeners must not fail on it afterwards).
    pub(crate) fn check(path: &Path) -> anyhow::Result<()> {
        let probe = path.with_extension(format!("probe{}", std::process::id()));
        std::fs::File::create(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot write the PID file {} (--pid-file): {e}",
                    path.display()
                )
            })
    }

    pub(crate) fn write(path: &Path) -> anyhow::Result<PidFile> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::anyhow!(
                "cannot write the PID file {} (--pid-file): {e}",
                path.display()
            )
        })?;
        Ok(PidFile {
            path: path.to_owned(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let mine = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if mine {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_pid_file_names_this_process_and_goes_with_it_unless_a_successor_took_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.pid");
        let f = PidFile::write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        drop(f);
        assert!(!path.exists());

        let f = PidFile::write(&path).unwrap();
        std::fs::write(&path, "4242\n").unwrap();
        drop(f);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "4242\n");
    }
}
