//! Secure aggregation: the math and crypto of SecAgg (Bonawitz et al., CCS 2017,
//! "Practical Secure Aggregation for Privacy-Preserving Machine Learning", Fig. 4, the
//! semi-honest protocol), without any I/O. The coordinator learns Σ_{u∈U3} x_u and
//! nothing about one site's x_u, and still finishes when sites drop out after sharing
//! keys.
//!
//! Rounds of one session (one attempt at one training round):
//! 0. Advertise keys: each site u draws fresh X25519 pairs (c_u for encrypting shares,
//!    s_u for masking) and a self-mask seed b_u, and signs (c_pk, s_pk) with its site
//!    identity ([`advert_signing_bytes`]). U1 = sites that advertised.
//! 1. Share keys: u Shamir-shares s_sk and b_u (t of |U1|) and seals one share of each
//!    to every v ∈ U1 ([`seal_shares`]). U2 = sites that sent shares.
//! 2. Masked input: `y_u = x_u + PRG(b_u) + Σ_{v∈U2∖u} ±PRG(s_uv) mod 2^32`
//!    ([`MaskPlan::for_site`]); + when u < v by name, − otherwise. U3 = sites whose
//!    masked input arrived.
//! 3. Unmask: each survivor reveals its share of b_u for u ∈ U3 and of s_sk_v for
//!    v ∈ U2∖U3, never both for one site ([`check_unmask_request`]); the coordinator
//!    reconstructs ([`reconstruct_seed`], [`reconstruct_mask_key`]) and removes the
//!    masks that do not cancel ([`MaskPlan::for_unmasking`]).
//!
//! Every key is fresh per session and every derivation is bound to the session id, the
//! SHA-256 of the roster and parameters ([`SessionParams::session_id`]), so masks are
//! never reused across rounds or attempts.
//!
//! PRG ([`add_keystream`]), specified exactly: AES-128 in counter mode as GCM runs it
//! (NIST SP 800-38D, Sec. 6.5, GCTR from inc32(J0) with J0 = IV ‖ 0^31 ‖ 1). The
//! AES key is the first 16 bytes of the 32-byte seed. The stream is cut into blocks
//! of [`PRG_BLOCK_WORDS`] words; block b is the GCTR keystream under IV = b as a
//! 96-bit big-endian integer (counter blocks IV ‖ 2, IV ‖ 3, …, 32-bit big-endian).
//! Word i of block b is bytes [4i, 4i+4) of that keystream read as a little-endian
//! u32, and is word b·PRG_BLOCK_WORDS + i of the stream. (ring computes it as the
//! ciphertext of AES-128-GCM over zero bytes, whose tag is discarded.) A stream holds
//! [`MAX_VALUES`] words at most, which bounds the model size.

use std::collections::{BTreeSet, HashMap};

use ring::aead;
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

mod keys;
mod masks;
mod quantize;
mod shares;

pub use keys::*;
pub use masks::*;
pub use quantize::*;
pub use shares::*;

/// Domain separation for every hash, key derivation and signature of this protocol.
pub const PROTOCOL: &[u8] = b"medfl-secagg-v1";

/// Most values one session can mask (2^22 PRG blocks).
pub const MAX_VALUES: u64 = 1 << 36;

pub use crate::prg::{PRG_BLOCK_WORDS, add_keystream};

/// Most sites in one session: Shamir shares live in GF(256), x = 1..=255.
pub const MAX_SITES: usize = 255;

#[derive(Debug, Error, PartialEq)]
pub enum SecAggError {
    #[error("invalid session parameters: {0}")]
    Params(String),
    #[error("the X25519 agreement with {0} is non-contributory (a low-order public key)")]
    NonContributory(String),
    #[error("a sealed share from {from} to {to} does not open: wrong key, wrong session or tampered")]
    Open { from: String, to: String },
    #[error("malformed share: {0}")]
    MalformedShare(String),
    #[error("shares with x = {0} disagree")]
    ConflictingShares(u8),
    #[error("{got} distinct shares, {need} needed to reconstruct")]
    TooFewShares { got: usize, need: usize },
    #[error("the masking key reconstructed for {0} does not match its advertised public key")]
    WrongKey(String),
    #[error("roster check failed: {0}")]
    Roster(String),
    #[error("quantization: {0}")]
    Quantization(String),
    #[error("no randomness from the operating system")]
    Random,
}

