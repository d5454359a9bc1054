//! The control service: the owner of projects, deployments and their lifecycle. Each account is
//! an ephemeral org with no human owner: the payer. See docs/control.md.

pub mod embedded;
pub mod error;
pub mod hosts;
pub mod http;
pub mod locks;
mod metrics;
pub mod model;
pub mod routes;
pub mod rows;
pub mod runtime;
mod service;
pub mod store;

pub use embedded::EmbeddedControlStore;
pub use error::ControlError;
pub use model::{DeployStatus, Deployment, Project, ProjectStatus};
pub use routes::{LocalRoutes, RoutePublisher};
pub use runtime::Runtime;
pub use service::{
    Control, ControlConfig, DatabaseAccess, DatabaseView, DeployOutcome, DeployRequest,
    ProjectView, QueryOut, START_LOCK_WAIT, Traffic, UsageView, bundler_for,
};
pub use store::{ControlStore, RedisControlStore, Usage};
