//! The pinned JavaScript toolchain: workerd (runs deployments), esbuild (bundles them) and the
//! curated packages tenant code may import, all from one `package.json` + lockfile.
//!
//! Installed with `npm ci --ignore-scripts` when missing or out of date: the binaries ship inside
//! npm's optional platform packages, so no install script (and no download from outside npm) runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;

/// Packages that are tools, not something tenant code may import.
const TOOLING: [&str; 2] = ["workerd", "esbuild"];

#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    #[error("JS toolchain at {dir}: {what}")]
    Manifest { dir: PathBuf, what: String },
    #[error(
        "installing the JS toolchain in {dir} failed ({status}); run `npm ci --ignore-scripts` there to see why"
    )]
    Install { dir: PathBuf, status: String },
    #[error(
        "{tool} at {path} is version {found}, the lockfile pins {pinned}; run `npm ci --ignore-scripts` in {dir}"
    )]
    Version {
        tool: &'static str,
        path: PathBuf,
        found: String,
        pinned: String,
        dir: PathBuf,
    },
    #[error("JS toolchain: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Deserialize)]
struct PackageJson {
    #[serde(default)]
    dependencies: BTreeMap<String, String>,
    #[serde(default)]
    version: Option<String>,
}

/// An installed, version-checked toolchain.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub dir: PathBuf,
    pub workerd: PathBuf,
    pub esbuild: PathBuf,
    pub node_modules: PathBuf,
    /// Curated packages (name → pinned version) that tenant code may import.
    pub packages: BTreeMap<String, String>,
    pub workerd_version: String,
    pub esbuild_version: String,
}

impl Toolchain {
    /// The toolchain in this source tree (`runtime/npm`), for tests and `tollgate dev` from a checkout.
    pub fn source_tree_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("npm")
    }

    /// Checks the toolchain in `dir`, installing it with `npm ci --ignore-scripts` first when the
    /// binaries are missing or differ from the lockfile. Safe to call from several processes at once
    /// (an exclusive file lock serialises installs).
    pub fn ensure(dir: &Path) -> Result<Toolchain, ToolchainError> {
        // Absolute, so the binaries can be started from any working directory.
        let dir = &std::fs::canonicalize(dir).map_err(|e| ToolchainError::Manifest {
            dir: dir.to_owned(),
            what: format!("cannot open the folder: {e}"),
        })?;
        let pins = read_package_json(&dir.join("package.json"), dir)?.dependencies;
        if let Ok(t) = Self::check(dir, &pins) {
            return Ok(t);
        }
        let lock = File::create(dir.join(".install.lock"))?;
        lock.lock()?;
        // Another process may have installed it while we waited for the lock.
        if let Ok(t) = Self::check(dir, &pins) {
            return Ok(t);
        }
        tracing::info!(dir = %dir.display(), "installing the pinned JS toolchain (workerd, esbuild, curated packages; ~180 MB, once)");
        eprintln!(
            "tollgate: installing the pinned JS toolchain into {} (npm ci --ignore-scripts; ~180 MB, once)…",
            dir.display()
        );
        let status = std::process::Command::new("npm")
            .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| ToolchainError::Install {
                dir: dir.to_owned(),
                status: format!("cannot run npm: {e}"),
            })?;
        if !status.success() {
            return Err(ToolchainError::Install {
                dir: dir.to_owned(),
                status: status.to_string(),
            });
        }
        Self::check(dir, &pins)
    }

    fn check(dir: &Path, pins: &BTreeMap<String, String>) -> Result<Toolchain, ToolchainError> {
        let node_modules = dir.join("node_modules");
        let installed = |name: &str| -> Result<String, ToolchainError> {
            let pkg = node_modules.join(name).join("package.json");
            read_package_json(&pkg, dir)?
                .version
                .ok_or_else(|| ToolchainError::Manifest {
                    dir: dir.to_owned(),
                    what: format!("{} has no version", pkg.display()),
                })
        };
        let mut packages = BTreeMap::new();
        for (name, pinned) in pins {
            let found = installed(name)?;
            if &found != pinned {
                return Err(ToolchainError::Version {
                    tool: "package",
                    path: node_modules.join(name),
                    found,
                    pinned: pinned.clone(),
                    dir: dir.to_owned(),
                });
            }
            if !TOOLING.contains(&name.as_str()) {
                packages.insert(name.clone(), found);
            }
        }
        let workerd = node_modules.join("@cloudflare/workerd-linux-64/bin/workerd");
        let esbuild = node_modules.join("@esbuild/linux-x64/bin/esbuild");
        let workerd_version = binary_version(&workerd)?;
        let esbuild_version = binary_version(&esbuild)?;
        // workerd's npm version is 1.YYYYMMDD.N and the binary prints `workerd YYYY-MM-DD`.
        let pinned_workerd = pins.get("workerd").map(|v| workerd_date(v));
        if pinned_workerd.as_deref() != Some(workerd_version.trim_start_matches("workerd ")) {
            return Err(ToolchainError::Version {
                tool: "workerd",
                path: workerd,
                found: workerd_version,
                pinned: pins.get("workerd").cloned().unwrap_or_default(),
                dir: dir.to_owned(),
            });
        }
        if pins.get("esbuild") != Some(&esbuild_version) {
            return Err(ToolchainError::Version {
                tool: "esbuild",
                path: esbuild,
                found: esbuild_version,
                pinned: pins.get("esbuild").cloned().unwrap_or_default(),
                dir: dir.to_owned(),
            });
        }
        Ok(Toolchain {
            dir: dir.to_owned(),
            workerd,
            esbuild,
            node_modules,
            packages,
            workerd_version,
            esbuild_version,
        })
    }
}

fn read_package_json(path: &Path, dir: &Path) -> Result<PackageJson, ToolchainError> {
    let text = std::fs::read_to_string(path).map_err(|e| ToolchainError::Manifest {
        dir: dir.to_owned(),
        what: format!("cannot read {}: {e}", path.display()),
    })?;
    serde_json::from_str(&text).map_err(|e| ToolchainError::Manifest {
        dir: dir.to_owned(),
        what: format!("{}: {e}", path.display()),
    })
}

fn binary_version(path: &Path) -> Result<String, ToolchainError> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `1.20261117.1` → `2026-11-17`.
fn workerd_date(npm_version: &str) -> String {
    let d = npm_version.split('.').nth(1).unwrap_or("");
    if d.len() == 8 {
        format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..])
    } else {
        d.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workerd_npm_version_maps_to_its_date() {
        assert_eq!(workerd_date("1.20261117.1"), "2026-11-17");
    }

    #[test]
    fn source_tree_toolchain_installs_and_lists_curated_packages() {
        let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
        assert_eq!(t.esbuild_version, "0.28.2");
        assert!(t.workerd_version.starts_with("workerd 20"));
        assert!(t.packages.contains_key("hono"));
        assert!(!t.packages.contains_key("workerd"));
        assert!(!t.packages.contains_key("esbuild"));
    }
}