type Result<T> = std::result::Result<T, SecAggError>;

/// What every participant of one session agrees on. Its SHA-256 is the session id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionParams {
    pub study_id: String,
    pub round: u32,
    pub attempt: u32,
    /// U0: the sites selected for the round, sorted, no repeats. A site's Shamir
    /// x-coordinate is its position here plus one.
    pub roster: Vec<String>,
    /// t: shares needed to reconstruct; also the fewest sites each stage may have.
    pub threshold: u32,
    /// Values per masked input.
    pub num_values: u64,
    /// log2 of the quantization scale γ (see [`Quantizer`]).
    pub scale_log2: i32,
    /// k: each site masks with and shares to k neighbours (SecAgg+, Bell et al., CCS
    /// 2020); 0 is the full graph of SecAgg.
    #[serde(default)]
    pub neighbours: u32,
}

impl SessionParams {
    pub fn validate(&self) -> Result<()> {
        let n = self.roster.len();
        if n > MAX_SITES {
            return Err(SecAggError::Params(format!("{n} sites; at most {MAX_SITES}")));
        }
        if self.roster.windows(2).any(|w| w[0] >= w[1]) {
            return Err(SecAggError::Params("the roster must be sorted without repeats".into()));
        }
        if self.threshold < 2 || self.threshold as usize > n {
            return Err(SecAggError::Params(format!(
                "threshold t = {} must be in 2..={n}",
                self.threshold
            )));
        }
        if self.neighbours != 0 {
            let k = self.neighbours as usize;
            if !k.is_multiple_of(2) || k < 2 || k >= n.saturating_sub(1) {
                return Err(SecAggError::Params(format!(
                    "{k} neighbours: SecAgg+ needs an even k with 2 ≤ k < {} (n − 1)",
                    n.saturating_sub(1)
                )));
            }
            if self.threshold as usize > k + 1 {
                return Err(SecAggError::Params(format!(
                    "threshold t = {} exceeds a neighbourhood of {} sites",
                    self.threshold,
                    k + 1
                )));
            }
        }
        if self.num_values == 0 || self.num_values > MAX_VALUES {
            return Err(SecAggError::Params(format!(
                "{} values; one session masks 1..={MAX_VALUES}",
                self.num_values
            )));
        }
        Ok(())
    }

    /// `SHA-256(PROTOCOL ‖ canonical JSON of the parameters)`.
    pub fn session_id(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(PROTOCOL);
        ctx.update(&serde_json::to_vec(self).unwrap_or_default());
        let mut id = [0u8; 32];
        id.copy_from_slice(ctx.finish().as_ref());
        id
    }

    /// The sites `site` masks with: every other site in the full graph; under SecAgg+
    /// its k/2 predecessors and k/2 successors on a ring ordered by
    /// SHA-256(session id ‖ name), a k-regular graph (Harary) that every participant
    /// derives from the session alone ([BBG+20] Sec. 3; the ring order keeps the
    /// coordinator from choosing who neighbours whom).
    pub fn neighbours_of(&self, site: &str) -> Vec<String> {
        let n = self.roster.len();
        if self.neighbours == 0 || self.neighbours as usize >= n.saturating_sub(1) {
            return self.roster.iter().filter(|s| s.as_str() != site).cloned().collect();
        }
        let session = self.session_id();
        let mut ring: Vec<([u8; 32], &String)> = self
            .roster
            .iter()
            .map(|s| {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                ctx.update(&session);
                ctx.update(s.as_bytes());
                let mut h = [0u8; 32];
                h.copy_from_slice(ctx.finish().as_ref());
                (h, s)
            })
            .collect();
        ring.sort();
        let Some(pos) = ring.iter().position(|(_, s)| s.as_str() == site) else {
            return Vec::new();
        };
        let mut out: Vec<String> = (1..=self.neighbours as usize / 2)
            .flat_map(|d| [ring[(pos + d) % n].1.clone(), ring[(pos + n - d) % n].1.clone()])
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether `a` and `b` exchange shares (they are neighbours, or the same site).
    pub fn are_peers(&self, a: &str, b: &str) -> bool {
        a == b || self.neighbours == 0 || self.neighbours_of(a).iter().any(|s| s == b)
    }

    /// The Shamir x-coordinate of `site` (its roster position + 1).
    pub fn x_of(&self, site: &str) -> Option<u8> {
        self.roster
            .binary_search_by(|s| s.as_str().cmp(site))
            .ok()
            .map(|i| (i + 1) as u8)
    }
}

/// Length-prefixed concatenation, so that no two different field lists encode alike.
fn encode_fields(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|f| f.len() + 4).sum());
    for f in fields {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).map_err(|_| SecAggError::Random)?;
    Ok(b)
}

