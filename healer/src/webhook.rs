//! HTTP: `POST /api/v1/alerts` (Alertmanager webhook), `/healthz`, `/readyz`, `/metrics`.
//!
//! The webhook only authenticates, validates and enqueues (bounded), then answers 202: the work
//! happens in the reconciler. Durability argument: a payload acknowledged and then lost in a crash
//! is not lost for good, because Alertmanager re-sends every firing alert of a group on
//! `repeat_interval` (and on any change of the group after `group_interval`), and everything the
//! healer already did is in the node's ticket annotation, from which a restarted healer resumes.
//! A full queue answers 503, which Alertmanager retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::mpsc;

use crate::alerts::{Alert, parse_webhook};
use crate::metrics::Metrics;

/// Default request body limit: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState {
    token: Arc<[u8]>,
    queue: mpsc::Sender<Vec<Alert>>,
    pub metrics: Metrics,
    /// Ready = this replica acts (holds the Lease, or leader election is off). Non-leaders are
    /// unready so the Service sends Alertmanager's notifications to the leader only.
    pub ready: Arc<AtomicBool>,
    body_limit: usize,
}

impl AppState {
    pub fn new(
        token: &str,
        queue: mpsc::Sender<Vec<Alert>>,
        metrics: Metrics,
        ready: Arc<AtomicBool>,
        body_limit: usize,
    ) -> Self {
        AppState {
            token: token.trim().as_bytes().into(),
            queue,
            metrics,
            ready,
            body_limit,
        }
    }
}

/// Errors of the HTTP layer; each is a response. 4xx are the client's problem and not logged as
/// errors.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    BadRequest(String),
    #[error("queue full, retry later")]
    QueueFull,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let code = match &self {
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::QueueFull => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut resp = (code, axum::Json(json!({"error": self.to_string()}))).into_response();
        if matches!(self, AppError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
        }
        resp
    }
}

/// Equality in time independent of where the inputs differ (length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/alerts", post(receive_alerts))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not the leader\n").into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.encode(),
    )
        .into_response()
}

async fn receive_alerts(State(s): State<AppState>, req: Request) -> Response {
    let result = accept(&s, req).await;
    let resp = match result {
        Ok(n) => (StatusCode::ACCEPTED, axum::Json(json!({"accepted": n}))).into_response(),
        Err(e) => {
            tracing::debug!(error = %e, "Webhook request rejected");
            e.into_response()
        }
    };
    s.metrics
        .webhook_requests
        .with_label_values(&[resp.status().as_str()])
        .inc();
    resp
}

