//! Compiles ../ebpf/ark.bpf.c with clang into OUT_DIR/ark.bpf.o. Without clang the crate still
//! builds (cfg `ark_no_ebpf`) and the eBPF collector reports why at run time.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ark_no_ebpf)");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let src = manifest.join("../ebpf");
    for f in ["ark.bpf.c", "ark.h"] {
        println!("cargo::rerun-if-changed={}", src.join(f).display());
    }
    println!("cargo::rerun-if-env-changed=ARK_CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("ark.bpf.o");
    // bpf_tracing.h needs the target architecture to read tracepoint arguments.
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "arm64",
        Ok("riscv64") => "riscv",
        Ok("s390x") => "s390",
        _ => "x86",
    };
    let clang = std::env::var("ARK_CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg(format!("-I{}", src.display()))
        .arg(format!("-I{}", src.join("include").display()))
        .arg("-c")
        .arg(src.join("ark.bpf.c"))
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        // A compile error in our own BPF code is a bug to fix, not a reason to ship without it.
        Ok(s) => panic!("clang failed to compile ebpf/ark.bpf.c ({s}); see the errors above"),
        Err(e) => {
            println!("cargo::warning=clang not found ({e}): building ark-exporter without eBPF");
            println!("cargo::rustc-cfg=ark_no_ebpf");
        }
    }
}
