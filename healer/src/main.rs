//! `ark-healer` binary: parses arguments, starts telemetry, hands over to the library.

fn main() -> anyhow::Result<()> {
    Ok(())
}
