//! The context assertion (DESIGN §6): a compact JWS, ES256, telling the viewer who the
//! clinician is, which authority they act for and which patient to open. The signature
//! comes from aws-lc-rs; this module only lays out the JOSE header and claims.

use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde::Serialize;

use crate::config::ConfigError;

/// The patient part of the claims.
#[derive(Debug, Clone, Serialize)]
pub struct PatientClaims<'a> {
    pub demographic_no: &'a str,
    pub hcn: &'a str,
    pub hcn_version: &'a str,
    pub birth_date: &'a str,
    pub gender: &'a str,
    pub family: &'a str,
    pub given: &'a str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Claims<'a> {
    pub iss: &'a str,
    /// The viewer origin, `https://ehr.host[:port]`.
    pub aud: &'a str,
    /// The EMR user.
    pub sub: &'a str,
    pub uao: &'a str,
    pub uao_name: &'a str,
    pub patient: PatientClaims<'a>,
    /// Whether the EMR user is the patient's most responsible provider.
    pub mrp: bool,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

pub struct ContextSigner {
    /// The key that signs (the first configured).
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    /// `{"alg":"ES256","typ":"ehr-context+jwt","kid":…}`, base64url, made once.
    header_b64: String,
    jwks: Bytes,
}

/// Reads one ES256 private key; errors name `key` (the configuration key).
fn load_key(key: &str, path: &Path) -> Result<EcdsaKeyPair, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| {
        ConfigError::new(
            key,
            format!(
                "cannot read {}: {e} (generate one with `openssl genpkey -algorithm EC \
                 -pkeyopt ec_paramgen_curve:P-256 -out {}`)",
                path.display(),
                path.display()
            ),
        )
    })?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        ConfigError::new(key, format!("{} holds no PEM private key", path.display()))
    })?;
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_der())
        .or_else(|_| {
            EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_der())
        })
        .map_err(|_| {
            ConfigError::new(
                key,
                format!("{} is not a P-256 (ES256) private key", path.display()),
            )
        })
}

/// A key's public JWK and its RFC 7638 thumbprint (the `kid`).
fn public_jwk(key: &EcdsaKeyPair) -> (String, serde_json::Value) {
    let point = key.public_key().as_ref();
    // Uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
    let (x, y) = (
        URL_SAFE_NO_PAD.encode(&point[1..33]),
        URL_SAFE_NO_PAD.encode(&point[33..65]),
    );
    // RFC 7638 thumbprint: the required members, in lexicographic order, no spaces.
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        canonical.as_bytes(),
    ));
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "x": x, "y": y,
        "kid": kid, "use": "sig", "alg": "ES256",
    });
    (kid, jwk)
}

impl ContextSigner {
    /// Loads the ES256 private keys (PKCS#8 PEM, or SEC1 `EC PRIVATE KEY`): the first
    /// signs; every one is published in the JWKS under its RFC 7638 thumbprint, so a
    /// key can be published before it signs and kept after (DESIGN §10).
    pub fn load(paths: &[std::path::PathBuf]) -> Result<Self, ConfigError> {
        let mut keys = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let key_name = if paths.len() == 1 {
                "context.signing_key".to_string()
            } else {
                format!("context.signing_key[{i}]")
            };
            keys.push(load_key(&key_name, path)?);
        }
        let mut published: Vec<(String, serde_json::Value)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let (kid, jwk) = public_jwk(key);
            if published.iter().any(|(k, _)| *k == kid) {
                return Err(ConfigError::new(
                    format!("context.signing_key[{i}]"),
                    format!("{} is the same key as an earlier entry", paths[i].display()),
                ));
            }
            published.push((kid, jwk));
        }
        let mut keys = keys.into_iter();
        let key = keys
            .next()
            .ok_or_else(|| ConfigError::new("context.signing_key", "list at least one key file"))?;
        let kid = published[0].0.clone();
        let header = serde_json::json!({"alg": "ES256", "typ": "ehr-context+jwt", "kid": kid});
        let jwks = serde_json::json!({
            "keys": published.into_iter().map(|(_, jwk)| jwk).collect::<Vec<_>>()
        });
        Ok(Self {
            key,
            rng: SystemRandom::new(),
            header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
            kid,
            jwks: Bytes::from(jwks.to_string()),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key set served at `/.well-known/ehrgate/jwks.json`.
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    /// Signs the claims into a compact JWS.
    pub fn sign(&self, claims: &Claims<'_>) -> Result<String, aws_lc_rs::error::Unspecified> {
        let payload = serde_json::to_vec(claims).map_err(|_| aws_lc_rs::error::Unspecified)?;
        let mut out = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 100);
        out.push_str(&self.header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let signature = self.key.sign(&self.rng, out.as_bytes())?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut out);
        Ok(out)
    }
}

