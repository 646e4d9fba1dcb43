//! Tamper-evident logs: the one hash-chain and signature scheme behind the
//! coordinator's audit log and each site's egress log.
//!
//! Every entry carries its sequence number, the SHA-256 of the entry before it and a
//! signature by the log's key over its own hash (ECDSA P-256 or Ed25519, named beside
//! each signature; see [`crate::sign`]), so a changed byte,
//! a removed or reordered entry, or a forged signature is found by anyone holding the
//! public key, offline. A checkpoint signs the number of entries and the head hash:
//! an export ends with one, so cutting off its tail is found too (the scheme of
//! Crosby & Wallach, "Efficient Data Structures for Tamper-Evident Logging", USENIX
//! Security 2009, §3, without their Merkle tree: auditors read logs whole).
//!
//! The exported form is JSON lines: a [`Header`], the [`Entry`]s in order, then a
//! [`Checkpoint`]. What is hashed is not the JSON but [`Entry::hash_input`], a
//! length-prefixed byte string, so reformatting the JSON cannot change a verdict.
//!
//! Keys are [`crate::sign::Signer`]s.

pub use crate::hex::{from_hex, to_hex};
use crate::sign::verify;
pub use crate::sign::{Algorithm, Signer};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The `format` field of an export's header.
pub const FORMAT: &str = "medfl-chainlog-v1";
const ENTRY_TAG: &[u8] = b"medfl-chainlog-v1/entry\0";
const CHECKPOINT_TAG: &[u8] = b"medfl-chainlog-v1/checkpoint\0";
/// The `prev` of the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

fn hash32(text: &str) -> Option<[u8; 32]> {
    from_hex(text)?.try_into().ok()
}

/// One entry of a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub at_ms: u64,
    /// Who caused it: an identity (`admin/alice`, `site/hospital-a`) or `coordinator`.
    pub actor: String,
    /// What happened, dotted: `study.create`, `round.commit`, `budget.charge`, ...
    pub action: String,
    /// The study it concerns, or empty.
    pub study: String,
    /// A JSON object with the particulars, kept as text so it is hashed byte for byte.
    pub details: String,
    /// Hex SHA-256 of the previous entry ([`GENESIS`] for the first).
    pub prev: String,
    /// Hex SHA-256 of [`Entry::hash_input`].
    pub hash: String,
    /// Hex signature over the 32 bytes of `hash`, by the log's key.
    pub signature: String,
    /// The signature's algorithm; absent (Ed25519) in logs written before P-256.
    #[serde(default)]
    pub algorithm: Algorithm,
}

impl Entry {
    /// The bytes whose SHA-256 is the entry's hash: a domain tag, then every field
    /// but `hash` and `signature`, integers big-endian, strings length-prefixed.
    pub fn hash_input(&self, prev: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.details.len());
        out.extend_from_slice(ENTRY_TAG);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        for field in [&self.actor, &self.action, &self.study, &self.details] {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out.extend_from_slice(prev);
        out
    }
}

/// A signed statement that a log held `count` entries ending in `head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub count: u64,
    pub head: String,
    pub at_ms: u64,
    pub signature: String,
    #[serde(default)]
    pub algorithm: Algorithm,
}

fn checkpoint_input(count: u64, head: &[u8; 32], at_ms: u64) -> Vec<u8> {
    let mut out = CHECKPOINT_TAG.to_vec();
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(&at_ms.to_be_bytes());
    out
}

/// The first line of an export: which log, and the key that signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    /// `audit` (coordinator) or `egress` (a site).
    pub log: String,
    /// Who keeps the log: the coordinator's or the site's identity.
    pub keeper: String,
    /// Hex public key: 32 bytes (Ed25519) or a 65-byte uncompressed point (P-256).
    pub public_key: String,
    /// The key's algorithm; absent (Ed25519) in logs written before P-256.
    #[serde(default)]
    pub algorithm: Algorithm,
}

/// One line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    Header(Header),
    Entry(Entry),
    Checkpoint(Checkpoint),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("the log's last entry is damaged: {0}")]
    Tail(String),
}

/// The state an appender keeps: the next sequence number and the head hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    next_seq: u64,
    head: [u8; 32],
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            next_seq: 0,
            head: GENESIS,
        }
    }
}

