//! The shared adapter store in S3-compatible object storage (`--adapter-store
//! s3://bucket/prefix`): jobs write checkpoints and finished adapters into a local folder as
//! always (the engine reads and writes plain folders), and each one is then published under
//! the same relative key in the bucket — every file an atomic PUT, a manifest last, so that a
//! reader sees a whole adapter or none. A replica that needs one it does not have (to serve it,
//! or to resume a job from it) fetches it into its local folder first: into a temporary folder
//! beside it, renamed into place once every file arrived whole.
//!
//! With `--adapter-store DIR` (a shared volume) none of this runs: the folder is the store.
//! Credentials, region and endpoint come from the usual `AWS_*` variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for MinIO and the like,
//! `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint), through the `object_store` crate.

use futures_util::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Written last under an adapter's key: the files that make it, with their sizes.
const MANIFEST: &str = "tandem-manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum AdapterFilesError {
    #[error("{0}")]
    Config(String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Corrupt(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AdapterFilesError + '_ {
    move |source| AdapterFilesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    files: Vec<ManifestFile>,
}

#[derive(Serialize, Deserialize)]
struct ManifestFile {
    name: String,
    size: u64,
}

/// A bucket (and prefix in it) that holds the adapters replicas share.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    url: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Remote {
    /// `s3://bucket[/prefix]`, configured from the `AWS_*` environment variables.
    pub fn from_url(url: &str) -> Result<Self, AdapterFilesError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            AdapterFilesError::Config(format!(
                "{url}: an object store is named s3://bucket/prefix (S3 or an S3-compatible service)"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(AdapterFilesError::Config(format!(
                "{url}: the bucket is missing (s3://bucket/prefix)"
            )));
        }
        // A bucket that does not answer fails a request within seconds, not minutes.
        let retry = object_store::RetryConfig {
            max_retries: 4,
            retry_timeout: std::time::Duration::from_secs(10),
            ..Default::default()
        };
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry)
            .build()?;
        Ok(Self::new(Arc::new(store), prefix, url))
    }

    /// Any object store (tests use an in-memory one).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Self {
        Self {
            store,
            prefix: Key::from(prefix.trim_matches('/')),
            url: url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fails unless the bucket answers (credentials, endpoint): checked at start.
    pub async fn check(&self) -> Result<(), AdapterFilesError> {
        self.store.list_with_delimiter(Some(&self.prefix)).await?;
        Ok(())
    }

    /// The key of local folder `dir` under `root`: the same relative path.
    fn key(&self, root: &Path, dir: &Path) -> Result<Key, AdapterFilesError> {
        let rel = dir.strip_prefix(root).map_err(|_| {
            AdapterFilesError::Config(format!(
                "{} is not under the adapter cache {}",
                dir.display(),
                root.display()
            ))
        })?;
        let mut key = self.prefix.clone();
        for part in rel.components() {
            let part = part.as_os_str().to_string_lossy();
            key = key.clone().join(part.as_ref());
        }
        Ok(key)
    }

    /// Uploads the files of `dir` (a folder under `root`), then its manifest.
    pub async fn publish(&self, root: &Path, dir: &Path) -> Result<(), AdapterFilesError> {
        let key = self.key(root, dir)?;
        let mut files = Vec::new();
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(dir))?;
        names.sort_by_key(|e| e.file_name());
        for entry in names {
            let path = entry.path();
            if !path.is_file() {
                continue; // adapters are flat folders
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let size = bytes.len() as u64;
            self.store
                .put(&key.clone().join(name.as_str()), PutPayload::from(bytes))
                .await?;
            files.push(ManifestFile { name, size });
        }
        let manifest = serde_json::to_vec(&Manifest { files })
            .map_err(|e| AdapterFilesError::Corrupt(e.to_string()))?;
        self.store
            .put(&key.join(MANIFEST), PutPayload::from(manifest))
            .await?;
        Ok(())
    }

    /// Makes sure `dir` (under `root`) is here: true if it was, or was fetched whole; false if
    /// the bucket has no complete adapter there.
    pub async fn fetch(&self, root: &Path, dir: &Path) -> Result<bool, AdapterFilesError> {
        if dir.is_dir() {
            return Ok(true);
        }
        let key = self.key(root, dir)?;
        let manifest = match self.store.get(&key.clone().join(MANIFEST)).await {
            Ok(m) => m.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let manifest: Manifest = serde_json::from_slice(&manifest)
            .map_err(|e| AdapterFilesError::Corrupt(format!("{}/{MANIFEST}: {e}", self.url)))?;
        let parent = dir.parent().unwrap_or(root);
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let tmp = parent.join(format!(".fetch-{}", uuid::Uuid::new_v4().simple()));
        let got = self.fetch_into(&key, &manifest, &tmp).await;
        if got.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
            return got.map(|_| false);
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Fetched by a request beside this one meanwhile.
            if !dir.is_dir() {
                return Err(io(dir)(e));
            }
        }
        Ok(true)
    }

    async fn fetch_into(
        &self,
        key: &Key,
        manifest: &Manifest,
        tmp: &Path,
    ) -> Result<(), AdapterFilesError> {
        std::fs::create_dir_all(tmp).map_err(io(tmp))?;
        for f in &manifest.files {
            if f.name.contains('/') || f.name.contains('\\') || f.name.starts_with('.') {
                return Err(AdapterFilesError::Corrupt(format!(
                    "{}: file name {:?} in the manifest",
                    self.url, f.name
                )));
            }
            let bytes = self
                .store
                .get(&key.clone().join(f.name.as_str()))
                .await?
                .bytes()
                .await?;
            if bytes.len() as u64 != f.size {
                return Err(AdapterFilesError::Corrupt(format!(
                    "{}: {} has {} bytes, the manifest says {}",
                    self.url,
                    f.name,
                    bytes.len(),
                    f.size
                )));
            }
            let path = tmp.join(&f.name);
            std::fs::write(&path, &bytes).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Deletes `dir`'s adapter from the bucket: the manifest first, so readers stop seeing it.
    pub async fn remove(&self, root: &Path, dir: &Path) -> Result<(), AdapterFilesError> {
        let key = self.key(root, dir)?;
        match self.store.delete(&key.clone().join(MANIFEST)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let objects: Vec<_> = self.store.list(Some(&key)).try_collect().await?;
        for o in objects {
            match self.store.delete(&o.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Publishes local adapter folder `dir` to the bucket, where adapters live in one (a no-op
/// with a shared folder or none).
pub(crate) async fn publish(st: &crate::AppState, dir: &Path) -> Result<(), AdapterFilesError> {
    match (&st.adapter_remote, &st.adapter_dir) {
        (Some(r), Some(root)) => r.publish(root, dir).await,
        _ => Ok(()),
    }
}

/// True if adapter folder `dir` is here, fetched from the bucket first where adapters live in
/// one (an unreachable bucket is logged, and answers false).
pub(crate) async fn present(st: &crate::AppState, dir: &Path) -> bool {
    match (&st.adapter_remote, &st.adapter_dir) {
        (Some(r), Some(root)) => match r.fetch(root, dir).await {
            Ok(here) => here,
            Err(e) => {
                tracing::warn!(path = %dir.display(), store = r.url(), error = %e, "cannot fetch an adapter from the object store");
                false
            }
        },
        _ => dir.exists(),
    }
}

/// Deletes adapter folder `dir`'s copy in the bucket (the engine deleted the local one).
pub(crate) async fn unpublish(st: &crate::AppState, dir: &Path) {
    if let (Some(r), Some(root)) = (&st.adapter_remote, &st.adapter_dir) {
        if let Err(e) = r.remove(root, dir).await {
            tracing::warn!(path = %dir.display(), store = r.url(), error = %e, "cannot delete an old checkpoint from the object store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn adapter(dir: &Path, weights: &[u8]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), b"{\"r\": 8}").unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
    }

    fn read(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn published_adapters_fetch_whole_on_another_replica() {
        let mem = Arc::new(InMemory::new());
        let remote = Remote::new(mem.clone(), "/team/adapters/", "s3://b/team/adapters");
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let here = a.path().join("checkpoints/ftjob-1/step-3");
        adapter(&here, &[1, 2, 3, 4]);
        remote.publish(a.path(), &here).await.unwrap();
        // Under the prefix, the same relative path.
        let keys: Vec<String> = mem
            .list(None)
            .map_ok(|o| o.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            keys.iter()
                .filter(|k| k.starts_with("team/adapters/checkpoints/ftjob-1/step-3/"))
                .count(),
            3
        );

        let there = b.path().join("checkpoints/ftjob-1/step-3");
        assert!(remote.fetch(b.path(), &there).await.unwrap());
        assert_eq!(read(&there), read(&here));
        // No temporary folder left beside it.
        let siblings: Vec<_> = std::fs::read_dir(there.parent().unwrap())
            .unwrap()
            .collect();
        assert_eq!(siblings.len(), 1);

        // Nothing there, and gone once removed.
        let other = b.path().join("fine_tuned/ftjob-2");
        assert!(!remote.fetch(b.path(), &other).await.unwrap());
        assert!(!other.exists());
        remote.remove(a.path(), &here).await.unwrap();
        let c = tempfile::tempdir().unwrap();
        let gone = c.path().join("checkpoints/ftjob-1/step-3");
        assert!(!remote.fetch(c.path(), &gone).await.unwrap());
        let left: Vec<_> = mem.list(None).try_collect().await.unwrap();
        assert!(left.is_empty());
    }

    #[tokio::test]
    async fn partial_or_damaged_uploads_are_never_served() {
        let mem = Arc::new(InMemory::new());
        let remote = Remote::new(mem.clone(), "", "s3://b");
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let here = a.path().join("fine_tuned/ftjob-9");
        adapter(&here, &[7; 100]);
        // An upload cut short before its manifest: not there.
        let weights = Key::from("fine_tuned/ftjob-9/adapter_model.safetensors");
        mem.put(&weights, PutPayload::from(vec![7u8; 100]))
            .await
            .unwrap();
        let there = b.path().join("fine_tuned/ftjob-9");
        assert!(!remote.fetch(b.path(), &there).await.unwrap());

        // A file shorter than its manifest says: an error, and nothing half-written kept.
        remote.publish(a.path(), &here).await.unwrap();
        mem.put(&weights, PutPayload::from(vec![7u8; 10]))
            .await
            .unwrap();
        let e = remote.fetch(b.path(), &there).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("has 10 bytes, the manifest says 100"),
            "{e}"
        );
        assert!(!there.exists());
        assert_eq!(
            std::fs::read_dir(b.path().join("fine_tuned"))
                .unwrap()
                .count(),
            0
        );

        // A folder outside the cache root has no key.
        let e = remote.publish(b.path(), a.path()).await.unwrap_err();
        assert!(
            e.to_string().contains("is not under the adapter cache"),
            "{e}"
        );
    }

    #[test]
    fn urls_name_a_bucket() {
        for bad in ["/data/adapters", "gs://b/p", "s3://", "s3:///p"] {
            assert!(Remote::from_url(bad).is_err(), "{bad}");
        }
        let r = Remote::from_url("s3://bucket/a/b").unwrap();
        assert_eq!(r.prefix.as_ref(), "a/b");
    }
}
