//! One esbuild run: write the files to a fresh directory, bundle, read the result, remove the
//! directory (on every path, including timeouts: the temp dir and the child die with the future).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::{Bundle, BundleError, BundlerConfig, Diagnostic, Manifest, SourceFiles};

/// esbuild's stderr kept for diagnostics; more is discarded.
const MAX_STDERR: u64 = 64 * 1024;
const MAX_DIAGNOSTICS: usize = 20;

pub(crate) async fn run(
    config: &BundlerConfig,
    files: &SourceFiles,
    entry: &str,
    jsx_import_source: Option<String>,
) -> Result<Bundle, BundleError> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&config.work_dir)
        .map_err(|e| BundleError::internal(format!("cannot create a build dir: {e}")))?;
    let src = dir.path().join("src");
    for (path, text) in files.iter() {
        // Agent files live under `src/` of the build dir so their names can never collide with
        // ours (out.js, meta.json).
        let target = src.join(path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| BundleError::internal(format!("writing sources: {e}")))?;
        }
        tokio::fs::write(&target, text)
            .await
            .map_err(|e| BundleError::internal(format!("writing sources: {e}")))?;
    }

    // Our own tsconfig: a tenant's `extends`/`paths` could otherwise point at host files.
    tokio::fs::write(dir.path().join("tsconfig.json"), "{}")
        .await
        .map_err(|e| BundleError::internal(format!("writing tsconfig: {e}")))?;
    let mut cmd = tokio::process::Command::new(&config.esbuild);
    cmd.current_dir(&src)
        .env_clear()
        .arg("--tsconfig=../tsconfig.json")
        .arg(entry)
        .args([
            "--bundle",
            "--format=esm",
            "--platform=neutral",
            "--target=es2022",
            "--conditions=workerd,worker,browser",
            "--main-fields=module,main",
            "--jsx=automatic",
            // workerd provides these when the deployment enables nodejs_compat.
            "--external:node:*",
            "--external:cloudflare:*",
            "--log-level=error",
            "--color=false",
            "--log-limit=50",
            "--metafile=../meta.json",
            "--outfile=../out.js",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(source) = &jsx_import_source {
        cmd.arg(format!("--jsx-import-source={source}"));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| BundleError::internal(format!("cannot start the bundler: {e}")))?;
    let mut stderr = String::new();
    let timeout = config.limits.timeout;
    let outcome = tokio::time::timeout(timeout, async {
        if let Some(pipe) = child.stderr.take() {
            let mut buf = Vec::new();
            let _ = pipe.take(MAX_STDERR).read_to_end(&mut buf).await;
            stderr = String::from_utf8_lossy(&buf).into_owned();
        }
        child.wait().await
    })
    .await;
    let status = match outcome {
        Err(_) => {
            return Err(BundleError::size(
                format!(
                    "bundling took longer than {} s and was stopped",
                    timeout.as_secs()
                ),
                "Reduce the amount of code, or split the service.",
            ));
        }
        Ok(Err(e)) => return Err(BundleError::internal(format!("esbuild: {e}"))),
        Ok(Ok(status)) => status,
    };
    if !status.success() {
        let mut diagnostics = parse_diagnostics(&stderr);
        for d in &mut diagnostics {
            // Never show host paths: keep what follows the last `node_modules/`.
            if let Some(f) = &mut d.file
                && let Some(i) = f.rfind("node_modules/")
            {
                *f = f[i..].to_owned();
            }
        }
        if diagnostics.is_empty() {
            return Err(BundleError::internal(format!(
                "esbuild failed ({status}) without a diagnostic"
            )));
        }
        let hint = hint_for(&diagnostics, &config.packages);
        return Err(BundleError::build(diagnostics, hint));
    }

    let out = dir.path().join("out.js");
    let size_bytes = tokio::fs::metadata(&out)
        .await
        .map_err(|e| BundleError::internal(format!("esbuild wrote no bundle: {e}")))?
        .len();
    if size_bytes > config.limits.max_bundle_bytes {
        return Err(BundleError::size(
            format!(
                "the bundle is {size_bytes} bytes, more than the {} allowed",
                config.limits.max_bundle_bytes
            ),
            "Large data belongs in external storage, not in the code.",
        ));
    }
    let code = tokio::fs::read_to_string(&out)
        .await
        .map_err(|e| BundleError::internal(format!("reading the bundle: {e}")))?;
    let meta = tokio::fs::read_to_string(dir.path().join("meta.json"))
        .await
        .map_err(|e| BundleError::internal(format!("reading esbuild's metafile: {e}")))?;
    let (inputs, packages) = check_imports(&meta, files, &config.packages)?;
    Ok(Bundle {
        code,
        manifest: Manifest {
            entry: entry.to_owned(),
            size_bytes,
            inputs,
            packages,
            jsx_import_source,
            build_ms: started.elapsed().as_millis() as u64,
        },
    })
}

#[derive(Deserialize)]
struct Metafile {
    inputs: BTreeMap<String, MetaInput>,
}

#[derive(Deserialize)]
struct MetaInput {
    #[serde(default)]
    imports: Vec<MetaImport>,
}

#[derive(Deserialize)]
struct MetaImport {
    path: String,
    #[serde(default)]
    external: bool,
    #[serde(default)]
    original: Option<String>,
}

/// The package a resolved path belongs to: the segment(s) after its last `node_modules/`.
fn package_of(path: &str) -> Option<String> {
    let rest = &path[path.rfind("node_modules/")? + "node_modules/".len()..];
    let mut segs = rest.split('/');
    let first = segs.next()?;
    if first.starts_with('@') {
        Some(format!("{first}/{}", segs.next()?))
    } else {
        Some(first.to_owned())
    }
}

/// Agent files may import only curated packages (not, say, a package that is merely installed as
/// a dependency of one). Returns the agent files used and the curated packages used.
fn check_imports(
    meta: &str,
    files: &SourceFiles,
    curated: &BTreeMap<String, String>,
) -> Result<(Vec<String>, BTreeMap<String, String>), BundleError> {
    let meta: Metafile = serde_json::from_str(meta)
        .map_err(|e| BundleError::internal(format!("esbuild's metafile: {e}")))?;
    let mut inputs = Vec::new();
    let mut used = BTreeMap::new();
    for (path, input) in &meta.inputs {
        if path.contains("node_modules/") {
            continue;
        }
        if !files.contains(path) {
            // The pre-scan refuses the ways to get here; this is the backstop.
            return Err(BundleError::build(
                vec![Diagnostic {
                    file: None,
                    line: None,
                    column: None,
                    message: "the bundle would include a file that is not part of the upload"
                        .into(),
                }],
                "Import only the uploaded files and the platform's packages.",
            ));
        }
        inputs.push(path.clone());
        for import in input.imports.iter().filter(|i| !i.external) {
            let Some(pkg) = package_of(&import.path) else {
                continue;
            };
            match curated.get(&pkg) {
                Some(version) => {
                    used.insert(pkg, version.clone());
                }
                None => {
                    let spec = import.original.clone().unwrap_or_else(|| pkg.clone());
                    return Err(BundleError::build(
                        vec![Diagnostic {
                            file: Some(path.clone()),
                            line: None,
                            column: None,
                            message: format!(
                                "{path}: imports {spec:?} from package {pkg:?}, which is not in the platform's package set"
                            ),
                        }],
                        available(curated),
                    ));
                }
            }
        }
    }
    Ok((inputs, used))
}

/// Specifiers the agent's files import (`from "x"`, `import "x"`, `import("x")`,
/// `require("x")`). A scan, not a parse: it runs before esbuild so that an import that escapes the
/// uploaded files, or names a host tool, is refused before esbuild reads anything.
pub(crate) fn imported_specifiers(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let q = b[i];
        if q != b'"' && q != b'\'' {
            i += 1;
            continue;
        }
        let Some(len) = b[i + 1..].iter().position(|&c| c == q || c == b'\n') else {
            break;
        };
        let spec = &text[i + 1..i + 1 + len];
        let before = text[..i].trim_end();
        let before = before
            .strip_suffix('(')
            .map(str::trim_end)
            .unwrap_or(before);
        let keyword = ["from", "import", "require"].iter().any(|k| {
            before.ends_with(k)
                && !before[..before.len() - k.len()]
                    .ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$' || c == '.')
        });
        if keyword && !spec.is_empty() {
            out.push(spec);
        }
        i += len + 2;
    }
    out
}

