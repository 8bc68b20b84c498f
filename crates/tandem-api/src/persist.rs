//! The data directory's record of adapters loaded at run time (`adapters.json`), so that a
//! restarted server serves them again. Written atomically (temporary file, then rename).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One adapter loaded at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub name: String,
    pub path: PathBuf,
    /// The tenant that loaded it; None: shared (an admin's, or from before tenants).
    pub owner: Option<String>,
}

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

    /// Every recorded adapter; none if the file does not exist yet.
    pub fn list(&self) -> io::Result<Vec<Record>> {
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
                    "{}: expected {{\"adapters\": [{{\"name\", \"path\", \"owner\"?}}]}}",
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
                    (Some(n), Some(p)) => Ok(Record {
                        name: n.to_string(),
                        path: PathBuf::from(p),
                        owner: a.get("owner").and_then(|o| o.as_str()).map(String::from),
                    }),
                    _ => Err(bad()),
                }
            })
            .collect()
    }

    /// Records adapter `name` at `path`, loaded by tenant `owner` (None: shared).
    pub fn put(&self, name: &str, path: &Path, owner: Option<&str>) -> io::Result<()> {
        self.update(|list| {
            list.retain(|r| r.name != name);
            list.push(Record {
                name: name.to_string(),
                path: path.to_path_buf(),
                owner: owner.map(String::from),
            });
        })
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.update(|list| list.retain(|r| r.name != name))
    }

    fn update(&self, f: impl FnOnce(&mut Vec<Record>)) -> io::Result<()> {
        let _guard = self
            .lock
            .lock()
            .map_err(|_| io::Error::other("adapter store lock poisoned"))?;
        let mut list = self.list()?;
        f(&mut list);
        let items: Vec<serde_json::Value> = list
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "path": r.path.to_string_lossy(), "owner": r.owner}))
            .collect();
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(&serde_json::json!({ "adapters": items }))?,
        )?;
        std::fs::rename(&tmp, &self.file)
    }
}
