//! The close of a secure round: the masked sum, unmasking with the survivors' shares,
//! and the distributed-DP check of the noise the survivors carry.

use super::*;

impl Engine {
    /// Runs a secure round's four stages (each waits for the sites of the previous one,
    /// stage 0 until the round deadline, the others `stage_timeout_secs`), unmasks the
    /// sum and commits its mean. Fewer than t sites at any stage fail the attempt with
    /// nothing released and nothing charged.
    pub(super) async fn finish_secure_round(
        self: &Arc<Self>,
        at: &Attempt<'_>,
        open: &Arc<OpenRound>,
        sec: &Arc<SecureRound>,
        control: &mut watch::Receiver<Control>,
    ) -> Result<RoundOutcome, ServiceError> {
        let (id, manifest, privacy, round) = (at.id(), &at.manifest, at.privacy, at.round);
        let (interrupted, failure) = self.wait_stages(open, sec, control).await;
        open.lock().closed = true;
        lock(&self.open).remove(id);
        let selected = open.selected.clone();
        if interrupted {
            let reason = self.interruption();
            sec.fail(reason);
            self.fail_round(at, selected, vec![], reason.into())?;
            return Ok(RoundOutcome::Interrupted);
        }
        if let Some(reason) = failure {
            return self.fail_round(at, selected, vec![], reason);
        }
        let for_unmask = sec.clone();
        let unmasked = tokio::task::spawn_blocking(move || for_unmask.unmask())
            .await
            .map_err(|e| ServiceError::Unavailable(format!("unmask task failed: {e}")))?;
        let (sum, survivors) = match unmasked {
            Ok(v) => v,
            Err(e) => return self.fail_round(at, selected, vec![], e.to_string()),
        };
        // Site-level DP: the sites' noise must carry at least what the ledger charges
        // for this many survivors ([KLS21] Prop. 14; see DistributedNoise), and the
        // mean takes DP-FedAvg's fixed denominator, the number selected.
        let mut denominator = survivors.len();
        if let (Some(plan), Some(noise)) = (
            privacy,
            privacy.and_then(|p| manifest.distributed_noise(p.sigma, sec.params.threshold)),
        ) {
            let carried = noise.charged_multiplier(&sec.quantizer, survivors.len());
            if carried < plan.per_round.sigma {
                let reason = format!(
                    "the sites' noise carries σ = {carried} for {} survivors, below the {} the ledger charges; nothing was released",
                    survivors.len(),
                    plan.per_round.sigma
                );
                return self.fail_round(at, selected, vec![], reason);
            }
            denominator = selected.len();
        }
        // Uniform FedAvg: fold the mean once.
        let inv = 1.0 / denominator as f32;
        let mean: Vec<f32> = sum.iter().map(|v| v * inv).collect();
        let mut acc = WeightedSum::new(mean.len());
        acc.fold(&mean, 1.0)
            .map_err(|e| ServiceError::Internal(format!("secure aggregate: {e}")))?;
        let record = RoundRecord {
            round,
            attempt: at.attempt,
            committed: true,
            selected,
            num_examples: survivors.len() as u64,
            contributors: survivors,
            mean_train_loss: None,
            started_ms: at.started_ms,
            finished_ms: now_ms(),
            reason: String::new(),
            clip_norm: None,
            next_clip_norm: None,
            eval: None,
        };
        let message = format!("{} masked updates, unmasked as one sum", record.contributors.len());
        self.commit_and_announce(
            at,
            Closed {
                record,
                sum: acc,
                unclipped: 0,
                message,
            },
        )
        .await
    }

    /// Waits through the four stages: each until the sites of the previous one answered
    /// (stage 0 until the round deadline, the others `stage_timeout_secs`). Returns
    /// whether the round was interrupted and why a stage failed, if one did.
    pub(super) async fn wait_stages(
        &self,
        open: &OpenRound,
        sec: &SecureRound,
        control: &mut watch::Receiver<Control>,
    ) -> (bool, Option<String>) {
        let stage_len = Duration::from_secs(open.manifest.secagg().map_or(30, |s| s.stage_timeout_secs));
        for stage in 0..4 {
            let until = if stage == 0 {
                open.deadline
            } else {
                Instant::now() + stage_len
            };
            loop {
                // A site that refused the round before advertising (its policy) will not
                // advertise; later stages wait for their own sets, which exclude it.
                let (got, of) = sec.progress();
                let refused = if stage == 0 { open.lock().refused.len() } else { 0 };
                if got + refused >= of {
                    break;
                }
                tokio::select! {
                    _ = open.progress.notified() => {}
                    _ = tokio::time::sleep_until(until.into()) => break,
                    _ = control.changed() => if *control.borrow() == Control::Abort { return (true, None) },
                    _ = self.shutdown.cancelled() => return (true, None),
                }
            }
            if let Some(reason) = sec.advance() {
                return (false, Some(reason));
            }
            info!(round = open.round, stage = stage + 1, "secure aggregation stage opened");
        }
        (false, None)
    }
}
