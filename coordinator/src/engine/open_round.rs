//! The open round: admission of uploads, the running weighted sum, and folding
//! updates into it (a batch that completes together folds in one pass, group commit).

use super::*;

/// What an upload says besides its values.
#[derive(Debug, Clone)]
pub struct UpdateMeta {
    pub update_id: String,
    /// FedAvg weight: the site's number of training examples.
    pub examples: u64,
    pub train_loss: Option<f64>,
    /// `[evaluation]`: the round's starting model on the site's held-out rows.
    pub evaluation: Option<EvalCounts>,
}

/// One site's held-out totals: rows, rows classified right, summed cross-entropy, and
/// its rows counted by score bins (`medfl_shared::metrics::score_bins`).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalCounts {
    pub examples: u64,
    pub correct: u64,
    pub loss_sum: f64,
    pub score_bins: Vec<u64>,
    /// Under DP instead of the counts: the site's noised (persons, Σ accuracy, Σ loss).
    pub noised: Option<[f64; 3]>,
}

pub(super) type Received = UpdateMeta;

#[derive(Debug)]
pub(super) struct RoundAcc {
    pub(super) sum: WeightedSum,
    /// A robust strategy's round keeps every update, by site (`sum` stays empty).
    pub(super) kept: BTreeMap<String, Vec<f32>>,
    pub(super) received: BTreeMap<String, Received>,
    pub(super) refused: HashSet<String>,
    /// Adaptive clipping: how many folded updates needed no clipping at C_t (released
    /// only noised, at commit).
    pub(super) unclipped: u32,
    pub(super) closed: bool,
}

impl RoundAcc {
    /// An empty round over a sum of `len` values (0 for a robust round, which keeps
    /// its updates instead).
    pub(super) fn new(len: usize) -> Self {
        RoundAcc {
            sum: WeightedSum::new(len),
            kept: BTreeMap::new(),
            received: BTreeMap::new(),
            refused: HashSet::new(),
            unclipped: 0,
            closed: false,
        }
    }
}

/// A whole, checked update queued for the round's batched fold, and where its outcome
/// goes.
#[derive(Debug)]
pub(super) struct PendingFold {
    pub(super) site: String,
    pub(super) meta: UpdateMeta,
    pub(super) chunks: Vec<bytes::Bytes>,
    pub(super) outcome: std::sync::mpsc::SyncSender<Result<(), ServiceError>>,
}

/// One open round of one study.
#[derive(Debug)]
pub struct OpenRound {
    pub study_id: String,
    pub round: u32,
    pub attempt: u32,
    pub manifest: Arc<StudyManifest>,
    pub(super) manifest_toml: String,
    pub manifest_hash: String,
    pub(super) manifest_signature: Vec<u8>,
    pub(super) manifest_signature_algorithm: String,
    pub(super) creator_cert: Vec<u8>,
    pub selected: Vec<String>,
    pub(super) deadline: Instant,
    pub(super) deadline_ms: u64,
    pub(super) acc: Mutex<RoundAcc>,
    /// Whole updates waiting for the sum's lock: whoever takes it folds them all in one
    /// batched pass (group commit), so updates that complete together cost one walk
    /// over the sum.
    pub(super) pending: Mutex<Vec<PendingFold>>,
    pub(super) progress: Notify,
    /// Secure aggregation's session for this attempt, if the study uses it.
    pub secure: Option<Arc<SecureRound>>,
    /// Adaptive clipping: the clip norm C_t of this round.
    pub adaptive_clip: Option<f64>,
    /// A federated-analytics query's one round (its id is the query's).
    pub query: bool,
}

impl OpenRound {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, RoundAcc> {
        self.acc.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_selected(&self, site: &str) -> bool {
        self.selected.iter().any(|s| s == site)
    }

    /// Returns the receipt id if this site's update is already folded.
    pub fn received_update(&self, site: &str) -> Option<String> {
        self.lock().received.get(site).map(|r| r.update_id.clone())
    }

    /// Wakes the round's driver: a site's message arrived.
    pub fn notify_progress(&self) {
        self.progress.notify_one();
    }

    /// When the round stops taking updates.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn is_open(&self) -> bool {
        !self.lock().closed && Instant::now() < self.deadline
    }

    /// The clip bound S of a site-level DP study.
    pub fn site_clip_norm(&self) -> Option<f64> {
        site_level(&self.manifest).map(|p| p.clip_norm)
    }

    /// Whether uploads must be decoded before they are folded: to be clipped or bounded,
    /// or kept whole for a robust strategy.
    pub fn needs_decoded(&self) -> bool {
        let strategy = &self.manifest.strategy;
        self.site_clip_norm().is_some() || strategy.norm_bound.is_some() || strategy.kind.is_robust()
    }