/// Refuses, before any work: absolute imports, relative imports that climb out of the uploaded
/// files, URL imports, and packages installed on the host that are not offered to tenants (the
/// tools). A package that is not installed at all is left to esbuild, which names it ("Could not
/// resolve") and gets the list of what is available as its hint.
pub(crate) fn precheck_imports(
    files: &SourceFiles,
    curated: &BTreeMap<String, String>,
    node_modules: &Path,
) -> Result<(), BundleError> {
    let refuse = |path: &str, message: String, hint: String| {
        Err(BundleError::build(
            vec![Diagnostic {
                file: Some(path.to_owned()),
                line: None,
                column: None,
                message: format!("{path}: {message}"),
            }],
            hint,
        ))
    };
    for (path, text) in files.iter() {
        if !is_code(path) {
            continue;
        }
        for spec in imported_specifiers(text) {
            if spec.starts_with('/') {
                return refuse(
                    path,
                    format!("imports {spec:?}, an absolute path"),
                    "Import only the uploaded files, with relative paths such as './lib'.".into(),
                );
            }
            if spec.starts_with('.') {
                if escapes(path, spec) {
                    return refuse(
                        path,
                        format!("imports {spec:?}, which is outside the uploaded files"),
                        "Import only the uploaded files.".into(),
                    );
                }
                continue;
            }
            if spec.starts_with("node:") || spec.starts_with("cloudflare:") {
                continue;
            }
            if spec.contains(':') {
                return refuse(
                    path,
                    format!("imports {spec:?}: URL imports are not supported"),
                    available(curated),
                );
            }
            let Some(pkg) = package_of(&format!("node_modules/{spec}")) else {
                continue;
            };
            if !curated.contains_key(&pkg) && node_modules.join(&pkg).exists() {
                return refuse(
                    path,
                    format!("imports package {pkg:?}, which is not in the platform's package set"),
                    available(curated),
                );
            }
        }
    }
    Ok(())
}

