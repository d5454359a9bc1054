//! The `tollgate` binary's command line, as a library for its tests. The composition is in
//! `tollgate-app`.

pub mod cli;
pub use tollgate_app::config;
