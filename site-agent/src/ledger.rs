//! The site's own privacy ledger: every charge against each local dataset, across all
//! studies, in the agent's sled store. The agent charges durably *before* the update
//! it pays for leaves, and in the same batch keeps that update (a *release*): if the
//! round is retried (a crash, a lost stream, a coordinator restart) the site sends the
//! very same values again, which costs no further privacy, instead of drawing new
//! noise and paying again. Exactly one charge per released output.
//!
//! The ledger stores events (each charge's mechanism), never ε to be added. The
//! cumulative ε of a dataset is recomputed over all its charges by RDP (Mironov 2017,
//! Prop. 1, converted once at the policy's δ by Canonne, Kamath, Steinke 2020,
//! Prop. 12) and by PLD (`medfl_shared::pld`), and the smaller counts; each charge
//! records which, with the PLD grid, so that an auditor recomputes the same figure. A
//! ledger that holds a cohort query's discrete Gaussian stays on RDP
//! (`medfl_shared::pld::Events`). This module is the only one in the agent that
//! touches sled.

use std::path::Path;

use medfl_shared::accountant::{AccountantError, GaussianSteps};
use medfl_shared::pld::{Events, Method, Spent};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One privacy expenditure against one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    pub dataset: String,
    pub study_id: String,
    pub round: u32,
    pub manifest_hash: String,
    pub mechanism: GaussianSteps,
    pub clip_norm: f64,
    /// The δ at which ε_before and ε_after are computed (the policy's).
    pub delta: f64,
    pub epsilon_before: f64,
    pub epsilon_after: f64,
    /// The accountant that gave `epsilon_after` (the tighter of RDP and PLD) and its
    /// PLD grid (0 for RDP, or where PLD is exact). Charges written before PLD read
    /// as RDP, which they were.
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub pld_interval: f64,
    /// A discrete Gaussian on integer totals (a cohort query), accounted by zCDP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discrete: bool,
    pub at_unix_ms: u64,
    /// The site's own trainer that added this charge's noise (record-level DP-SGD it
    /// declares), or None when the agent added it. A declared charge is the site's word,
    /// not something medfl enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_by: Option<String>,
    /// The release of the round's held-out totals (DP evaluation), charged with the
    /// round's update in the same batch, not a training step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evaluation: bool,
}

#[derive(Debug, Error)]
pub enum LedgerError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("ledger entry {key} is corrupt: {source}")]
    Corrupt { key: String, source: serde_json::Error },
    #[error("accountant: {0}")]
    Accountant(#[from] AccountantError),
    #[error("dataset {dataset:?} would reach ε = {after:.4} at δ = {delta} (now {before:.4}), above its cap of {cap}")]
    WouldExceed {
        dataset: String,
        before: f64,
        after: f64,
        cap: f64,
        delta: f64,
    },
}

/// What one charge is for: the dataset it spends, the study round and manifest it pays
/// for, the mechanism with its clip norm, and the dataset's cap at the policy's δ.
#[derive(Debug, Clone, Copy)]
pub struct ChargeRequest<'a> {
    pub dataset: &'a str,
    pub study_id: &'a str,
    pub round: u32,
    pub manifest_hash: &'a str,
    pub mechanism: GaussianSteps,
    pub clip_norm: f64,
    pub cap: f64,
    pub delta: f64,
    pub declared_by: Option<&'a str>,
    /// The mechanism is a discrete Gaussian on integer totals (a cohort query).
    pub discrete: bool,
    /// The round's DP evaluation (its held-out totals' Gaussian), charged after the
    /// mechanism as an entry of its own, in the same batch and under the same cap.
    pub evaluation: Option<GaussianSteps>,
}

/// An update the site paid for, kept until a later round of its study is released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub study_id: String,
    pub round: u32,
    pub manifest_hash: String,
    pub update_id: String,
    pub epsilon_after: f64,
    pub values: Vec<f32>,
}

#[derive(Clone)]
pub struct Ledger {
    db: sled::Db,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

impl Ledger {
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        Ok(Ledger {
            db: sled::Config::new().path(path).cache_capacity(8 << 20).open()?,
        })
    }

