//! The device registry: which devices may connect to the embedded endpoint, and with what
//! secret (`[broker.embedded] auth = "password"`; the MQTT user name is the device id).
//!
//! Only argon2id hashes are kept, in `data_dir/devices.json`, written atomically and durably
//! (temp file, fsync, rename, directory fsync) so a power cut leaves the old registry or the
//! new one, never half of either. The CLI edits the file whether the agent runs or not; the
//! running endpoint picks a change up at the next CONNECT ([`Watch`]), so adding, rotating
//! or removing a device never needs a restart (a removed device's open connection is closed
//! at its next publish).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

/// The registry's file in the data dir.
pub const FILE: &str = "devices.json";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device registry {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device registry {path}: not a registry this agent can read: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("device '{0}' is already registered (use `device rotate` for a new secret)")]
    Exists(String),
    #[error("no device '{0}' is registered")]
    Unknown(String),
    #[error("device id '{0}': {1}")]
    BadId(String, &'static str),
    #[error("the password must be at least {MIN_PASSWORD} characters")]
    WeakPassword,
    #[error("hashing the secret: {0}")]
    Hash(String),
}

/// Shortest password accepted from `--password` (generated ones are longer).
pub const MIN_PASSWORD: usize = 12;

/// One registered device. `hash` is a PHC string (`$argon2id$v=19$m=…`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub hash: String,
    /// When it was added, and when its secret last changed (epoch ms).
    pub added_at: i64,
    pub rotated_at: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub devices: BTreeMap<String, Device>,
}

/// What a CONNECT's credentials amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    UnknownDevice,
    BadPassword,
}

impl Verdict {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::UnknownDevice => "unknown_device",
            Verdict::BadPassword => "bad_password",
        }
    }
}

/// argon2id at OWASP's second recommended setting (19 MiB, 2 passes): about 60 ms on a
/// Raspberry Pi 4, paid once per CONNECT, not per message.
fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], DeviceError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| DeviceError::Hash(e.to_string()))?;
    Ok(b)
}

/// A fresh secret for a device: 24 random bytes, base64url (32 characters).
pub fn generate_secret() -> Result<String, DeviceError> {
    use argon2::password_hash::Encoding;
    let bytes = random_bytes::<24>()?;
    let mut out = [0u8; 32];
    let s = Encoding::B64
        .encode(&bytes, &mut out)
        .map_err(|e| DeviceError::Hash(e.to_string()))?;
    Ok(s.replace('+', "-").replace('/', "_"))
}

fn hash(secret: &str) -> Result<String, DeviceError> {
    let salt = SaltString::encode_b64(&random_bytes::<16>()?)
        .map_err(|e| DeviceError::Hash(e.to_string()))?;
    hasher()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| DeviceError::Hash(e.to_string()))
}

/// A device id must be usable as an MQTT user name and as one topic level.
pub fn check_id(id: &str) -> Result<(), DeviceError> {
    let bad = |why| Err(DeviceError::BadId(id.to_string(), why));
    if id.is_empty() || id.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if id.contains(['/', '+', '#']) || id.chars().any(char::is_control) {
        return bad("must not contain '/', '+', '#' or control characters (it is a topic level)");
    }
    Ok(())
}

impl Registry {
    /// Registers `id` with `password`, or a generated secret (returned: shown once, then
    /// only its hash exists).
    pub fn add(
        &mut self,
        id: &str,
        password: Option<&str>,
        now: i64,
    ) -> Result<String, DeviceError> {
        check_id(id)?;
        if self.devices.contains_key(id) {
            return Err(DeviceError::Exists(id.to_string()));
        }
        let secret = chosen_or_generated(password)?;
        self.devices.insert(
            id.to_string(),
            Device {
                hash: hash(&secret)?,
                added_at: now,
                rotated_at: None,
            },
        );
        Ok(secret)
    }

    /// A new secret for `id`; the old one stops working at once.
    pub fn rotate(
        &mut self,
        id: &str,
        password: Option<&str>,
        now: i64,
    ) -> Result<String, DeviceError> {
        let secret = chosen_or_generated(password)?;
        let hash = hash(&secret)?;
        let d = self
            .devices
            .get_mut(id)
            .ok_or_else(|| DeviceError::Unknown(id.to_string()))?;
        d.hash = hash;
        d.rotated_at = Some(now);
        Ok(secret)
    }

    pub fn remove(&mut self, id: &str) -> Result<(), DeviceError> {
        self.devices
            .remove(id)
            .map(drop)
            .ok_or_else(|| DeviceError::Unknown(id.to_string()))
    }

    /// Checks a CONNECT's credentials. An unknown device costs the same hash as a known one,
    /// so timing does not tell which ids exist.
    pub fn verify(&self, id: &str, password: &[u8]) -> Verdict {
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let (stored, known) = match self.devices.get(id) {
            Some(d) => (d.hash.as_str(), true),
            None => (
                DUMMY
                    .get_or_init(|| hash("not a device secret").unwrap_or_default())
                    .as_str(),
                false,
            ),
        };
        let ok =
            PasswordHash::new(stored).is_ok_and(|h| hasher().verify_password(password, &h).is_ok());
        match (known, ok) {
            (false, _) => Verdict::UnknownDevice,
            (true, true) => Verdict::Accepted,
            (true, false) => Verdict::BadPassword,
        }
    }

