//! The hosted runtime: each deployment version runs in its own workerd process, with its CPU
//! measured and capped, its logs kept, and redeploys that drop nothing. See docs/runtime.md.

pub mod capnp;
pub mod cpu;
mod instance;
pub mod logs;
mod metrics;
mod supervisor;
pub mod toolchain;

pub use cpu::{AppliedLimits, CgroupMode, CpuSourceKind};
pub use logs::LogEntry;
pub use supervisor::{
    CpuDelta, CpuSink, D1Access, DeploymentSpec, DeploymentStatus, Inflight, InflightGuard,
    NoCpuSink, Phase, RuntimeConfig, RuntimeError, RuntimeEvent, Started, Supervisor,
};
pub use toolchain::{Toolchain, ToolchainError};
