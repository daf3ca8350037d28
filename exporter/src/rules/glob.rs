//! Ark globs: `|` separates alternatives, `*` matches any run of characters, a pattern without
//! `*` must match the whole id. No other metacharacters (`?`, `[`) exist in the format.

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    alts: Vec<Vec<String>>,
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Glob {
            alts: pattern
                .split('|')
                .map(|alt| alt.trim().split('*').map(str::to_owned).collect())
                .collect(),
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        self.alts.iter().any(|parts| match_parts(parts, s))
    }
}

fn match_parts(parts: &[String], s: &str) -> bool {
    match parts {
        [] => s.is_empty(),
        [only] => only == s,
        [first, middle @ .., last] => {
            if s.len() < first.len() + last.len() || !s.starts_with(first.as_str()) {
                return false;
            }
            if !s.ends_with(last.as_str()) {
                return false;
            }
            let mut rest = &s[first.len()..s.len() - last.len()];
            for m in middle {
                match rest.find(m.as_str()) {
                    Some(i) => rest = &rest[i + m.len()..],
                    None => return false,
                }
            }
            true
        }
    }
}

/// `value_pattern`: `|`-separated, case-sensitive substrings; any one present matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Substrings(Vec<String>);

impl Substrings {
    pub fn new(pattern: &str) -> Self {
        Substrings(pattern.split('|').map(str::to_owned).collect())
    }
    pub fn matches(&self, s: &str) -> bool {
        self.0.iter().any(|p| s.contains(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = Glob::new("gpu-*|mlx5_*");
        assert!(g.matches("gpu-0"));
        assert!(g.matches("mlx5_1"));
        assert!(!g.matches("nvme0n1"));
        assert!(!g.matches("xgpu-0"));
        let exact = Glob::new("gpu-0");
        assert!(exact.matches("gpu-0"));
        assert!(!exact.matches("gpu-01"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("*").matches("anything"));
        assert!(Glob::new("a*b*c").matches("a-x-b-y-c"));
        assert!(!Glob::new("a*b*c").matches("a-c-b"));
        assert!(
            !Glob::new("ab*ba").matches("aba"),
            "prefix and suffix must not overlap"
        );
        assert!(Glob::new("pid-*").matches("pid-12"));
        assert!(Glob::new("**").matches("x"));
    }

    #[test]
    fn hostile_patterns_stay_linear() {
        let g = Glob::new(&"*a".repeat(200));
        let s = "a".repeat(10_000);
        assert!(g.matches(&s));
        assert!(!g.matches(&"b".repeat(10_000)));
    }

    #[test]
    fn substrings_are_case_sensitive() {
        let v = Substrings::new("OOM|out of memory");
        assert!(v.matches("CUDA out of memory"));
        assert!(v.matches("OOM killer"));
        assert!(!v.matches("oom"));
    }
}
