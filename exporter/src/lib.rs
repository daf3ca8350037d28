//! Ark node exporter. The real implementation lands with the "Exporter core" issue; this
//! placeholder only serves `/healthz` so the workspace, scripts and demo have something to run.

use anyhow::Context;

/// Entry point used by `main.rs`.
pub fn cli_main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .skip_while(|a| a != "--web.listen-address")
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9487".to_owned());
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        axum::serve(listener, app).await.context("serving HTTP")
    })
}
