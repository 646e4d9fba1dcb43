//! The site's egress log: every message that carries the site's data-derived content
//! (model updates, masked inputs, refusals with their reasons, registrations) is
//! written here, durably, *before* it is sent: time, study, round, kind, byte count,
//! the SHA-256 of the payload and the ε charged with it. Entries are hash-chained and
//! signed with the site's egress key (`<store>/egress-key.pk8`, P-256 when made), the same
//! scheme as the coordinator's audit log ([`medfl_shared::chainlog`]), so hospital IT
//! can check the file with `medfl-agent egress --verify` or `medfl audit verify`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use medfl_shared::chainlog::{Chain, FORMAT, Header, Line, Signer};
use medfl_shared::{sha256_hex, unix_ms};
use serde_json::{Value, json};

#[derive(Debug)]
pub struct EgressLog {
    path: PathBuf,
    keeper: String,
    signer: Signer,
    chain: Mutex<Chain>,
    /// Since this process started: (messages, bytes) by kind, and refusals by the
    /// reason's first clause, for `/metrics`.
    totals: Mutex<BTreeMap<&'static str, (u64, u64)>>,
    refusals: Mutex<BTreeMap<String, u64>>,
}

/// The site's egress key (`<store>/egress-key.pk8`): read, or made owner-only on first use.
pub fn load_or_create_key(path: &Path) -> Result<Signer> {
    Ok(medfl_proto::transport::load_or_create_signing_key(path)?)
}

impl EgressLog {
    /// Opens the log at `path` (continuing its chain) or starts it with its header.
    pub fn open(path: &Path, signer: Signer, keeper: &str) -> Result<Self> {
        let chain = match std::fs::read_to_string(path) {
            Ok(mut text) => {
                // A crash can cut the last line short: that entry was never complete, so
                // its message was never sent (a record is written before its send).
                if !text.is_empty() && !text.ends_with('\n') {
                    let keep = text.rfind('\n').map_or(0, |i| i + 1);
                    tracing::warn!(path = %path.display(), "dropping a torn last line of the egress log");
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .and_then(|f| f.set_len(keep as u64))
                        .with_context(|| format!("truncate {}", path.display()))?;
                    text.truncate(keep);
                }
                let mut chain = Chain::default();
                let mut header = None;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match serde_json::from_str::<Line>(line) {
                        Ok(Line::Header(h)) => header = Some(h),
                        Ok(Line::Entry(e)) => chain = Chain::after(&e)?,
                        Ok(Line::Checkpoint(_)) => {}
                        Err(e) => bail!(
                            "{} is not a medfl egress log ({e}); move it aside to start a new one",
                            path.display()
                        ),
                    }
                }
                match header {
                    Some(h) if h.public_key == signer.public_key_hex() => chain,
                    Some(_) => bail!(
                        "{} was signed with another egress key; move it aside to start a new one",
                        path.display()
                    ),
                    None => bail!("{} has no header line", path.display()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let header = Line::Header(Header {
                    format: FORMAT.into(),
                    log: "egress".into(),
                    keeper: keeper.to_string(),
                    public_key: signer.public_key_hex(),
                    algorithm: signer.algorithm(),
                });
                append_line(path, &serde_json::to_string(&header)?)?;
                Chain::default()
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok(EgressLog {
            path: path.to_path_buf(),
            keeper: keeper.to_string(),
            signer,
            chain: Mutex::new(chain),
            totals: Default::default(),
            refusals: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one outgoing message durably; call it before sending. `payload` is the
    /// bytes that leave (their SHA-256 and length are logged, not the bytes).
    pub fn record(
        &self,
        kind: &'static str,
        study: &str,
        round: u32,
        payload: &[u8],
        epsilon: Option<f64>,
        extra: Value,
    ) -> Result<()> {
        let refusal = (kind == "refusal")
            .then(|| {
                extra
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(medfl_proto::ops::reason_kind)
            })
            .flatten();
        let mut details = json!({
            "round": round,
            "bytes": payload.len(),
            "sha256": sha256_hex(payload),
            "epsilon_after": epsilon,
        });
        if let (Some(d), Value::Object(extra)) = (details.as_object_mut(), extra) {
            d.extend(extra);
        }
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = *chain;
        let entry = next.append(
            &self.signer,
            unix_ms(SystemTime::now()),
            &self.keeper,
            kind,
            study,
            &details,
        );
        append_line(&self.path, &serde_json::to_string(&Line::Entry(entry))?)
            .with_context(|| format!("write the egress log {}; nothing was sent", self.path.display()))?;
        *chain = next;
        drop(chain);
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let t = totals.entry(kind).or_default();
        *t = (t.0 + 1, t.1 + payload.len() as u64);
        if let Some(reason) = refusal {
            *self
                .refusals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(reason)
                .or_default() += 1;
        }
        Ok(())
    }

    /// (messages, bytes) logged by kind since this process started.
    pub fn totals(&self) -> BTreeMap<&'static str, (u64, u64)> {
        self.totals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Refusals logged by the reason's first clause since this process started.
    pub fn refusals(&self) -> BTreeMap<String, u64> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    // One write of the whole line, so a crash leaves it whole or torn at the end,
    // never interleaved.
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    f.write_all(&buf)?;
    f.sync_data()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_continues_across_restarts_and_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("egress.jsonl");
        let key = dir.path().join("k.pk8");
        {
            let log = EgressLog::open(&path, load_or_create_key(&key).expect("key"), "site/a").expect("open");
            log.record("model_update", "s-1", 1, b"abc", Some(0.5), json!({}))
                .expect("record");
        }
        let log = EgressLog::open(&path, load_or_create_key(&key).expect("key"), "site/a").expect("reopen");
        log.record("refusal", "s-1", 2, b"why", None, json!({"reason": "why"}))
            .expect("record");
        let text = std::fs::read_to_string(&path).expect("read");
        let v = medfl_shared::chainlog::verify_export(&text, None, false).expect("verifies");
        assert_eq!(v.entries, 2);
        // A line torn by a crash is dropped on the next open, and the chain goes on.
        std::fs::write(&path, format!("{text}{{\"kind\":\"entry\",\"seq\":2,\"at_ms")).expect("tear");
        let log = EgressLog::open(&path, load_or_create_key(&key).expect("key"), "site/a").expect("reopen torn");
        log.record("refusal", "s-1", 3, b"x", None, json!({})).expect("record");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            medfl_shared::chainlog::verify_export(&text, None, false)
                .expect("verifies")
                .entries,
            3
        );
        let other = dir.path().join("other.pk8");
        assert!(EgressLog::open(&path, load_or_create_key(&other).expect("key"), "site/a").is_err());
    }
}
