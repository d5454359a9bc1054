//! The operator API (for SREs): list, inspect, suspend, resume and delete any project. Bearer
//! token from config; without a token the API is off. Errors are problem+json with a hint.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::error::ControlError;
use crate::service::Control;

#[derive(Clone)]
struct Admin {
    control: Arc<Control>,
    token: Option<Arc<str>>,
}

/// `/v1/admin/...` routes, to merge into the control listener's router.
pub fn admin_router(control: Arc<Control>, token: Option<String>) -> axum::Router {
    let state = Admin {
        control,
        token: token.filter(|t| !t.is_empty()).map(Arc::from),
    };
    axum::Router::new()
        .route("/v1/admin/projects", get(list))
        .route("/v1/admin/projects/{id}", get(show).delete(delete))
        .route("/v1/admin/projects/{id}/suspend", post(suspend))
        .route("/v1/admin/projects/{id}/resume", post(resume))
        .with_state(state)
}

fn problem(status: StatusCode, code: &str, message: &str, hint: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:tollgate:problem:{}", code.to_ascii_lowercase().replace('_', "-")),
        "title": code,
        "status": status.as_u16(),
        "detail": message,
        "hint": hint,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(e: ControlError) -> Response {
    let status = match e.code {
        "NOT_FOUND" => StatusCode::NOT_FOUND,
        "VALIDATION_ERROR" | "BUNDLE_FAILED" | "SIZE_LIMIT" => StatusCode::BAD_REQUEST,
        "DEPLOY_FAILED" => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    problem(status, e.code, &e.message, &e.hint)
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Some(answer)` when the request must be refused.
fn authorize(admin: &Admin, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &admin.token else {
        return Some(problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "ADMIN_DISABLED",
            "the operator API is off",
            "Set control.admin_token (or TOLLGATE_ADMIN_TOKEN) to turn it on.",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same(g.as_bytes(), token.as_bytes()) => None,
        _ => Some(problem(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or wrong admin token",
            "Send Authorization: Bearer <control.admin_token>.",
        )),
    }
}

async fn list(State(a): State<Admin>, h: HeaderMap) -> Response {
    if let Some(r) = authorize(&a, &h) {
        return r;
    }
    match a.control.admin_list().await {
        Ok(p) => Json(serde_json::json!({ "projects": p })).into_response(),
        Err(e) => error_response(e),
    }
}

async fn show(State(a): State<Admin>, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = authorize(&a, &h) {
        return r;
    }
    match a.control.admin_get(&id).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => error_response(e),
    }
}

async fn suspend(State(a): State<Admin>, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = authorize(&a, &h) {
        return r;
    }
    match a.control.admin_suspend(&id).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => error_response(e),
    }
}

async fn resume(State(a): State<Admin>, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = authorize(&a, &h) {
        return r;
    }
    match a.control.admin_resume(&id).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => error_response(e),
    }
}

async fn delete(State(a): State<Admin>, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = authorize(&a, &h) {
        return r;
    }
    match a.control.admin_delete(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error_response(e),
    }
}
