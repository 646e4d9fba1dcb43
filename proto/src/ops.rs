//! The operations endpoint the coordinator and the agent share: `GET /metrics` in the
//! Prometheus text format (version 0.0.4) and `GET /healthz`, over plain HTTP on an
//! address inside the operator's network (`metrics_listen`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// Renders the metrics text, or says why it could not.
pub type Render = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// A label value with `\`, `"` and newlines escaped, as the text format asks.
pub fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A refusal reason's kind for a `reason` label: its first clause, so the label's
/// values stay few (the full reasons are in `study status`, the audit and egress logs).
pub fn reason_kind(reason: &str) -> String {
    let head = reason.split([':', ';', '(']).next().unwrap_or(reason).trim();
    head.chars().take(60).collect()
}

/// Appends one metric family: its HELP and TYPE lines, then `name{labels} value` lines.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

async fn metrics(State(render): State<Render>) -> impl IntoResponse {
    match tokio::task::spawn_blocking(move || render()).await {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics task: {e}\n")).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Serves `/metrics` (from `render`, off the reactor) and `/healthz` on `addr` until
/// `shutdown`.
pub async fn serve(addr: SocketAddr, render: Render, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics and health on plain HTTP");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(render);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_reasons_kept_short() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(reason_kind("ε cap: round 3 would bring dataset x to 1.2"), "ε cap");
        assert_eq!(reason_kind(&"x".repeat(100)).len(), 60);
    }
}
