//! One workerd process: spawn, learn its port, wait until it answers, stop.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::logs::LogBuffer;

pub(crate) struct Spawned {
    pub child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub started: Instant,
}

/// A start that did not get to serve, and the CPU its process used meanwhile (µs, from its own
/// `/proc` counters: what a cgroup does not meter).
#[derive(Debug)]
pub(crate) struct StartFailed {
    pub reason: String,
    pub proc_cpu_us: u64,
}

/// Starts `workerd serve <config>` with `--control-fd 1`: workerd writes its `listen` event (with
/// the port it bound on 127.0.0.1:0) to stdout, next to the structured console lines, which go to
/// the deployment's log buffer. No fd juggling and no port allocator.
///
/// `join`: `cgroup.procs` files the process writes its own pid into before anything else runs
/// (a tiny `sh` step that then `exec`s workerd, keeping the pid): the tenant's module code runs
/// capped and metered from its first instruction. A join that fails stops the start.
pub(crate) async fn spawn(
    workerd: &Path,
    config: &Path,
    logs: Arc<LogBuffer>,
    ready_timeout: Duration,
    max_line: usize,
    join: &[std::path::PathBuf],
    ip: std::net::IpAddr,
) -> Result<Spawned, StartFailed> {
    let fail = |reason: String| StartFailed {
        reason,
        proc_cpu_us: 0,
    };
    let started = Instant::now();
    let mut cmd = if join.is_empty() {
        None
    } else {
        let mut c = Command::new("/bin/sh");
        c.args([
            "-c",
            // Exit 125 (before workerd ever runs) when a group cannot be joined.
            r#"while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#,
            "tollgate-join",
        ]);
        c.args(join).arg("--");
        Some(c)
    };
    // Through `setpriv --pdeathsig KILL` (util-linux) where available: if the supervisor dies,
    // the kernel kills its workerd children instead of leaving them running unsupervised and
    // unbilled. (Setting it ourselves would take `unsafe` code between fork and exec.) The
    // signal only comes for a parent that dies *after* it was asked for, so a supervisor that
    // died while this process was starting would leave it behind: a last `sh` step, run once
    // the signal is set, checks that its parent is still the supervisor and exits otherwise
    // (seen in the fault suite: a control process killed mid-deploy left a tenant's workerd
    // spinning under PID 1).
    let supervisor = std::process::id().to_string();
    match (&mut cmd, setpriv()) {
        (Some(c), Some(setpriv)) => {
            c.arg(setpriv);
            guard(c, &supervisor, workerd);
        }
        (Some(c), None) => {
            c.arg(workerd);
        }
        (None, Some(setpriv)) => {
            let mut c = Command::new(setpriv);
            guard(&mut c, &supervisor, workerd);
            cmd = Some(c);
        }
        (None, None) => cmd = Some(Command::new(workerd)),
    }
    let Some(mut cmd) = cmd else {
        return Err(fail("no command".into()));
    };
    let mut child = cmd
        .arg("serve")
        .arg(config)
        .args(["--control-fd", "1"])
        .current_dir(config.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot start workerd ({}): {e}", workerd.display())))?;
    let pid = child
        .id()
        .ok_or_else(|| fail("workerd exited at once".into()))?;
    // The process's own CPU, sampled while it starts: what a failed start used is billed too.
    let cpu_seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let cpu_seen = cpu_seen.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(us) = crate::cpu::proc_cpu_us(pid) {
                    cpu_seen.fetch_max(us, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let failed = |reason: String| {
        sampler.abort();
        if let Ok(us) = crate::cpu::proc_cpu_us(pid) {
            cpu_seen.fetch_max(us, std::sync::atomic::Ordering::Relaxed);
        }
        StartFailed {
            reason,
            proc_cpu_us: cpu_seen.load(std::sync::atomic::Ordering::Relaxed),
        }
    };
    let (port_tx, port_rx) = oneshot::channel::<u16>();
    if let Some(stdout) = child.stdout.take() {
        let logs = logs.clone();
        tokio::spawn(async move {
            let mut port_tx = Some(port_tx);
            for_each_line(stdout, max_line, |line| {
                if line.starts_with("{\"event\":") {
                    if let Some(port) = listen_port(line)
                        && let Some(tx) = port_tx.take()
                    {
                        let _ = tx.send(port);
                    }
                    return;
                }
                logs.push_workerd_line(line);
            })
            .await;
        });
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            for_each_line(stderr, max_line, |line| logs.push_workerd_line(line)).await;
        });
    }
    let ready = async {
        let port = port_rx
            .await
            .map_err(|_| "workerd exited before it listened".to_owned())?;
        let addr = SocketAddr::from((ip, port));
        // Ready = it answers HTTP (any status: the tenant's `/` may well be a 404).
        let mut delay = Duration::from_millis(2);
        loop {
            match probe(addr).await {
                Ok(()) => return Ok::<_, String>(addr),
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
            }
        }
    };
    let addr = tokio::select! {
        r = tokio::time::timeout(ready_timeout, ready) => match r {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => {
                let f = failed(format!("workerd did not answer within {} ms", ready_timeout.as_millis()));
                let _ = child.start_kill();
                return Err(f);
            }
        },
        status = child.wait() => {
            // Let the log readers catch workerd's last words.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(failed(match status {
                Ok(s) if s.code() == Some(125) && !join.is_empty() => {
                    format!("could not put the process under its resource limits ({s})")
                }
                Ok(s) => format!("workerd exited during start ({s})"),
                Err(e) => format!("workerd: {e}"),
            }));
        }
    };
    sampler.abort();
    Ok(Spawned {
        child,
        pid,
        addr,
        started,
    })
}

