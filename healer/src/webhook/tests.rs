//! Handler tests through `router(state).oneshot(request)`, no socket.

use super::*;
use axum::http::Request as HttpRequest;
use http_body_util::BodyExt;
use tower::ServiceExt;

const SAMPLE: &str = r#"{"version":"4","groupKey":"g","truncatedAlerts":0,"status":"firing","receiver":"r","groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am","alerts":[{"status":"firing","labels":{"node":"n1","condition":"GpuHung"},"annotations":{},"startsAt":"2026-11-22T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"f1"}]}"#;

fn state(cap: usize) -> (AppState, mpsc::Receiver<Batch>) {
    state_with_queue_bytes(cap, 16 << 20)
}

fn state_with_queue_bytes(cap: usize, max_queue_bytes: usize) -> (AppState, mpsc::Receiver<Batch>) {
    let (tx, rx) = mpsc::channel(cap);
    let m = Metrics::register(&prometheus::Registry::new()).unwrap();
    (
        AppState::new(
            "s3cret",
            tx,
            m,
            Arc::new(AtomicBool::new(true)),
            DEFAULT_BODY_LIMIT,
            max_queue_bytes,
        ),
        rx,
    )
}

/// A payload of `n` alerts, each with an annotation of `pad` bytes.
fn payload(n: usize, pad: usize) -> String {
    let alerts: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            json!({"status": "firing", "labels": {"node": format!("n{i}"), "condition": "GpuHung"},
                "annotations": {"pad": "x".repeat(pad)}, "startsAt": "2026-11-22T10:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z", "fingerprint": format!("f{i}")})
        })
        .collect();
    json!({"version": "4", "status": "firing", "alerts": alerts}).to_string()
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
    assert_eq!(got.alerts[0].fingerprint, "f1");
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
    let text = |r: Response| async move {
        let body = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    };
    // Ready means "serving", whatever the leadership.
    s.metrics.is_leader.set(0);
    let r = router(s.clone()).oneshot(get("/readyz")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(text(r).await, "ready\n");
    s.ready.store(false, Ordering::Relaxed);
    let r = router(s.clone()).oneshot(get("/readyz")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!text(r).await.contains("leader"));
    let r = router(s.clone()).oneshot(get("/metrics")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("ark_healer_tickets_open 0"), "{text}");
}

#[tokio::test]
async fn unknown_fields_are_accepted_top_level_and_per_alert() {
    let (s, mut rx) = state(4);
    let body = SAMPLE
        .replace(
            "\"receiver\":\"r\"",
            "\"receiver\":\"r\",\"newField\":{\"x\":[1]}",
        )
        .replace(
            "\"fingerprint\":\"f1\"",
            "\"fingerprint\":\"f1\",\"silencedBy\":[]",
        );
    assert_ne!(body, SAMPLE);
    let (code, _) = send(&s, post(body, Some("s3cret"), Some("application/json"))).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!(rx.try_recv().unwrap().alerts[0].fingerprint, "f1");
}

