//! The commit over the store: the new global model (noised, optimizer-stepped) is
//! written and fsynced, then published with its charges in one atomic batch; and the
//! committed model encoded once for every site's download.

use medfl_shared::manifest::PublicScaling;
use medfl_shared::strategy::ServerOptimizer;

use super::*;
use crate::store::ModelWriter;

/// Aggregates a robust strategy's round into a one-update sum (its total weight 1,
/// so the sum is the aggregate), with a note of what Krum kept; an error is the
/// reason the round fails (too few updates for the strategy).
///
/// With public feature scaling in the manifest the updates are compared on the
/// standardized scale (the map is linear): on raw coordinates the first layer's bias
/// absorbs `W·center` and a weight's size follows its feature's unit, so distances
/// (Krum) and per-coordinate order statistics would be dominated by a few coordinates.
pub(super) fn robust_aggregate(
    manifest: &StudyManifest,
    mut kept: BTreeMap<String, Vec<f32>>,
) -> Result<(WeightedSum, String), String> {
    use medfl_shared::manifest::Robust;
    use medfl_shared::strategy::{coordinate_median, multi_krum, trimmed_mean};
    let strategy = &manifest.strategy;
    let len = manifest.num_params() as usize;
    let standardizer = manifest.data.scaling.as_ref().map(|s| s.standardizer());
    if let Some(std) = &standardizer {
        kept.values_mut()
            .for_each(|u| std.raw_to_standardized(&manifest.model, u));
    }
    let names: Vec<&String> = kept.keys().collect();
    let updates: Vec<&[f32]> = kept.values().map(|u| u.as_slice()).collect();
    let n = updates.len();
    let threads = medfl_shared::cores();
    let mut out = vec![0f32; len];
    let mut note = String::new();
    let result = match strategy.robust(n) {
        Some(Robust::Median) => coordinate_median(&updates, &mut out, threads),
        Some(Robust::TrimmedMean { trim }) => trimmed_mean(&updates, trim, &mut out, threads),
        Some(Robust::Krum { f, m }) => {
            multi_krum(&updates, f, m.min(n.saturating_sub(f)), &mut out, threads).map(|chosen| {
                let chosen: Vec<&str> = chosen.iter().map(|i| names[*i].as_str()).collect();
                note = format!("; krum kept {}", chosen.join(", "));
            })
        }
        None => return Err("not a robust strategy".into()),
    };
    result.map_err(|e| format!("{}: {e}", strategy.kind.name()))?;
    if let Some(std) = &standardizer {
        std.standardized_to_raw(&manifest.model, &mut out);
    }
    let mut acc = WeightedSum::new(len);
    acc.fold(&out, 1.0).map_err(|e| e.to_string())?;
    Ok((acc, note))
}

impl Engine {
    /// The encoded chunks of `study_id`'s committed model of `round`, loaded once from
    /// the store and shared by every site that downloads it (the study's entry is
    /// replaced when a later round is broadcast).
    pub async fn broadcast_model(self: &Arc<Self>, study_id: &str, round: u32) -> Result<EncodedModel, ServiceError> {
        let mut cache = self.broadcast.lock().await;
        if let Some((r, chunks)) = cache.get(study_id)
            && *r == round
        {
            return Ok(chunks.clone());
        }
        let engine = self.clone();
        let id = study_id.to_string();
        let control =
            StudyManifest::from_toml(&self.study(study_id)?.manifest_toml).is_ok_and(|m| m.control_variates());
        let chunks = tokio::task::spawn_blocking(move || {
            let mut chunks = Vec::new();
            while let Some(bytes) = engine.store.model_chunk(&id, round, chunks.len())? {
                chunks.push(bytes::Bytes::from(bytes));
            }
            // SCAFFOLD: the global control variate after `round` follows the model.
            if control {
                let model_chunks = chunks.len();
                let n: usize = chunks.iter().map(|c| c.len() / 4).sum();
                for index in 0..model_chunks {
                    let len = CHUNK_VALUES.min(n - index * CHUNK_VALUES);
                    let c = engine.store.state_chunk(&id, round, index, 1, len)?;
                    chunks.push(bytes::Bytes::from(medfl_shared::chunk::encode(&c)));
                }
            }
            Ok::<_, StoreError>(chunks)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("model load task failed: {e}")))??;
        if chunks.is_empty() {
            return Err(ServiceError::NotFound(format!(
                "study {study_id} has no committed model for round {round}"
            )));
        }
        let chunks = Arc::new(chunks);
        cache.insert(study_id.to_string(), (round, chunks.clone()));
        Ok(chunks)
    }

