//! The accept loop: HTTP/1.1 on hyper with every limit of [`Limits`], optional TLS, and a
//! health-only reserve past the connection limit.
//!
//! Why each limit holds:
//! - a connection that sends no complete request head is closed by hyper's header-read timer,
//!   which runs whenever the connection waits for a request (first one and keep-alive);
//! - the head is read into a buffer of at most `max_header_bytes`; a bigger head is a 431 and a
//!   close, so a connection costs a few KiB whatever the client sends;
//! - a request (body included) has `request_timeout` ([`crate::layers::request_timeout`]);
//! - the [`Activity`] wrapper closes a connection with no byte in either direction for
//!   `idle_timeout` (a stuck body, a client that stopped reading);
//! - at most `max_connections` connections are served; past them, `health_reserve` more answer
//!   only `/healthz` and `/readyz`, with a short header timeout and no keep-alive, so a flood
//!   that fills the pool still leaves the probes a door; past both, a connection is closed at
//!   accept. The process raises its soft `RLIMIT_NOFILE` to the hard limit at start.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::layers::{self, BasicAuth};
use crate::{Limits, WebConfig};

/// A configured server: the application wrapped in the layers, and the limits.
pub struct Server {
    app: Router,
    health: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
}

impl Server {
    /// `app` is served behind gzip, the request timeout and (when `web.users` is not empty)
    /// basic auth; `public` paths skip basic auth besides the health probes (e.g. a webhook
    /// with its own bearer token).
    pub fn new(app: Router, limits: Limits, web: &WebConfig, public: &[&str]) -> Self {
        let mut open: Vec<&str> = crate::HEALTH_PATHS.to_vec();
        open.extend_from_slice(public);
        let auth = BasicAuth::new(web.users.clone(), &open);
        let app = app
            .layer(axum::middleware::from_fn(layers::gzip))
            .layer(axum::middleware::from_fn_with_state(
                auth,
                layers::basic_auth,
            ))
            .layer(axum::middleware::from_fn_with_state(
                limits.request_timeout,
                layers::request_timeout,
            ));
        let health = app
            .clone()
            .layer(axum::middleware::from_fn(layers::health_only));
        Server {
            app,
            health,
            limits,
            tls: web.tls.clone().map(TlsAcceptor::from),
        }
    }

    /// Serves until `shutdown` resolves, then lets open requests finish (up to 5 s).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let limits = raise_fd_limit(self.limits);
        let pool = Arc::new(Semaphore::new(limits.max_connections));
        let reserve = Arc::new(Semaphore::new(limits.health_reserve));
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            app: self.app,
            health: self.health,
            limits: limits.clone(),
            tls: self.tls,
        });
        tokio::pin!(shutdown);
        loop {
            let (stream, _peer) = tokio::select! {
                () = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (permit, full) = match pool.clone().try_acquire_owned() {
                Ok(p) => (p, false),
                Err(_) => match reserve.clone().try_acquire_owned() {
                    Ok(p) => (p, true),
                    // Past both: closed now, costs nothing more.
                    Err(_) => continue,
                },
            };
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move { shared.connection(stream, full, permit, stop).await });
        }
        let _ = stop_tx.send(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while (pool.available_permits() < limits.max_connections
            || reserve.available_permits() < limits.health_reserve)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// `Server::new(app, limits, web, public).run(listener, shutdown)`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    web: &WebConfig,
    public: &[&str],
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    Server::new(app, limits, web, public)
        .run(listener, shutdown)
        .await
}

struct Shared {
    app: Router,
    health: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
}

impl Shared {
    async fn connection(
        &self,
        stream: tokio::net::TcpStream,
        reserve: bool,
        _permit: OwnedSemaphorePermit,
        stop: watch::Receiver<bool>,
    ) {
        let head_timeout = if reserve {
            self.limits.reserve_timeout
        } else {
            self.limits.header_read_timeout
        };
        match &self.tls {
            None => self.http(stream, reserve, head_timeout, stop).await,
            Some(acceptor) => {
                // The handshake counts against the header-read timeout.
                match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.http(tls, reserve, head_timeout, stop).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            }
        }
    }

    async fn http<I>(
        &self,
        io: I,
        reserve: bool,
        head_timeout: Duration,
        mut stop: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = Activity::new(io);
        let last = io.last.clone();
        let started = io.started;
        let app = if reserve { &self.health } else { &self.app };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            .max_buf_size(self.limits.max_header_bytes)
            .keep_alive(!reserve);
        let conn =
            builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        tokio::pin!(conn);
        let idle = self.limits.idle_timeout;
        let mut draining = false;
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = started + since + idle;
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended");
                    }
                    return;
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    let since = Duration::from_millis(last.load(Ordering::Relaxed));
                    if started + since + idle <= Instant::now() {
                        // Silent both ways for the idle timeout: dropped, not drained.
                        return;
                    }
                }
                r = stop.changed(), if !draining => {
                    draining = true;
                    if r.is_ok() {
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Soft `RLIMIT_NOFILE` raised to the hard limit; `max_connections` lowered to fit it.
fn raise_fd_limit(mut limits: Limits) -> Limits {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return limits;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // Room for the process' own files (collectors, probes, the Kubernetes client).
    let room = usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(128)
        .max(16);
    let wanted = limits.max_connections + limits.health_reserve;
    if wanted > room {
        let reserve = limits.health_reserve.min(room / 8);
        tracing::warn!(
            fd_limit = soft,
            max_connections = room - reserve,
            health_reserve = reserve,
            "Connection limit lowered to fit the open-file limit"
        );
        limits.health_reserve = reserve;
        limits.max_connections = room - reserve;
    }
    limits
}

/// An I/O stream that records when a byte last went either way (milliseconds since `started`).
struct Activity<I> {
    io: I,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl<I> Activity<I> {
    fn new(io: I) -> Self {
        Activity {
            io,
            started: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Activity<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Activity<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
