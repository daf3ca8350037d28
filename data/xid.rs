// The one parser of data/xid.csv, the one source of Ark's XID knowledge: NVIDIA's catalog
// (xid, mnemonic, description, immediate_action, investigatory_action) plus Ark's columns
// `ark_class` (fault | application | informational: what the exporter does with the XID) and
// `ark_condition` (the healer condition, and alert, that the XID stands for; empty for none).
// Compiled into the exporter (collectors/nvml/xid.rs), the healer (catalog.rs) and the tests
// crate (alerts.rs, which ties alerts/gpu.rules.yml to it) with `include!`, so no inner `//!`
// comments here. Each caller passes the text it got from `include_str!`.

/// What an XID says about the GPU (`ark_class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XidClass {
    /// The GPU is at fault: the XID blocks it in the causal graph.
    Fault,
    /// The workload's fault (a bad kernel, a page fault): counted, does not block the GPU.
    Application,
    /// Says nothing new about the GPU (NVIDIA: IGNORE, or qualifies another XID).
    Informational,
}

/// One row of data/xid.csv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidRow {
    pub xid: u32,
    pub mnemonic: String,
    pub immediate_action: String,
    pub class: XidClass,
    /// `None` when the XID stands for no condition of its own.
    pub condition: Option<String>,
}

/// The header data/xid.csv must have.
pub const XID_CSV_HEADER: &str =
    "xid,mnemonic,description,immediate_action,investigatory_action,ark_class,ark_condition";

/// Parses data/xid.csv: one row per XID, ascending, no duplicates. A bad row is an error naming
/// its line.
pub fn parse_xid_csv(text: &str) -> Result<Vec<XidRow>, String> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default().trim_end_matches('\r');
    if header != XID_CSV_HEADER {
        return Err(format!("xid.csv: header {header:?}, expected {XID_CSV_HEADER:?}"));
    }
    let mut rows: Vec<XidRow> = Vec::new();
    for (i, line) in lines.enumerate() {
        let at = i + 2;
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let f = split_csv_line(line).map_err(|e| format!("xid.csv line {at}: {e}"))?;
        if f.len() != 7 {
            return Err(format!("xid.csv line {at}: {} fields, expected 7", f.len()));
        }
        let xid: u32 = f[0]
            .parse()
            .map_err(|_| format!("xid.csv line {at}: xid {:?} is not a number", f[0]))?;
        if rows.last().is_some_and(|r| r.xid >= xid) {
            return Err(format!("xid.csv line {at}: xid {xid} is not after the previous row"));
        }
        let class = match f[5].as_str() {
            "fault" => XidClass::Fault,
            "application" => XidClass::Application,
            "informational" => XidClass::Informational,
            other => {
                return Err(format!(
                    "xid.csv line {at}: ark_class {other:?} is not fault, application or informational"
                ));
            }
        };
        let condition = match f[6].as_str() {
            "" => None,
            c if c.chars().all(|ch| ch.is_ascii_alphanumeric()) => Some(c.to_owned()),
            c => return Err(format!("xid.csv line {at}: ark_condition {c:?} is not a name")),
        };
        rows.push(XidRow {
            xid,
            mnemonic: f[1].clone(),
            immediate_action: f[3].clone(),
            class,
            condition,
        });
    }
    Ok(rows)
}

/// Splits one CSV line; fields may be double-quoted (with `""` for a quote inside).
fn split_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    out.push(cur);
    Ok(out)
}
