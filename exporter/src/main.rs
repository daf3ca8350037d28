//! `ark-exporter` binary: everything lives in the library (`ark_exporter::cli`).

fn main() -> anyhow::Result<()> {
    ark_exporter::cli_main()
}
