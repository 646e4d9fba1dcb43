//! Signing keys and checks for every consortium identity, the coordinator's audit key
//! and each site's egress key. Two algorithms, both through ring:
//!
//! - **ECDSA P-256 with SHA-256** (FIPS 186-5; signatures ASN.1 DER, as OpenSSL,
//!   Python and Go write them) — the default, because browsers, gRPC core (BoringSSL),
//!   HSMs and KMSs accept it;
//! - **Ed25519** (RFC 8032), which earlier consortia use and which keeps working.
//!
//! A signature is always kept beside its [`Algorithm`]; a key's algorithm is read from
//! its PKCS#8 or certificate, never guessed from a length. Key files are written as
//! PKCS#8 v1 (RFC 5208; RFC 8410 for Ed25519), which OpenSSL 3.0 reads; v1 and v2
//! (RFC 5958) are both read.

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, ED25519, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
    UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignError {
    #[error("not a P-256 or Ed25519 PKCS#8 key: {0}")]
    Key(String),
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    #[error("unknown signature algorithm {0:?} (known: p256, ed25519)")]
    UnknownAlgorithm(String),
    #[error("the signature is labelled {label}, but the certificate's key is {key}")]
    Mismatch { label: Algorithm, key: Algorithm },
}

/// A signature algorithm. Its serialised name (`p256`, `ed25519`) is what logs,
/// ledgers and the wire record beside each signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// ECDSA over NIST P-256 with SHA-256, signatures ASN.1 DER.
    P256,
    /// Ed25519. The default where a record predates the label: every earlier
    /// signature was Ed25519.
    #[default]
    Ed25519,
}

impl Algorithm {
    /// What a new consortium uses.
    pub const RECOMMENDED: Algorithm = Algorithm::P256;

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::P256 => "p256",
            Algorithm::Ed25519 => "ed25519",
        }
    }

    /// Reads a label as sent on the wire: empty means Ed25519, which every sender
    /// before the label existed used.
    pub fn from_label(label: &str) -> Result<Self, SignError> {
        match label {
            "" => Ok(Algorithm::Ed25519),
            other => other.parse(),
        }
    }

    /// The length of a raw public key: 32 bytes for Ed25519, 65 (uncompressed point)
    /// for P-256.
    pub fn public_key_len(self) -> usize {
        match self {
            Algorithm::P256 => 65,
            Algorithm::Ed25519 => 32,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = SignError;
    fn from_str(s: &str) -> Result<Self, SignError> {
        match s.to_ascii_lowercase().as_str() {
            "p256" | "p-256" | "ecdsa-p256" => Ok(Algorithm::P256),
            "ed25519" => Ok(Algorithm::Ed25519),
            _ => Err(SignError::UnknownAlgorithm(s.to_string())),
        }
    }
}

enum Key {
    P256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A signing key of either algorithm.
pub struct Signer {
    key: Key,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("algorithm", &self.algorithm())
            .field("public_key", &crate::hex::to_hex(self.public_key()))
            .finish()
    }
}

impl Signer {
    /// Reads a PKCS#8 key (v1 or v2) of either algorithm, as `medfl pki`, rcgen, ring
    /// or `openssl genpkey` write them.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, SignError> {
        let rng = SystemRandom::new();
        let key = if let Ok(key) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            Key::Ed25519(key)
        } else {
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
                .map(Key::P256)
                .map_err(|e| SignError::Key(e.to_string()))?
        };
        Ok(Signer { key, rng })
    }

    /// A fresh key from the system's randomness, as PKCS#8 v1 DER.
    pub fn generate_pkcs8(algorithm: Algorithm) -> Result<Vec<u8>, SignError> {
        let rng = SystemRandom::new();
        let doc = match algorithm {
            Algorithm::P256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng),
            Algorithm::Ed25519 => Ed25519KeyPair::generate_pkcs8(&rng),
        }
        .map_err(|e| SignError::Key(e.to_string()))?;
        Ok(pkcs8_v1(doc.as_ref()))
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.key {
            Key::P256(_) => Algorithm::P256,
            Key::Ed25519(_) => Algorithm::Ed25519,
        }
    }

    /// The raw public key: 32 bytes (Ed25519) or a 65-byte uncompressed point (P-256).
    pub fn public_key(&self) -> &[u8] {
        match &self.key {
            Key::P256(k) => k.public_key().as_ref(),
            Key::Ed25519(k) => k.public_key().as_ref(),
        }
    }

    pub fn public_key_hex(&self) -> String {
        crate::hex::to_hex(self.public_key())
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        match &self.key {
            // ring fails only when the system's randomness does; nothing can be
            // signed then, and carrying on unsigned would be worse than stopping.
            Key::P256(k) => k
                .sign(&self.rng, message)
                .expect("the system's randomness failed while signing")
                .as_ref()
                .to_vec(),
            Key::Ed25519(k) => k.sign(message).as_ref().to_vec(),
        }
    }
}

/// Whether `signature` is `public_key`'s `algorithm` signature of `message`.
pub fn verify(algorithm: Algorithm, public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let alg: &dyn ring::signature::VerificationAlgorithm = match algorithm {
        Algorithm::P256 => &ECDSA_P256_SHA256_ASN1,
        Algorithm::Ed25519 => &ED25519,
    };
    UnparsedPublicKey::new(alg, public_key)
        .verify(message, signature)
        .is_ok()
}

/// The algorithm of a certificate's key, from its SubjectPublicKeyInfo.
pub fn certificate_algorithm(cert_der: &[u8]) -> Result<Algorithm, SignError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| SignError::Certificate(e.to_string()))?;
    spki_algorithm(cert.public_key())
}

