//! Stage 0 of a session: each site's fresh X25519 pairs and self-mask seed, the key
//! agreement between two sites, and what a site signs when it advertises its keys.

use super::*;

/// X25519, refusing a non-contributory result (RFC 7748 Sec. 6.1: an all-zero shared
/// secret means the peer's key was of low order).
pub(super) fn agree(secret: &StaticSecret, peer_public: &[u8; 32], peer: &str) -> Result<[u8; 32]> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(SecAggError::NonContributory(peer.to_string()));
    }
    Ok(shared.to_bytes())
}

/// A site's public keys for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedKeys {
    /// For sealing shares (c_pk).
    pub cipher: [u8; 32],
    /// For pairwise masks (s_pk).
    pub mask: [u8; 32],
}

/// A site's secrets for one session; dropped with it.
pub struct SiteSecrets {
    pub(super) cipher: StaticSecret,
    pub(super) mask: StaticSecret,
    pub(super) self_seed: [u8; 32],
}

impl std::fmt::Debug for SiteSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteSecrets")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl SiteSecrets {
    /// Fresh keys and seed from the operating system's CSPRNG.
    pub fn generate() -> Result<Self> {
        Ok(SiteSecrets {
            cipher: StaticSecret::from(random_bytes::<32>()?),
            mask: StaticSecret::from(random_bytes::<32>()?),
            self_seed: random_bytes()?,
        })
    }

    pub fn public(&self) -> AdvertisedKeys {
        AdvertisedKeys {
            cipher: PublicKey::from(&self.cipher).to_bytes(),
            mask: PublicKey::from(&self.mask).to_bytes(),
        }
    }
}

/// The bytes a site signs with its identity key to advertise its keys.
pub fn advert_signing_bytes(session: &[u8; 32], site: &str, keys: &AdvertisedKeys) -> Vec<u8> {
    encode_fields(&[
        PROTOCOL,
        b"advertise",
        session,
        site.as_bytes(),
        &keys.cipher,
        &keys.mask,
    ])
}
