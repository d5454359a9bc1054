//! A private PostgreSQL cluster for tests: `initdb` into a temporary directory and `pg_ctl`
//! on a free loopback port (trust authentication, no socket shared with anything else),
//! stopped and deleted when dropped. Never the machine's own server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `TOLLGATE_PG_BIN`, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin` (Debian's layout).
pub fn pg_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TOLLGATE_PG_BIN") {
        return PathBuf::from(d);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if d.join("initdb").exists() {
            return d;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql (scripts/deps.sh)")
}

/// A private PostgreSQL cluster.
pub struct PostgresServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user.
fn as_pg_user(bin: &Path, tool: &str) -> Command {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

/// Starts the cluster in `dir/data` on `port`; false when it did not come up (the port taken).
fn pg_ctl_start(bin: &Path, dir: &Path, port: u16) -> bool {
    let opts = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=50",
        dir.display()
    );
    as_pg_user(bin, "pg_ctl")
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-o", &opts, "-w", "-t", "30", "-l"])
        .arg(dir.join("log"))
        .arg("start")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl PostgresServer {
    pub fn start() -> PostgresServer {
        let bin = pg_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir()
            .expect("tempdir");
        // The cluster's files belong to whoever runs the server.
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let data = dir.path().join("data");
        let out = as_pg_user(&bin, "initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..5 {
            let port = free_port();
            if pg_ctl_start(&bin, dir.path(), port) {
                return PostgresServer { port, dir, bin };
            }
        }
        panic!("PostgreSQL did not start");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops it (fast shutdown); [`PostgresServer::start_again`] brings it back with its data.
    pub fn stop(&self) {
        let _ = as_pg_user(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Kills the postmaster (SIGKILL), as a crash would.
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.data().join("postmaster.pid"))
            && let Some(pid) = pid.lines().next()
        {
            let _ = Command::new("kill")
                .args(["-9", pid.trim()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Command::new("kill")
                .args(["-0", pid.trim()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn start_again(&self) {
        assert!(
            pg_ctl_start(&self.bin, self.dir.path(), self.port),
            "PostgreSQL did not start again"
        );
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = as_pg_user(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
