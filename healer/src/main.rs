//! `ark-healer` binary: parses arguments, starts telemetry, hands over to the library.

use clap::Parser;

/// glibc's malloc kept the freed 120 KB strings of clipped alerts as heap it could neither reuse
/// nor return (800 MiB RSS after 6,000 such alerts, while the store held 12 MiB); mimalloc reuses
/// and returns them (issue 14 scenario 6, `safety_memory_is_bounded_in_bytes_under_large_alerts`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = ark_healer::cli::Cli::parse();
    ark_healer::cli::init_tracing(cli.log_format);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(ark_healer::cli::run(cli)));
    if let Err(e) = result {
        // The whole chain on one line, no backtrace: this is what an SRE reads in the pod log.
        eprintln!("ark-healer: error: {e:#}");
        std::process::exit(1);
    }
}
