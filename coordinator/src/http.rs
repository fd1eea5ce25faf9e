//! The coordinator's plain HTTP listener: `/metrics` and `/healthz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Page;

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

pub fn router(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .with_state(HttpState { registry, metrics })
}

async fn metrics_page(State(state): State<HttpState>) -> impl IntoResponse {
    let body = state.metrics.render(&state.registry.list());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// Healthy when the store answers a read.
async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    match state.registry.events(Page::oldest(u64::MAX - 1, 1)).await {
        Ok(_) => (StatusCode::OK, "ok\n".to_string()),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {error}\n"),
        ),
    }
}