/// Verifies a compact JWS made by [`ContextSigner::sign`] against a JWKS document, as a
/// viewer does: the header, the key by `kid`, the ES256 signature, then `exp`. Returns
/// the claims. (ehrgate itself never verifies; the demo viewer and the tests do.)
pub fn verify(
    jws: &str,
    jwks: &serde_json::Value,
    now_unix: i64,
) -> Result<serde_json::Value, String> {
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
    let mut parts = jws.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS".into());
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| "bad base64url".to_string())
    };
    let header: serde_json::Value =
        serde_json::from_slice(&decode(h)?).map_err(|_| "bad header")?;
    if header["alg"] != "ES256" || header["typ"] != "ehr-context+jwt" {
        return Err(format!("unexpected header {header}"));
    }
    let key = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == header["kid"]))
        .ok_or("no key with that kid")?;
    let coordinate = |name: &str| decode(key[name].as_str().unwrap_or_default());
    let mut point = vec![4u8];
    point.extend(coordinate("x")?);
    point.extend(coordinate("y")?);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(format!("{h}.{p}").as_bytes(), &decode(s)?)
        .map_err(|_| "signature does not verify".to_string())?;
    let claims: serde_json::Value =
        serde_json::from_slice(&decode(p)?).map_err(|_| "bad claims")?;
    match claims["exp"].as_i64() {
        Some(exp) if exp > now_unix => Ok(claims),
        _ => Err("expired".into()),
    }
}

/// A random JWT id.
pub fn new_jti() -> Result<String, aws_lc_rs::error::Unspecified> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b)?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    fn signer() -> ContextSigner {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, crate::tls::dev::generate_signing_key_pem().unwrap()).unwrap();
        ContextSigner::load(&[path]).unwrap()
    }

    fn claims() -> Claims<'static> {
        Claims {
            iss: "ehrgate",
            aud: "https://ehr.localhost:8443",
            sub: "999998",
            uao: "2.16.840.1.113883.3.239.9:101",
            uao_name: "Maple",
            patient: PatientClaims {
                demographic_no: "1001",
                hcn: "9876543217",
                hcn_version: "AB",
                birth_date: "1970-01-31",
                gender: "F",
                family: "Testpatient",
                given: "Alice",
            },
            mrp: false,
            iat: 1_800_000_000,
            exp: 1_800_000_060,
            jti: "j".into(),
        }
    }

    #[test]
    fn signs_a_compact_jws_that_the_published_key_verifies() {
        let s = signer();
        let jws = s.sign(&claims()).unwrap();
        let parts: Vec<&str> = jws.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "ehr-context+jwt");
        assert_eq!(header["kid"], s.kid());
        let body: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(body["patient"]["birth_date"], "1970-01-31");
        assert_eq!(body["mrp"], false);

        let jwks: serde_json::Value = serde_json::from_slice(&s.jwks()).unwrap();
        let jwk = &jwks["keys"][0];
        assert_eq!(jwk["kid"], s.kid());
        let mut point = vec![4u8];
        point.extend(URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap());
        point.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(signed.as_bytes(), &sig)
            .expect("signature verifies");
        let jwks_doc: serde_json::Value = serde_json::from_slice(&s.jwks()).unwrap();
        assert_eq!(
            verify(&jws, &jwks_doc, 1_800_000_000).unwrap()["sub"],
            "999998"
        );
        assert_eq!(
            verify(&jws, &jwks_doc, 1_800_000_060).unwrap_err(),
            "expired"
        );
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(b"{\"sub\":\"x\"}"),
            parts[2]
        );
        assert!(verify(&forged, &jwks_doc, 0).is_err());
        assert!(verify("a.b", &jwks_doc, 0).is_err());
        let mut tampered = signed.into_bytes();
        tampered[5] ^= 1;
        assert!(UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(&tampered, &sig)
            .is_err());
    }

    #[test]
    fn refuses_a_key_of_another_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        std::fs::write(&path, ed.serialize_pem()).unwrap();
        let e = ContextSigner::load(std::slice::from_ref(&path))
            .err()
            .unwrap();
        assert_eq!(e.key, "context.signing_key");
        let e = ContextSigner::load(&[dir.path().join("missing.pem")])
            .err()
            .unwrap();
        assert!(e.message.contains("cannot read"));
    }

    #[test]
    fn every_listed_key_is_published_and_the_first_signs() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<std::path::PathBuf> = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("k{i}.pem"));
                std::fs::write(&p, crate::tls::dev::generate_signing_key_pem().unwrap()).unwrap();
                p
            })
            .collect();
        let both = ContextSigner::load(&paths).unwrap();
        let first = ContextSigner::load(&paths[..1]).unwrap();
        let second = ContextSigner::load(&paths[1..]).unwrap();
        assert_eq!(both.kid(), first.kid(), "the first signs");
        let jwks: serde_json::Value = serde_json::from_slice(&both.jwks()).unwrap();
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids, [first.kid(), second.kid()]);
        let jws = both.sign(&claims()).unwrap();
        assert!(verify(&jws, &jwks, 1_800_000_000).is_ok());
        // The same key twice is a mistake, named.
        let twice = [paths[0].clone(), dir.path().join("copy.pem")];
        std::fs::copy(&paths[0], &twice[1]).unwrap();
        let e = ContextSigner::load(&twice).err().unwrap();
        assert_eq!(e.key, "context.signing_key[1]");
    }
}
