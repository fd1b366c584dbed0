//! Who may post events over HTTP: per-device API keys (stored as SHA-256 hashes) and JWTs
//! verified against a JWKS file. Every credential speaks for exactly one device; a request for
//! another device is refused (403), one without a valid credential too (401).
//!
//! An API key is 32 random bytes (base64url), so a plain SHA-256 is the right hash: there is
//! nothing to brute-force, and a lookup costs one hash rather than a password KDF per request.
//! The key file has one line per key, `DEVICE sha256:HEX` (`#` starts a comment); a device may
//! have several keys (rotation).
//!
//! A JWT is accepted when its header's `kid` names a key of the JWKS (or the JWKS has one key
//! and the token names none), its `alg` is the one that key is for, its signature verifies,
//! `exp` (required) and `nbf` hold, and `iss`/`aud` are the configured ones when set. The
//! device is the configured claim (`sub` by default).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest as _, Sha256};

use crate::config::HttpConfig;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send `Authorization: Bearer <API key or JWT>` or `X-Api-Key`")]
    Missing,
    #[error("unknown API key")]
    UnknownKey,
    #[error("API keys are not accepted here (no http.api_keys)")]
    NoKeys,
    #[error("JWTs are not accepted here (no http.jwks)")]
    NoJwks,
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("the credentials are for device '{allowed}', not '{asked}'")]
    OtherDevice { allowed: String, asked: String },
}

impl AuthError {
    /// 403 for a valid credential of another device, 401 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::OtherDevice { .. } => 403,
            _ => 401,
        }
    }
}

struct JwtKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The credentials an HTTP listener accepts.
pub struct Auth {
    /// SHA-256 of a key → its device.
    keys: Option<HashMap<[u8; 32], String>>,
    jwks: Option<Vec<JwtKey>>,
    issuer: Option<String>,
    audience: Option<String>,
    device_claim: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("api_keys", &self.keys.as_ref().map(HashMap::len))
            .field("jwks", &self.jwks.as_ref().map(Vec::len))
            .finish()
    }
}

impl Auth {
    /// Reads the key file and the JWKS; an error names the field and the line or key.
    pub fn load(cfg: &HttpConfig) -> anyhow::Result<Auth> {
        // Both aws-lc (the SDK's) and nothing else: pinned here so feature unification
        // elsewhere cannot leave jsonwebtoken without a provider at the first request.
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let keys = match &cfg.api_keys {
            Some(p) => Some(read_keys(p).context("http.api_keys")?),
            None => None,
        };
        let jwks = match &cfg.jwks {
            Some(p) => Some(read_jwks(p).context("http.jwks")?),
            None => None,
        };
        Ok(Auth {
            keys,
            jwks,
            issuer: cfg.jwt_issuer.clone(),
            audience: cfg.jwt_audience.clone(),
            device_claim: cfg.device_claim.clone(),
        })
    }

    /// The device the request's credential speaks for.
    pub fn device(&self, headers: &http::HeaderMap) -> Result<String, AuthError> {
        let header = |name: http::header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let bearer = header(http::header::AUTHORIZATION).and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let api_key = header(http::HeaderName::from_static("x-api-key"));
        match (bearer, api_key) {
            (Some(t), _) if t.split('.').count() == 3 => self.jwt(t),
            (Some(k), _) | (None, Some(k)) => self.api_key(k),
            (None, None) => Err(AuthError::Missing),
        }
    }

    /// [`Auth::device`], and that it is `asked`.
    pub fn device_is(&self, headers: &http::HeaderMap, asked: &str) -> Result<(), AuthError> {
        let allowed = self.device(headers)?;
        if allowed != asked {
            return Err(AuthError::OtherDevice {
                allowed,
                asked: asked.to_string(),
            });
        }
        Ok(())
    }

    fn api_key(&self, key: &str) -> Result<String, AuthError> {
        let keys = self.keys.as_ref().ok_or(AuthError::NoKeys)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        keys.get(&digest).cloned().ok_or(AuthError::UnknownKey)
    }

