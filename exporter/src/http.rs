//! HTTP surface: `/metrics` (encodes the latest snapshots, never waits on collectors),
//! `/healthz` (the process is up), `/readyz` (the pipeline runs), `/api/v1/why/{pid}` (causal
//! chain of a process) and `/api/v1/scenes` (active scenes). Built by [`router`] so tests call it
//! without a socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::graph::RootCause;
use crate::metrics::Telemetry;
use crate::pipeline::{PipelineClient, QueryError};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub telemetry: Telemetry,
    pub pipeline: Option<PipelineClient>,
    /// Set once collectors are started.
    pub ready: Arc<AtomicBool>,
}

/// Errors as responses: 4xx for bad requests (not logged), 5xx logged once, no internals leaked.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("pipeline unavailable")]
    Unavailable(#[source] QueryError),
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Unavailable(e) => {
                tracing::warn!(error = %e, "Query not answered");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/why/{pid}", get(why))
        .route("/api/v1/scenes", get(scenes))
        .route("/", get(index))
        .with_state(state)
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "<html><head><title>Ark exporter</title></head><body><h1>Ark exporter</h1>\
         <p><a href=\"/metrics\">Metrics</a> · <a href=\"/api/v1/scenes\">Active scenes</a> · \
         /api/v1/why/&lt;pid&gt;</p></body></html>",
    )
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.telemetry.encode(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let pipeline_ok = s.pipeline.as_ref().is_none_or(PipelineClient::is_running);
    if s.ready.load(Ordering::Relaxed) && pipeline_ok {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Root causes in one `why` answer at most.
pub const MAX_WHY_CAUSES: usize = 64;
/// Hops of one chain at most (the first ones, from the process; the cause stays named).
pub const MAX_WHY_DEPTH: usize = 32;
/// Bytes of one `why` answer at most (JSON); causes past it are left out.
pub const MAX_WHY_BYTES: usize = 256 * 1024;

/// Body of `GET /api/v1/why/{pid}`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct WhyResponse {
    pub pid: u32,
    /// Empty when the process is known but nothing blocks it.
    pub root_causes: Vec<RootCause>,
    /// Set when causes or hops were left out to keep the answer within its bounds
    /// ([`MAX_WHY_CAUSES`], [`MAX_WHY_DEPTH`], [`MAX_WHY_BYTES`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl WhyResponse {
    /// The answer for `pid`, cut to its bounds in causes, hops and bytes.
    pub fn bounded(pid: u32, mut root_causes: Vec<RootCause>) -> Self {
        let mut truncated = root_causes.len() > MAX_WHY_CAUSES;
        root_causes.truncate(MAX_WHY_CAUSES);
        let mut bytes = 64;
        let mut keep = 0;
        for rc in &mut root_causes {
            if rc.chain.len() > MAX_WHY_DEPTH {
                rc.chain.truncate(MAX_WHY_DEPTH);
                truncated = true;
            }
            bytes += serde_json::to_vec(rc).map_or(usize::MAX, |v| v.len() + 1);
            if bytes > MAX_WHY_BYTES {
                truncated = true;
                break;
            }
            keep += 1;
        }
        root_causes.truncate(keep);
        WhyResponse {
            pid,
            root_causes,
            truncated,
        }
    }
}

async fn why(
    State(s): State<AppState>,
    Path(pid): Path<String>,
) -> Result<Json<WhyResponse>, AppError> {
    let pid: u32 = pid
        .trim_start_matches("pid-")
        .parse()
        .map_err(|_| AppError::BadRequest(format!("not a pid: {pid:?}")))?;
    let client = s
        .pipeline
        .as_ref()
        .ok_or(AppError::Unavailable(QueryError::Stopped))?;
    match client.why(pid).await.map_err(AppError::Unavailable)? {
        Some(root_causes) => Ok(Json(WhyResponse::bounded(pid, root_causes))),
        None => Err(AppError::NotFound(format!(
            "pid {pid} is not in the causal graph"
        ))),
    }
}

async fn scenes(State(s): State<AppState>) -> Result<impl IntoResponse, AppError> {
    let client = s
        .pipeline
        .as_ref()
        .ok_or(AppError::Unavailable(QueryError::Stopped))?;
    Ok(Json(client.scenes().await.map_err(AppError::Unavailable)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventType};
    use crate::pipeline::{Clock, Pipeline, PipelineConfig, spawn};
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get_body(app: &Router, uri: &str) -> (StatusCode, String) {
        let res = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[test]
    fn why_answers_are_bounded() {
        use crate::graph::{EdgeKind, Hop};
        let hop = Hop {
            from: "p".repeat(200),
            edge: EdgeKind::WaitsOn,
            to: "r".repeat(200),
        };
        let rc = RootCause {
            pid: 1,
            job: None,
            pod: None,
            namespace: None,
            resource: "r".into(),
            cause: "waits_on".into(),
            detail: None,
            chain: vec![hop; 1000],
        };
        let w = WhyResponse::bounded(1, vec![rc; 1000]);
        assert!(w.truncated);
        assert!(w.root_causes.len() <= MAX_WHY_CAUSES);
        assert!(w.root_causes.iter().all(|r| r.chain.len() <= MAX_WHY_DEPTH));
        assert!(serde_json::to_vec(&w).unwrap().len() <= MAX_WHY_BYTES);
        let small = WhyResponse::bounded(1, Vec::new());
        assert!(!small.truncated);
        assert_eq!(
            serde_json::to_string(&small).unwrap(),
            r#"{"pid":1,"root_causes":[]}"#
        );
    }

    #[tokio::test]
    async fn endpoints() {
        let telemetry = Telemetry::new("n1").unwrap();
        let p = Pipeline::new(
            PipelineConfig::default(),
            Clock::EventTime,
            Some(&[]),
            telemetry.dropped.clone(),
        );
        let running = spawn(p, telemetry.clone()).unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let app = router(AppState {
            telemetry,
            pipeline: Some(running.client.clone()),
            ready: ready.clone(),
        });
        assert_eq!(get_body(&app, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get_body(&app, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get_body(&app, "/readyz").await.0, StatusCode::OK);
        let base = 1_700_000_000_000;
        for (i, (t, e, pid, v)) in [
            (EventType::ComputeUtil, "gpu-0", Some(42), "90"),
            (EventType::ErrorHw, "gpu-0", None, "XID 79"),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(running.sender.send(Event {
                ts: base + i as i64,
                event_type: t,
                entity_id: e.into(),
                job_id: pid.map(|_| "train".into()),
                pid,
                value: v.into(),
                node_id: None,
                pod: None,
                namespace: None,
            }));
        }
        let (status, body) = get_body(&app, "/api/v1/why/42").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let w: WhyResponse = serde_json::from_str(&body).unwrap();
        assert_eq!(w.root_causes[0].resource, "gpu-0");
        assert_eq!(w.root_causes[0].cause, "error.hw");
        assert_eq!(get_body(&app, "/api/v1/why/pid-42").await.0, StatusCode::OK);
        assert_eq!(
            get_body(&app, "/api/v1/why/7").await.0,
            StatusCode::NOT_FOUND
        );
        let (status, body) = get_body(&app, "/api/v1/why/abc").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("not a pid"));
        assert_eq!(
            get_body(&app, "/api/v1/why/99999999999").await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            get_body(&app, "/api/v1/scenes").await,
            (StatusCode::OK, "[]".to_owned())
        );
        // The snapshot follows within the publish interval.
        let mut text = String::new();
        for _ in 0..100 {
            text = get_body(&app, "/metrics").await.1;
            if text.contains("ark_blocked_by{") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            text.contains("ark_blocked_by{resource=\"gpu-0\",error=\"error.hw\",node=\"n1\"} 1"),
            "{text}"
        );
        running.client.shutdown();
    }
}
