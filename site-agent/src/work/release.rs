//! Step 3: charge, log, send. Under DP the charge lands durably, with the update it
//! pays for in the same batch, before anything leaves; the egress log gets the entry
//! of what leaves next; then the update is streamed plain or masked (secure
//! aggregation).
//!
//! Crash rules: a crash after the charge and before the send leaves the update in the
//! ledger as a release; the next attempt of that round sends it again as it was
//! ([`paid_before`]), with no new noise and no new charge. Distributed DP draws its
//! noise at masking, so it has no reusable release and charges each attempt.

use std::time::SystemTime;

use anyhow::{Context, Result};
use medfl_proto::stream::{update_chunks, update_header};
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::manifest::StudyManifest;
use medfl_shared::unix_ms;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::train::{Trained, save_control};
use super::vet::Approved;
use super::{Refusal, WorkError};
use crate::ledger::{ChargeRequest, LedgerError};
use crate::settings::AgentSettings;

/// One update ready to leave, with what its egress entry records.
#[derive(Debug)]
pub(crate) struct Update {
    pub update_id: String,
    pub delta: Vec<f32>,
    pub weight: u64,
    pub loss: Option<f64>,
    pub evaluation: Option<pb::Evaluation>,
    /// The dataset's ε after this update's charge, under DP.
    pub epsilon_after: Option<f64>,
    pub scaffold_next: Option<Vec<f32>>,
}

/// Whether a DP update this site already paid for in this round can be sent again
/// as it was.
fn reusable(approved: &Approved) -> bool {
    approved.plan.is_some() && !approved.manifest.distributed_dp()
}

/// The update this site already paid for in this round, if any.
pub(crate) fn paid_before(
    settings: &AgentSettings,
    work: &pb::WorkItem,
    approved: &Approved,
) -> Result<Option<Update>, WorkError> {
    if !reusable(approved) {
        return Ok(None);
    }
    let release = settings
        .ledger
        .release(&work.study_id, work.round, &work.manifest_hash)
        .context("read the ledger's releases")?;
    Ok(release.map(|r| {
        info!(update_id = %r.update_id, "resending the update this site already paid for");
        Update {
            update_id: r.update_id,
            delta: r.values,
            weight: 1,
            loss: None,
            evaluation: None,
            epsilon_after: Some(r.epsilon_after),
            scaffold_next: None,
        }
    }))
}

/// Charges the ledger for a trained update (durably, with the update when it can be
/// sent again) and names the update.
pub(crate) fn charge(
    settings: &AgentSettings,
    work: &pb::WorkItem,
    approved: &Approved,
    trained: Trained,
) -> Result<Update, WorkError> {
    let update_id = format!(
        "{}-{}-{}-{}",
        approved.site,
        work.study_id,
        work.round,
        unix_ms(SystemTime::now())
    );
    let epsilon_after = match trained.charge {
        Some(planned) => {
            let request = ChargeRequest {
                dataset: &approved.ledger,
                study_id: &work.study_id,
                round: work.round,
                manifest_hash: &work.manifest_hash,
                mechanism: planned.mechanism,
                clip_norm: planned.clip_norm,
                cap: planned.cap,
                delta: settings.policy.delta,
                declared_by: planned.declared_by.as_deref(),
                discrete: planned.discrete,
                evaluation: planned.evaluation,
            };
            let release = reusable(approved).then_some((update_id.as_str(), trained.delta.as_slice()));
            let charge = match settings.ledger.charge_release(&request, release) {
                Ok(c) => c,
                Err(e @ LedgerError::WouldExceed { .. }) => return Err(Refusal::Budget(e).into()),
                Err(e) => return Err(anyhow::Error::from(e).context("charge the ledger").into()),
            };
            info!(dataset = %approved.dataset, ledger = %approved.ledger, epsilon_before = charge.epsilon_before, epsilon_after = charge.epsilon_after, "privacy charged");
            // A crash between the durable charge and the release (crash tests).
            medfl_proto::failpoint!("after_charge");
            Some(charge.epsilon_after)
        }
        None => None,
    };
    Ok(Update {
        update_id,
        delta: trained.delta,
        weight: trained.weight,
        loss: trained.loss,
        evaluation: trained.evaluation,
        epsilon_after,
        scaffold_next: trained.scaffold_next,
    })
}

