use serde::Serialize;

/// An error an agent can act on: a machine-readable code, what happened, what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ControlError {
    pub code: &'static str,
    pub message: String,
    pub hint: String,
}

impl ControlError {
    pub fn new(code: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        ControlError {
            code,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub fn validation(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new("VALIDATION_ERROR", message, hint)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            "NOT_FOUND",
            format!("{what} not found"),
            "List your projects with list_projects; ids look like p_… and d_….",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            "INTERNAL_ERROR",
            message,
            "A platform fault, not yours: retry shortly. Nothing was changed.",
        )
    }
}

impl From<tollgate_bundler::BundleError> for ControlError {
    fn from(e: tollgate_bundler::BundleError) -> Self {
        let code = match e.code() {
            "VALIDATION_ERROR" => "VALIDATION_ERROR",
            "SIZE_LIMIT" => "SIZE_LIMIT",
            "BUNDLE_FAILED" => "BUNDLE_FAILED",
            _ => "INTERNAL_ERROR",
        };
        ControlError::new(code, e.message, e.hint)
    }
}

impl From<redis::RedisError> for ControlError {
    fn from(e: redis::RedisError) -> Self {
        tracing::error!(error = %e, "control store");
        ControlError::internal("the control store is unreachable")
    }
}

impl From<serde_json::Error> for ControlError {
    fn from(e: serde_json::Error) -> Self {
        tracing::error!(error = %e, "control store record");
        ControlError::internal("a stored record could not be read")
    }
}