    fn scan(&self, prefix: &str) -> Result<Vec<Charge>, LedgerError> {
        self.db
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|source| LedgerError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })
            })
            .collect()
    }

    /// Every charge against `dataset`, oldest first.
    pub fn charges(&self, dataset: &str) -> Result<Vec<Charge>, LedgerError> {
        self.scan(&format!("charge/{dataset}/"))
    }

    /// Every charge, all datasets.
    pub fn all(&self) -> Result<Vec<Charge>, LedgerError> {
        self.scan("charge/")
    }

    /// ε spent so far on `dataset`, at `delta`.
    pub fn spent(&self, dataset: &str, delta: f64) -> Result<f64, LedgerError> {
        Ok(self.spent_by(dataset, delta)?.epsilon)
    }

    /// ε spent so far on `dataset` at `delta`, with the accountant that gave it.
    pub fn spent_by(&self, dataset: &str, delta: f64) -> Result<Spent, LedgerError> {
        let (events, kind) = events(&self.charges(dataset)?, &[], false);
        Ok(medfl_shared::pld::spent(&events, kind, delta)?)
    }

    /// The update released for `study_id`'s `round` under `manifest_hash`, if any.
    pub fn release(&self, study_id: &str, round: u32, manifest_hash: &str) -> Result<Option<Release>, LedgerError> {
        let key = release_key(study_id, round);
        let Some(bytes) = self.db.get(key.as_bytes())? else {
            return Ok(None);
        };
        let release: Release = serde_json::from_slice(&bytes).map_err(|source| LedgerError::Corrupt { key, source })?;
        Ok((release.manifest_hash == manifest_hash).then_some(release))
    }

    /// ε of `dataset` before and after the `next` mechanisms (discrete Gaussians when
    /// `discrete`), or the overspend.
    pub fn check(
        &self,
        dataset: &str,
        next: &[GaussianSteps],
        discrete: bool,
        cap: f64,
        delta: f64,
    ) -> Result<(f64, Spent), LedgerError> {
        let charges = self.charges(dataset)?;
        let before = match charges.last() {
            // The last charge's figure is this ledger's ε so far, when at this δ.
            Some(last) if last.delta == delta => last.epsilon_after,
            _ => {
                let (events, kind) = events(&charges, &[], false);
                medfl_shared::pld::spent(&events, kind, delta)?.epsilon
            }
        };
        let (events, kind) = events(&charges, next, discrete);
        let after = medfl_shared::pld::spent(&events, kind, delta)?;
        if after.epsilon > cap {
            return Err(LedgerError::WouldExceed {
                dataset: dataset.to_string(),
                before,
                after: after.epsilon,
                cap,
                delta,
            });
        }
        Ok((before, after))
    }

    /// Records a charge durably if it keeps the dataset within its cap, and returns it;
    /// otherwise records nothing and says by how much it would overspend.
    pub fn charge(&self, request: &ChargeRequest<'_>) -> Result<Charge, LedgerError> {
        self.charge_release(request, None)
    }

    /// Like [`Ledger::charge`], and keeps `release` (update id and values) in the same
    /// durable batch, replacing any earlier release of the study.
    pub fn charge_release(
        &self,
        request: &ChargeRequest<'_>,
        release: Option<(&str, &[f32])>,
    ) -> Result<Charge, LedgerError> {
        let ChargeRequest {
            dataset,
            study_id,
            round,
            manifest_hash,
            mechanism,
            clip_norm,
            cap,
            delta,
            declared_by,
            discrete,
            evaluation,
        } = *request;
        let next: Vec<GaussianSteps> = std::iter::once(mechanism).chain(evaluation).collect();
        let (before, after) = self.check(dataset, &next, discrete, cap, delta)?;
        // With an evaluation, the training charge's own figure comes first.
        let trained = match evaluation {
            Some(_) => {
                let (events, kind) = events(&self.charges(dataset)?, &next[..1], discrete);
                medfl_shared::pld::spent(&events, kind, delta)?
            }
            None => after,
        };
        let charge = Charge {
            dataset: dataset.to_string(),
            study_id: study_id.to_string(),
            round,
            manifest_hash: manifest_hash.to_string(),
            mechanism,
            clip_norm,
            delta,
            epsilon_before: before,
            epsilon_after: trained.epsilon,
            method: trained.method,
            pld_interval: trained.interval,
            discrete,
            at_unix_ms: medfl_shared::unix_ms(std::time::SystemTime::now()),
            declared_by: declared_by.map(str::to_string),
            evaluation: false,
        };
        let evaluated = evaluation.map(|m| Charge {
            mechanism: m,
            clip_norm: medfl_shared::manifest::EVALUATION_SENSITIVITY,
            epsilon_before: trained.epsilon,
            epsilon_after: after.epsilon,
            method: after.method,
            pld_interval: after.interval,
            evaluation: true,
            ..charge.clone()
        });
        let mut batch = sled::Batch::default();
        for c in std::iter::once(&charge).chain(&evaluated) {
            let seq = self.db.generate_id()?;
            let value = serde_json::to_vec(c).map_err(|source| LedgerError::Corrupt {
                key: "new charge".into(),
                source,
            })?;
            batch.insert(format!("charge/{dataset}/{seq:016}").as_bytes(), value);
        }
        if let Some((update_id, values)) = release {
            for old in self.db.scan_prefix(format!("release/{study_id}/").as_bytes()).keys() {
                batch.remove(old?);
            }
            let release = Release {
                study_id: study_id.to_string(),
                round,
                manifest_hash: manifest_hash.to_string(),
                update_id: update_id.to_string(),
                epsilon_after: after.epsilon,
                values: values.to_vec(),
            };
            let bytes = serde_json::to_vec(&release).map_err(|source| LedgerError::Corrupt {
                key: "new release".into(),
                source,
            })?;
            batch.insert(release_key(study_id, round).as_bytes(), bytes);
        }
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(charge)
    }
}

