//! A throwaway certificate authority for TLS tests, made at test time (nothing checked in): a
//! CA, a broker certificate for 127.0.0.1/localhost, a client certificate, more of either on
//! demand, and a CRL revoking some of them. The one implementation for the end-to-end tests
//! and `cloud-bridge/tests/` (a dev-dependency on this crate).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};

/// PEM files under `dir/name/`.
pub struct Pki {
    /// This CA's folder.
    pub dir: PathBuf,
    pub ca: PathBuf,
    /// A broker certificate for 127.0.0.1 and localhost.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate (CN `gw-test`).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The serial number of the last certificate issued to each CN (or SAN), for
    /// [`Pki::crl`]; and the last serial number given out.
    serials: Mutex<(HashMap<String, u64>, u64)>,
}

impl Pki {
    /// Makes a CA named `name` and the broker and client certificates it signs, under
    /// `dir/name/`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, issuer.pem()).unwrap();
        let mut pki = Pki {
            ca,
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            dir,
            issuer,
            serials: Mutex::default(),
        };
        (pki.server_cert, pki.server_key) = pki.issue("server", true);
        (pki.client_cert, pki.client_key) = pki.issue("gw-test", false);
        pki
    }

    /// `(cert, key)` files for a client certificate with an empty subject (no CN) and the one
    /// DNS subject alternative name `san`: how some fleets name devices.
    pub fn issue_san_only(&self, san: &str) -> (PathBuf, PathBuf) {
        let mut p = CertificateParams::new(vec![san.to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.serial_number = Some(self.serial_for(san));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let c = self.dir.join(format!("san-{san}.pem"));
        let k = self.dir.join(format!("san-{san}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// `(cert, key)` files `{cn}.pem`/`{cn}.key` signed by this CA: a server certificate for
    /// 127.0.0.1 and localhost if `server`, else a client certificate.
    pub fn issue(&self, cn: &str, server: bool) -> (PathBuf, PathBuf) {
        let sans = if server {
            vec!["127.0.0.1".to_string(), "localhost".to_string()]
        } else {
            vec![cn.to_string()]
        };
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.serial_number = Some(self.serial_for(cn));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let c = self.dir.join(format!("{cn}.pem"));
        let k = self.dir.join(format!("{cn}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A client certificate for `cn` over a key made elsewhere (e.g. an RSA key, as AWS IoT
    /// Core's `create-keys-and-certificate` makes them); returns the certificate file.
    pub fn issue_client_for_key(&self, cn: &str, key: &KeyPair) -> PathBuf {
        let mut p = CertificateParams::new(vec![cn.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.serial_number = Some(self.serial_for(cn));
        let cert = p.signed_by(key, &self.issuer).unwrap();
        let c = self.dir.join(format!("{cn}.cert.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        c
    }

    /// A new serial number for the certificate of `name` (remembered for [`Pki::crl`]); one
    /// never given out before, even when `name` is issued again.
    fn serial_for(&self, name: &str) -> SerialNumber {
        let (by_name, last) = &mut *self.serials.lock().unwrap();
        *last += 1;
        by_name.insert(name.to_string(), *last);
        SerialNumber::from(*last)
    }

    /// `crl.pem`: this CA's revocation list, revoking the (last) certificate issued to each of
    /// `names`.
    pub fn crl(&self, names: &[&str]) -> PathBuf {
        let (serials, _) = &*self.serials.lock().unwrap();
        let now = rcgen::date_time_ymd(2025, 1, 1);
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: names
                .iter()
                .map(|n| RevokedCertParams {
                    serial_number: SerialNumber::from(serials[*n]),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).unwrap();
        let path = self.dir.join("crl.pem");
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }
}
