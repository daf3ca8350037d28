//! Middleware applied by [`crate::server::Server`] around an application router: gzip, the
//! request timeout, basic auth, and the health-only filter of the reserve connections.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::HEALTH_PATHS;

/// Largest response body compressed (a bigger one goes out as is).
const MAX_GZIP_INPUT: usize = 64 << 20;
/// Bodies smaller than this are not worth a gzip header.
const MIN_GZIP_INPUT: usize = 1024;

/// Whether `Accept-Encoding` allows gzip (`gzip`, `gzip;q=0.5`, `*`; not `gzip;q=0`).
pub fn accepts_gzip(req: &Request) -> bool {
    req.headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let q_zero = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !q_zero
        })
}

/// gzip for a client that asks for it (`Accept-Encoding: gzip`, as Prometheus sends).
pub async fn gzip(req: Request, next: Next) -> Response {
    let wants = accepts_gzip(&req);
    let res = next.run(req).await;
    if !wants
        || res.status() != StatusCode::OK
        || res.headers().contains_key(header::CONTENT_ENCODING)
    {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_GZIP_INPUT).await {
        Ok(b) => b,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    if bytes.len() < MIN_GZIP_INPUT {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::fast(),
    );
    let out = match enc.write_all(&bytes).and_then(|()| enc.finish()) {
        Ok(out) => out,
        Err(_) => return Response::from_parts(parts, Body::from(bytes)),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts
        .headers
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    Response::from_parts(parts, Body::from(out))
}

/// 408 when handling (body read included) takes longer than the limit; the connection closes.
pub async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            [(header::CONNECTION, "close")],
            "request not completed in time\n",
        )
            .into_response(),
    }
}

/// What reserve connections answer: the health probes only.
pub async fn health_only(req: Request, next: Next) -> Response {
    if HEALTH_PATHS.contains(&req.uri().path()) {
        next.run(req).await
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONNECTION, "close")],
            "connection limit reached: only /healthz and /readyz are served, retry later\n",
        )
            .into_response()
    }
}

/// Basic auth against bcrypt hashes. bcrypt is slow on purpose (tens of ms per check), so
/// checks run on the blocking pool, at most [`MAX_CONCURRENT_CHECKS`] at once (a flood of wrong
/// passwords costs at most that many cores), and a verified user:password pair is remembered
/// (as a keyed hash, never the password) so a scrape every 15 s costs one check per process.
#[derive(Clone)]
pub struct BasicAuth {
    inner: Arc<AuthInner>,
}

/// bcrypt checks running at once.
pub const MAX_CONCURRENT_CHECKS: usize = 2;
/// Verified pairs remembered.
const MAX_REMEMBERED: usize = 256;

struct AuthInner {
    users: Arc<std::collections::HashMap<String, String>>,
    /// Paths served without authentication (health probes; a route with its own token).
    public: Vec<String>,
    checks: Semaphore,
    hasher: RandomState,
    verified: Mutex<HashSet<u64>>,
}

impl BasicAuth {
    pub fn new(users: Arc<std::collections::HashMap<String, String>>, public: &[&str]) -> Self {
        BasicAuth {
            inner: Arc::new(AuthInner {
                users,
                public: public.iter().map(|s| (*s).to_owned()).collect(),
                checks: Semaphore::new(MAX_CONCURRENT_CHECKS),
                hasher: RandomState::new(),
                verified: Mutex::default(),
            }),
        }
    }

    async fn allows(&self, authorization: Option<&str>) -> bool {
        let Some((user, password)) = authorization.and_then(credentials) else {
            return false;
        };
        let key = self.inner.hasher.hash_one((&user, &password));
        let known = self
            .inner
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&key);
        if known {
            return true;
        }
        // An unknown user costs a check too, so timing does not tell which users exist.
        let hash = self.inner.users.get(&user).cloned();
        let Ok(_permit) = self.inner.checks.acquire().await else {
            return false;
        };
        let ok = tokio::task::spawn_blocking(move || match hash {
            Some(h) => bcrypt::verify(&password, &h).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(&password, DUMMY_HASH);
                false
            }
        })
        .await
        .unwrap_or(false);
        if ok {
            let mut v = self
                .inner
                .verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if v.len() >= MAX_REMEMBERED {
                v.clear();
            }
            v.insert(key);
        }
        ok
    }
}

/// bcrypt("not a password", 10): compared against when the user is unknown.
const DUMMY_HASH: &str = "$2b$10$4lRfcoFcDd2fK8dKpH2mB.yq1F1S3Zp8n1Pp9Ck0V5c0m6E9mQm3K";

fn credentials(v: &str) -> Option<(String, String)> {
    use base64::Engine;
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// The middleware: 401 with a `WWW-Authenticate` challenge unless the path is public or the
/// credentials verify.
pub async fn basic_auth(State(auth): State<BasicAuth>, req: Request, next: Next) -> Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if auth.inner.users.is_empty()
        || auth.inner.public.iter().any(|p| p == req.uri().path())
        || auth.allows(authorization.as_deref()).await
    {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"ark\"")],
        "unauthorized\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ae: &str) -> Request {
        Request::builder()
            .header(header::ACCEPT_ENCODING, ae)
            .body(Body::empty())
            .unwrap()
    }

    #[test]
    fn accept_encoding() {
        assert!(accepts_gzip(&req("gzip")));
        assert!(accepts_gzip(&req("deflate, GZIP;q=0.5")));
        assert!(accepts_gzip(&req("*")));
        assert!(!accepts_gzip(&req("gzip;q=0")));
        assert!(!accepts_gzip(&req("identity")));
    }

    #[test]
    fn dummy_hash_is_a_bcrypt_hash() {
        assert!(DUMMY_HASH.parse::<bcrypt::HashParts>().is_ok());
    }
}