/// A ledger's events, with `next` appended (discrete Gaussians when `discrete`), and
/// what they may be composed by.
fn events(charges: &[Charge], next: &[GaussianSteps], discrete: bool) -> (Vec<GaussianSteps>, Events) {
    let events: Vec<GaussianSteps> = charges
        .iter()
        .map(|c| c.mechanism)
        .chain(next.iter().copied())
        .collect();
    let discrete = charges.iter().any(|c| c.discrete) || (discrete && !next.is_empty());
    (events, Events::with_discrete(discrete))
}

fn release_key(study_id: &str, round: u32) -> String {
    format!("release/{study_id}/{round:08}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfl_shared::accountant::Sampling;

    fn steps(sigma: f64) -> GaussianSteps {
        GaussianSteps {
            sigma,
            q: 0.1,
            steps: 20,
            sampling: Sampling::Poisson,
        }
    }

    #[test]
    fn charges_accumulate_durably_and_the_cap_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cap = 1.0;
        let mut last = 0.0;
        let mut n = 0;
        {
            let ledger = Ledger::open(dir.path()).expect("open");
            loop {
                let request = ChargeRequest {
                    dataset: "bc",
                    study_id: "s-1",
                    round: n + 1,
                    manifest_hash: "h",
                    mechanism: steps(6.0),
                    clip_norm: 1.0,
                    cap,
                    delta: 1e-5,
                    declared_by: None,
                    discrete: false,
                    evaluation: None,
                };
                match ledger.charge(&request) {
                    Ok(c) => {
                        assert!(
                            c.epsilon_after > c.epsilon_before && c.epsilon_before >= last,
                            "charge {n}: {c:?} after {last}"
                        );
                        last = c.epsilon_after;
                        n += 1;
                    }
                    Err(LedgerError::WouldExceed { after, .. }) => {
                        assert!(after > cap);
                        break;
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            assert!(n >= 2 && last <= cap, "{n} charges, last ε {last}");
        }
        // Reopened, the ledger remembers and the refused charge left no trace.
        let ledger = Ledger::open(dir.path()).expect("reopen");
        assert_eq!(ledger.charges("bc").expect("charges").len(), n as usize);
        assert!((ledger.spent("bc", 1e-5).expect("spent") - last).abs() < 1e-12);
        assert_eq!(ledger.spent("other", 1e-5).expect("spent"), 0.0);
    }

    /// A study calibrated to exactly its budget must fit its last round: the stored σ
    /// reads back to the bit (serde_json's `float_roundtrip`), so the ledger's rounds
    /// merge into the one mechanism the plan composed. Before, a σ one unit in the last
    /// place off split them, and the PLD grid put the demo's CNN at ε = 8.000000003.
    #[test]
    fn a_stored_mechanism_reads_back_to_the_bit_and_the_last_round_fits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let sigma = 1.4152509023723743;
        let mechanism = GaussianSteps {
            sigma,
            q: 0.25,
            steps: 4,
            sampling: Sampling::Poisson,
        };
        for round in 1..=15 {
            let request = ChargeRequest {
                dataset: "digits",
                study_id: "s-1",
                round,
                manifest_hash: "h",
                mechanism,
                clip_norm: 1.0,
                cap: 8.0,
                delta: 1e-5,
                declared_by: None,
                discrete: false,
                evaluation: None,
            };
            let charge = ledger.charge(&request).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(charge.epsilon_after <= 8.0);
        }
        for c in ledger.charges("digits").expect("charges") {
            assert_eq!(c.mechanism.sigma.to_bits(), sigma.to_bits());
        }
    }
}
