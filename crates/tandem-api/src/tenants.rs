//! Tenants: API keys and who owns what.
//!
//! Each API key names a tenant: every `--api-key` the tenant `default`; `--api-keys FILE` any
//! tenant (lines `KEY TENANT`, or `KEY TENANT admin` for a key that sees everything; reloaded on
//! SIGHUP). Files, fine-tuning jobs (with their events and checkpoints) and fine-tuned models
//! belong to the tenant that made them; other tenants get 404s for them and do not see them in
//! lists. The base model and adapters the operator loaded (`--adapter`) are shared. Without any
//! key, authentication is off and the single user is an admin of tenant `default`.
//!
//! Keys are kept as SHA-256 digests and compared in constant time (`subtle`); they are never
//! logged, and errors about the keys file name lines, not keys.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use subtle::ConstantTimeEq;

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub admin: bool,
}

/// The tenant of `--api-key` keys, of objects made before tenants existed, and of the single
/// user when authentication is off.
pub const DEFAULT_TENANT: &str = "default";

impl Tenant {
    /// May this tenant see an object owned by `owner` (None: shared, e.g. operator adapters)?
    pub fn sees(&self, owner: Option<&str>) -> bool {
        self.admin || owner.is_none_or(|o| o == self.name)
    }

    /// The prefix-cache salt for a request: tenants never share cached blocks.
    pub fn cache_salt(&self, salt: Option<&str>) -> Option<String> {
        Some(match salt {
            Some(s) => format!("{}\u{0}{s}", self.name),
            None => self.name.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

#[derive(Default)]
struct KeySet {
    keys: Vec<([u8; 32], Tenant)>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Parses a keys file: `KEY TENANT [admin]` per line; blank lines and `#` comments skipped.
fn parse_file(path: &Path) -> Result<Vec<(String, Tenant)>, KeysError> {
    let err = |msg: String| KeysError::File {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let admin = match parts.as_slice() {
            [_, _] => false,
            [_, _, "admin"] => true,
            _ => {
                return Err(err(format!(
                    "line {}: expected `KEY TENANT` or `KEY TENANT admin`",
                    i + 1
                )))
            }
        };
        let name = parts[1];
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err(format!(
                "line {}: a tenant name is letters, digits, '-', '_' or '.'",
                i + 1
            )));
        }
        out.push((
            parts[0].to_string(),
            Tenant {
                name: name.to_string(),
                admin,
            },
        ));
    }
    Ok(out)
}

/// The server's keys and the owners of adapters served by name.
pub struct Tenants {
    plain: Vec<String>,
    file: Option<PathBuf>,
    set: RwLock<KeySet>,
    /// Served adapter name -> owning tenant (fine-tuned models, their checkpoints, adapters a
    /// tenant loaded at run time). Names not here are shared.
    owners: Mutex<HashMap<String, String>>,
}

impl Tenants {
    /// `api_keys`: keys of tenant `default` (`--api-key`, repeatable); `file`: `--api-keys`.
    pub fn new(api_keys: Vec<String>, file: Option<PathBuf>) -> Result<Self, KeysError> {
        let t = Self {
            plain: api_keys,
            file,
            set: RwLock::new(KeySet::default()),
            owners: Mutex::new(HashMap::new()),
        };
        t.reload()?;
        Ok(t)
    }

    /// Authentication is on (some key is configured).
    pub fn enabled(&self) -> bool {
        !self.read().keys.is_empty() || !self.plain.is_empty() || self.file.is_some()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeySet> {
        self.set.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the keys file again (SIGHUP). On error the keys in force stay.
    pub fn reload(&self) -> Result<usize, KeysError> {
        let mut keys: Vec<([u8; 32], Tenant)> = self
            .plain
            .iter()
            .map(|k| {
                (
                    digest(k),
                    Tenant {
                        name: DEFAULT_TENANT.into(),
                        admin: false,
                    },
                )
            })
            .collect();
        if let Some(f) = &self.file {
            keys.extend(parse_file(f)?.into_iter().map(|(k, t)| (digest(&k), t)));
        }
        let n = keys.len();
        *self.set.write().unwrap_or_else(|e| e.into_inner()) = KeySet { keys };
        Ok(n)
    }

    /// The tenant of a bearer token; None if it is no key. With authentication off, everyone
    /// is the admin of tenant `default`.
    pub fn authenticate(&self, bearer: Option<&str>) -> Option<Tenant> {
        if !self.enabled() {
            return Some(Tenant {
                name: DEFAULT_TENANT.into(),
                admin: true,
            });
        }
        let given = digest(bearer?);
        let set = self.read();
        // Every key is compared (constant time each), whichever matches.
        let mut found = None;
        for (k, t) in &set.keys {
            if bool::from(k.ct_eq(&given)) && found.is_none() {
                found = Some(t.clone());
            }
        }
        found
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `tenant` owns the adapter served as `name`.
    pub fn set_owner(&self, name: &str, tenant: &str) {
        self.owners().insert(name.to_string(), tenant.to_string());
    }

    pub fn forget(&self, name: &str) {
        self.owners().remove(name);
    }

    /// The owner of a served model name: its own entry, or for a checkpoint
    /// (`NAME:ckpt-step-N`) its job's. None: shared.
    pub fn owner(&self, name: &str) -> Option<String> {
        let owners = self.owners();
        if let Some(o) = owners.get(name) {
            return Some(o.clone());
        }
        let (base, _) = name.rsplit_once(":ckpt-step-")?;
        owners.get(base).cloned()
    }
}

/// The owner recorded on a stored object (jobs: `tandem_owner`); objects from before tenants
/// belong to `default`.
pub fn job_owner(job: &serde_json::Value) -> &str {
    job["tandem_owner"].as_str().unwrap_or(DEFAULT_TENANT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_tenants_and_the_file_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys");
        std::fs::write(&f, "# keys\nk-alice alice\n\nk-root ops admin\n").unwrap();
        let t = Tenants::new(vec!["k-plain".into()], Some(f.clone())).unwrap();
        assert!(t.enabled());
        assert_eq!(t.authenticate(Some("k-alice")).unwrap().name, "alice");
        assert!(t.authenticate(Some("k-root")).unwrap().admin);
        assert_eq!(
            t.authenticate(Some("k-plain")).unwrap().name,
            DEFAULT_TENANT
        );
        assert_eq!(t.authenticate(Some("k-bob")), None);
        assert_eq!(t.authenticate(None), None);
        std::fs::write(&f, "k-bob bob\n").unwrap();
        assert_eq!(t.reload().unwrap(), 2);
        assert_eq!(t.authenticate(Some("k-alice")), None);
        assert_eq!(t.authenticate(Some("k-bob")).unwrap().name, "bob");
        // A bad file keeps the keys in force, and the error names the line, not the key.
        std::fs::write(&f, "k-secret-1 carol extra words\n").unwrap();
        let e = t.reload().unwrap_err().to_string();
        assert!(e.contains("line 1") && !e.contains("k-secret-1"), "{e}");
        assert_eq!(t.authenticate(Some("k-bob")).unwrap().name, "bob");
    }

    #[test]
    fn visibility_owners_and_salts() {
        let t = Tenants::new(vec![], None).unwrap();
        assert!(!t.enabled());
        let anyone = t.authenticate(None).unwrap();
        assert!(anyone.admin);
        t.set_owner("ft:m:x:1", "alice");
        assert_eq!(t.owner("ft:m:x:1:ckpt-step-3").as_deref(), Some("alice"));
        assert_eq!(t.owner("shared"), None);
        let alice = Tenant {
            name: "alice".into(),
            admin: false,
        };
        let bob = Tenant {
            name: "bob".into(),
            admin: false,
        };
        assert!(alice.sees(Some("alice")) && alice.sees(None) && !bob.sees(Some("alice")));
        assert_ne!(alice.cache_salt(None), bob.cache_salt(None));
        assert_ne!(alice.cache_salt(Some("x")), alice.cache_salt(None));
    }
}