    /// Reads the registry of `data_dir`; a missing file is an empty registry.
    pub fn load(data_dir: &Path) -> Result<Registry, DeviceError> {
        let path = data_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DeviceError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(source) => Err(DeviceError::Io { path, source }),
        }
    }

    /// Replaces the registry of `data_dir`, atomically and durably (owner-only permissions).
    pub fn save(&self, data_dir: &Path) -> Result<(), DeviceError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join(FILE);
        let io = |source| DeviceError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let tmp = data_dir.join(format!("{FILE}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let body = serde_json::to_vec_pretty(self).expect("a registry serializes");
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

/// Loads, changes and saves the registry of `data_dir` under an exclusive lock
/// (`devices.json.lock`), so two technicians' commands never lose each other's change.
pub fn edit<T>(
    data_dir: &Path,
    change: impl FnOnce(&mut Registry) -> Result<T, DeviceError>,
) -> Result<T, DeviceError> {
    let path = data_dir.join(format!("{FILE}.lock"));
    let io = |source| DeviceError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let lock = std::fs::File::create(&path).map_err(io)?;
    lock.lock().map_err(io)?;
    let mut registry = Registry::load(data_dir)?;
    let out = change(&mut registry)?;
    registry.save(data_dir)?;
    Ok(out)
}

fn chosen_or_generated(password: Option<&str>) -> Result<String, DeviceError> {
    match password {
        Some(p) if p.chars().count() < MIN_PASSWORD => Err(DeviceError::WeakPassword),
        Some(p) => Ok(p.to_string()),
        None => generate_secret(),
    }
}

/// The file's modification time and size: what tells [`Watch`] to read it again.
type Stamp = Option<(SystemTime, u64)>;

/// The registry as the running endpoint sees it: reloaded when the file changes.
pub struct Watch {
    data_dir: PathBuf,
    current: Mutex<(Stamp, Arc<Registry>)>,
}

impl Watch {
    pub fn new(data_dir: &Path) -> Result<Watch, DeviceError> {
        let w = Watch {
            data_dir: data_dir.to_path_buf(),
            current: Mutex::new((None, Arc::new(Registry::default()))),
        };
        w.registry()?;
        Ok(w)
    }

    /// The registry now: the file is read again only if its mtime or size changed. A file
    /// that became unreadable keeps the last good registry (and says why).
    pub fn registry(&self) -> Result<Arc<Registry>, DeviceError> {
        let path = self.data_dir.join(FILE);
        let stamp = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 != stamp || stamp.is_none() && !cur.1.devices.is_empty() {
            match Registry::load(&self.data_dir) {
                Ok(r) => *cur = (stamp, Arc::new(r)),
                Err(e) if cur.0.is_none() => return Err(e),
                Err(e) => {
                    tracing::error!(error = %e, "device registry unreadable: keeping the last one read")
                }
            }
        }
        Ok(Arc::clone(&cur.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_secret_of_a_known_device_is_accepted() {
        let mut r = Registry::default();
        let secret = r.add("meter-1", None, 1).unwrap();
        assert_eq!(secret.len(), 32);
        assert!(r.devices["meter-1"].hash.starts_with("$argon2id$"));
        assert!(!r.devices["meter-1"].hash.contains(&secret));
        assert_eq!(r.verify("meter-1", secret.as_bytes()), Verdict::Accepted);
        assert_eq!(r.verify("meter-1", b"wrong"), Verdict::BadPassword);
        assert_eq!(
            r.verify("meter-2", secret.as_bytes()),
            Verdict::UnknownDevice
        );
        let new = r.rotate("meter-1", Some("a long enough pass"), 2).unwrap();
        assert_eq!(r.verify("meter-1", secret.as_bytes()), Verdict::BadPassword);
        assert_eq!(r.verify("meter-1", new.as_bytes()), Verdict::Accepted);
        r.remove("meter-1").unwrap();
        assert_eq!(r.verify("meter-1", new.as_bytes()), Verdict::UnknownDevice);
    }

    #[test]
    fn bad_input_is_refused_by_name() {
        let mut r = Registry::default();
        assert!(matches!(r.add("a/b", None, 0), Err(DeviceError::BadId(..))));
        assert!(matches!(r.add("", None, 0), Err(DeviceError::BadId(..))));
        assert!(matches!(
            r.add("m", Some("short"), 0),
            Err(DeviceError::WeakPassword)
        ));
        r.add("m", None, 0).unwrap();
        assert!(matches!(r.add("m", None, 0), Err(DeviceError::Exists(_))));
        assert!(matches!(
            r.rotate("x", None, 0),
            Err(DeviceError::Unknown(_))
        ));
        assert!(matches!(r.remove("x"), Err(DeviceError::Unknown(_))));
    }

    #[test]
    fn saved_registries_reload_and_the_watch_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        let watch = Watch::new(dir.path()).unwrap();
        assert!(watch.registry().unwrap().devices.is_empty());
        let mut r = Registry::default();
        let secret = r.add("m1", None, 5).unwrap();
        r.save(dir.path()).unwrap();
        assert_eq!(Registry::load(dir.path()).unwrap(), r);
        let seen = watch.registry().unwrap();
        assert_eq!(seen.verify("m1", secret.as_bytes()), Verdict::Accepted);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert!(Registry::load(dir.path()).is_err());
        // The running endpoint keeps the last good registry.
        assert_eq!(watch.registry().unwrap().devices.len(), 1);
    }
}