#[tokio::test]
async fn missing_required_field_is_400_naming_it() {
    let (s, mut rx) = state(4);
    for (field, body) in [
        ("labels", SAMPLE.replace("\"labels\"", "\"labelz\"")),
        ("startsAt", SAMPLE.replace("\"startsAt\"", "\"startedAt\"")),
        ("endsAt", SAMPLE.replace("\"endsAt\"", "\"endedAt\"")),
        ("alerts", SAMPLE.replace("\"alerts\"", "\"alertz\"")),
        ("version", SAMPLE.replace("\"version\":\"4\",", "")),
    ] {
        let (code, resp) = send(&s, post(body, Some("s3cret"), Some("application/json"))).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{field}");
        let error = resp["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("missing field `{field}`")),
            "{error}"
        );
    }
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn hostile_alerts_are_clipped_and_counted() {
    let (s, mut rx) = state(4);
    let labels: serde_json::Map<String, serde_json::Value> = (0..10_000)
        .map(|i| (format!("l{i:05}"), json!("v")))
        .chain([("node".to_owned(), json!("n1"))])
        .collect();
    let body = json!({"version": "4", "status": "firing", "alerts": [{
        "status": "firing", "labels": labels, "annotations": {"summary": "s".repeat(5000)},
        "startsAt": "2026-11-22T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
        "fingerprint": "f".repeat(5000)}]});
    let (code, _) = send(
        &s,
        post(body.to_string(), Some("s3cret"), Some("application/json")),
    )
    .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let a = &rx.try_recv().unwrap().alerts[0];
    assert_eq!(a.labels.len(), 64);
    assert_eq!(a.node(), Some("n1"));
    assert_eq!(a.fingerprint.len(), 16);
    // 10,001 - 64 labels dropped, the summary cut, the fingerprint hashed.
    let clipped = 10_001 - 64 + 1 + 1;
    let text = s.metrics.encode();
    assert!(
        text.contains(&format!("ark_healer_alert_fields_clipped_total {clipped}")),
        "{text}"
    );
}

#[tokio::test]
async fn queue_bytes_budget_is_503_until_batches_are_applied() {
    // 64 KiB of queue; each request holds a bit over 20 KiB.
    let (s, mut rx) = state_with_queue_bytes(100, 64 << 10);
    let body = payload(2, 10 * 1024);
    // Alertmanager sends Content-Length; a body without one reserves the whole body limit.
    let req = || {
        let mut r = post(body.clone(), Some("s3cret"), Some("application/json"));
        r.headers_mut()
            .insert("content-length", body.len().to_string().parse().unwrap());
        r
    };
    for _ in 0..3 {
        assert_eq!(send(&s, req()).await.0, StatusCode::ACCEPTED);
    }
    assert_eq!(send(&s, req()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    // Taking a batch off the channel frees nothing until it is dropped (applied).
    let batch = rx.try_recv().unwrap();
    assert_eq!(send(&s, req()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    drop(batch);
    assert_eq!(send(&s, req()).await.0, StatusCode::ACCEPTED);
    // A refused request returned what it had taken: the permits add up.
    while let Ok(b) = rx.try_recv() {
        drop(b);
    }
    assert_eq!(s.queue_bytes.available_permits(), 64);
    let text = s.metrics.encode();
    assert!(
        text.contains("ark_healer_webhook_requests_total{code=\"503\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn queue_bytes_count_the_alerts_in_memory_not_only_the_body() {
    // 1,000 small alerts: about 100 KB of JSON, several times that as alerts in memory.
    let (s, mut rx) = state_with_queue_bytes(100, 16 << 20);
    let body = payload(1000, 0);
    let (code, _) = send(
        &s,
        post(body.clone(), Some("s3cret"), Some("application/json")),
    )
    .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let batch = rx.try_recv().unwrap();
    let in_memory: usize = batch.alerts.iter().map(Alert::bytes).sum();
    assert!(in_memory > body.len());
    assert_eq!(
        batch.permit.num_permits(),
        in_memory.div_ceil(QUEUE_PERMIT_BYTES)
    );
}

#[tokio::test]
async fn a_batch_larger_than_the_queue_budget_waits_for_an_empty_queue() {
    let (s, rx) = state_with_queue_bytes(100, 4 << 10);
    let big = payload(4, 4096);
    let req = |b: &str| post(b.to_owned(), Some("s3cret"), Some("application/json"));
    assert_eq!(send(&s, req(&big)).await.0, StatusCode::ACCEPTED);
    assert_eq!(
        send(&s, req(SAMPLE)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    drop(rx);
    // A closed queue (the consumer is gone) is a 503 too, and returns its permits.
    let (s, rx) = state_with_queue_bytes(100, 4 << 10);
    drop(rx);
    assert_eq!(
        send(&s, req(SAMPLE)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(s.queue_bytes.available_permits(), 4);
}

#[tokio::test]
async fn rejections_are_logged_at_warn_with_a_clipped_reason() {
    use std::io::Write;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // The test runtime is single-threaded: the handler runs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let (s, _rx) = state(4);
    let secret = "z".repeat(10_000);
    let bad = SAMPLE.replace("\"firing\",\"labels\"", &format!("\"{secret}\",\"labels\""));
    assert_eq!(
        send(&s, post(bad, Some("s3cret"), Some("application/json")))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(&s, post(SAMPLE, Some("wrong"), Some("application/json")))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&s, post(SAMPLE, Some("s3cret"), Some("text/plain")))
            .await
            .0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (line, code) in lines.iter().zip(["400", "401", "415"]) {
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&format!("code={code}")), "{line}");
        assert!(line.contains("Webhook request rejected"), "{line}");
    }
    assert!(lines[0].contains("unknown variant"), "{}", lines[0]);
    assert!(
        lines[0].len() < 600,
        "reason not clipped: {} bytes",
        lines[0].len()
    );
    assert!(lines[1].contains("bearer token"), "{}", lines[1]);
}

#[test]
fn constant_time_compare() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"abcd"));
}
