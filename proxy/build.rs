//! Records the source revision for `tollgate_build_info{revision}`: `TOLLGATE_REVISION` when the
//! builder sets it (images, packages), else `git rev-parse --short=12 HEAD`, else "unknown".
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TOLLGATE_REVISION");
    // A new commit moves HEAD (or the branch it points at).
    for p in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let rev = std::env::var("TOLLGATE_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TOLLGATE_REVISION={rev}");
}