    /// Commits a round off the reactor (see [`Self::commit`]), then announces it.
    pub(super) async fn commit_and_announce(
        self: &Arc<Self>,
        at: &Attempt<'_>,
        closed: Closed,
    ) -> Result<RoundOutcome, ServiceError> {
        let Closed {
            record,
            sum,
            unclipped,
            message,
        } = closed;
        let engine = self.clone();
        let study_id = at.id().to_string();
        let (manifest, privacy) = (at.manifest.clone(), at.privacy);
        let rec = record.clone();
        tokio::task::spawn_blocking(move || engine.commit(&study_id, &rec, &sum, unclipped, &manifest, privacy))
            .await
            .map_err(|e| ServiceError::Unavailable(format!("commit task failed: {e}")))??;
        info!(
            round = record.round,
            n_updates = record.contributors.len(),
            "round committed"
        );
        self.emit(at.id(), EventKind::RoundCommitted, record.round, "", message);
        Ok(RoundOutcome::Committed)
    }

    /// Commits a round: the site-level noise (drawn once), the server optimizer's step
    /// over the previous model, the model file fsynced, then the record and its privacy
    /// charges in one atomic batch.
    pub(super) fn commit(
        &self,
        id: &str,
        record: &RoundRecord,
        acc: &WeightedSum,
        unclipped: u32,
        manifest: &StudyManifest,
        privacy: Option<PrivacyPlan>,
    ) -> Result<(), ServiceError> {
        let mut record = record.clone();
        // Under secure aggregation the sites added the noise in shares (distributed DP).
        let site_noise = site_noise_release(&mut record, acc, unclipped, manifest, privacy)?;
        if acc.count() == 0 && site_noise.is_none() {
            return Err(ServiceError::FailedPrecondition("no update to commit".into()));
        }
        let step = ModelStep {
            store: &self.store,
            id,
            round: record.round,
            acc,
            manifest,
            site_noise: site_noise.as_ref(),
            // DP-FedAvg's fixed-denominator estimator (McMahan et al., ICLR 2018,
            // Algorithm 1): Δ = (Σ_k clip(Δ_k) + N(0, σ²S²)) / W with W the number of
            // sites the round selected, fixed before any site delivered, so the divisor
            // reveals nothing.
            denominator: record.selected.len().max(1) as f32,
        };
        step.write()?;
        // A crash with the round's model written (its noise drawn) but neither charged
        // nor published (crash tests).
        medfl_proto::failpoint!("before_commit");
        let _guard = lock(&self.study_lock);
        let mut study = self.study(id)?;
        let charges = self.round_charges(&study, &record, manifest, privacy)?;
        study.rounds_completed = record.round;
        // The round's privacy charges land in the same atomic batch that publishes it.
        self.store.commit_round(&study, &record, &charges)?;
        // A crash with the round committed and charged but not yet announced to anyone
        // (crash tests).
        medfl_proto::failpoint!("after_commit");
        Ok(())
    }
}

/// One round's step from the previous global model to the next, chunk by chunk: the
/// round's mean update Δ (noised under site-level DP), then the server optimizer.
struct ModelStep<'a> {
    store: &'a Store,
    id: &'a str,
    round: u32,
    acc: &'a WeightedSum,
    manifest: &'a StudyManifest,
    site_noise: Option<&'a medfl_shared::dp::GaussianNoise>,
    denominator: f32,
}