fn spki_algorithm(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<Algorithm, SignError> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
    let alg = &spki.algorithm;
    if alg.algorithm == OID_SIG_ED25519 {
        return Ok(Algorithm::Ed25519);
    }
    let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve.as_ref() == Some(&OID_EC_P256) {
        return Ok(Algorithm::P256);
    }
    Err(SignError::Certificate(format!(
        "its key is neither P-256 nor Ed25519 (algorithm {})",
        alg.algorithm
    )))
}

/// Whether `signature`, labelled `label` by its sender, is the signature of `message`
/// by the key of the certificate `cert_der` (whose chain the caller checks). A label
/// that does not name the certificate key's algorithm is an error, not a `false`.
pub fn verify_by_certificate(
    cert_der: &[u8],
    label: &str,
    message: &[u8],
    signature: &[u8],
) -> Result<bool, SignError> {
    let label = Algorithm::from_label(label)?;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| SignError::Certificate(e.to_string()))?;
    let key = spki_algorithm(cert.public_key())?;
    if key != label {
        return Err(SignError::Mismatch { label, key });
    }
    Ok(verify(
        key,
        cert.public_key().subject_public_key.data.as_ref(),
        message,
        signature,
    ))
}

/// The v2 (RFC 5958) form ring writes for Ed25519 (OID 1.3.101.112), 83 bytes:
/// `SEQUENCE(81) { INTEGER 1, SEQUENCE { OID }, OCTET STRING { OCTET STRING(32) },
/// [1] IMPLICIT BIT STRING public key }`.
const ED25519_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The RFC 8410 §7 v1 form: `SEQUENCE(46) { INTEGER 0, SEQUENCE { OID }, OCTET STRING {
/// OCTET STRING(32) } }`, which OpenSSL 3.0 reads (it refuses the v2 form).
const ED25519_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A PKCS#8 key in the v1 form every tool reads: an Ed25519 v2 key loses its attached
/// public key (derived again from the seed by whoever loads it); anything else is
/// returned as it is (ring's P-256 keys are v1 already).
pub fn pkcs8_v1(der: &[u8]) -> Vec<u8> {
    match der.strip_prefix(&ED25519_V2_PREFIX[..]) {
        Some(rest) if der.len() == 83 => {
            let mut out = ED25519_V1_PREFIX.to_vec();
            out.extend_from_slice(&rest[..32]);
            out
        }
        _ => der.to_vec(),
    }
}

/// A PKCS#8 key as a `PRIVATE KEY` PEM block, in the v1 form.
pub fn private_key_pem(pkcs8_der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", pkcs8_v1(pkcs8_der)),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// What an admin signs to create a federated-analytics query: its manifest's hash,
/// under a tag of its own.
pub fn query_signing_bytes(manifest_hash: &str) -> Vec<u8> {
    let mut out = b"medfl-query-v1\0".to_vec();
    out.extend_from_slice(manifest_hash.as_bytes());
    out
}

/// What an admin signs to create a study: a domain tag (so a study signature is never
/// a query's) and the manifest's hash.
pub fn study_signing_bytes(manifest_hash: &str) -> Vec<u8> {
    let mut out = b"medfl-study-v1\0".to_vec();
    out.extend_from_slice(manifest_hash.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(algorithm: Algorithm) -> Signer {
        Signer::from_pkcs8(&Signer::generate_pkcs8(algorithm).expect("key")).expect("parse")
    }

    #[test]
    fn signatures_verify_only_for_their_key_message_and_algorithm() {
        for algorithm in [Algorithm::P256, Algorithm::Ed25519] {
            let a = signer(algorithm);
            let b = signer(algorithm);
            assert_eq!(a.algorithm(), algorithm);
            assert_eq!(a.public_key().len(), algorithm.public_key_len());
            let sig = a.sign(b"m");
            assert!(verify(algorithm, a.public_key(), b"m", &sig));
            assert!(!verify(algorithm, a.public_key(), b"n", &sig));
            assert!(!verify(algorithm, b.public_key(), b"m", &sig));
        }
        let p = signer(Algorithm::P256);
        assert!(!verify(Algorithm::Ed25519, p.public_key(), b"m", &p.sign(b"m")));
        assert!(Signer::from_pkcs8(b"not a key").is_err());
    }

    #[test]
    fn ed25519_keys_are_written_as_v1_and_v2_keys_still_read() {
        let v2 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        let v1 = pkcs8_v1(v2.as_ref());
        assert_eq!(v1.len(), 48);
        assert_eq!(v1[..16], ED25519_V1_PREFIX);
        let from_v1 = Signer::from_pkcs8(&v1).expect("v1");
        let from_v2 = Signer::from_pkcs8(v2.as_ref()).expect("v2");
        assert_eq!(from_v1.public_key(), from_v2.public_key());
        assert_eq!(Signer::generate_pkcs8(Algorithm::Ed25519).expect("key").len(), 48);
        assert!(private_key_pem(v2.as_ref()).starts_with("-----BEGIN PRIVATE KEY-----\n"));
    }

    #[test]
    fn labels_read_as_the_wire_sends_them() {
        assert_eq!(Algorithm::from_label("").expect("empty"), Algorithm::Ed25519);
        assert_eq!(Algorithm::from_label("p256").expect("p256"), Algorithm::P256);
        assert!(Algorithm::from_label("rsa").is_err());
        assert_eq!(serde_json::to_string(&Algorithm::P256).expect("json"), "\"p256\"");
    }
}
