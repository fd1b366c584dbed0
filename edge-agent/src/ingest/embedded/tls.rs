//! The embedded endpoint's TLS listener (`[broker.embedded.tls]`, rustls through tokio-rustls:
//! the same stack the uplink already uses through rumqttc).
//!
//! * `auth = "password"` (or `"none"`): server authentication only; the device's password
//!   travels inside the encrypted connection.
//! * `auth = "certificate"`: a client certificate signed by `client_ca` is required; one that
//!   is missing, expired or from another CA fails the handshake, before any MQTT byte is read.
//! * `auth = "password_or_certificate"`: a certificate is optional, but one that is presented
//!   must verify; a client without one gives its registry password in CONNECT.
//!
//! The device id of a verified certificate ([`device_id`]) is its subject's CN, as AWS IoT
//! policies use it (`iot:Certificate.Subject.CommonName`); only a certificate without a CN is
//! identified by its subject alternative name, and only if it has exactly one DNS or URI
//! name (two would leave the choice to us). The id must be a valid device id
//! ([`crate::devices::check_id`]). Failed handshakes are counted by reason
//! (`ingest_tls_refused_total{reason}`, [`failure_reason`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer,
};
use tokio_rustls::rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use tokio_rustls::rustls::{self, CertificateError, RootCertStore, ServerConfig};

use super::auth::Refusal;
use crate::ingest::config::{Auth, TlsConfig};

/// A TLS file that cannot serve, named by its field. The text never contains a file's
/// contents (the key is a secret), only its path and what is wrong with it.
#[derive(Debug)]
pub enum TlsConfigError {
    File {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    KeyMismatch {
        path: PathBuf,
    },
    Setup(String),
}

impl TlsConfigError {
    /// The config field at fault (`broker.embedded.tls.key`).
    pub fn field(&self) -> String {
        match self {
            TlsConfigError::File { field, .. } => format!("broker.embedded.tls.{field}"),
            TlsConfigError::KeyMismatch { .. } => "broker.embedded.tls.key".to_string(),
            TlsConfigError::Setup(_) => "broker.embedded.tls".to_string(),
        }
    }

    /// What is wrong with it: the text after the field.
    fn problem(&self) -> String {
        match self {
            TlsConfigError::File { path, reason, .. } => format!("{}: {reason}", path.display()),
            TlsConfigError::KeyMismatch { path } => format!(
                "{}: is not the key of the certificate in broker.embedded.tls.cert",
                path.display()
            ),
            TlsConfigError::Setup(message) => message.clone(),
        }
    }
}

impl std::fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field(), self.problem())
    }
}

impl std::error::Error for TlsConfigError {}

impl From<TlsConfigError> for settings::Invalid {
    fn from(e: TlsConfigError) -> settings::Invalid {
        settings::Invalid::at(e.field(), e.problem())
    }
}

fn file_error(field: &'static str, path: &Path, reason: impl ToString) -> TlsConfigError {
    TlsConfigError::File {
        field,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|e| file_error(field, path, format!("cannot read it: {e}")))
}

/// Certificates of a PEM file, at least one.
fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let bytes = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(field, path, format!("not a readable PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(file_error(
            field,
            path,
            "no certificate in it (expected PEM \"BEGIN CERTIFICATE\")",
        ));
    }
    Ok(certs)
}

/// The CRLs of a PEM file, at least one (parsed by rustls when the verifier is built).
fn revocation_lists(
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsConfigError> {
    let bytes = read("crl", path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("crl", path, format!("not a readable PEM file ({e})")))?;
    if crls.is_empty() {
        return Err(file_error(
            "crl",
            path,
            "no CRL in it (expected PEM \"BEGIN X509 CRL\")",
        ));
    }
    Ok(crls)
}

/// Makes ring rustls's process-wide provider, which rumqttc's TLS configs (the uplink, an
/// external broker) are built with. A build of the whole workspace links aws-lc too (the
/// bridge's AWS SDK), and with two providers rustls would not choose; a second call is a no-op.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the listener's rustls configuration for `auth`, reading and checking every file:
/// the certificate chain, that the key is its key, and the client CA when `auth` asks for
/// certificates. Called by `check-config` and at start-up, so a bad file stops either with
/// the field named.
pub fn server_config(tls: &TlsConfig, auth: Auth) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let chain = certificates("cert", &tls.cert)?;
    let key_bytes = read("key", &tls.key)?;
    // The parser's own error could quote a line of the file: say only what was expected.
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        let why = match e {
            pem::Error::NoItemsFound => "no private key in it (expected PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")",
            _ => "not a readable PEM private key",
        };
        file_error("key", &tls.key, why)
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Setup(e.to_string()))?;
    let builder = match (&tls.client_ca, auth.uses_certificates()) {
        (Some(ca), true) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client_ca", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error("client_ca", ca, format!("not a usable CA: {e}")))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            if auth == Auth::PasswordOrCertificate {
                verifier = verifier.allow_unauthenticated();
            }
            if let Some(path) = &tls.crl {
                // The device certificate only: a fleet's CRLs are published per issuing CA.
                verifier = verifier
                    .with_crls(revocation_lists(path)?)
                    .only_check_end_entity_revocation();
            }
            let verifier = verifier.build().map_err(|e| match (e, &tls.crl) {
                (VerifierBuilderError::InvalidCrl(e), Some(path)) => {
                    file_error("crl", path, format!("not a usable CRL: {e:?}"))
                }
                (e, _) => file_error("client_ca", ca, e),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsConfigError::KeyMismatch {
            path: tls.key.clone(),
        },
        other => file_error("cert", &tls.cert, other),
    })?;
    Ok(Arc::new(config))
}