    pub(super) fn weight(&self, examples: u64) -> f64 {
        match self.manifest.strategy.weighting {
            Weighting::Examples => examples as f64,
            Weighting::Uniform => 1.0,
        }
    }
}

/// Folds the queued updates `batch` that may still join the round in one pass, and
/// sends each its outcome; returns the folded sites with their count of updates.
pub(super) fn fold_pending(round: &OpenRound, acc: &mut RoundAcc, batch: Vec<PendingFold>) -> Vec<(String, usize)> {
    let mut admitted = Vec::new();
    for item in batch {
        match admit(round, acc, &item.site) {
            Ok(()) if !admitted.iter().any(|a: &PendingFold| a.site == item.site) => admitted.push(item),
            Ok(()) => {
                let _ = item.outcome.send(Err(ServiceError::AlreadyExists(format!(
                    "site {} delivered two updates for round {} at once; one was folded",
                    item.site, round.round
                ))));
            }
            Err(e) => {
                let _ = item.outcome.send(Err(e));
            }
        }
    }
    let threads = medfl_shared::cores();
    let refs: Vec<Vec<&[u8]>> = admitted
        .iter()
        .map(|p| p.chunks.iter().map(|c| c.as_ref()).collect())
        .collect();
    let updates: Vec<(&[&[u8]], f64)> = refs
        .iter()
        .zip(&admitted)
        .map(|(r, p)| (r.as_slice(), round.weight(p.meta.examples)))
        .collect();
    // Every update here passed its `ChunkCursor` (the model's length) and has a
    // positive finite weight, so the batch is not refused; were it, it folds nothing
    // and each upload says so.
    let batch_outcome = acc.sum.fold_batch(&updates, threads);
    drop(updates);
    drop(refs);
    let mut folded = Vec::new();
    for item in admitted {
        let outcome = match &batch_outcome {
            Ok(()) => {
                acc.received.insert(item.site.clone(), item.meta);
                folded.push((item.site, acc.received.len()));
                Ok(())
            }
            Err(e) => Err(ServiceError::Internal(format!(
                "the batched fold refused the update: {e}"
            ))),
        };
        let _ = item.outcome.send(outcome);
    }
    folded
}

/// Whether `site`'s update may still join `round`: the round is open and has none
/// from it yet.
pub(super) fn admit(round: &OpenRound, acc: &RoundAcc, site: &str) -> Result<(), ServiceError> {
    if acc.closed {
        return Err(ServiceError::FailedPrecondition(format!(
            "round {} of study {} closed before the update from {site} completed",
            round.round, round.study_id
        )));
    }
    if let Some(prev) = acc.received.get(site) {
        return Err(ServiceError::AlreadyExists(format!(
            "site {site} already delivered update {} for round {}",
            prev.update_id, round.round
        )));
    }
    Ok(())
}

impl Engine {
    /// Returns the open round of a study if it is `round`, with an error a site can act
    /// on otherwise.
    pub fn open_round(&self, study_id: &str, round: u32) -> Result<Arc<OpenRound>, ServiceError> {
        if let Some(r) = lock(&self.open).get(study_id).filter(|r| r.query).cloned() {
            return match r.round == round {
                true => Ok(r),
                false => Err(ServiceError::FailedPrecondition(format!(
                    "query {study_id} has one round, round 1"
                ))),
            };
        }
        if self.store.query(study_id)?.is_some() {
            return Err(ServiceError::FailedPrecondition(format!(
                "query {study_id} is no longer taking answers"
            )));
        }
        let study = self.study(study_id)?;
        let open = lock(&self.open).get(study_id).cloned();
        match open {
            Some(r) if r.round == round => Ok(r),
            Some(r) if round < r.round => Err(ServiceError::FailedPrecondition(format!(
                "round {round} of study {study_id} is closed; round {} is open",
                r.round
            ))),
            Some(r) => Err(ServiceError::FailedPrecondition(format!(
                "round {round} of study {study_id} has not started; round {} is open",
                r.round
            ))),
            None if round <= study.rounds_completed => Err(ServiceError::FailedPrecondition(format!(
                "round {round} of study {study_id} is closed (committed)"
            ))),
            None => Err(ServiceError::FailedPrecondition(format!(
                "study {study_id} has no open round (state {:?}, {} rounds committed)",
                study.state, study.rounds_completed
            ))),
        }
    }

    /// Returns the open round running the secure-aggregation session `session_id`.
    pub fn secure_round(&self, session_id: &[u8]) -> Option<(Arc<OpenRound>, Arc<SecureRound>)> {
        lock(&self.open).values().find_map(|r| {
            let sec = r.secure.as_ref()?;
            (sec.session_id.as_slice() == session_id).then(|| (r.clone(), sec.clone()))
        })
    }

