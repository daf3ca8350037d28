//! `ark-exporter` binary: parses arguments, starts telemetry, hands over to the library.

fn main() -> anyhow::Result<()> {
    ark_exporter::cli_main()
}
