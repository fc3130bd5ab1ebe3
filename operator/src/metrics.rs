//! Prometheus metrics of the operator and the HTTP endpoint that serves them with the health
//! probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Short error class.
    pub error: String,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles run.
    pub reconciles: Counter,
    /// Reconciles that failed, by error class.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Histogram,
    /// Objects written (applied, deleted, status patched).
    pub writes: Counter,
    /// 1 while this instance holds the leader lease.
    pub leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mailcluster_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let writes = Counter::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed", errors.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles",
            duration.clone(),
        );
        registry.register("writes", "Objects written by reconciles", writes.clone());
        registry.register(
            "leader",
            "1 while this instance is the leader",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            writes,
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records a reconcile's duration.
    pub fn observe(&self, d: Duration) {
        self.reconciles.inc();
        self.duration.observe(d.as_secs_f64());
    }

    /// Records a failed reconcile.
    pub fn error(&self, class: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: class.to_string(),
            })
            .inc();
    }

    /// Marks the operator ready (it reached the API server).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the operator is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> StatusCode {
    if m.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The HTTP routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(m)
}

/// Serves [`router`] on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(m))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(m: &Arc<Metrics>, path: &str) -> (StatusCode, String) {
        let resp = router(m.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn health_ready_and_metrics_endpoints() {
        let m = Arc::new(Metrics::default());
        assert_eq!(get(&m, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&m, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        m.set_ready(true);
        assert_eq!(get(&m, "/readyz").await.0, StatusCode::OK);
        m.observe(Duration::from_millis(3));
        let (status, body) = get(&m, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("mailcluster_operator_reconciles_total 1"),
            "{body}"
        );
    }

    #[test]
    fn encodes_counters_and_histogram() {
        let m = Metrics::default();
        m.observe(Duration::from_millis(20));
        m.error("kube");
        let text = m.encode().unwrap();
        assert!(
            text.contains("mailcluster_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains("mailcluster_operator_reconcile_errors_total{error=\"kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mailcluster_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