    /// Folds a complete, validated update into its round.
    pub fn fold(
        &self,
        round: &OpenRound,
        site: &str,
        meta: UpdateMeta,
        update: &mut [f32],
    ) -> Result<(), ServiceError> {
        use medfl_shared::dp::{l2_norm, scale_to_norm};
        let norm = l2_norm(update);
        let mut unclipped = 0;
        if let Some(bound) = round.site_clip_norm() {
            check_site_clip(norm, bound, site)?;
            // Clip to a hair under the bound, so that the sensitivity the noise is
            // calibrated to holds exactly whatever the site's rounding; with adaptive
            // clipping the bound is C_t ≤ S, and the updates within it are counted.
            let clip = match round.adaptive_clip {
                Some(c) => {
                    unclipped = u32::from(norm <= c);
                    c
                }
                None => bound,
            };
            scale_to_norm(update, norm, clip * (1.0 - 1e-6));
        } else if let Some(bound) = round.manifest.strategy.norm_bound {
            // Norm bounding (Sun et al. 2019): scale down, never refuse.
            scale_to_norm(update, norm, bound);
        }
        if round.manifest.strategy.kind.is_robust() {
            let whole = update.to_vec();
            return self.fold_with(round, site, meta, |acc, _| {
                acc.kept.insert(site.to_string(), whole);
                Ok(())
            });
        }
        self.fold_with(round, site, meta, |acc, w| {
            acc.sum.fold(update, w)?;
            acc.unclipped += unclipped;
            Ok(())
        })
    }

    /// Folds a complete update straight from the chunks it arrived in (accepted by a
    /// `ChunkCursor`: whole, ordered, finite), without a decoded copy. Blocks; run it
    /// off the async workers.
    ///
    /// Group commit: the update joins the round's queue, then the caller takes the
    /// sum's lock and folds whatever is queued, its own update and any that completed
    /// meanwhile, in one [`WeightedSum::fold_batch`]. An update another caller folded
    /// first has its outcome waiting.
    pub fn fold_bytes(
        &self,
        round: &OpenRound,
        site: &str,
        meta: UpdateMeta,
        chunks: Vec<bytes::Bytes>,
    ) -> Result<(), ServiceError> {
        if round.needs_decoded() {
            return Err(ServiceError::Internal(
                "this study clips, bounds or keeps each update: fold it decoded".into(),
            ));
        }
        let (outcome, result) = std::sync::mpsc::sync_channel(1);
        lock(&round.pending).push(PendingFold {
            site: site.to_string(),
            meta,
            chunks,
            outcome,
        });
        let mut acc = round.lock();
        let batch = std::mem::take(&mut *lock(&round.pending));
        let folded = fold_pending(round, &mut acc, batch);
        drop(acc);
        if !folded.is_empty() {
            crate::counters::Counters::add(&self.counters.fold_passes, 1);
            crate::counters::Counters::add(&self.counters.updates_folded, folded.len() as u64);
        }
        for (site, n) in folded {
            self.announce(round, &site, n);
        }
        result
            .recv()
            .map_err(|_| ServiceError::Internal("the batched fold dropped this update".into()))?
    }

    pub(super) fn fold_with(
        &self,
        round: &OpenRound,
        site: &str,
        meta: UpdateMeta,
        fold: impl FnOnce(&mut RoundAcc, f64) -> Result<(), medfl_shared::aggregate::AggregateError>,
    ) -> Result<(), ServiceError> {
        let mut acc = round.lock();
        admit(round, &acc, site)?;
        fold(&mut acc, round.weight(meta.examples)).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        acc.received.insert(site.to_string(), meta);
        let n = acc.received.len();
        drop(acc);
        self.announce(round, site, n);
        Ok(())
    }

