//! Turns an agent's files (path → text) into one ES module that workerd runs, with esbuild from the
//! pinned npm toolchain run as a subprocess in a throw-away directory.
//!
//! Everything an agent can get wrong comes back as a [`BundleError`] with a machine-readable code,
//! a message and a hint; esbuild's diagnostics keep their `file:line:col`.

mod error;
mod esbuild;
mod files;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use error::{BundleError, Diagnostic};
pub use files::{SourceFiles, normalize_path};

/// Input limits, checked before any work is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_files: usize,
    pub max_source_bytes: usize,
    pub max_bundle_bytes: u64,
    /// Wall-clock limit for one esbuild run.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_files: 200,
            max_source_bytes: 500 * 1024,
            max_bundle_bytes: 10 * 1024 * 1024,
            timeout: Duration::from_secs(20),
        }
    }
}

/// Where esbuild and the curated packages are (see `tollgate_runtime::Toolchain`).
#[derive(Debug, Clone)]
pub struct BundlerConfig {
    pub esbuild: PathBuf,
    pub node_modules: PathBuf,
    /// Curated packages tenant code may import: name → version.
    pub packages: BTreeMap<String, String>,
    /// Parent of the per-build temp dirs; a `node_modules` link to the toolchain is kept here.
    pub work_dir: PathBuf,
    pub limits: Limits,
}

/// Entry files tried in order when `package.json` has no usable `main`.
pub const ENTRY_CANDIDATES: [&str; 8] = [
    "src/index.ts",
    "src/index.tsx",
    "src/index.js",
    "index.ts",
    "index.tsx",
    "index.js",
    "worker.ts",
    "worker.js",
];

/// The bundle and what went into it.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub code: String,
    pub manifest: Manifest,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub entry: String,
    pub size_bytes: u64,
    /// The agent's files that ended up in the bundle.
    pub inputs: Vec<String>,
    /// Curated packages the bundle uses, with their versions.
    pub packages: BTreeMap<String, String>,
    pub jsx_import_source: Option<String>,
    pub build_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Bundler {
    config: BundlerConfig,
}

impl Bundler {
    pub fn new(config: BundlerConfig) -> Result<Self, BundleError> {
        std::fs::create_dir_all(&config.work_dir).map_err(|e| {
            BundleError::internal(format!("cannot create {}: {e}", config.work_dir.display()))
        })?;
        // esbuild resolves bare imports by walking up from the importer, so every build dir lives
        // under a folder that links to the toolchain's node_modules.
        let link = config.work_dir.join("node_modules");
        if std::fs::read_link(&link).ok().as_deref() != Some(config.node_modules.as_path()) {
            let _ = std::fs::remove_file(&link);
            #[cfg(unix)]
            std::os::unix::fs::symlink(&config.node_modules, &link).map_err(|e| {
                BundleError::internal(format!("cannot link {}: {e}", link.display()))
            })?;
        }
        Ok(Bundler { config })
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    pub fn packages(&self) -> &BTreeMap<String, String> {
        &self.config.packages
    }

    /// Validates raw input (see [`SourceFiles::new`]) and bundles it.
    pub async fn bundle_raw<P, B>(
        &self,
        input: impl IntoIterator<Item = (P, B)>,
    ) -> Result<Bundle, BundleError>
    where
        P: AsRef<str>,
        B: Into<Vec<u8>>,
    {
        let files = SourceFiles::new(input, &self.config.limits)?;
        self.bundle(&files).await
    }

    pub async fn bundle(&self, files: &SourceFiles) -> Result<Bundle, BundleError> {
        let entry = find_entry(files)?;
        esbuild::precheck_imports(files, &self.config.packages, &self.config.node_modules)?;
        let jsx = uses_hono(files).then(|| "hono/jsx".to_owned());
        esbuild::run(&self.config, files, &entry, jsx).await
    }
}

/// `package.json` `main` when that file exists, else the first of [`ENTRY_CANDIDATES`].
pub fn find_entry(files: &SourceFiles) -> Result<String, BundleError> {
    if let Some(pkg) = files.get("package.json") {
        let main = serde_json::from_str::<serde_json::Value>(pkg)
            .map_err(|e| {
                BundleError::validation(
                    format!("package.json:{}:{}: {e}", e.line(), e.column()),
                    "package.json must be valid JSON (it is only read for `main`).".to_owned(),
                )
            })?
            .get("main")
            .and_then(|m| m.as_str())
            .map(str::to_owned);
        if let Some(main) = main
            && let Ok(main) = normalize_path(&main)
            && files.contains(&main)
        {
            return Ok(main);
        }
    }
    ENTRY_CANDIDATES
        .iter()
        .find(|c| files.contains(c))
        .map(|c| (*c).to_owned())
        .ok_or_else(|| {
            BundleError::validation(
                format!(
                    "no entry file: looked for package.json `main`, then {}",
                    ENTRY_CANDIDATES.join(", ")
                ),
                "Add src/index.ts exporting `default { fetch(request, env, ctx) }` (or a Hono app).",
            )
        })
}

/// Hono projects get `hono/jsx` as the JSX import source; others keep esbuild's default.
fn uses_hono(files: &SourceFiles) -> bool {
    files.iter().any(|(path, text)| {
        (path == "package.json" && text.contains("\"hono\""))
            || text.contains("from \"hono")
            || text.contains("from 'hono")
    })
}
