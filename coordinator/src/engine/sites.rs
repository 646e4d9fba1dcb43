//! Site liveness and work: registration, heartbeats, long-polled work items, refusals
//! and reported metrics.

use super::*;

impl Engine {
    pub fn register_site(
        &self,
        name: &str,
        agent_version: String,
        datasets: Vec<DatasetRecord>,
    ) -> Result<(), ServiceError> {
        let registered_ms = self.store.site(name)?.map_or_else(now_ms, |s| s.registered_ms);
        self.store.put_site(&SiteRecord {
            name: name.to_string(),
            agent_version,
            datasets,
            registered_ms,
        })?;
        self.touch(name);
        info!(site = %name, "site registered");
        Ok(())
    }

    /// Marks a site as alive now.
    pub fn touch(&self, site: &str) {
        lock(&self.live).insert(site.to_string(), Instant::now());
    }

    pub fn last_seen(&self, site: &str) -> Option<Instant> {
        lock(&self.live).get(site).copied()
    }

    pub fn is_connected(&self, site: &str) -> bool {
        self.last_seen(site)
            .is_some_and(|t| t.elapsed() < self.config.liveness_timeout)
    }

    pub fn require_registered(&self, site: &str) -> Result<(), ServiceError> {
        if self.store.site(site)?.is_some() {
            Ok(())
        } else {
            Err(ServiceError::FailedPrecondition(format!(
                "site {site} has not registered; call Register first"
            )))
        }
    }

    // ------------------------------------------------------------------ studies

    /// Returns work for `site` as soon as a round selects it, or `None` after `wait`.
    pub async fn poll_work(&self, site: &str, wait: Duration) -> Option<Work> {
        let mut changed = self.work.subscribe();
        let until = tokio::time::Instant::now() + wait;
        loop {
            self.touch(site);
            if let Some(work) = self.find_work(site) {
                return Some(work);
            }
            tokio::select! {
                res = changed.changed() => if res.is_err() { return None },
                _ = tokio::time::sleep_until(until) => return None,
                _ = self.shutdown.cancelled() => return None,
            }
        }
    }

    pub(super) fn find_work(&self, site: &str) -> Option<Work> {
        let open = lock(&self.open);
        open.values().find_map(|r| {
            let acc = r.lock();
            let engaged = r.secure.as_ref().is_some_and(|s| s.has_advertised(site));
            let wanted = r.is_selected(site)
                && !acc.closed
                && !acc.received.contains_key(site)
                && !acc.refused.contains(site)
                && !engaged;
            wanted.then(|| Work {
                study_id: r.study_id.clone(),
                round: r.round,
                manifest_hash: r.manifest_hash.clone(),
                manifest_toml: r.manifest_toml.clone(),
                deadline_ms: r.deadline_ms,
                num_params: r.manifest.num_params(),
                secure: r.secure.clone(),
                manifest_signature: r.manifest_signature.clone(),
                manifest_signature_algorithm: r.manifest_signature_algorithm.clone(),
                creator_cert: r.creator_cert.clone(),
                settings: r.manifest.round_settings(),
                query: r.query,
            })
        })
    }

    pub fn report_metrics(&self, site: &str, study_id: &str, round: u32, train_loss: f64) {
        if let Some(r) = lock(&self.open).get(study_id).filter(|r| r.round == round)
            && let Some(rec) = r.lock().received.get_mut(site)
            && train_loss.is_finite()
        {
            rec.train_loss = Some(train_loss);
        }
    }

    pub fn refuse(&self, site: &str, study_id: &str, round: u32, reason: &str) -> Result<(), ServiceError> {
        if self.store.query(study_id)?.is_none() {
            self.study(study_id)?;
        }
        let reason: String = reason.chars().take(2000).collect();
        self.store.add_refusal(
            study_id,
            &RefusalRecord {
                site: site.to_string(),
                round,
                reason: reason.clone(),
                at_ms: now_ms(),
            },
        )?;
        if let Some(r) = lock(&self.open).get(study_id).filter(|r| r.round == round) {
            r.lock().refused.insert(site.to_string());
            r.progress.notify_one();
        }
        warn!(study = %study_id, round, site, %reason, "site refused");
        self.emit(study_id, EventKind::SiteRefused, round, site, reason);
        Ok(())
    }

    pub fn sites(&self) -> Result<Vec<SiteRecord>, ServiceError> {
        Ok(self.store.sites()?)
    }

    // ------------------------------------------------------------------ drivers
}