impl ModelStep<'_> {
    /// The model's values (under SCAFFOLD the sum also holds the control-variate changes).
    fn n(&self) -> usize {
        self.manifest.num_params() as usize
    }

    fn chunk_range(&self, index: usize) -> std::ops::Range<usize> {
        index * CHUNK_VALUES..((index + 1) * CHUNK_VALUES).min(self.n())
    }

    /// Chunk `index` of the previous model and of the round's Δ, appended to x and d
    /// (`noisy` is scratch space).
    fn read_chunk(
        &self,
        index: usize,
        x: &mut Vec<f32>,
        d: &mut Vec<f32>,
        noisy: &mut Vec<f32>,
    ) -> Result<(), ServiceError> {
        let range = self.chunk_range(index);
        let prev = match self.store.model_chunk(self.id, self.round - 1, index)? {
            Some(bytes) if bytes.len() == range.len() * 4 => bytes,
            other => {
                return Err(ServiceError::Store(StoreError::CorruptChunk {
                    key: format!("model/{}/{:08}/{index:08}", self.id, self.round - 1),
                    len: other.map_or(0, |b| b.len()),
                }));
            }
        };
        x.extend(
            prev.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        match self.site_noise {
            Some(noise) => {
                noisy.clear();
                noisy.extend_from_slice(self.acc.sum_slice(range));
                noise
                    .add_to(noisy)
                    .map_err(|e| ServiceError::Internal(format!("site-level noise: {e}")))?;
                d.extend(noisy.iter().map(|s| s / self.denominator));
            }
            None => d.extend(self.acc.mean_slice(range)),
        }
        Ok(())
    }

    /// Writes the next model (and the optimizer's state beside it) and fsyncs both.
    fn write(&self) -> Result<(), ServiceError> {
        // The server optimizer steps from the last committed round's state (Reddi et al.
        // 2021, Algorithm 2), written beside the round's model.
        let optimizer = self.manifest.strategy.server_optimizer();
        let slots = optimizer.slots();
        let mut writer = self.store.model_writer(self.id, self.round)?;
        let mut state_writer = match slots + usize::from(self.manifest.control_variates()) {
            0 => None,
            _ => Some(self.store.state_writer(self.id, self.round)?),
        };
        // The adaptive optimizers normalize each coordinate, so with public feature
        // scaling in the manifest they step on the standardized scale (the map is linear,
        // so Δ maps as x does): on raw coordinates a step of η is far too large for a
        // weight of a feature measured in thousands. That holds the whole model (and Δ)
        // in memory, two model-sized vectors more than the streaming path.
        match self.manifest.data.scaling.as_ref().filter(|_| slots == 2) {
            Some(scaling) => self.step_standardized(&optimizer, scaling, &mut writer, state_writer.as_mut())?,
            None => self.step_streaming(&optimizer, &mut writer, state_writer.as_mut())?,
        }
        writer.finish()?;
        if let Some(w) = state_writer {
            w.finish()?;
        }
        Ok(())
    }

    /// The adaptive optimizers' step on the manifest's public standardized scale.
    fn step_standardized(
        &self,
        optimizer: &ServerOptimizer,
        scaling: &PublicScaling,
        writer: &mut ModelWriter,
        mut state_writer: Option<&mut ModelWriter>,
    ) -> Result<(), ServiceError> {
        let (n, slots) = (self.n(), optimizer.slots());
        let chunks = n.div_ceil(CHUNK_VALUES);
        let standardizer = scaling.standardizer();
        let (mut x, mut d, mut noisy) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
        for index in 0..chunks {
            self.read_chunk(index, &mut x, &mut d, &mut noisy)?;
        }
        standardizer.raw_to_standardized(&self.manifest.model, &mut x);
        standardizer.raw_to_standardized(&self.manifest.model, &mut d);
        for index in 0..chunks {
            let range = self.chunk_range(index);
            let mut state = self
                .store
                .state_chunk(self.id, self.round - 1, index, slots, range.len())?;
            optimizer.step(&mut x[range.clone()], &d[range], &mut state);
            if let Some(w) = state_writer.as_mut() {
                w.write(&state)?;
            }
        }
        standardizer.standardized_to_raw(&self.manifest.model, &mut x);
        for chunk in x.chunks(CHUNK_VALUES) {
            writer.write(chunk)?;
        }
        Ok(())
    }

    /// The step chunk by chunk, holding one chunk of the model at a time.
    fn step_streaming(
        &self,
        optimizer: &ServerOptimizer,
        writer: &mut ModelWriter,
        mut state_writer: Option<&mut ModelWriter>,
    ) -> Result<(), ServiceError> {
        let (n, slots) = (self.n(), optimizer.slots());
        let mut next = Vec::with_capacity(CHUNK_VALUES.min(n));
        let mut delta = Vec::with_capacity(CHUNK_VALUES.min(n));
        let mut noisy = Vec::new();
        for index in 0..n.div_ceil(CHUNK_VALUES) {
            next.clear();
            delta.clear();
            self.read_chunk(index, &mut next, &mut delta, &mut noisy)?;
            let state = if self.manifest.control_variates() {
                // SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, server): x ← x + η_g Δx̄
                // and c ← c + (1/N) Σ Δc_i, N the sites selected.
                let range = self.chunk_range(index);
                let mut c = self.store.state_chunk(self.id, self.round - 1, index, 1, range.len())?;
                let dc = self.acc.sum_slice(n + range.start..n + range.end);
                for (c, d) in c.iter_mut().zip(dc) {
                    *c += d / self.denominator;
                }
                optimizer.step(&mut next, &delta, &mut []);
                c
            } else {
                let mut state = self
                    .store
                    .state_chunk(self.id, self.round - 1, index, slots, next.len())?;
                optimizer.step(&mut next, &delta, &mut state);
                state
            };
            writer.write(&next)?;
            if let Some(w) = state_writer.as_mut() {
                w.write(&state)?;
            }
        }
        Ok(())
    }
}