async fn accept(s: &AppState, req: Request) -> Result<usize, AppError> {
    let headers = req.headers();
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if s.token.is_empty() || !constant_time_eq(presented.as_bytes(), &s.token) {
        return Err(AppError::Unauthorized);
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(AppError::UnsupportedMediaType);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > s.body_limit) {
        return Err(AppError::PayloadTooLarge(s.body_limit));
    }
    let body: Body = req.into_body();
    let bytes = axum::body::to_bytes(body, s.body_limit)
        .await
        .map_err(|_| AppError::PayloadTooLarge(s.body_limit))?;
    let payload = parse_webhook(&bytes).map_err(|e| AppError::BadRequest(e.to_string()))?;
    let alerts: Vec<Alert> = payload.alerts.into_iter().map(Alert::from).collect();
    let n = alerts.len();
    for a in &alerts {
        let status = match a.status {
            crate::alerts::AlertStatus::Firing => "firing",
            crate::alerts::AlertStatus::Resolved => "resolved",
        };
        s.metrics.alerts_received.with_label_values(&[status]).inc();
    }
    s.queue.try_send(alerts).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => AppError::QueueFull,
        mpsc::error::TrySendError::Closed(_) => AppError::QueueFull,
    })?;
    s.metrics.queue_depth.inc();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request as HttpRequest;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const SAMPLE: &str = r#"{"version":"4","groupKey":"g","truncatedAlerts":0,"status":"firing","receiver":"r","groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am","alerts":[{"status":"firing","labels":{"node":"n1","condition":"GpuHung"},"annotations":{},"startsAt":"2026-11-22T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"f1"}]}"#;

    fn state(cap: usize) -> (AppState, mpsc::Receiver<Vec<Alert>>) {
        let (tx, rx) = mpsc::channel(cap);
        let m = Metrics::register(&prometheus::Registry::new()).unwrap();
        (
            AppState::new(
                "s3cret",
                tx,
                m,
                Arc::new(AtomicBool::new(true)),
                DEFAULT_BODY_LIMIT,
            ),
            rx,
        )
    }

    fn post(body: impl Into<Body>, token: Option<&str>, ctype: Option<&str>) -> HttpRequest<Body> {
        let mut b = HttpRequest::post("/api/v1/alerts");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if let Some(c) = ctype {
            b = b.header("content-type", c);
        }
        b.body(body.into()).unwrap()
    }

    async fn send(s: &AppState, req: HttpRequest<Body>) -> (StatusCode, serde_json::Value) {
        let resp = router(s.clone()).oneshot(req).await.unwrap();
        let code = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            code,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn accepts_and_enqueues() {
        let (s, mut rx) = state(4);
        let (code, body) = send(&s, post(SAMPLE, Some("s3cret"), Some("application/json"))).await;
        assert_eq!(code, StatusCode::ACCEPTED);
        assert_eq!(body["accepted"], 1);
        let got = rx.try_recv().unwrap();
        assert_eq!(got[0].fingerprint, "f1");
        let text = s.metrics.encode();
        assert!(
            text.contains("ark_healer_alerts_received_total{status=\"firing\"} 1"),
            "{text}"
        );
        assert!(text.contains("ark_healer_webhook_requests_total{code=\"202\"} 1"));
    }

    #[tokio::test]
    async fn auth_is_checked_first() {
        let (s, mut rx) = state(4);
        for token in [None, Some("wrong"), Some("s3cret-but-longer"), Some("")] {
            let (code, body) = send(&s, post(SAMPLE, token, Some("application/json"))).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}");
            assert!(body["error"].as_str().unwrap().contains("token"));
        }
        // Even a bad body gets 401 without a token: nothing is parsed for strangers.
        let (code, _) = send(&s, post("{", None, Some("text/plain"))).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn wrong_content_type_is_415() {
        let (s, _rx) = state(4);
        for ct in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let (code, _) = send(&s, post(SAMPLE, Some("s3cret"), ct)).await;
            assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        let (code, _) = send(
            &s,
            post(
                SAMPLE,
                Some("s3cret"),
                Some("application/json; charset=utf-8"),
            ),
        )
        .await;
        assert_eq!(code, StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn malformed_json_is_400_with_a_json_error() {
        let (s, mut rx) = state(4);
        let bodies = [
            "".to_owned(),
            "{".to_owned(),
            SAMPLE[..SAMPLE.len() - 10].to_owned(),
            SAMPLE.replace("\"version\":\"4\"", "\"version\":\"5\""),
            SAMPLE.replace("\"firing\",\"labels\"", "\"exploding\",\"labels\""),
            "[]".to_owned(),
            "null".to_owned(),
        ];
        for b in bodies {
            let (code, body) = send(
                &s,
                post(b.clone(), Some("s3cret"), Some("application/json")),
            )
            .await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{b}");
            assert!(body["error"].is_string(), "{body}");
        }
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn oversized_body_is_413() {
        let (s, _rx) = state(4);
        // 100,000 alerts is far over 1 MiB.
        let alert = r#"{"status":"firing","labels":{"node":"n1","condition":"GpuHung"},"annotations":{},"startsAt":"2026-11-22T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"f1"}"#;
        let many = format!(
            r#"{{"version":"4","status":"firing","alerts":[{}]}}"#,
            vec![alert; 100_000].join(",")
        );
        let (code, body) = send(
            &s,
            post(many.clone(), Some("s3cret"), Some("application/json")),
        )
        .await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body["error"].is_string());
        // Without a Content-Length (streamed body) the limit still holds.
        let stream = futures::stream::iter(
            many.into_bytes()
                .chunks(64 * 1024)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        );
        let (code, _) = send(
            &s,
            post(
                Body::from_stream(stream),
                Some("s3cret"),
                Some("application/json"),
            ),
        )
        .await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn full_queue_is_503() {
        let (s, _rx) = state(1);
        let req = || post(SAMPLE, Some("s3cret"), Some("application/json"));
        assert_eq!(send(&s, req()).await.0, StatusCode::ACCEPTED);
        assert_eq!(send(&s, req()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn health_ready_metrics() {
        let (s, _rx) = state(1);
        let get = |p: &str| HttpRequest::get(p).body(Body::empty()).unwrap();
        let r = router(s.clone()).oneshot(get("/healthz")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = router(s.clone()).oneshot(get("/readyz")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        s.ready.store(false, Ordering::Relaxed);
        let r = router(s.clone()).oneshot(get("/readyz")).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let r = router(s.clone()).oneshot(get("/metrics")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("ark_healer_tickets_open 0"), "{text}");
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
