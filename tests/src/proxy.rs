//! A plain-HTTP reverse proxy on 127.0.0.1 in front of an upstream (the test apiserver's https
//! URL) that can HOLD requests: while a hold rule matches `(method, path prefix)`, a request
//! waits in the proxy's handler and is forwarded only once the rule is released. A client that
//! gives up meanwhile (its timeout fires, it closes the connection) makes the server drop the
//! handler, so its request is never forwarded: an abandoned request does not land. That is a
//! slow network path in front of one replica, with the one property a test of write fencing
//! needs — what the client abandoned, the apiserver never sees.
//!
//! Request bodies are read completely before a request is held (so the server notices a client
//! that goes away); responses are buffered, not streamed (no watch requests through it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

/// What happened to one request that reached the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRecord {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// When it arrived, since the proxy started.
    pub arrived: Duration,
    /// It matched a hold rule and waited.
    pub held: bool,
    /// When forwarding to the upstream began (since the proxy started), if it did.
    pub forwarded: Option<Duration>,
    /// The upstream's status code, once it answered.
    pub status: Option<u16>,
    /// The client went away before the proxy answered (the handler was dropped).
    pub abandoned: bool,
}

impl ProxyRecord {
    /// Was this request (possibly) seen by the upstream?
    pub fn reached_upstream(&self) -> bool {
        self.forwarded.is_some()
    }
}

struct Rule {
    method: Option<String>,
    prefix: String,
}

struct Inner {
    upstream: String,
    client: reqwest::Client,
    started: Instant,
    rules: Mutex<Vec<Rule>>,
    /// Bumped on every rule change, so held requests re-check.
    version: watch::Sender<u64>,
    log: Mutex<Vec<ProxyRecord>>,
}

impl Inner {
    fn holds(&self, method: &str, path: &str) -> bool {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|r| r.method.as_deref().is_none_or(|m| m == method) && path.starts_with(&r.prefix))
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut ProxyRecord)) {
        if let Some(r) = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(i)
        {
            f(r);
        }
    }
}

/// Marks the record abandoned when the handler is dropped before it answered.
struct Pending {
    inner: Arc<Inner>,
    index: usize,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.inner.update(self.index, |r| r.abandoned = true);
        }
    }
}

/// The running proxy; stops serving on drop.
pub struct DelayProxy {
    pub port: u16,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for DelayProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayProxy")
            .field("port", &self.port)
            .field("upstream", &self.inner.upstream)
            .finish()
    }
}

