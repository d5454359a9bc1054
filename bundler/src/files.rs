//! Validation of an agent's file set, before any work is done.

use std::collections::BTreeMap;

use crate::{BundleError, Limits};

/// A validated set of source files: normalised relative path → UTF-8 text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFiles {
    files: BTreeMap<String, String>,
    total_bytes: usize,
}

impl SourceFiles {
    /// Validates `(path, bytes)` pairs as an MCP tool or API received them.
    pub fn new<P, B>(
        input: impl IntoIterator<Item = (P, B)>,
        limits: &Limits,
    ) -> Result<Self, BundleError>
    where
        P: AsRef<str>,
        B: Into<Vec<u8>>,
    {
        let mut files = BTreeMap::new();
        let mut total_bytes = 0usize;
        let mut count = 0usize;
        for (path, bytes) in input {
            let raw = path.as_ref();
            count += 1;
            if count > limits.max_files {
                return Err(BundleError::size(
                    format!("more than {} files", limits.max_files),
                    "Deploy only the sources the service needs; dependencies come from the curated package set, not from uploaded node_modules.",
                ));
            }
            let path = normalize_path(raw)?;
            let bytes = bytes.into();
            total_bytes = total_bytes.saturating_add(bytes.len());
            if total_bytes > limits.max_source_bytes {
                return Err(BundleError::size(
                    format!(
                        "the files add up to more than {} bytes",
                        limits.max_source_bytes
                    ),
                    "Remove generated or vendored files; large assets belong in external storage.",
                ));
            }
            let text = String::from_utf8(bytes).map_err(|e| {
                BundleError::validation(
                    format!(
                        "{path}: not UTF-8 text (invalid byte at offset {})",
                        e.utf8_error().valid_up_to()
                    ),
                    "Only text sources can be deployed; encode binary data (e.g. base64) inside a source file.",
                )
            })?;
            if files.insert(path.clone(), text).is_some() {
                return Err(BundleError::validation(
                    format!("{raw:?}: duplicate path (another entry also normalises to {path:?})"),
                    "Each file may appear once; `./a.ts` and `a.ts` are the same file.",
                ));
            }
        }
        // `src` as a file and `src/index.ts` cannot both exist on disk.
        for path in files.keys() {
            let mut dir = path.as_str();
            while let Some((parent, _)) = dir.rsplit_once('/') {
                if files.contains_key(parent) {
                    return Err(BundleError::validation(
                        format!("{parent:?} is both a file and the folder of {path:?}"),
                        "Rename the file or the folder.",
                    ));
                }
                dir = parent;
            }
        }
        if files.is_empty() {
            return Err(BundleError::validation(
                "no files".to_owned(),
                "Send at least an entry file, e.g. {\"src/index.ts\": \"export default { fetch() { return new Response('hi') } }\"}.",
            ));
        }
        Ok(SourceFiles { files, total_bytes })
    }

    pub fn get(&self, path: &str) -> Option<&str> {
        self.files.get(path).map(String::as_str)
    }

    pub fn contains(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files.iter().map(|(p, t)| (p.as_str(), t.as_str()))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }
}

const MAX_PATH: usize = 256;

/// Normalises `./a//b.ts` to `a/b.ts` and refuses anything that could escape the build directory
/// or carry secrets and vendored code.
pub fn normalize_path(raw: &str) -> Result<String, BundleError> {
    let bad = |why: &str, hint: &str| {
        Err(BundleError::validation(
            format!("{raw:?}: {why}"),
            hint.to_owned(),
        ))
    };
    let relative = "Use relative paths such as `src/index.ts`.";
    if raw.is_empty() {
        return bad("empty path", relative);
    }
    if raw.len() > MAX_PATH {
        return bad(&format!("path longer than {MAX_PATH} bytes"), relative);
    }
    if raw.contains('\0') {
        return bad("path contains a NUL byte", relative);
    }
    if raw.contains('\\') {
        return bad("path contains a backslash", "Use `/` as the separator.");
    }
    if raw.starts_with('/') {
        return bad("absolute path", relative);
    }
    let mut parts = Vec::new();
    for seg in raw.split('/') {
        match seg {
            "" | "." => continue,
            ".." => return bad("path contains `..`", relative),
            _ => {}
        }
        if seg == "node_modules" {
            return bad(
                "node_modules cannot be uploaded",
                "Import packages by name; the curated set is installed on the platform.",
            );
        }
        if seg == ".git" {
            return bad(
                ".git cannot be uploaded",
                "Send only the service's source files.",
            );
        }
        if seg.len() > 255 {
            return bad("a path segment is longer than 255 bytes", relative);
        }
        if seg.chars().any(char::is_control) {
            return bad("path contains a control character", relative);
        }
        parts.push(seg);
    }
    let Some(last) = parts.last() else {
        return bad("path names no file", relative);
    };
    if last.starts_with(".env") {
        return bad(
            "`.env` files are refused so secrets are never stored with the code",
            "Pass secrets as the deployment's env vars; the service reads them from `env`.",
        );
    }
    if raw.ends_with('/') || raw.ends_with("/.") {
        return bad("path ends with `/` (a directory)", relative);
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_dots_and_double_slashes() {
        assert_eq!(normalize_path("./src//a/./b.ts").unwrap(), "src/a/b.ts");
        assert_eq!(normalize_path("index.ts").unwrap(), "index.ts");
    }

    #[test]
    fn a_file_cannot_also_be_a_folder() {
        let e = SourceFiles::new([("src", "x"), ("src/index.ts", "y")], &Limits::default())
            .unwrap_err();
        assert_eq!(e.code(), "VALIDATION_ERROR");
        assert!(
            e.message.contains("both a file and the folder"),
            "{}",
            e.message
        );
        let long = format!("src/{}.ts", "a".repeat(253));
        assert_eq!(
            normalize_path(&long).unwrap_err().code(),
            "VALIDATION_ERROR"
        );
    }

    #[test]
    fn refuses_escaping_and_secret_paths() {
        for p in [
            "",
            "/etc/passwd",
            "../x.ts",
            "src/../../x.ts",
            "a\\b.ts",
            "a\0.ts",
            ".env",
            "src/.env.local",
            "node_modules/hono/index.js",
            "src/.git/config",
            "src/",
            "src/.",
            ".",
            "a\nb.ts",
        ] {
            let e = normalize_path(p).unwrap_err();
            assert_eq!(e.code(), "VALIDATION_ERROR", "{p:?}");
        }
    }
}
