//! HTTP: `POST /api/v1/alerts` (Alertmanager webhook), `/healthz`, `/readyz`, `/metrics`.
//!
//! The webhook only authenticates, validates, clips and enqueues (bounded), then answers 202: the
//! work happens in the reconciler. Durability argument: a payload acknowledged and then lost in a
//! crash is not lost for good, because Alertmanager re-sends every firing alert of a group on
//! `repeat_interval` (and on any change of the group after `group_interval`), and everything the
//! healer already did is in the node's ticket annotation, from which a restarted healer resumes.
//!
//! The queue is bounded in count (`queue_capacity`) and in bytes (`max_queue_bytes`): each
//! queued [`Batch`] holds semaphore permits for its size (one per KiB) until it has been applied.
//! A full queue answers 503, which Alertmanager retries. Every 4xx is the sender's problem and is
//! logged at WARN with its reason, never the body: a 400 is not retried by Alertmanager, so a
//! silent one would stop remediation unseen.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::alerts::clip::clipped_str;
use crate::alerts::{Alert, AlertStatus, parse_webhook};
use crate::metrics::Metrics;

/// Default request body limit: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// Bytes of queue one semaphore permit stands for.
pub const QUEUE_PERMIT_BYTES: usize = 1024;

/// Longest reason written to the log for a rejected request.
const MAX_LOGGED_REASON: usize = 256;

/// The alerts of one accepted webhook request, on their way to the store. `permit` holds this
/// batch's share of `max_queue_bytes`: drop it once the alerts are applied, not before.
#[derive(Debug)]
pub struct Batch {
    pub alerts: Vec<Alert>,
    pub permit: OwnedSemaphorePermit,
}

#[derive(Clone)]
pub struct AppState {
    token: Arc<[u8]>,
    queue: mpsc::Sender<Batch>,
    /// One permit per [`QUEUE_PERMIT_BYTES`] of `max_queue_bytes`.
    queue_bytes: Arc<Semaphore>,
    queue_permits: u32,
    pub metrics: Metrics,
    /// Ready = this replica serves: set by the serve loop once it listens. Every replica stores
    /// what it receives and only the leader acts (`ark_healer_is_leader`), so any replica may take
    /// Alertmanager's notifications, and a rolling update is not held up by a standby.
    pub ready: Arc<AtomicBool>,
    body_limit: usize,
}

impl AppState {
    pub fn new(
        token: &str,
        queue: mpsc::Sender<Batch>,
        metrics: Metrics,
        ready: Arc<AtomicBool>,
        body_limit: usize,
        max_queue_bytes: usize,
    ) -> Self {
        let permits = (max_queue_bytes / QUEUE_PERMIT_BYTES)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        AppState {
            token: token.trim().as_bytes().into(),
            queue,
            queue_bytes: Arc::new(Semaphore::new(permits)),
            queue_permits: u32::try_from(permits).unwrap_or(u32::MAX),
            metrics,
            ready,
            body_limit,
        }
    }

    /// Permits for `bytes` of queue: at least one per request. A batch larger than the whole
    /// budget takes all of it, so it waits for an empty queue instead of never fitting.
    fn permits_for(&self, bytes: usize) -> u32 {
        let n = bytes.div_ceil(QUEUE_PERMIT_BYTES).max(1);
        u32::try_from(n).unwrap_or(u32::MAX).min(self.queue_permits)
    }
}

/// Errors of the HTTP layer; each is a response. 4xx are the client's problem: logged at WARN,
/// not as errors. 503 (queue full) is back-pressure that Alertmanager retries, also a WARN.
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

impl AppError {
    fn status(&self) -> StatusCode {
        match self {
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::QueueFull => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let code = self.status();
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
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
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
            let reason = e.to_string();
            let reason = clipped_str(&reason, MAX_LOGGED_REASON);
            let code = e.status();
            tracing::warn!(code = code.as_u16(), reason, "Webhook request rejected");
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
    // The bytes being read and parsed count against the same budget as the queue: without it,
    // hundreds of concurrent 1 MiB bodies (and their parsed copies) took the healer to 800 MiB.
    // A body without Content-Length reserves the whole body limit.
    let reserve = declared.unwrap_or(s.body_limit).min(s.body_limit);
    let mut permit = s
        .queue_bytes
        .clone()
        .try_acquire_many_owned(s.permits_for(reserve))
        .map_err(|_| AppError::QueueFull)?;
    let body: Body = req.into_body();
    let bytes = axum::body::to_bytes(body, s.body_limit)
        .await
        .map_err(|_| AppError::PayloadTooLarge(s.body_limit))?;
    let payload = parse_webhook(&bytes).map_err(|e| AppError::BadRequest(e.to_string()))?;
    let mut clipped = 0;
    let alerts: Vec<Alert> = payload
        .alerts
        .into_iter()
        .map(|a| {
            let (a, c) = Alert::from_webhook(a);
            clipped += c.fields();
            a
        })
        .collect();
    // What the queue holds is the alerts, which can take more memory than their JSON did.
    let held = bytes.len().max(alerts.iter().map(Alert::bytes).sum());
    drop(bytes);
    let want = s.permits_for(held) as usize;
    let have = permit.num_permits();
    if want > have {
        let more = s
            .queue_bytes
            .clone()
            .try_acquire_many_owned((want - have) as u32)
            .map_err(|_| AppError::QueueFull)?;
        permit.merge(more);
    } else if want < have {
        drop(permit.split(have - want));
    }
    let n = alerts.len();
    let (mut firing, mut resolved) = (0, 0);
    for a in &alerts {
        match a.status {
            AlertStatus::Firing => firing += 1,
            AlertStatus::Resolved => resolved += 1,
        }
    }
    // A full or closed channel hands the batch back; dropping it returns its permits.
    s.queue
        .try_send(Batch { alerts, permit })
        .map_err(|_| AppError::QueueFull)?;
    s.metrics.queue_depth.inc();
    let received = &s.metrics.alerts_received;
    received.with_label_values(&["firing"]).inc_by(firing);
    received.with_label_values(&["resolved"]).inc_by(resolved);
    s.metrics.alert_fields_clipped.inc_by(clipped as u64);
    Ok(n)
}

#[cfg(test)]
mod tests;
