//! TLS for both sides of the proxy: the server configuration browsers meet (TLS 1.2 and
//! 1.3 only, ALPN `h2` and `http/1.1`, session resumption) and the client configuration
//! used towards `https://` upstreams.
//!
//! Owns reading certificates and keys from disk and checking that they belong together.
//! It never decides routing: SNI is only reported to the proxy, which compares it with
//! the request's host.

pub mod dev;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::ConfigError;

/// ALPN identifiers, in the server's order of preference.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// TLS sessions remembered for stateful resumption (about 200 bytes each).
const SESSION_CACHE_SIZE: usize = 20_000;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Reads a PEM certificate chain (leaf first).
pub fn read_cert_chain(
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ConfigError::new(
                key,
                format!("{} is not a PEM certificate file: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        ConfigError::new(
            key,
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                path.display()
            ),
        )
    })
}

/// Builds the server's TLS configuration from the configured chain and key.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<ServerTls, ConfigError> {
    let cert = Arc::new(CertSwap(ArcSwap::from_pointee(certified_key(
        cert_path, key_path,
    )?)));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| ConfigError::new("server", format!("TLS set-up failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| ConfigError::new("server", format!("TLS ticketer: {e}")))?;
    Ok(ServerTls {
        config: Arc::new(config),
        cert,
    })
}

/// The server's TLS configuration, and the handle that swaps its certificate.
#[derive(Debug)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub cert: Arc<CertSwap>,
}

/// The certificate browsers are shown, swapped on reload: new handshakes get the new
/// one, established connections keep theirs (as HAProxy's runtime certificate update).
#[derive(Debug)]
pub struct CertSwap(ArcSwap<CertifiedKey>);

impl CertSwap {
    pub fn replace(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }

    /// The certificate chain in use now (leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.0.load().cert.clone()
    }
}

impl ResolvesServerCert for CertSwap {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Reads `tls_cert` and `tls_key` and checks that they belong together.
pub fn certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, ConfigError> {
    let chain = read_cert_chain("server.tls_cert", cert_path)?;
    let key = read_private_key("server.tls_key", key_path)?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => {
                "does not belong to the certificate in server.tls_cert".to_string()
            }
            other => format!("cannot be used with server.tls_cert: {other}"),
        };
        ConfigError::new("server.tls_key", format!("{} {why}", key_path.display()))
    })
}

/// Builds the client TLS configuration for an `https://` upstream: verified against
/// `ca_path` when given, otherwise against the system's roots, with the upstream's name
/// checked against its certificate. ALPN is left empty: the HTTP connector offers the
/// protocols it speaks itself, and refuses a configuration that already names some.
pub fn upstream_client_config(key: &str, ca_path: &str) -> Result<ClientConfig, ConfigError> {
    let mut roots = RootCertStore::empty();
    if ca_path.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A malformed system root is skipped, as every TLS client does.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(ConfigError::new(
                key,
                "empty, and the system has no trusted root certificates; name a PEM bundle",
            ));
        }
    } else {
        for cert in read_cert_chain(key, Path::new(ca_path))? {
            roots.add(cert).map_err(|e| {
                ConfigError::new(
                    key,
                    format!("{ca_path} holds an unusable CA certificate: {e}"),
                )
            })?;
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| ConfigError::new(key, format!("TLS set-up failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatched_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = dev::DevPki::generate(&["a.localhost"]).unwrap();
        let b = dev::DevPki::generate(&["b.localhost"]).unwrap();
        let cert = dir.path().join("a.crt");
        let key = dir.path().join("b.key");
        std::fs::write(&cert, &a.server_cert_pem).unwrap();
        std::fs::write(&key, &b.server_key_pem).unwrap();
        let e = server_config(&cert, &key).unwrap_err();
        assert_eq!(e.key, "server.tls_key");
        assert!(e.message.contains("does not belong"), "{e}");
    }

    #[test]
    fn unreadable_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crt");
        let e = server_config(&missing, &missing).unwrap_err();
        assert_eq!(e.key, "server.tls_cert");
        assert!(e.message.contains("cannot read"), "{e}");

        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = server_config(&empty, &empty).unwrap_err();
        assert!(e.message.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn matching_pair_loads_with_alpn_and_resumption() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev::DevPki::generate(&["emr.localhost", "ehr.localhost"]).unwrap();
        let (cert, key) = (dir.path().join("s.crt"), dir.path().join("s.key"));
        std::fs::write(&cert, &pki.server_cert_pem).unwrap();
        std::fs::write(&key, &pki.server_key_pem).unwrap();
        let c = server_config(&cert, &key).unwrap().config;
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(c.ticketer.enabled());
    }
}