    fn jwt(&self, token: &str) -> Result<String, AuthError> {
        let bad = |e: jsonwebtoken::errors::Error| AuthError::BadToken(e.to_string());
        let jwks = self.jwks.as_ref().ok_or(AuthError::NoJwks)?;
        let header = jsonwebtoken::decode_header(token).map_err(bad)?;
        let key = match &header.kid {
            Some(kid) => jwks.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if jwks.len() == 1 => jwks.first(),
            None => None,
        }
        .ok_or_else(|| AuthError::BadToken("no key of the JWKS matches its kid".into()))?;
        if header.alg != key.alg {
            return Err(AuthError::BadToken(format!(
                "alg {:?} is not the key's {:?}",
                header.alg, key.alg
            )));
        }
        let mut v = Validation::new(key.alg);
        v.set_required_spec_claims(&["exp"]);
        v.validate_nbf = true;
        match &self.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &v)
                .map_err(bad)?;
        data.claims
            .get(&self.device_claim)
            .and_then(serde_json::Value::as_str)
            .map(String::from)
            .ok_or_else(|| {
                AuthError::BadToken(format!(
                    "claim '{}' (the device) missing",
                    self.device_claim
                ))
            })
    }
}

/// `DEVICE sha256:HEX` lines.
fn read_keys(path: &Path) -> anyhow::Result<HashMap<[u8; 32], String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let (device, hash) = line
            .split_once(char::is_whitespace)
            .with_context(|| format!("{}: expected `DEVICE sha256:HEX`", at()))?;
        let hex = hash
            .trim()
            .strip_prefix("sha256:")
            .with_context(|| format!("{}: the hash must start with sha256:", at()))?;
        let digest =
            parse_digest(hex).with_context(|| format!("{}: sha256: needs 64 hex digits", at()))?;
        keys.insert(digest, device.to_string());
    }
    Ok(keys)
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn read_jwks(path: &Path) -> anyhow::Result<Vec<JwtKey>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JWKS (RFC 7517)", path.display()))?;
    if set.keys.is_empty() {
        bail!("{}: the JWKS has no keys", path.display());
    }
    set.keys
        .iter()
        .enumerate()
        .map(|(i, jwk)| {
            let at = || format!("{} keys[{i}]", path.display());
            Ok(JwtKey {
                kid: jwk.common.key_id.clone(),
                alg: key_alg(jwk).with_context(at)?,
                key: DecodingKey::from_jwk(jwk).with_context(at)?,
            })
        })
        .collect()
}

/// The one algorithm a public key verifies: its `alg`, else the curve's (EC) or RS256 (RSA).
/// Symmetric (`oct`) keys are refused: a shared secret in a file of public keys is a mistake.
fn key_alg(jwk: &Jwk) -> anyhow::Result<Algorithm> {
    if let AlgorithmParameters::OctetKey(_) = jwk.algorithm {
        bail!("a symmetric (oct) key: only public keys (RSA, EC, OKP) belong in a JWKS here");
    }
    if let Some(a) = jwk.common.key_algorithm {
        return a
            .to_string()
            .parse::<Algorithm>()
            .map_err(|e| anyhow::anyhow!("alg {a:?}: {e}"));
    }
    Ok(match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref c => bail!("curve {c:?} is not supported"),
        },
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => unreachable!("refused above"),
    })
}

/// A new API key for `device`: (the key to give the device, the line for `http.api_keys`).
pub fn new_key(device: &str) -> anyhow::Result<(String, String)> {
    use base64::Engine as _;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| anyhow::anyhow!("no system randomness"))?;
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    Ok((key.clone(), key_line(device, &key)))
}

