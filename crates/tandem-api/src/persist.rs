//! The data directory's record of adapters loaded at run time (`adapters.json`), so that a
//! restarted server serves them again. Written atomically (temporary file, then rename).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct AdapterStore {
    file: PathBuf,
    lock: Mutex<()>,
}

impl AdapterStore {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            file: dir.join("adapters.json"),
            lock: Mutex::new(()),
        })
    }

    /// (name, path) of every recorded adapter; none if the file does not exist yet.
    pub fn list(&self) -> io::Result<Vec<(String, PathBuf)>> {
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.file.display()),
            )
        })?;
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: expected {{\"adapters\": [{{\"name\", \"path\"}}]}}",
                    self.file.display()
                ),
            )
        };
        v.get("adapters")
            .and_then(|a| a.as_array())
            .ok_or_else(bad)?
            .iter()
            .map(|a| {
                match (
                    a.get("name").and_then(|n| n.as_str()),
                    a.get("path").and_then(|p| p.as_str()),
                ) {
                    (Some(n), Some(p)) => Ok((n.to_string(), PathBuf::from(p))),
                    _ => Err(bad()),
                }
            })
            .collect()
    }

    pub fn put(&self, name: &str, path: &Path) -> io::Result<()> {
        self.update(|list| {
            list.retain(|(n, _)| n != name);
            list.push((name.to_string(), path.to_path_buf()));
        })
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.update(|list| list.retain(|(n, _)| n != name))
    }

    fn update(&self, f: impl FnOnce(&mut Vec<(String, PathBuf)>)) -> io::Result<()> {
        let _guard = self
            .lock
            .lock()
            .map_err(|_| io::Error::other("adapter store lock poisoned"))?;
        let mut list = self.list()?;
        f(&mut list);
        let items: Vec<serde_json::Value> = list
            .iter()
            .map(|(n, p)| serde_json::json!({"name": n, "path": p.to_string_lossy()}))
            .collect();
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(&serde_json::json!({ "adapters": items }))?,
        )?;
        std::fs::rename(&tmp, &self.file)
    }
}