impl Chain {
    /// Continues after `last`, the last entry of a log read back from storage.
    pub fn after(last: &Entry) -> Result<Self, ChainError> {
        let head = hash32(&last.hash).ok_or_else(|| ChainError::Tail(format!("entry {} has no hash", last.seq)))?;
        Ok(Chain {
            next_seq: last.seq + 1,
            head,
        })
    }

    /// Entries so far.
    pub fn len(&self) -> u64 {
        self.next_seq
    }

    pub fn is_empty(&self) -> bool {
        self.next_seq == 0
    }

    /// Builds and signs the next entry, and advances.
    pub fn append(
        &mut self,
        signer: &Signer,
        at_ms: u64,
        actor: &str,
        action: &str,
        study: &str,
        details: &serde_json::Value,
    ) -> Entry {
        let mut entry = Entry {
            seq: self.next_seq,
            at_ms,
            actor: actor.to_string(),
            action: action.to_string(),
            study: study.to_string(),
            details: details.to_string(),
            prev: to_hex(&self.head),
            hash: String::new(),
            signature: String::new(),
            algorithm: signer.algorithm(),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, &entry.hash_input(&self.head));
        entry.hash = to_hex(digest.as_ref());
        entry.signature = to_hex(&signer.sign(digest.as_ref()));
        self.next_seq += 1;
        self.head.copy_from_slice(digest.as_ref());
        entry
    }

    /// Signs the log's current length and head.
    pub fn checkpoint(&self, signer: &Signer, at_ms: u64) -> Checkpoint {
        Checkpoint {
            count: self.next_seq,
            head: to_hex(&self.head),
            at_ms,
            signature: to_hex(&signer.sign(&checkpoint_input(self.next_seq, &self.head, at_ms))),
            algorithm: signer.algorithm(),
        }
    }
}

/// The first thing wrong with a log, by line of its export (1-based) and entry.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {what}")]
pub struct VerifyError {
    pub line: usize,
    /// The sequence number of the first bad entry, where there is one.
    pub seq: Option<u64>,
    pub what: String,
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub header: Header,
    pub entries: u64,
    pub head: String,
    /// Whether the export ended with a checkpoint covering every entry.
    pub checkpointed: bool,
}