/// The `http.api_keys` line of `key`.
pub fn key_line(device: &str, key: &str) -> String {
    use std::fmt::Write as _;
    let hex = Sha256::digest(key.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
    format!("{device} sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn cfg(dir: &Path, keys: Option<&str>, jwks: Option<&str>) -> HttpConfig {
        let mut c: HttpConfig = toml::from_str("listen = \"127.0.0.1:0\"").unwrap();
        if let Some(k) = keys {
            std::fs::write(dir.join("keys"), k).unwrap();
            c.api_keys = Some(dir.join("keys"));
        }
        if let Some(j) = jwks {
            std::fs::write(dir.join("jwks.json"), j).unwrap();
            c.jwks = Some(dir.join("jwks.json"));
        }
        c
    }

    #[test]
    fn api_keys_speak_for_their_device_only() {
        let dir = tempfile::tempdir().unwrap();
        let (key, line) = new_key("phone-1").unwrap();
        let (other, _) = new_key("phone-1").unwrap();
        let auth = Auth::load(&cfg(dir.path(), Some(&format!("# keys\n{line}\n")), None)).unwrap();
        assert_eq!(
            auth.device(&headers(&[("authorization", &format!("Bearer {key}"))])),
            Ok("phone-1".into())
        );
        assert_eq!(
            auth.device(&headers(&[("x-api-key", &key)])),
            Ok("phone-1".into())
        );
        assert_eq!(
            auth.device(&headers(&[("x-api-key", &other)])),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(auth.device(&headers(&[])), Err(AuthError::Missing));
        let e = auth
            .device_is(&headers(&[("x-api-key", &key)]), "phone-2")
            .unwrap_err();
        assert_eq!(e.status(), 403);
        assert_eq!(AuthError::UnknownKey.status(), 401);
    }

    #[test]
    fn a_bad_key_file_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = Auth::load(&cfg(dir.path(), Some("phone-1 sha256:abc\n"), None)).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("http.api_keys:") && msg.contains("line 1"),
            "{msg}"
        );
    }

    /// An ES256 key pair: the JWKS text and the PEM to sign with.
    fn es256(kid: &str) -> (serde_json::Value, jsonwebtoken::EncodingKey) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw(); // 0x04 || x || y
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
        let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        (jwk, enc)
    }

    fn token(enc: &jsonwebtoken::EncodingKey, kid: &str, claims: serde_json::Value) -> String {
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, enc).unwrap()
    }

    #[test]
    fn jwts_verify_against_the_jwks() {
        let dir = tempfile::tempdir().unwrap();
        let (jwk, enc) = es256("k1");
        let (_, stranger) = es256("k1");
        let jwks = json!({"keys": [jwk]}).to_string();
        let mut c = cfg(dir.path(), None, Some(&jwks));
        c.jwt_issuer = Some("https://id.example".into());
        let auth = Auth::load(&c).unwrap();
        let exp = crate::now_ms() / 1000 + 600;
        let bearer = |t: String| headers(&[("authorization", &format!("Bearer {t}"))]);
        let good = token(
            &enc,
            "k1",
            json!({"sub": "phone-7", "exp": exp, "iss": "https://id.example"}),
        );
        assert_eq!(auth.device(&bearer(good)), Ok("phone-7".into()));
        for (what, t) in [
            (
                "another key",
                token(
                    &stranger,
                    "k1",
                    json!({"sub": "p", "exp": exp, "iss": "https://id.example"}),
                ),
            ),
            (
                "expired",
                token(
                    &enc,
                    "k1",
                    json!({"sub": "p", "exp": 1000, "iss": "https://id.example"}),
                ),
            ),
            (
                "no exp",
                token(&enc, "k1", json!({"sub": "p", "iss": "https://id.example"})),
            ),
            (
                "wrong issuer",
                token(&enc, "k1", json!({"sub": "p", "exp": exp, "iss": "x"})),
            ),
            (
                "unknown kid",
                token(
                    &enc,
                    "k2",
                    json!({"sub": "p", "exp": exp, "iss": "https://id.example"}),
                ),
            ),
            (
                "no device",
                token(&enc, "k1", json!({"exp": exp, "iss": "https://id.example"})),
            ),
        ] {
            let r = auth.device(&bearer(t));
            assert!(matches!(r, Err(AuthError::BadToken(_))), "{what}: {r:?}");
        }
        // An API key where only JWTs are configured.
        assert_eq!(
            auth.device(&headers(&[("x-api-key", "k")])),
            Err(AuthError::NoKeys)
        );
    }

    #[test]
    fn symmetric_keys_are_refused_in_a_jwks() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]}).to_string();
        let e = Auth::load(&cfg(dir.path(), None, Some(&jwks))).unwrap_err();
        assert!(format!("{e:#}").contains("symmetric"), "{e:#}");
    }
}
