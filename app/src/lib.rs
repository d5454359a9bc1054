//! The composition of tollgate: the one place that wires components.
//!
//! - [`config`]: the configuration model (file, then environment, then flags);
//! - [`settings`]: the configuration checked once, with every error naming its key;
//! - [`metering`]: the process's metering node (balance cache + settling agent, stand-ins,
//!   orphan journals);
//! - [`adapters`]: the glue between crates that must not know each other;
//! - [`node`]: a proxy node (metering node, then the proxy over its cache);
//! - [`modes`]: `run_proxy`, `run_control`, `run_runtime`, `run_dev`, each with one ordered shutdown;
//! - [`ops`]: operator commands.
//!
//! The binary parses its flags and calls one of these. docs/architecture.md draws the map.

pub mod adapters;
pub mod config;
pub mod control;
mod devchain;
pub mod metering;
pub mod modes;
pub mod node;
pub mod ops;
pub mod paid;
mod process;
pub mod settings;
mod shutdown;
pub mod telemetry;

pub use modes::{DevChoices, proxy_options, run_control, run_dev, run_proxy, run_runtime};
pub use settings::{Settings, SettingsError};

/// Logs to stderr through `tracing`: the settings' filter (`TOLLGATE_LOG` wins over
/// `log.level`), text or JSON; and, when configured, spans to OpenTelemetry as `service`
/// (`tollgate-proxy`, `tollgate-control`, `tollgate-dev`; [`telemetry`]).
pub fn init_logging(settings: &Settings, service: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, filter::filter_fn};
    let filter =
        EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Pingora's debug records print whole request headers (Authorization, MPP credentials,
    // cookies) and rmcp's print whole MCP requests (deploy secrets): never below info, whatever
    // the filter asks (tests/edge.rs::access_log_lines_and_no_secret_in_any_log).
    let no_secrets = filter_fn(|m| {
        *m.level() <= tracing::Level::INFO
            || !(m.target().starts_with("pingora") || m.target().starts_with("rmcp"))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // The log filter is the log's own: exported spans have their own targets.
    let otel = telemetry::layer(settings.config.log.otlp_endpoint.as_deref(), service);
    let registry = tracing_subscriber::registry().with(otel);
    let _ = match settings.config.log.format {
        config::LogFormat::Json => registry
            .with(fmt.json().with_filter(no_secrets).with_filter(filter))
            .try_init(),
        config::LogFormat::Text => registry
            .with(fmt.with_filter(no_secrets).with_filter(filter))
            .try_init(),
    };
}

/// `tollgate check-config`: parses the file and checks every value the settings can check
/// without starting anything; a one-line summary, or the first error with where it is.
pub fn check_config(file: &std::path::Path) -> Result<String, String> {
    let cfg = config::Config::from_file(file).map_err(|e| e.to_string())?;
    let s = Settings::from_config(cfg).map_err(|e| format!("{}: {e}", file.display()))?;
    let cfg = &s.config;
    Ok(format!(
        "{}: ok (proxy {}, admin {}, {} static route(s), routes from {})",
        file.display(),
        cfg.proxy.listen,
        cfg.admin.listen,
        cfg.routes.len(),
        if cfg.redis.is_some() {
            "Redis"
        } else {
            "this file only"
        }
    ))
}
