//! Records the git revision the binaries are built from (`ark_build_info{revision}`). Outside a
//! git checkout (a source tarball, a container build without `.git`) the revision is "unknown",
//! or `ARK_REVISION` when set; the build never fails for it.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ARK_REVISION");
    let revision = std::env::var("ARK_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // Rebuild when HEAD moves (a commit, a checkout). Only files that exist: cargo reruns a build
    // script on every build while one of its rerun-if-changed paths is missing (packed-refs
    // usually is), which rebuilt both binaries on every cargo command.
    let mut watch: Vec<String> = ["HEAD", "packed-refs"]
        .iter()
        .filter_map(|p| git(&["rev-parse", "--path-format=absolute", "--git-path", p]))
        .collect();
    if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.extend(git(&[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            &head,
        ]));
    }
    for path in watch.iter().filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    // Without any watched file (no git), the revision cannot change between builds.
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=ARK_REVISION={revision}");
}
