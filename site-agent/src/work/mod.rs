//! One work item from the coordinator, in three steps:
//!
//! 1. [`vet`]: the site's own checks (manifest text and hash, the admin's signature,
//!    round settings, privacy plan, policy, dataset, secure-aggregation session). It
//!    returns the [`vet::Approved`] work or a typed [`Refusal`].
//! 2. [`train`]: the global model is downloaded, the privacy mode chosen, the round's
//!    budget checked, and a [`LocalTrainer`](crate::trainer::LocalTrainer) trains; the
//!    agent turns what it returns into a finite, clipped delta.
//! 3. [`release`]: the charge lands durably with the update it pays for, the egress log
//!    gets its entry, and the update leaves plain or masked.
//!
//! Refusals are sent in one place, [`handle_work`], and each is written to the egress
//! log before it leaves.

mod query;
mod refusal;
mod release;
mod train;
mod vet;

use std::sync::Arc;

use anyhow::{Context, Result};
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use tonic::transport::Channel;
use tracing::{instrument, warn};

pub use refusal::Refusal;
pub use train::round_seed;

use crate::settings::AgentSettings;

/// How a step of a work item ends early: refused (the coordinator is told why) or
/// failed here (logged locally; the coordinator's deadline covers it).
#[derive(Debug)]
pub(crate) enum WorkError {
    Refused(Refusal),
    Failed(anyhow::Error),
}

impl From<Refusal> for WorkError {
    fn from(refusal: Refusal) -> Self {
        WorkError::Refused(refusal)
    }
}

impl From<anyhow::Error> for WorkError {
    fn from(error: anyhow::Error) -> Self {
        WorkError::Failed(error)
    }
}

/// Vets, trains and releases one work item; a refusal reaches the coordinator.
#[instrument(skip_all, fields(study = %work.study_id, round = work.round))]
pub(crate) async fn handle_work(
    client: &mut SiteClient<Channel>,
    settings: &Arc<AgentSettings>,
    work: pb::WorkItem,
) -> Result<()> {
    let outcome = match work.query {
        true => query::answer(client, settings, &work).await,
        false => steps(client, settings, &work).await,
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(WorkError::Refused(refusal)) => refuse(client, settings, &work, &refusal).await,
        Err(WorkError::Failed(e)) => Err(e),
    }
}

async fn steps(
    client: &mut SiteClient<Channel>,
    settings: &Arc<AgentSettings>,
    work: &pb::WorkItem,
) -> Result<(), WorkError> {
    let mut approved = vet::vet(settings, work).await?;
    let update = match release::paid_before(settings, work, &approved)? {
        Some(update) => update,
        None => {
            let trained = train::train(client, settings, work, &mut approved).await?;
            release::charge(settings, work, &approved, trained)?
        }
    };
    release::send(client, settings, work, approved, update).await
}

/// Tells the coordinator why this site does not take part, after logging it.
async fn refuse(
    client: &mut SiteClient<Channel>,
    settings: &AgentSettings,
    work: &pb::WorkItem,
    refusal: &Refusal,
) -> Result<()> {
    let reason = refusal.to_string();
    warn!(study = %work.study_id, round = work.round, %reason, "refusing work");
    let report = pb::RefusalReport {
        study_id: work.study_id.clone(),
        round: work.round,
        reason,
    };
    settings.egress.record(
        "refusal",
        &work.study_id,
        work.round,
        &prost::Message::encode_to_vec(&report),
        None,
        serde_json::json!({"reason": report.reason}),
    )?;
    client.report_refusal(report).await.context("report refusal")?;
    Ok(())
}