impl DelayProxy {
    /// Proxies `http://127.0.0.1:<port>` to `upstream` (e.g. `https://127.0.0.1:6443`),
    /// trusting the PEM CA at `ca` for it when given.
    pub async fn start(upstream: &str, ca: Option<&Path>) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(120));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        let inner = Arc::new(Inner {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: builder.build()?,
            started: Instant::now(),
            rules: Mutex::new(Vec::new()),
            version: watch::channel(0).0,
            log: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(forward).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(DelayProxy { port, inner, task })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Time since the proxy started (the clock of [`ProxyRecord`]).
    pub fn elapsed(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// From now on, hold requests with `method` (any method when `None`) whose path starts
    /// with `prefix`, until [`DelayProxy::release`].
    pub fn hold(&self, method: Option<&str>, prefix: &str) {
        self.inner
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Rule {
                method: method.map(str::to_owned),
                prefix: prefix.to_owned(),
            });
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// Drops every hold rule: requests still waiting (their client still there) are forwarded.
    pub fn release(&self) {
        self.inner
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// Every request seen so far, in arrival order.
    pub fn log(&self) -> Vec<ProxyRecord> {
        self.inner
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests waiting in a hold right now.
    pub fn held_now(&self) -> Vec<ProxyRecord> {
        self.log()
            .into_iter()
            .filter(|r| r.held && r.forwarded.is_none() && !r.abandoned)
            .collect()
    }

    /// Writes a kubeconfig in `dir` whose server is this proxy, authenticating with `token`.
    pub fn kubeconfig(&self, dir: &Path, name: &str, token: &str) -> Result<PathBuf> {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: via-proxy\n  cluster:\n    server: {url}\n\
             users:\n- name: {name}\n  user:\n    token: {token}\n\
             contexts:\n- name: {name}\n  context:\n    cluster: via-proxy\n    user: {name}\n    namespace: default\n\
             current-context: {name}\n",
            url = self.url(),
        );
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}-via-proxy.kubeconfig"));
        std::fs::write(&path, yaml)?;
        Ok(path)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hop-by-hop headers (and the ones the clients recompute) are not copied.
fn copied(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "host"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
    )
}

async fn forward(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method.as_str().to_owned();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let index = {
        let mut log = inner.log.lock().unwrap_or_else(|p| p.into_inner());
        log.push(ProxyRecord {
            method: method.clone(),
            path: path.clone(),
            arrived: inner.started.elapsed(),
            held: false,
            forwarded: None,
            status: None,
            abandoned: false,
        });
        log.len() - 1
    };
    let mut pending = Pending {
        inner: inner.clone(),
        index,
        done: false,
    };
    // The whole body first: then the client has nothing more to send, and the server notices
    // (and drops this future) when it closes the connection while we hold.
    let bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => {
            pending.done = true;
            return (StatusCode::BAD_REQUEST, format!("proxy: reading body: {e}")).into_response();
        }
    };
    let mut version = inner.version.subscribe();
    while inner.holds(&method, &path) {
        inner.update(index, |r| r.held = true);
        if version.changed().await.is_err() {
            break;
        }
    }
    inner.update(index, |r| r.forwarded = Some(inner.started.elapsed()));
    let Ok(m) = reqwest::Method::from_bytes(method.as_bytes()) else {
        pending.done = true;
        return (StatusCode::BAD_REQUEST, "proxy: bad method").into_response();
    };
    let mut up = inner.client.request(m, format!("{}{path}", inner.upstream));
    for (k, v) in &parts.headers {
        if copied(k) {
            up = up.header(k.as_str(), v.as_bytes());
        }
    }
    let result = up.body(bytes).send().await;
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            pending.done = true;
            return (StatusCode::BAD_GATEWAY, format!("proxy: upstream: {e}")).into_response();
        }
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            pending.done = true;
            return (
                StatusCode::BAD_GATEWAY,
                format!("proxy: upstream body: {e}"),
            )
                .into_response();
        }
    };
    inner.update(index, |r| r.status = Some(status));
    pending.done = true;
    let mut out = Response::builder().status(status);
    for (k, v) in &headers {
        if copied(k) {
            out = out.header(k.as_str(), v.as_bytes());
        }
    }
    out.body(Body::from(body)).unwrap_or_else(|e| {
        (StatusCode::BAD_GATEWAY, format!("proxy: response: {e}")).into_response()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A local plain-HTTP upstream that counts the requests it received.
    async fn upstream() -> Result<(String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>)> {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = Router::new().fallback(move |req: Request| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                format!("{} {}", req.method(), req.uri())
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((url, hits, task))
    }

    #[tokio::test]
    async fn held_requests_wait_and_abandoned_ones_never_reach_the_upstream() -> Result<()> {
        let (url, hits, _up) = upstream().await?;
        let proxy = DelayProxy::start(&url, None).await?;
        let client = reqwest::Client::new();

        // Not held: forwarded at once, method, path, query and body passed through.
        let r = client
            .get(format!("{}/api/v1/nodes?limit=1", proxy.url()))
            .send()
            .await?;
        assert_eq!(r.text().await?, "GET /api/v1/nodes?limit=1");
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        proxy.hold(Some("PATCH"), "/api/v1/nodes");
        // A client that gives up while held: never forwarded, not even after the release.
        let r = client
            .patch(format!("{}/api/v1/nodes/a1", proxy.url()))
            .body("{}")
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(r.is_err(), "a held request was answered: {r:?}");
        // Other methods pass while PATCH is held.
        client
            .get(format!("{}/api/v1/nodes/a1", proxy.url()))
            .send()
            .await?;
        assert_eq!(hits.load(Ordering::SeqCst), 2);

        // A client that waits: forwarded on release.
        let waiting = {
            let (client, url) = (client.clone(), format!("{}/api/v1/nodes/a2", proxy.url()));
            tokio::spawn(async move { client.patch(url).body("{}").send().await?.text().await })
        };
        for _ in 0..100 {
            if !proxy.held_now().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(proxy.held_now().len(), 1, "{:?}", proxy.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(hits.load(Ordering::SeqCst), 2, "forwarded while held");
        proxy.release();
        assert_eq!(waiting.await??, "PATCH /api/v1/nodes/a2");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            hits.load(Ordering::SeqCst),
            3,
            "the abandoned request was forwarded after the release"
        );
        let log = proxy.log();
        let a1 = log
            .iter()
            .find(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/a1")
            .context("a1 logged")?;
        assert!(a1.held && a1.abandoned && !a1.reached_upstream(), "{a1:?}");
        let a2 = log
            .iter()
            .find(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/a2")
            .context("a2 logged")?;
        assert!(
            a2.held && a2.reached_upstream() && a2.status == Some(200),
            "{a2:?}"
        );
        Ok(())
    }
}
