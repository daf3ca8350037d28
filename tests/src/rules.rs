//! Time-scaled copies of `alerts/*.rules.yml`, so end-to-end tests exercise the real rules
//! (same expressions, labels and structure) in seconds instead of minutes: every duration in
//! `for:`, `keep_firing_for:`, range selectors `[10m]`, subqueries `[5m:1m]`, `offset 10m` and
//! `time() - 600` is divided by `factor`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Milliseconds of a Prometheus duration (`1h30m`, `10m`, `500ms`); `None` if it is not one.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = [
            ("ms", 1),
            ("s", 1000),
            ("m", 60_000),
            ("h", 3_600_000),
            ("d", 86_400_000),
            ("w", 604_800_000),
            ("y", 31_536_000_000),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))
        .map(|(u, ms)| (ms, u.len()))?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[len..];
    }
    Some(total)
}

fn scaled(d: &str, factor: u64) -> Option<String> {
    let ms = parse_duration_ms(d)?;
    if ms == 0 {
        return Some("0s".into());
    }
    Some(format!("{}ms", (ms / factor).max(1)))
}

/// Scales the durations inside one `[...]` range or subquery.
fn scale_range(inner: &str, factor: u64) -> String {
    inner
        .split(':')
        .map(|part| scaled(part.trim(), factor).unwrap_or_else(|| part.to_owned()))
        .collect::<Vec<_>>()
        .join(":")
}

/// Scales every duration of a rule file's text (see the module docs).
pub fn scale_rule_durations(text: &str, factor: u64) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let mut done = false;
        for key in ["for:", "keep_firing_for:"] {
            if let Some(v) = trimmed.strip_prefix(key)
                && let Some(s) = scaled(v.trim(), factor)
            {
                out.push_str(&format!("{indent}{key} {s}\n"));
                done = true;
            }
        }
        if done {
            continue;
        }
        let mut l = String::with_capacity(line.len());
        let mut rest = line;
        while let Some(i) = rest.find('[') {
            let Some(j) = rest[i..].find(']') else { break };
            l.push_str(&rest[..=i]);
            l.push_str(&scale_range(&rest[i + 1..i + j], factor));
            l.push(']');
            rest = &rest[i + j + 1..];
        }
        l.push_str(rest);
        // `offset 10m` and `time() - 600` (seconds).
        let mut words: Vec<String> = l.split(' ').map(str::to_owned).collect();
        for k in 1..words.len() {
            if words[k - 1] == "offset" {
                let n = words[k]
                    .find(|c: char| !c.is_ascii_alphanumeric())
                    .unwrap_or(words[k].len());
                if let Some(s) = scaled(&words[k][..n], factor) {
                    words[k] = format!("{s}{}", &words[k][n..]);
                }
            }
            if k >= 2 && words[k - 1] == "-" && words[k - 2].ends_with("time()") {
                let digits: String = words[k].chars().take_while(char::is_ascii_digit).collect();
                if let Ok(secs) = digits.parse::<f64>() {
                    let tail = words[k][digits.len()..].to_owned();
                    words[k] = format!("{}{tail}", secs / factor as f64);
                }
            }
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// Writes time-scaled copies of `<repo>/alerts/*.rules.yml` into `dir`; returns their paths.
pub fn scaled_alert_rules(dir: &Path, factor: u64) -> Result<Vec<PathBuf>> {
    let src = crate::repo_root().join("alerts");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let dst = dir.join(f.file_name().unwrap_or_default());
        std::fs::write(&dst, scale_rule_durations(&text, factor))?;
        out.push(dst);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("10m"), Some(600_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        for bad in ["", "m", "10", "10x", "1.5m", "ten"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn scales_every_kind_of_duration_and_nothing_else() {
        let text = "        for: 2m\n        keep_firing_for: 5m\n        expr: |\n          \
                    increase(x{xid=~\"79|48\"}[10m]) > 0 or max_over_time(up[5m:1m]) == 0\n          \
                    unless (y offset 10m) or z > time() - 600\n        labels: {severity: critical}\n";
        let got = scale_rule_durations(text, 60);
        assert!(got.contains("for: 2000ms\n"), "{got}");
        assert!(got.contains("keep_firing_for: 5000ms\n"), "{got}");
        assert!(got.contains("[10000ms]"), "{got}");
        assert!(got.contains("[5000ms:1000ms]"), "{got}");
        assert!(got.contains("(y offset 10000ms)"), "{got}");
        assert!(got.contains("time() - 10"), "{got}");
        assert!(got.contains("xid=~\"79|48\""), "{got}");
        assert!(got.contains("for: 0s") || !text.contains("for: 0m"));
        assert_eq!(
            scale_rule_durations("        for: 0m\n", 60),
            "        for: 0s\n"
        );
    }
}
