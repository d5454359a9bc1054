//! The admin listener: `/metrics` (Prometheus text), `/livez`, `/readyz`. It runs on the
//! background runtime, not Pingora's, so that it keeps answering while the proxy drains.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tollgate_routes::RouteTable;

use crate::dispatch::Health;

#[derive(Clone)]
pub struct AdminState {
    pub registry: Registry,
    pub table: Arc<RouteTable>,
    pub health: Arc<Health>,
    pub ready: prometheus::IntGauge,
}

impl AdminState {
    fn is_ready(&self) -> (bool, bool, bool) {
        let synced = self.table.is_synced();
        let draining = self.health.is_draining();
        (synced && !draining, synced, draining)
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    s.ready.set(i64::from(s.is_ready().0));
    let mut out = Vec::with_capacity(16 * 1024);
    match TextEncoder::new().encode(&s.registry.gather(), &mut out) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let (ready, synced, draining) = s.is_ready();
    let body = serde_json::json!({
        "ready": ready,
        "routes_synced": synced,
        "draining": draining,
        "routes": s.table.snapshot().len(),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}
