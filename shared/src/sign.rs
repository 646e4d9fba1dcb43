//! Ed25519 (RFC 8032) signing keys and checks: every identity's certificate key, the
//! coordinator's audit key and each site's egress key are Ed25519, through ring.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignError {
    #[error("not an Ed25519 PKCS#8 key: {0}")]
    Key(String),
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
}

/// An Ed25519 signing key.
pub struct Signer {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public_key", &crate::hex::to_hex(self.public_key()))
            .finish()
    }
}

impl Signer {
    /// Reads a PKCS#8 key (v1 or v2), as rcgen writes certificate keys and ring makes them.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, SignError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|key| Signer { key })
            .map_err(|e| SignError::Key(e.to_string()))
    }

    /// A fresh PKCS#8 key from the system's randomness.
    pub fn generate_pkcs8() -> Result<Vec<u8>, SignError> {
        Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map(|k| k.as_ref().to_vec())
            .map_err(|e| SignError::Key(e.to_string()))
    }

    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    pub fn public_key_hex(&self) -> String {
        crate::hex::to_hex(self.public_key())
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
    }
}

/// Whether `signature` is `public_key`'s Ed25519 signature of `message`.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

/// Whether `signature` is the Ed25519 signature of `message` by the key of the
/// certificate `cert_der` (whose chain the caller checks).
pub fn verify_by_certificate(cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<bool, SignError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| SignError::Certificate(e.to_string()))?;
    Ok(verify(
        cert.public_key().subject_public_key.data.as_ref(),
        message,
        signature,
    ))
}

/// What an admin signs to create a study: its manifest's canonical hash, tagged.
pub fn study_signing_bytes(manifest_hash: &str) -> Vec<u8> {
    let mut out = b"medfl-study-v1\0".to_vec();
    out.extend_from_slice(manifest_hash.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_key_and_message() {
        let a = Signer::from_pkcs8(&Signer::generate_pkcs8().expect("key")).expect("parse");
        let b = Signer::from_pkcs8(&Signer::generate_pkcs8().expect("key")).expect("parse");
        let sig = a.sign(b"m");
        assert!(verify(a.public_key(), b"m", &sig));
        assert!(!verify(a.public_key(), b"n", &sig));
        assert!(!verify(b.public_key(), b"m", &sig));
        assert!(Signer::from_pkcs8(b"not a key").is_err());
    }
}