/// `setpriv`'s arguments: the parent-death signal, then a `sh` step that runs `workerd` only if
/// the parent is still `supervisor` (exit 125 otherwise, as a failed cgroup join).
fn guard(c: &mut Command, supervisor: &str, workerd: &Path) {
    c.args(["--pdeathsig", "KILL", "--", "/bin/sh", "-c"])
        .arg(r#"[ "$PPID" = "$0" ] || exit 125; exec "$@""#)
        .arg(supervisor)
        .arg(workerd);
}

fn setpriv() -> Option<&'static Path> {
    static FOUND: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            ["/usr/bin/setpriv", "/bin/setpriv"]
                .iter()
                .map(std::path::PathBuf::from)
                .find(|p| p.exists())
        })
        .as_deref()
}

/// Calls `f` with each `\n`-terminated line, keeping at most `max` bytes of it: a tenant that
/// prints a huge line cannot make the supervisor buffer it.
async fn for_each_line<R: AsyncRead + Unpin>(r: R, max: usize, mut f: impl FnMut(&str)) {
    let mut r = BufReader::new(r);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match r.fill_buf().await {
            Ok(b) if !b.is_empty() => b,
            _ => break,
        };
        let end = buf.iter().position(|&c| c == b'\n');
        let take = end.unwrap_or(buf.len());
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&buf[..take.min(room)]);
        let consumed = end.map_or(buf.len(), |p| p + 1);
        r.consume(consumed);
        if end.is_some() {
            f(&String::from_utf8_lossy(&line));
            line.clear();
        }
    }
    if !line.is_empty() {
        f(&String::from_utf8_lossy(&line));
    }
}

fn listen_port(line: &str) -> Option<u16> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v.get("event")?.as_str()? == "listen").then_some(())?;
    u16::try_from(v.get("port")?.as_u64()?).ok()
}

/// One HTTP/1.1 request; succeeds on any status line.
pub(crate) async fn probe(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: tollgate-runtime-probe\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).await?;
    if line.starts_with("HTTP/1.") {
        Ok(())
    } else {
        Err(std::io::Error::other("not an HTTP answer"))
    }
}

/// SIGTERM, then SIGKILL after `grace`.
pub(crate) async fn stop(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_cut_not_buffered() {
        let input = format!("short\n{}\nlast", "x".repeat(10_000));
        let mut got = Vec::new();
        for_each_line(input.as_bytes(), 100, |l| got.push(l.to_owned())).await;
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], "short");
        assert_eq!(got[1].len(), 100);
        assert_eq!(got[2], "last");
    }

    /// The parent-death guard runs the program only while its parent is the supervisor that
    /// asked for it; a process whose supervisor is already gone exits before running it.
    #[tokio::test]
    async fn the_guard_runs_the_program_only_under_its_supervisor() {
        let setpriv = super::setpriv().expect("setpriv (util-linux) is installed");
        let run = |supervisor: String| async move {
            let mut c = Command::new(setpriv);
            super::guard(&mut c, &supervisor, Path::new("/bin/echo"));
            c.arg("ran").output().await.unwrap()
        };
        let ours = run(std::process::id().to_string()).await;
        assert!(ours.status.success(), "{ours:?}");
        assert_eq!(String::from_utf8_lossy(&ours.stdout), "ran\n");
        // As seen by a process whose supervisor died before the signal was set: another parent.
        let orphan = run("1".into()).await;
        assert_eq!(orphan.status.code(), Some(125), "{orphan:?}");
        assert!(orphan.stdout.is_empty(), "{orphan:?}");
    }
}
