//! Private CAs for upstreams, made at run time: a viewer or EMR served over HTTPS with a
//! certificate its CA signed, for exactly the names a test chooses.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test CA that signs upstream certificates.
pub struct TestCa {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// One name in a certificate: a DNS name or an IP address.
pub enum Name {
    Dns(&'static str),
    Ip([u8; 4]),
}

pub const LOOPBACK: Name = Name::Ip([127, 0, 0, 1]);

impl TestCa {
    pub fn new(cn: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server TLS configuration (HTTP/1.1 and h2 by ALPN) whose certificate names
    /// exactly `names`.
    pub fn server(&self, names: &[Name]) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.server_pem(names);
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A server certificate for exactly `names` and its key, as PEM (for a server that
    /// reads files, such as redis-server).
    pub fn server_pem(&self, names: &[Name]) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for n in names {
            params.subject_alt_names.push(match n {
                Name::Dns(d) => SanType::DnsName((*d).try_into().unwrap()),
                Name::Ip(ip) => SanType::IpAddress((*ip).into()),
            });
        }
        params
            .distinguished_name
            .push(DnType::CommonName, "test upstream");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA certificate into `dir` and returns its path, for `upstream_ca`.
    pub fn write(&self, dir: &std::path::Path, name: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path.display().to_string()
    }
}

/// The clinic's private CA for one test, written where `upstream_ca` can name it.
pub struct ClinicCa {
    pub ca: TestCa,
    pub path: String,
    _dir: tempfile::TempDir,
}

impl ClinicCa {
    pub fn new() -> Self {
        let ca = TestCa::new("the clinic's CA");
        let dir = tempfile::tempdir().unwrap();
        let path = ca.write(dir.path(), "ca.pem");
        Self {
            ca,
            path,
            _dir: dir,
        }
    }

    /// A server configuration for 127.0.0.1 signed by this CA.
    pub fn loopback_server(&self) -> Arc<rustls::ServerConfig> {
        self.ca.server(&[LOOPBACK])
    }

    /// An ehrgate whose EMR upstream is `https://addr`, trusting this CA, with `emr`
    /// added to its `[emr]` table.
    pub fn emr_setup(&self, addr: std::net::SocketAddr, emr: &str) -> crate::support::Setup {
        let mut setup = crate::support::Setup::new(addr, addr)
            .emr(&format!("upstream_ca = {:?}\n{emr}", self.path));
        setup.emr_upstream = format!("https://{addr}");
        setup
    }
}