    /// Logs and announces that `site`'s update is the round's `n`-th.
    pub(super) fn announce(&self, round: &OpenRound, site: &str, n: usize) {
        info!(study = %round.study_id, round = round.round, site, n_updates = n, "update folded");
        self.emit(
            &round.study_id,
            EventKind::UpdateReceived,
            round.round,
            site,
            format!("{n} of {} updates", round.selected.len()),
        );
        round.progress.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FedAvg round of an MLP with 288,001 values (two chunks), weighted by examples.
    fn open_round() -> OpenRound {
        let features: Vec<String> = (0..30).map(|i| format!("\"f{i}\"")).collect();
        let toml = format!(
            "name = \"batch\"\nrounds = 1\n\n[model]\nkind = \"mlp\"\nhidden = [9000]\n\n[data]\n\
             dataset = \"d\"\nlabel = \"y\"\nfeatures = [{}]\n\n[selection]\nmin_sites = 1\n",
            features.join(", ")
        );
        let manifest = Arc::new(StudyManifest::from_toml(&toml).expect("manifest"));
        OpenRound {
            study_id: "s-batch".into(),
            round: 1,
            attempt: 1,
            manifest_toml: toml,
            manifest_hash: String::new(),
            manifest_signature: Vec::new(),
            manifest_signature_algorithm: String::new(),
            creator_cert: Vec::new(),
            selected: Vec::new(),
            deadline: Instant::now() + Duration::from_secs(60),
            deadline_ms: 0,
            acc: Mutex::new(RoundAcc::new(manifest.wire_params() as usize)),
            pending: Mutex::new(Vec::new()),
            progress: Notify::new(),
            manifest,
            secure: None,
            adaptive_clip: None,
            query: false,
        }
    }

    fn meta(id: &str, examples: u64) -> UpdateMeta {
        UpdateMeta {
            update_id: id.into(),
            examples,
            train_loss: None,
            evaluation: None,
        }
    }

    #[test]
    fn a_batch_of_queued_updates_folds_to_the_weighted_sum_and_each_gets_its_outcome() {
        let round = open_round();
        let n = round.manifest.wire_params() as usize;
        assert!(n > CHUNK_VALUES, "the model spans two chunks");
        let updates: Vec<Vec<f32>> = (0..6)
            .map(|k| medfl_shared::aggregate::synthetic_update(n, k + 1))
            .collect();
        let wire = |u: &[f32]| -> Vec<bytes::Bytes> {
            medfl_shared::chunk::chunks(u)
                .map(|c| bytes::Bytes::from(c.2))
                .collect()
        };
        round.lock().received.insert("hospital-0".into(), meta("earlier", 1));
        let mut batch = Vec::new();
        let mut outcomes = Vec::new();
        // hospital-0 already delivered; hospital-3 sends twice at once; the rest are new.
        for (k, site) in [
            (0, "hospital-0"),
            (1, "hospital-1"),
            (2, "hospital-2"),
            (3, "hospital-3"),
            (4, "hospital-3"),
            (5, "hospital-5"),
        ] {
            let (outcome, result) = std::sync::mpsc::sync_channel(1);
            batch.push(PendingFold {
                site: site.into(),
                meta: meta(&format!("u{k}"), 10 * (k as u64 + 1)),
                chunks: wire(&updates[k]),
                outcome,
            });
            outcomes.push(result);
        }
        let folded = fold_pending(&round, &mut round.lock(), batch);
        let results: Vec<Result<(), ServiceError>> = outcomes.iter().map(|r| r.recv().expect("an outcome")).collect();
        assert!(
            matches!(results[0], Err(ServiceError::AlreadyExists(_))),
            "{:?}",
            results[0]
        );
        assert!(
            matches!(results[4], Err(ServiceError::AlreadyExists(_))),
            "{:?}",
            results[4]
        );
        for k in [1, 2, 3, 5] {
            assert!(results[k].is_ok(), "update {k}: {:?}", results[k]);
        }
        let sites: Vec<&str> = folded.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(sites, ["hospital-1", "hospital-2", "hospital-3", "hospital-5"]);
        assert_eq!(folded.last().map(|(_, n)| *n), Some(5), "the fifth update of the round");

        let mut want = WeightedSum::new(n);
        for k in [1usize, 2, 3, 5] {
            want.fold(&updates[k], 10.0 * (k as f64 + 1.0)).expect("fold");
        }
        let acc = round.lock();
        assert_eq!(acc.sum.count(), 4);
        assert_eq!(acc.sum.total_weight(), want.total_weight());
        for (i, (a, b)) in acc.sum.sum_slice(0..n).iter().zip(want.sum_slice(0..n)).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "[{i}]: {a} vs {b}");
        }
        assert_eq!(acc.received["hospital-3"].update_id, "u3");
    }

    #[test]
    fn a_closed_round_refuses_queued_updates_and_folds_none() {
        let round = open_round();
        let n = round.manifest.wire_params() as usize;
        round.lock().closed = true;
        let (outcome, result) = std::sync::mpsc::sync_channel(1);
        let chunks = medfl_shared::chunk::chunks(&vec![0.5f32; n])
            .map(|c| bytes::Bytes::from(c.2))
            .collect();
        let batch = vec![PendingFold {
            site: "hospital-a".into(),
            meta: meta("late", 5),
            chunks,
            outcome,
        }];
        assert!(fold_pending(&round, &mut round.lock(), batch).is_empty());
        let refused = result.recv().expect("an outcome");
        assert!(
            matches!(refused, Err(ServiceError::FailedPrecondition(ref m)) if m.contains("closed")),
            "{refused:?}"
        );
        assert_eq!(round.lock().sum.count(), 0);
    }
}