/// HKDF-SHA256 (RFC 5869) with the session id as salt and `info` as context.
fn derive_key(ikm: &[u8], session: &[u8; 32], info: &[u8]) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, session).extract(ikm);
    let info = [PROTOCOL, info];
    let mut out = [0u8; 32];
    // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255 · 32).
    if let Ok(okm) = prk.expand(&info, hkdf::HKDF_SHA256) {
        let _ = okm.fill(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributed_noise_is_accounted_for_its_survivors() {
        let noise = DistributedNoise {
            noise_multiplier: 1.5,
            threshold: 4,
            num_values: 10_000,
        };
        let q = Quantizer::largest_scale_with_noise(1.0, 1.0, 10, Some(&noise)).expect("scale");
        assert!(q.check_headroom(10, noise.tail(&q, 10)).is_ok());
        // At realistic scales τ vanishes: t survivors carry exactly σ, 4t carry 2σ.
        assert!(ddg_tau(noise.site_std(&q), 10) < 1e-300);
        assert!((noise.charged_multiplier(&q, 4) - 1.5).abs() < 1e-12);
        assert!((noise.charged_multiplier(&q, 16) - 3.0).abs() < 1e-12);
        // With tiny per-site noise τ is not negligible and the charge drops below σ.
        assert!(ddg_tau(0.2, 10) > 1.0);
        let mut words = vec![0u32; 50_000];
        crate::dp::add_discrete_gaussian(&mut words, 40.0).expect("noise");
        let xs: Vec<f64> = words.iter().map(|w| *w as i32 as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt();
        assert!((sd - 40.0).abs() < 1.0, "std {sd}");
        assert!(mean.abs() < 1.0, "mean {mean}");
    }

    /// Fresh secrets for every site of the roster, and their advertised keys.
    fn keyed(p: &SessionParams) -> (Vec<SiteSecrets>, Vec<(String, AdvertisedKeys)>) {
        let secrets: Vec<SiteSecrets> = p
            .roster
            .iter()
            .map(|_| SiteSecrets::generate().expect("keys"))
            .collect();
        let keys = p
            .roster
            .iter()
            .cloned()
            .zip(secrets.iter().map(|s| s.public()))
            .collect();
        (secrets, keys)
    }

    fn params(n: usize, t: u32, d: u64) -> SessionParams {
        SessionParams {
            study_id: "s-1".into(),
            round: 3,
            attempt: 1,
            roster: (0..n).map(|i| format!("site-{i:02}")).collect(),
            threshold: t,
            num_values: d,
            scale_log2: 16,
            neighbours: 0,
        }
    }

    #[test]
    fn keystream_matches_the_gcm_test_vector_and_seeks() {
        // McGrew & Viega, GCM spec, test case 2: K = 0^128, IV = 0^96, P = 0^128 gives
        // C = 0388dace60b6a392f328c2b971b2fe78, the GCTR keystream of our block 0.
        let mut words = [0u32; 4];
        add_keystream(&[0; 32], 0, &mut words, false);
        assert_eq!(words, [0xce_da_88_03, 0x92_a3_b6_60, 0xb9_c2_28_f3, 0x78_fe_b2_71]);
        // Any window of the stream equals the same words of one long expansion,
        // across PRG blocks.
        let key = [7u8; 32];
        let mut whole = vec![0u32; 3 * PRG_BLOCK_WORDS + 100];
        add_keystream(&key, 0, &mut whole, false);
        let mut part = vec![0u32; PRG_BLOCK_WORDS + 1234];
        add_keystream(&key, 1777, &mut part, false);
        assert_eq!(part, whole[1777..1777 + PRG_BLOCK_WORDS + 1234]);
        add_keystream(&key, 1777, &mut part, true);
        assert!(part.iter().all(|w| *w == 0));
    }

    /// The whole protocol in memory: returns the unmasked sum of `inputs` when the
    /// sites in `drop_after_shares` vanish between sharing keys and masked input.
    fn run(n: usize, t: u32, inputs: &[Vec<u32>], drop_after_shares: &[usize]) -> Result<Vec<u32>> {
        run_with(&params(n, t, inputs[0].len() as u64), inputs, drop_after_shares)
    }

    fn run_with(p: &SessionParams, inputs: &[Vec<u32>], drop_after_shares: &[usize]) -> Result<Vec<u32>> {
        let (n, t, d) = (p.roster.len(), p.threshold, inputs[0].len());
        let p = p.clone();
        p.validate()?;
        let (secrets, u1) = keyed(&p);
        // Round 1: everyone shares; inbox[v] = (from, sealed).
        let mut inbox: Vec<Vec<(usize, Vec<u8>)>> = vec![Vec::new(); n];
        for (u, secret) in secrets.iter().enumerate() {
            for (to, sealed) in seal_shares(&p, secret, &p.roster[u], &u1)? {
                let v = p.x_of(&to).expect("on roster") as usize - 1;
                inbox[v].push((u, sealed));
            }
        }
        let u2 = u1.clone();
        // Round 2: survivors mask; dropped sites never send.
        let survivors: Vec<usize> = (0..n).filter(|u| !drop_after_shares.contains(u)).collect();
        let mut sum = vec![0u32; d];
        for &u in &survivors {
            let mut y = inputs[u].clone();
            MaskPlan::for_site(&p, &secrets[u], &p.roster[u], &u2)?.apply(0, &mut y);
            for (s, v) in sum.iter_mut().zip(&y) {
                *s = s.wrapping_add(*v);
            }
        }
        // Round 3: survivors open their inbox and reveal one share per site.
        let names = |ix: &[usize]| ix.iter().map(|&i| p.roster[i].clone()).collect::<Vec<_>>();
        let dropped: Vec<usize> = drop_after_shares.to_vec();
        let mut seed_shares: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
        let mut key_shares: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
        for &v in &survivors {
            check_unmask_request(&p, &p.roster, &names(&survivors), &names(&dropped), &p.roster[v])?;
            for (from, sealed) in &inbox[v] {
                let pair = open_shares(&p, &secrets[v], &p.roster[v], &p.roster[*from], &u1[*from].1, sealed)?;
                if survivors.contains(from) {
                    seed_shares.entry(*from).or_default().push(pair.self_seed);
                } else {
                    key_shares.entry(*from).or_default().push(pair.mask_key);
                }
            }
        }
        let mut seeds = HashMap::new();
        for &u in &survivors {
            seeds.insert(p.roster[u].clone(), reconstruct_seed(&seed_shares[&u], t)?);
        }
        let mut keys = HashMap::new();
        for &v in &dropped {
            let shares = key_shares.get(&v).cloned().unwrap_or_default();
            keys.insert(
                p.roster[v].clone(),
                reconstruct_mask_key(&shares, t, &p.roster[v], &u1[v].1.mask)?,
            );
        }
        let surv: Vec<(String, AdvertisedKeys)> = survivors.iter().map(|&u| u1[u].clone()).collect();
        MaskPlan::for_unmasking(&p, &surv, &seeds, &keys)?.apply(0, &mut sum);
        Ok(sum)
    }

    #[test]
    fn secagg_plus_neighbourhoods_are_k_regular_and_unmask_exactly() {
        let mut p = params(12, 3, 50);
        p.neighbours = 4;
        p.validate().expect("valid");
        for site in &p.roster {
            let nb = p.neighbours_of(site);
            assert_eq!(nb.len(), 4, "{site}: {nb:?}");
            assert!(nb.iter().all(|v| p.neighbours_of(v).contains(site)), "symmetric");
        }
        let inputs: Vec<Vec<u32>> = (0..12u32)
            .map(|u| (0..50u32).map(|i| i * 31 + u * 1000).collect())
            .collect();
        assert_eq!(run_with(&p, &inputs, &[]).expect("no dropout"), plain_sum(&inputs, &[]));
        assert_eq!(
            run_with(&p, &inputs, &[3]).expect("one dropped"),
            plain_sum(&inputs, &[3])
        );
        let mut odd = p.clone();
        odd.neighbours = 3;
        assert!(odd.validate().is_err());
    }

    fn plain_sum(inputs: &[Vec<u32>], without: &[usize]) -> Vec<u32> {
        let mut sum = vec![0u32; inputs[0].len()];
        for (_, x) in inputs.iter().enumerate().filter(|(u, _)| !without.contains(u)) {
            for (s, v) in sum.iter_mut().zip(x) {
                *s = s.wrapping_add(*v);
            }
        }
        sum
    }

    #[test]
    fn unmasked_sum_is_exact_with_and_without_dropouts() {
        let inputs: Vec<Vec<u32>> = (0..5u32)
            .map(|u| {
                (0..300u32)
                    .map(|i| (i * 7919 + u * 104_729).wrapping_mul(2_654_435_761))
                    .collect()
            })
            .collect();
        assert_eq!(run(5, 3, &inputs, &[]).expect("no dropout"), plain_sum(&inputs, &[]));
        assert_eq!(run(5, 3, &inputs, &[2]).expect("one dropped"), plain_sum(&inputs, &[2]));
        assert_eq!(
            run(5, 3, &inputs, &[0, 4]).expect("two dropped"),
            plain_sum(&inputs, &[0, 4])
        );
        // Fewer than t survivors: the unmask request is refused, nothing is revealed.
        let err = run(5, 3, &inputs, &[1, 2, 3]).expect_err("two survivors");
        assert!(matches!(err, SecAggError::Roster(_)), "{err}");
    }

    #[test]
    fn a_masked_input_alone_looks_uniform() {
        // Chi-square over byte values of one site's masked zeros (255 dof: the 1 − 10⁻⁶
        // quantile is about 377 by Wilson–Hilferty, so a false alarm is one in a million).
        let p = params(3, 2, 64 * 1024);
        let (secrets, u2) = keyed(&p);
        let mut y = vec![0u32; 64 * 1024];
        MaskPlan::for_site(&p, &secrets[0], &p.roster[0], &u2)
            .expect("plan")
            .apply(0, &mut y);
        let mut counts = [0f64; 256];
        for w in &y {
            for b in w.to_le_bytes() {
                counts[b as usize] += 1.0;
            }
        }
        let expected = (y.len() * 4) as f64 / 256.0;
        let chi2: f64 = counts.iter().map(|c| (c - expected).powi(2) / expected).sum();
        assert!(chi2 < 380.0, "chi-square {chi2}");
    }

    #[test]
    fn sealed_shares_bind_session_sender_and_recipient() {
        let p = params(3, 2, 10);
        let (s, u1) = keyed(&p);
        let sealed = seal_shares(&p, &s[0], &p.roster[0], &u1).expect("seal");
        let to1 = &sealed[1].1;
        assert!(open_shares(&p, &s[1], &p.roster[1], &p.roster[0], &u1[0].1, to1).is_ok());
        // Another recipient, a claimed other sender, another session, a flipped bit.
        assert!(open_shares(&p, &s[2], &p.roster[2], &p.roster[0], &u1[0].1, to1).is_err());
        assert!(open_shares(&p, &s[1], &p.roster[1], &p.roster[2], &u1[2].1, to1).is_err());
        let mut other = p.clone();
        other.round += 1;
        assert!(open_shares(&other, &s[1], &p.roster[1], &p.roster[0], &u1[0].1, to1).is_err());
        let mut flipped = to1.clone();
        flipped[5] ^= 1;
        assert!(open_shares(&p, &s[1], &p.roster[1], &p.roster[0], &u1[0].1, &flipped).is_err());
        assert_ne!(p.session_id(), other.session_id());
    }

    #[test]
    fn reconstruction_dedupes_refuses_conflicts_and_checks_the_public_key() {
        let secret = SiteSecrets::generate().expect("keys");
        let key = secret.mask.to_bytes();
        let public = secret.public().mask;
        let shares = split_secret(&key, 3, 5).expect("split");
        // Duplicates do not count twice.
        let dup = vec![shares[0].clone(), shares[0].clone(), shares[1].clone()];
        assert_eq!(
            reconstruct_seed(&dup, 3),
            Err(SecAggError::TooFewShares { got: 2, need: 3 })
        );
        let mut ok = dup.clone();
        ok.push(shares[4].clone());
        assert_eq!(reconstruct_mask_key(&ok, 3, "a", &public).expect("3 distinct"), key);
        let mut conflict = ok.clone();
        let mut forged = shares[1].clone();
        forged[3] ^= 0x55;
        conflict.push(forged.clone());
        assert_eq!(reconstruct_seed(&conflict, 3), Err(SecAggError::ConflictingShares(2)));
        // A forged share among exactly t yields a key that fails the public-key check.
        let bad = vec![shares[0].clone(), forged, shares[2].clone()];
        assert_eq!(
            reconstruct_mask_key(&bad, 3, "a", &public),
            Err(SecAggError::WrongKey("a".into()))
        );
    }

    #[test]
    fn a_mask_applied_in_parallel_pieces_equals_the_serial_stream() {
        let p = params(3, 2, 300_000);
        let (secrets, u2) = keyed(&p);
        let plan = MaskPlan::for_site(&p, &secrets[1], &p.roster[1], &u2).expect("plan");
        let mut parallel = vec![5u32; 300_000];
        plan.apply(0, &mut parallel);
        let mut serial = vec![5u32; 300_000];
        for (key, subtract) in &plan.terms {
            add_keystream(key, 0, &mut serial, *subtract);
        }
        assert_eq!(parallel, serial);
    }

    #[test]
    fn low_order_public_keys_are_refused() {
        let s = SiteSecrets::generate().expect("keys");
        assert_eq!(
            agree(&s.mask, &[0u8; 32], "evil"),
            Err(SecAggError::NonContributory("evil".into()))
        );
    }

    #[test]
    fn roster_checks_catch_a_misbehaving_coordinator() {
        let p = params(5, 3, 10);
        let r = |ix: &[usize]| ix.iter().map(|&i| p.roster[i].clone()).collect::<Vec<_>>();
        assert!(check_rosters(&p, &[&r(&[0, 1, 2, 3]), &r(&[0, 1, 2]), &r(&[0, 1, 2])]).is_ok());
        assert!(check_rosters(&p, &[&r(&[0, 1, 2]), &r(&[0, 1, 3])]).is_err(), "U2 ⊄ U1");
        assert!(check_rosters(&p, &[&r(&[0, 1])]).is_err(), "|U1| < t");
        assert!(check_rosters(&p, &[&r(&[0, 1, 1, 2])]).is_err(), "repeat");
        let u2 = r(&[0, 1, 2, 3]);
        assert!(check_unmask_request(&p, &u2, &r(&[0, 1, 2]), &r(&[3]), &p.roster[0]).is_ok());
        assert!(
            check_unmask_request(&p, &u2, &r(&[0, 1, 2, 3]), &r(&[3]), &p.roster[0]).is_err(),
            "both"
        );
        assert!(
            check_unmask_request(&p, &u2, &r(&[0, 1]), &r(&[2, 3]), &p.roster[0]).is_err(),
            "< t"
        );
        assert!(
            check_unmask_request(&p, &u2, &r(&[0, 1, 2]), &r(&[]), &p.roster[0]).is_err(),
            "≠ U2"
        );
        assert!(
            check_unmask_request(&p, &u2, &r(&[1, 2, 3]), &r(&[0]), &p.roster[0]).is_err(),
            "me dropped"
        );
    }

    #[test]
    fn quantized_sums_decode_within_rounding_and_headroom_is_enforced() {
        let n = 10;
        let q = Quantizer::largest_scale(1.0, 0.25, n, 0.0).expect("scale");
        assert!(q.check_headroom(n, 0.0).is_ok());
        assert!(q.check_headroom(n + 1, 0.0).is_err() || q.check_headroom(2 * n, 0.0).is_err());
        let d = 1000;
        let inputs: Vec<Vec<f32>> = (0..n)
            .map(|u| {
                (0..d)
                    .map(|i| (((i * 31 + u * 17) % 200) as f32 - 100.0) * 1e-4)
                    .collect()
            })
            .collect();
        let mut sum = vec![0u32; d];
        let mut qv = Vec::new();
        for x in &inputs {
            q.quantize(x, &mut qv).expect("quantize");
            for (s, v) in sum.iter_mut().zip(&qv) {
                *s = s.wrapping_add(*v);
            }
        }
        let mut decoded = vec![0f32; d];
        q.dequantize(&sum, &mut decoded);
        for i in 0..d {
            let want: f64 = inputs.iter().map(|x| x[i] as f64).sum();
            // Each input rounds by less than one step 1/γ.
            assert!(
                (decoded[i] as f64 - want).abs() <= n as f64 / q.scale(),
                "{i}: {} vs {want}",
                decoded[i]
            );
        }
    }
}
