//! Stages 1 and 3: Shamir shares of s_sk and b_u, sealed to each peer (AES-GCM under a
//! key from the pair's agreement), opened, and reconstructed at unmasking.

use super::*;

/// Shamir-shares a 32-byte secret t-of-n; share i (0-based) has x = i + 1 and is
/// encoded as `x ‖ y` (33 bytes).
pub(super) fn split_secret(secret: &[u8; 32], t: u32, n: usize) -> Result<Vec<Vec<u8>>> {
    let shares: Vec<Vec<u8>> = blahaj::Sharks(t as u8)
        .dealer(secret)
        .take(n)
        .map(|s| Vec::from(&s))
        .collect();
    if shares.len() != n || shares.iter().enumerate().any(|(i, s)| s[0] as usize != i + 1) {
        return Err(SecAggError::MalformedShare(
            "the dealer did not produce x = 1..=n".into(),
        ));
    }
    Ok(shares)
}

/// One recipient's shares of a sender's two secrets, as sealed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePair {
    /// Share of the sender's masking key s_sk (x ‖ y).
    pub mask_key: Vec<u8>,
    /// Share of the sender's self-mask seed b (x ‖ y).
    pub self_seed: Vec<u8>,
}

pub(super) const SHARE_LEN: usize = 33;

pub(super) fn share_key(
    secrets: &SiteSecrets,
    session: &[u8; 32],
    from: &str,
    to: &str,
    peer_c_pk: &[u8; 32],
    peer: &str,
) -> Result<aead::LessSafeKey> {
    let shared = agree(&secrets.cipher, peer_c_pk, peer)?;
    // One key per direction and session, so the all-zero nonce is never reused.
    let info = encode_fields(&[b"share key", from.as_bytes(), to.as_bytes()]);
    let key = derive_key(&shared, session, &info);
    aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &key)
        .map(aead::LessSafeKey::new)
        .map_err(|_| SecAggError::Random)
}

pub(super) fn share_ad(session: &[u8; 32], from: &str, to: &str) -> Vec<u8> {
    encode_fields(&[PROTOCOL, b"share", session, from.as_bytes(), to.as_bytes()])
}

/// Round 1 at site `me`: shares s_sk and b t-of-n and seals one pair to each
/// v ∈ U1 that is `me` or one of its neighbours with ChaCha20-Poly1305 under a key from X25519(c_sk_me,
/// c_pk_v) and HKDF; the associated data binds session, sender and recipient.
/// Returns (recipient, sealed bytes) in `u1` order.
pub fn seal_shares(
    params: &SessionParams,
    secrets: &SiteSecrets,
    me: &str,
    u1: &[(String, AdvertisedKeys)],
) -> Result<Vec<(String, Vec<u8>)>> {
    let session = params.session_id();
    let n = params.roster.len();
    let mask_shares = split_secret(&secrets.mask.to_bytes(), params.threshold, n)?;
    let seed_shares = split_secret(&secrets.self_seed, params.threshold, n)?;
    u1.iter()
        .filter(|(to, _)| params.are_peers(me, to))
        .map(|(to, keys)| {
            let x = params
                .x_of(to)
                .ok_or_else(|| SecAggError::Roster(format!("{to} is not on the session's roster")))?;
            let i = x as usize - 1;
            let mut plain = Vec::with_capacity(2 * SHARE_LEN + 16);
            plain.extend_from_slice(&mask_shares[i]);
            plain.extend_from_slice(&seed_shares[i]);
            let key = share_key(secrets, &session, me, to, &keys.cipher, to)?;
            key.seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key([0; 12]),
                aead::Aad::from(share_ad(&session, me, to)),
                &mut plain,
            )
            .map_err(|_| SecAggError::Random)?;
            Ok((to.clone(), plain))
        })
        .collect()
}

/// Round 2 at site `me`: opens the pair `from` sealed to it, and checks that both
/// shares carry `me`'s x-coordinate.
pub fn open_shares(
    params: &SessionParams,
    secrets: &SiteSecrets,
    me: &str,
    from: &str,
    from_keys: &AdvertisedKeys,
    sealed: &[u8],
) -> Result<SharePair> {
    let session = params.session_id();
    let key = share_key(secrets, &session, from, me, &from_keys.cipher, from)?;
    let mut buf = sealed.to_vec();
    let plain = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(share_ad(&session, from, me)),
            &mut buf,
        )
        .map_err(|_| SecAggError::Open {
            from: from.to_string(),
            to: me.to_string(),
        })?;
    if plain.len() != 2 * SHARE_LEN {
        return Err(SecAggError::MalformedShare(format!("{} bytes", plain.len())));
    }
    let x = params.x_of(me);
    if x != Some(plain[0]) || x != Some(plain[SHARE_LEN]) {
        return Err(SecAggError::MalformedShare(format!(
            "shares for {me} must have x = {x:?}"
        )));
    }
    Ok(SharePair {
        mask_key: plain[..SHARE_LEN].to_vec(),
        self_seed: plain[SHARE_LEN..].to_vec(),
    })
}

/// Reconstructs a 32-byte secret from shares (x ‖ y), deduplicated by x: repeats of a
/// share are dropped, two different shares at one x are refused, and exactly the
/// first t distinct shares are interpolated.
pub fn reconstruct_seed(shares: &[Vec<u8>], threshold: u32) -> Result<[u8; 32]> {
    let mut by_x: HashMap<u8, &Vec<u8>> = HashMap::new();
    for s in shares {
        if s.len() != SHARE_LEN || s[0] == 0 {
            return Err(SecAggError::MalformedShare(format!("a share of {} bytes", s.len())));
        }
        match by_x.get(&s[0]) {
            Some(prev) if *prev != s => return Err(SecAggError::ConflictingShares(s[0])),
            Some(_) => {}
            None => {
                by_x.insert(s[0], s);
            }
        }
    }
    let t = threshold as usize;
    if by_x.len() < t {
        return Err(SecAggError::TooFewShares {
            got: by_x.len(),
            need: t,
        });
    }
    let mut xs: Vec<u8> = by_x.keys().copied().collect();
    xs.sort_unstable();
    let chosen: Vec<blahaj::Share> = xs[..t]
        .iter()
        .map(|x| blahaj::Share::try_from(by_x[x].as_slice()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| SecAggError::MalformedShare(e.to_string()))?;
    let secret = blahaj::Sharks(threshold as u8)
        .recover(&chosen)
        .map_err(|e| SecAggError::MalformedShare(e.to_string()))?;
    secret
        .try_into()
        .map_err(|_| SecAggError::MalformedShare("the secret is not 32 bytes".into()))
}

/// Reconstructs a dropped site's masking key and checks that it reproduces the public
/// key the site advertised (a wrong or forged share fails here, not in the sum).
pub fn reconstruct_mask_key(shares: &[Vec<u8>], threshold: u32, site: &str, advertised: &[u8; 32]) -> Result<[u8; 32]> {
    let key = reconstruct_seed(shares, threshold)?;
    if PublicKey::from(&StaticSecret::from(key)).as_bytes() != advertised {
        return Err(SecAggError::WrongKey(site.to_string()));
    }
    Ok(key)
}