/// True when `spec`, relative to the directory of `importer`, leaves the upload's root.
fn escapes(importer: &str, spec: &str) -> bool {
    let mut depth = importer.matches('/').count() as i64;
    for seg in spec.split('/') {
        match seg {
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            "." | "" => {}
            _ => depth += 1,
        }
    }
    false
}

fn is_code(path: &str) -> bool {
    [".ts", ".tsx", ".js", ".jsx", ".mjs", ".mts", ".cjs", ".cts"]
        .iter()
        .any(|e| path.ends_with(e))
}

fn available(curated: &BTreeMap<String, String>) -> String {
    let list = curated
        .iter()
        .map(|(n, v)| format!("{n}@{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "Packages available to import: {list}. Anything else must be part of the uploaded sources."
    )
}

fn hint_for(diagnostics: &[Diagnostic], curated: &BTreeMap<String, String>) -> String {
    let unresolved_package = diagnostics.iter().find_map(|d| {
        let spec = d
            .message
            .strip_prefix("Could not resolve \"")?
            .strip_suffix('"')?;
        (!spec.starts_with('.') && !spec.starts_with('/')).then_some(spec)
    });
    match unresolved_package {
        Some(spec) => format!("{spec:?} is not available. {}", available(curated)),
        None => "Fix the errors at the given file:line:col and deploy again.".to_owned(),
    }
}

/// Parses esbuild's text log:
///
/// ```text
/// ✘ [ERROR] Expected ";" but found "z"
///
///     index.ts:3:6:
/// ```
fn parse_diagnostics(stderr: &str) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = Vec::new();
    let mut awaiting_location = false;
    for line in stderr.lines() {
        if let Some(msg) = line.strip_prefix("✘ [ERROR] ") {
            if out.len() == MAX_DIAGNOSTICS {
                break;
            }
            out.push(Diagnostic {
                file: None,
                line: None,
                column: None,
                message: msg.trim().to_owned(),
            });
            awaiting_location = true;
            continue;
        }
        if !awaiting_location || line.trim().is_empty() {
            continue;
        }
        awaiting_location = false;
        if let Some(d) = out.last_mut()
            && let Some((file, l, c)) = parse_location(line.trim())
        {
            d.file = Some(file);
            d.line = Some(l);
            d.column = Some(c);
        }
    }
    out
}

/// `src/index.ts:3:6:` → (`src/index.ts`, 3, 6)
fn parse_location(s: &str) -> Option<(String, u32, u32)> {
    let s = s.strip_suffix(':')?;
    let (rest, col) = s.rsplit_once(':')?;
    let (file, line) = rest.rsplit_once(':')?;
    Some((file.to_owned(), line.parse().ok()?, col.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_located_and_unlocated_errors() {
        let log = "✘ [ERROR] Expected \";\" but found \"z\"\n\n    src/a.ts:3:6:\n      3 │ let y z\n\n✘ [ERROR] Something global\n\n";
        let d = parse_diagnostics(log);
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0].to_string(),
            "src/a.ts:3:6 Expected \";\" but found \"z\""
        );
        assert_eq!(d[1].file, None);
    }

    #[test]
    fn escaping_relative_imports_are_detected() {
        assert!(!escapes("src/index.ts", "./lib"));
        assert!(!escapes("src/index.ts", "../other.ts"));
        assert!(escapes("src/index.ts", "../../x"));
        assert!(escapes("index.ts", "../x"));
        assert!(escapes("src/a/b.ts", "../../../etc/passwd"));
        assert!(!escapes("src/a/b.ts", "./c/../../d"));
    }

    #[test]
    fn finds_import_specifiers() {
        let src = r#"import { Hono } from 'hono'
import x from "./local"
import "@hono/zod-validator/x"
const z = await import("zod")
const l = require('lodash')
import fs from "node:fs"
const notAnImport = myfrom("nope")
"#;
        assert_eq!(
            imported_specifiers(src),
            vec![
                "hono",
                "./local",
                "@hono/zod-validator/x",
                "zod",
                "lodash",
                "node:fs"
            ]
        );
    }

    #[test]
    fn package_names_include_scopes() {
        assert_eq!(
            package_of("../x/node_modules/@hono/zod-validator/dist/index.js").as_deref(),
            Some("@hono/zod-validator")
        );
        assert_eq!(
            package_of("node_modules/a/node_modules/hono/dist/x.js").as_deref(),
            Some("hono")
        );
        assert_eq!(package_of("src/x.ts"), None);
    }
}