/// Verifies an export line by line: the header's format (and key, when `pinned_key`
/// is given), then each entry's sequence number, link, hash and signature, then the
/// closing checkpoint (required when `require_checkpoint`; a live log being written
/// has none). Stops at the first bad line and names it.
pub fn verify_export(text: &str, pinned_key: Option<&str>, require_checkpoint: bool) -> Result<Verified, VerifyError> {
    let fail = |line: usize, seq: Option<u64>, what: String| VerifyError { line, seq, what };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    let header = match lines.next().map(|(n, l)| (n, serde_json::from_str::<Line>(l))) {
        Some((_, Ok(Line::Header(h)))) => h,
        Some((n, _)) => return Err(fail(n, None, "the first line is not a medfl log header".into())),
        None => return Err(fail(1, None, "the file is empty".into())),
    };
    if header.format != FORMAT {
        return Err(fail(
            1,
            None,
            format!("format {:?}, expected {FORMAT:?}", header.format),
        ));
    }
    if let Some(pinned) = pinned_key
        && !pinned.eq_ignore_ascii_case(&header.public_key)
    {
        return Err(fail(
            1,
            None,
            format!(
                "the log is signed by key {}, not by the pinned key {pinned}",
                header.public_key
            ),
        ));
    }
    let algorithm = header.algorithm;
    let key_bytes = from_hex(&header.public_key)
        .filter(|k| k.len() == algorithm.public_key_len())
        .ok_or_else(|| {
            fail(
                1,
                None,
                format!(
                    "the header's public key is not {} bytes of hex, as a {algorithm} key is",
                    algorithm.public_key_len()
                ),
            )
        })?;
    let mut chain = Chain::default();
    let mut checkpoint = None;
    for (n, text) in lines {
        if checkpoint.is_some() {
            return Err(fail(n, None, "a line follows the closing checkpoint".into()));
        }
        let line: Line = serde_json::from_str(text).map_err(|e| {
            fail(
                n,
                Some(chain.next_seq),
                format!(
                    "entry {} (or what stands in its place) does not parse: {e}",
                    chain.next_seq
                ),
            )
        })?;
        match line {
            Line::Header(_) => return Err(fail(n, None, "a second header".into())),
            Line::Checkpoint(c) => checkpoint = Some((n, c)),
            Line::Entry(entry) => {
                let seq = chain.next_seq;
                if entry.seq != seq {
                    let why = if entry.seq > seq {
                        "deleted or moved"
                    } else {
                        "reordered or repeated"
                    };
                    return Err(fail(
                        n,
                        Some(seq),
                        format!("entry {seq} expected, found entry {} ({why})", entry.seq),
                    ));
                }
                if hash32(&entry.prev) != Some(chain.head) {
                    return Err(fail(
                        n,
                        Some(seq),
                        format!(
                            "entry {seq} does not link to the entry before it (an entry was removed, reordered or altered)"
                        ),
                    ));
                }
                let digest = ring::digest::digest(&ring::digest::SHA256, &entry.hash_input(&chain.head));
                if hash32(&entry.hash).as_ref().map(|h| &h[..]) != Some(digest.as_ref()) {
                    return Err(fail(
                        n,
                        Some(seq),
                        format!("entry {seq} was altered: its content does not match its hash"),
                    ));
                }
                if entry.algorithm != algorithm {
                    return Err(fail(
                        n,
                        Some(seq),
                        format!(
                            "entry {seq} is signed with {}, but the log's key is {algorithm} (forged)",
                            entry.algorithm
                        ),
                    ));
                }
                let signature = from_hex(&entry.signature).unwrap_or_default();
                if !verify(algorithm, &key_bytes, digest.as_ref(), &signature) {
                    return Err(fail(
                        n,
                        Some(seq),
                        format!("entry {seq} carries a signature the log's key did not make (forged)"),
                    ));
                }
                chain.next_seq += 1;
                chain.head.copy_from_slice(digest.as_ref());
            }
        }
    }
    let checkpointed = match checkpoint {
        Some((n, c)) => {
            let signature = from_hex(&c.signature).unwrap_or_default();
            let head = hash32(&c.head).unwrap_or_default();
            if c.algorithm != algorithm
                || !verify(
                    algorithm,
                    &key_bytes,
                    &checkpoint_input(c.count, &head, c.at_ms),
                    &signature,
                )
            {
                return Err(fail(
                    n,
                    None,
                    "the checkpoint's signature does not verify (forged)".into(),
                ));
            }
            if c.count != chain.next_seq || head != chain.head {
                let seq = chain.next_seq.min(c.count);
                return Err(fail(
                    n,
                    Some(seq),
                    format!(
                        "the checkpoint covers {} entries but the file holds {}: entries from {seq} on were cut off",
                        c.count, chain.next_seq
                    ),
                ));
            }
            true
        }
        None if require_checkpoint => {
            return Err(fail(
                text.lines().count() + 1,
                Some(chain.next_seq),
                format!(
                    "no signed checkpoint after entry {}: the export was truncated",
                    chain.next_seq.saturating_sub(1)
                ),
            ));
        }
        None => false,
    };
    Ok(Verified {
        header,
        entries: chain.next_seq,
        head: to_hex(&chain.head),
        checkpointed,
    })
}