/// The device id a verified client certificate stands for (see the module docs: CN first,
/// else the one DNS or URI SAN). [`Refusal::NoIdentity`] if there is none, or no valid id.
pub(super) fn device_id(cert: &CertificateDer<'_>) -> Result<String, Refusal> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|_| Refusal::NoIdentity)?;
    let cns = common_names(ee.subject()).ok_or(Refusal::NoIdentity)?;
    let id = match cns.as_slice() {
        [cn] => *cn,
        [] => {
            let sans: Vec<&str> = ee.valid_dns_names().chain(ee.valid_uri_names()).collect();
            match sans.as_slice() {
                [one] => *one,
                _ => return Err(Refusal::NoIdentity),
            }
        }
        _ => return Err(Refusal::NoIdentity),
    };
    crate::devices::check_id(id).map_err(|_| Refusal::NoIdentity)?;
    Ok(id.to_string())
}

/// One DER TLV: (tag, value, rest). `None` on anything malformed.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        (
            bytes
                .iter()
                .fold(0usize, |acc, &b| acc << 8 | usize::from(b)),
            rest,
        )
    };
    let (value, rest) = rest.split_at_checked(len)?;
    Some((tag, value, rest))
}

/// The commonName values of a DER `Name` (its RDN sequence's contents, as webpki gives it).
/// `None` if it does not parse or a CN is not a UTF-8, printable or IA5 string.
fn common_names(mut rdns: &[u8]) -> Option<Vec<&str>> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const CN: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    let mut found = Vec::new();
    while !rdns.is_empty() {
        let (tag, mut set, rest) = tlv(rdns)?;
        rdns = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attr, rest) = tlv(set)?;
            set = rest;
            let (oid_tag, oid, value) = tlv(attr)?;
            if tag != SEQUENCE || oid_tag != OID {
                return None;
            }
            if oid == CN {
                let (string_tag, text, _) = tlv(value)?;
                // UTF8String, PrintableString, IA5String.
                if !matches!(string_tag, 0x0c | 0x13 | 0x16) {
                    return None;
                }
                found.push(std::str::from_utf8(text).ok()?);
            }
        }
    }
    Some(found)
}

/// Why a TLS handshake failed (the metric's `reason` label).
pub(super) fn failure_reason(e: &io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "closed";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownRevocationStatus => "revocation_unknown",
            _ => "bad_certificate",
        },
        // The client refused us (e.g. it does not trust our certificate).
        rustls::Error::AlertReceived(_) => "client_alert",
        // Typically plain MQTT sent to the TLS port.
        rustls::Error::InvalidMessage(_) => "not_tls",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der_len(n: usize) -> Vec<u8> {
        if n < 0x80 {
            vec![n as u8]
        } else {
            vec![0x81, n as u8]
        }
    }

    fn tl(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend(der_len(value.len()));
        v.extend_from_slice(value);
        v
    }

    fn rdn(oid: &[u8], tag: u8, text: &str) -> Vec<u8> {
        let attr = [tl(0x06, oid), tl(tag, text.as_bytes())].concat();
        tl(0x31, &tl(0x30, &attr))
    }

    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const CN: &[u8] = &[0x55, 0x04, 0x03];

    #[test]
    fn common_names_are_read_from_the_subject() {
        let subject = [rdn(O, 0x0c, "Acme"), rdn(CN, 0x0c, "meter-1")].concat();
        assert_eq!(common_names(&subject), Some(vec!["meter-1"]));
        let printable = rdn(CN, 0x13, "meter-2");
        assert_eq!(common_names(&printable), Some(vec!["meter-2"]));
        assert_eq!(common_names(&rdn(O, 0x0c, "Acme")), Some(vec![]));
        let two = [rdn(CN, 0x0c, "a"), rdn(CN, 0x0c, "b")].concat();
        assert_eq!(common_names(&two), Some(vec!["a", "b"]));
        // BMPString is not read (as UTF-8 it would be garbage), nor is a truncated name.
        assert_eq!(common_names(&rdn(CN, 0x1e, "xy")), None);
        let mut cut = rdn(CN, 0x0c, "meter-1");
        cut.pop();
        assert_eq!(common_names(&cut), None);
        assert_eq!(common_names(&[]), Some(vec![]));
    }

    #[test]
    fn a_long_name_uses_the_long_length_form() {
        let long = "m".repeat(128);
        assert_eq!(
            common_names(&rdn(CN, 0x0c, &long)),
            Some(vec![long.as_str()])
        );
    }

    #[test]
    fn handshake_failures_have_a_reason() {
        let io = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            failure_reason(&io(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))),
            "unknown_issuer"
        );
        assert_eq!(
            failure_reason(&io(rustls::Error::NoCertificatesPresented)),
            "no_certificate"
        );
        for (e, reason) in [
            (CertificateError::Revoked, "revoked"),
            (
                CertificateError::UnknownRevocationStatus,
                "revocation_unknown",
            ),
        ] {
            let e = io(rustls::Error::InvalidCertificate(e));
            assert_eq!(failure_reason(&e), reason);
        }
        assert_eq!(
            failure_reason(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            "closed"
        );
    }
}
