//! `ark-healer` binary: parses arguments, starts telemetry, hands over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = ark_healer::cli::Cli::parse();
    ark_healer::cli::init_tracing(cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(ark_healer::cli::run(cli))
}