/// Writes an export: the header, the entries, then `checkpoint` if given.
pub fn export_lines(header: &Header, entries: &[Entry], checkpoint: Option<&Checkpoint>) -> String {
    let mut out = String::new();
    let mut push = |line: Line| {
        out.push_str(&serde_json::to_string(&line).unwrap_or_default());
        out.push('\n');
    };
    push(Line::Header(header.clone()));
    for e in entries {
        push(Line::Entry(e.clone()));
    }
    if let Some(c) = checkpoint {
        push(Line::Checkpoint(c.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signer() -> Signer {
        signer_of(Algorithm::P256)
    }

    fn signer_of(algorithm: Algorithm) -> Signer {
        Signer::from_pkcs8(&Signer::generate_pkcs8(algorithm).expect("keygen")).expect("key")
    }

    fn export(signer: &Signer, n: u64) -> String {
        let mut chain = Chain::default();
        let entries: Vec<Entry> = (0..n)
            .map(|i| {
                chain.append(
                    signer,
                    1000 + i,
                    "admin/alice",
                    "study.state",
                    "s-1",
                    &json!({"state": "running", "i": i}),
                )
            })
            .collect();
        let header = Header {
            format: FORMAT.into(),
            log: "audit".into(),
            keeper: "coordinator/c".into(),
            public_key: signer.public_key_hex(),
            algorithm: signer.algorithm(),
        };
        export_lines(&header, &entries, Some(&chain.checkpoint(signer, 9999)))
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn an_untouched_export_verifies_for_both_algorithms() {
        for algorithm in [Algorithm::P256, Algorithm::Ed25519] {
            let s = signer_of(algorithm);
            let v = verify_export(&export(&s, 5), Some(&s.public_key_hex()), true).expect("verifies");
            assert_eq!(v.entries, 5);
            assert_eq!(v.header.algorithm, algorithm);
            assert!(v.checkpointed);
            let empty = verify_export(&export(&s, 0), None, true).expect("an empty log verifies");
            assert_eq!(empty.entries, 0);
        }
    }

    #[test]
    fn a_log_written_before_the_algorithm_label_reads_as_ed25519() {
        let s = signer_of(Algorithm::Ed25519);
        let old: Vec<String> = lines(&export(&s, 3))
            .into_iter()
            .map(|l| l.replace(",\"algorithm\":\"ed25519\"", ""))
            .collect();
        assert!(!old.iter().any(|l| l.contains("algorithm")));
        verify_export(&old.join("\n"), Some(&s.public_key_hex()), true).expect("old logs still verify");
        // A P-256 log relabelled as Ed25519 fails at its header, not silently.
        let p = export(&signer_of(Algorithm::P256), 1).replace("\"p256\"", "\"ed25519\"");
        assert_eq!(verify_export(&p, None, true).expect_err("relabelled").line, 1);
    }

    #[test]
    fn a_restarted_chain_continues_the_log() {
        let s = signer();
        let mut chain = Chain::default();
        let first = chain.append(&s, 1, "a", "x", "", &json!({}));
        let mut resumed = Chain::after(&first).expect("resume");
        assert_eq!(resumed, chain);
        let second = resumed.append(&s, 2, "a", "y", "", &json!({}));
        assert_eq!(second.seq, 1);
        assert_eq!(second.prev, first.hash);
    }

    #[test]
    fn each_tampering_is_named_at_its_first_bad_entry() {
        let s = signer();
        let good = lines(&export(&s, 6));
        // line 1 is the header; entry k is line k + 2.
        let check = |mutated: Vec<String>, line: usize, needle: &str| {
            let err = verify_export(&mutated.join("\n"), None, true).expect_err("tampering must be found");
            assert_eq!(err.line, line, "{err}");
            assert!(err.what.contains(needle), "{err}");
        };
        let mut flipped = good.clone();
        flipped[3] = flipped[3].replace("running", "rUnning");
        check(flipped, 4, "altered");

        let mut deleted = good.clone();
        deleted.remove(3);
        check(deleted, 4, "entry 2 expected, found entry 3");

        let mut swapped = good.clone();
        swapped.swap(3, 4);
        check(swapped, 4, "entry 2 expected, found entry 3");

        let mut truncated = good.clone();
        truncated.truncate(5); // header, entries 0..=3; tail and checkpoint gone
        check(truncated, 6, "no signed checkpoint");

        let mut cut_before_checkpoint = good.clone();
        cut_before_checkpoint.remove(6); // entry 5 gone, checkpoint kept
        check(cut_before_checkpoint, 7, "were cut off");

        let other = signer();
        let mut forged = good.clone();
        let mut entry: Entry = match serde_json::from_str(&forged[2]).expect("entry") {
            Line::Entry(e) => e,
            other => panic!("{other:?}"),
        };
        entry.signature = to_hex(&other.sign(&from_hex(&entry.hash).expect("hex")));
        forged[2] = serde_json::to_string(&Line::Entry(entry)).expect("json");
        check(forged, 3, "forged");

        // A whole log re-signed by another key passes on its own key, not on the pinned one.
        let resigned = export(&other, 6);
        assert!(verify_export(&resigned, None, true).is_ok());
        let err = verify_export(&resigned, Some(&s.public_key_hex()), true).expect_err("pinned");
        assert!(err.what.contains("pinned"), "{err}");
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex(&to_hex(&bytes)).expect("hex"), bytes);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }
}
