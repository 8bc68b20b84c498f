//! Under feature `cuda`, compiles every kernels/*.cu to PTX with nvcc (CUDA_COMPUTE_CAP, default
//! 90) into OUT_DIR; src/lib.rs embeds them. Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let kernels = PathBuf::from(env("CARGO_MANIFEST_DIR")).join("../../kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    // The host picks kernels that exist only for some architectures (clusters: sm_90+).
    println!("cargo:rustc-env=TANDEM_CUDA_CAP={cap}");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let entries =
        std::fs::read_dir(&kernels).unwrap_or_else(|e| panic!("{}: {e}", kernels.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("cu") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", &format!("-arch=sm_{cap}"), "-O3", "-o"])
            .arg(&ptx)
            .arg(&path)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (see scripts/cuda-toolchain.sh): {e}"));
        assert!(status.success(), "nvcc failed on {}", path.display());
    }
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set"))
}
