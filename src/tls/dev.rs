//! Development key material for `ehrgate demo` and the tests: a throw-away CA, a server
//! certificate for the demo hosts signed by it, and a context-signing key.
//!
//! Everything here is generated on the machine that uses it; nothing is committed.
//! Never use these files for a real clinic.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

/// A development CA and a server certificate it signed, all PEM.
pub struct DevPki {
    pub ca_cert_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl DevPki {
    /// Generates a CA and a server certificate for `hosts`, `localhost` and 127.0.0.1.
    pub fn generate(hosts: &[&str]) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.distinguished_name = name("ehrgate development CA (not for clinical use)");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        if !names.iter().any(|n| n == "localhost") {
            names.push("localhost".into());
        }
        let mut params = CertificateParams::new(names)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name = name("ehrgate development server");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params.signed_by(&server_key, &issuer)?;

        Ok(Self {
            ca_cert_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
        })
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Generates an ES256 (P-256) private key as PKCS#8 PEM, for signing context assertions.
pub fn generate_signing_key_pem() -> Result<String, rcgen::Error> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?.serialize_pem())
}

/// The files of a development set-up.
#[derive(Debug, Clone)]
pub struct DevFiles {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub signing_key: PathBuf,
}

/// Makes sure `dir` holds a development CA, server certificate and signing key for
/// `hosts`, generating what is missing; existing files are reused so that a browser that
/// trusts the CA keeps trusting it. Returns whether anything was generated.
pub fn ensure_dev_files(dir: &Path, hosts: &[&str]) -> std::io::Result<(DevFiles, bool)> {
    let files = DevFiles {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        signing_key: dir.join("context-signing.pem"),
    };
    std::fs::create_dir_all(dir)?;
    let hosts_file = dir.join("hosts.txt");
    let wanted_hosts = hosts.join("\n");
    let mut generated = false;
    let pki_ok = files.ca_cert.exists()
        && files.server_cert.exists()
        && files.server_key.exists()
        && std::fs::read_to_string(&hosts_file).ok().as_deref() == Some(wanted_hosts.as_str());
    if !pki_ok {
        let pki = DevPki::generate(hosts).map_err(std::io::Error::other)?;
        write_file(&files.ca_cert, &pki.ca_cert_pem, false)?;
        write_file(&files.server_cert, &pki.server_cert_pem, false)?;
        write_file(&files.server_key, &pki.server_key_pem, true)?;
        write_file(&hosts_file, &wanted_hosts, false)?;
        generated = true;
    }
    if !files.signing_key.exists() {
        let pem = generate_signing_key_pem().map_err(std::io::Error::other)?;
        write_file(&files.signing_key, &pem, true)?;
        generated = true;
    }
    Ok((files, generated))
}

/// Writes a file; secret ones are created readable by their owner only.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    let mut f = options.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_files_are_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (files, generated) =
            ensure_dev_files(dir.path(), &["emr.localhost", "ehr.localhost"]).unwrap();
        assert!(generated);
        let first = std::fs::read(&files.server_cert).unwrap();
        let (_, generated) =
            ensure_dev_files(dir.path(), &["emr.localhost", "ehr.localhost"]).unwrap();
        assert!(!generated);
        assert_eq!(std::fs::read(&files.server_cert).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.server_key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        // Other hosts: a new certificate.
        let (_, generated) = ensure_dev_files(dir.path(), &["emr.test"]).unwrap();
        assert!(generated);
        assert_ne!(std::fs::read(&files.server_cert).unwrap(), first);
    }
}
