// The one golden compare-or-update helper. Used by exporter/tests/{golden,nvml,host_collectors}.rs
// (as `common::golden`) and by the eBPF collector's unit test, which `include!`s this file (so no
// inner `//!` doc comments here: they are not allowed in an included file).

/// How a golden text is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Line for line, as written.
    Exact,
    /// As sorted lines: the order of series in an exposition is not part of the contract.
    Sorted,
}

/// `text` with its lines sorted (and a final newline).
pub fn sorted(text: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// True when the golden files are to be rewritten: `ARK_UPDATE_GOLDEN=1`.
pub fn updating() -> bool {
    std::env::var("ARK_UPDATE_GOLDEN").is_ok_and(|v| v == "1")
}

/// What differs between `want` and `got`, both in `order`: the first differing line, and for
/// sorted texts the lines only one side has (20 at most each). Empty when they are equal.
pub fn difference(want: &str, got: &str, order: Order) -> String {
    let (want, got) = match order {
        Order::Exact => (want.to_owned(), got.to_owned()),
        Order::Sorted => (sorted(want), sorted(got)),
    };
    if want == got {
        return String::new();
    }
    let mut out = String::new();
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    match w.iter().zip(&g).position(|(a, b)| a != b) {
        Some(i) => out.push_str(&format!(
            "first difference at line {}:\n  golden: {}\n  now:    {}\n",
            i + 1,
            w[i],
            g[i]
        )),
        None => out.push_str(&format!(
            "one text is a prefix of the other ({} golden lines, {} now)\n",
            w.len(),
            g.len()
        )),
    }
    if order == Order::Sorted {
        let ws: std::collections::BTreeSet<&str> = w.iter().copied().collect();
        let gs: std::collections::BTreeSet<&str> = g.iter().copied().collect();
        for (label, only) in [
            ("only in the golden file", ws.difference(&gs)),
            ("only in the output now", gs.difference(&ws)),
        ] {
            let only: Vec<&&str> = only.collect();
            if !only.is_empty() {
                out.push_str(&format!("{label} ({}):\n", only.len()));
                for l in only.iter().take(20) {
                    out.push_str(&format!("  {l}\n"));
                }
            }
        }
    }
    out
}

/// Compares `actual` with the golden file `path` in `order`, panicking with what differs. With
/// `ARK_UPDATE_GOLDEN=1` it first writes `actual` to `path` (creating its directory). Returns the
/// golden text, for the checks a test makes on it.
pub fn compare_or_update(path: &std::path::Path, actual: &str, order: Order) -> String {
    if updating() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        std::fs::write(path, actual).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    let golden = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "golden file {} unreadable ({e}): run with ARK_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    let diff = difference(&golden, actual, order);
    assert!(
        diff.is_empty(),
        "output differs from {} (ARK_UPDATE_GOLDEN=1 regenerates it after an intended change):\n{diff}",
        path.display()
    );
    golden
}
