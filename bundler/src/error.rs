use serde::Serialize;

/// One esbuild error, located in the agent's own file when esbuild knows where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.line, self.column) {
            (Some(file), Some(l), Some(c)) => write!(f, "{file}:{l}:{c} {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// Why a bundle was refused. `code()` is the machine-readable kind the MCP tools report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct BundleError {
    code: &'static str,
    pub message: String,
    pub hint: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
}

impl BundleError {
    pub fn validation(message: String, hint: impl Into<String>) -> Self {
        Self::new("VALIDATION_ERROR", message, hint)
    }

    pub fn size(message: String, hint: impl Into<String>) -> Self {
        Self::new("SIZE_LIMIT", message, hint)
    }

    pub fn internal(message: String) -> Self {
        Self::new(
            "INTERNAL",
            message,
            "This is a platform fault, not the agent's; retry later.",
        )
    }

    pub(crate) fn build(diagnostics: Vec<Diagnostic>, hint: impl Into<String>) -> Self {
        let message = diagnostics
            .iter()
            .map(Diagnostic::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        BundleError {
            code: "BUNDLE_FAILED",
            message,
            hint: hint.into(),
            diagnostics,
        }
    }

    fn new(code: &'static str, message: String, hint: impl Into<String>) -> Self {
        BundleError {
            code,
            message,
            hint: hint.into(),
            diagnostics: Vec::new(),
        }
    }

    /// `VALIDATION_ERROR`, `SIZE_LIMIT`, `BUNDLE_FAILED` or `INTERNAL`.
    pub fn code(&self) -> &'static str {
        self.code
    }
}
