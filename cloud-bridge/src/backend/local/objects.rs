//! Objects as files under a directory: `dir/{key}`, the same layout as the S3 bucket, each
//! written to a temporary file and renamed, so a reader never sees half an object.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::backend::{BoxFuture, ObjectStore};

/// Objects as files under a directory.
#[derive(Debug)]
pub struct LocalObjects {
    root: PathBuf,
    /// Serialises conditional rewrites (one process owns the directory).
    rewrite: std::sync::Mutex<()>,
}

impl LocalObjects {
    pub fn new(root: &Path) -> anyhow::Result<LocalObjects> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(LocalObjects {
            root: root.to_path_buf(),
            rewrite: std::sync::Mutex::new(()),
        })
    }

    fn path(&self, key: &str) -> anyhow::Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            bail!("object key '{key}' is not a relative path");
        }
        Ok(self.root.join(key))
    }

    fn put_sync(&self, key: &str, body: &[u8]) -> anyhow::Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("writing {}", path.display()))
    }

    fn delete_sync(&self, key: &str) -> anyhow::Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("deleting {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    fn list_sync(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // temporary files
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                if e.file_type()?.is_dir() {
                    walk(&e.path(), &key, out)?;
                } else {
                    out.push(key);
                }
            }
            Ok(())
        }
        let mut keys = Vec::new();
        walk(&self.root, "", &mut keys)
            .with_context(|| format!("listing {}", self.root.display()))?;
        keys.retain(|k| k.starts_with(prefix));
        keys.sort();
        Ok(keys)
    }
}

impl ObjectStore for LocalObjects {
    fn put<'a>(&'a self, key: &'a str, body: Vec<u8>, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.put_sync(key, &body) })
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.delete_sync(key) })
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move { self.list_sync(prefix) })
    }
    fn location(&self) -> String {
        self.root.display().to_string()
    }
    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<(Vec<u8>, String)>> {
        Box::pin(async move { self.get_versioned_sync(key) })
    }
    fn put_if_match<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        _: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let _one = self.rewrite.lock().unwrap_or_else(|p| p.into_inner());
            match self.get_versioned_sync(key)? {
                Some((_, now)) if now == etag => self.put_sync(key, &body).map(|()| true),
                _ => Ok(false),
            }
        })
    }
}

impl LocalObjects {
    fn get_versioned_sync(&self, key: &str) -> anyhow::Result<Option<(Vec<u8>, String)>> {
        let path = self.path(key)?;
        match std::fs::read(&path) {
            Ok(body) => {
                // A version tag from the content, as S3's ETag of a one-part upload is its MD5.
                let etag = format!("{:016x}", crate::fnv1a(&body));
                Ok(Some((body, etag)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}