/// Sends the update: masked through the round's secure-aggregation session, or plain.
/// Its egress entry is written first.
pub(crate) async fn send(
    client: &mut SiteClient<Channel>,
    settings: &AgentSettings,
    work: &pb::WorkItem,
    approved: Approved,
    update: Update,
) -> Result<(), WorkError> {
    let Approved { manifest, session, .. } = approved;
    if let Some(mut session) = session {
        session.log_to(settings.egress.clone());
        let creds = settings.credentials();
        let outcome = async {
            session.advertise(client, &creds).await?;
            session.share_keys(client, &creds).await?;
            // A site that dies after its shares left and before its masked input does
            // (dropout tests).
            medfl_proto::failpoint!("secagg_after_share");
            // (No evaluation totals here: the manifest refuses them with secure aggregation.)
            log_egress(settings, work, &update, true)?;
            session
                .send_masked(client, work, &manifest, &update.update_id, &update.delta)
                .await?;
            session.reveal(client).await
        }
        .await;
        return match outcome {
            Ok(()) => {
                info!(epsilon_after = ?update.epsilon_after, "masked update delivered and unmask answered");
                Ok(())
            }
            Err(e) if e.downcast_ref::<crate::secagg::Refusal>().is_some() => {
                warn!(reason = %e, "secure aggregation: the coordinator's message failed a check; leaving the session");
                Err(Refusal::SecureAggregation(e.to_string()).into())
            }
            Err(e) => Err(e.into()),
        };
    }
    log_egress(settings, work, &update, false)?;
    let outgoing = Outgoing {
        update_id: &update.update_id,
        examples: update.weight,
        delta: &update.delta,
        train_loss: update.loss,
        evaluation: update.evaluation,
    };
    upload(client, work, &manifest, outgoing).await?;
    if let Some(c_next) = &update.scaffold_next {
        save_control(&settings.store, &work.study_id, c_next)?;
    }
    info!(weight = update.weight, loss = ?update.loss, epsilon_after = ?update.epsilon_after, "update delivered");
    Ok(())
}

/// One plain update as it goes on the wire.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub update_id: &'a str,
    /// The FedAvg weight (1 under DP).
    pub examples: u64,
    pub delta: &'a [f32],
    pub train_loss: Option<f64>,
    pub evaluation: Option<pb::Evaluation>,
}

/// Streams an update: header, then chunks.
pub async fn upload(
    client: &mut SiteClient<Channel>,
    work: &pb::WorkItem,
    manifest: &StudyManifest,
    update: Outgoing<'_>,
) -> Result<pb::UploadReceipt> {
    let mut header = update_header(
        work,
        &manifest.wire_layout(),
        update.update_id,
        update.examples,
        update.delta.len() as u64,
        update.train_loss,
    );
    if let Some(pb::update_chunk::Body::Header(h)) = header.body.as_mut() {
        h.evaluation = update.evaluation;
    }
    let messages: Vec<pb::UpdateChunk> = std::iter::once(header).chain(update_chunks(update.delta)).collect();
    let stream = futures::stream::iter(messages);
    Ok(client
        .upload_update(stream)
        .await
        .context("upload update")?
        .into_inner())
}

/// The egress log's entry for what leaves next. With secure aggregation what leaves is
/// this update quantized and masked; the log names the update it came from.
fn log_egress(settings: &AgentSettings, work: &pb::WorkItem, update: &Update, masked: bool) -> Result<()> {
    let evaluation = update.evaluation.as_ref().map(|e| match &e.noised {
        Some(n) => serde_json::json!({"noised": {"persons": n.persons, "correct": n.correct, "loss_sum": n.loss_sum}}),
        None => serde_json::json!({"examples": e.examples, "correct": e.correct, "loss_sum": e.loss_sum,
                                   "score_bins": e.score_bins}),
    });
    settings.egress.record(
        if masked { "masked_update" } else { "model_update" },
        &work.study_id,
        work.round,
        &medfl_shared::chunk::encode(&update.delta),
        update.epsilon_after,
        serde_json::json!({
            "manifest_hash": work.manifest_hash,
            "update_id": update.update_id,
            "num_params": update.delta.len(),
            "l2_norm": medfl_shared::dp::l2_norm(&update.delta),
            "num_examples": update.weight,
            "train_loss": update.loss,
            "evaluation": evaluation,
            "secure_aggregation": masked,
        }),
    )
}
