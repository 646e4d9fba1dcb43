//! Every protobuf ↔ domain conversion of the services.

use super::*;

pub(super) fn state_pb(state: StudyState) -> pb::StudyState {
    match state {
        StudyState::Created => pb::StudyState::Created,
        StudyState::Running => pb::StudyState::Running,
        StudyState::Paused => pb::StudyState::Paused,
        StudyState::Completed => pb::StudyState::Completed,
        StudyState::Aborted => pb::StudyState::Aborted,
        StudyState::Failed => pb::StudyState::Failed,
        StudyState::BudgetExhausted => pb::StudyState::BudgetExhausted,
    }
}

pub(super) fn info_pb(s: &StudyRecord) -> pb::StudyInfo {
    pb::StudyInfo {
        study_id: s.id.clone(),
        name: s.name.clone(),
        manifest_hash: s.manifest_hash.clone(),
        state: state_pb(s.state) as i32,
        rounds_completed: s.rounds_completed,
        rounds_total: s.rounds_total,
        created_unix_ms: s.created_ms,
        reason: s.reason.clone(),
    }
}

pub(super) fn status_pb(v: StudyView) -> pb::StudyStatus {
    pb::StudyStatus {
        info: Some(info_pb(&v.study)),
        manifest_toml: v.study.manifest_toml.clone(),
        rounds: v
            .rounds
            .into_iter()
            .map(|r| pb::RoundRecord {
                round: r.round,
                committed: r.committed,
                selected: r.selected,
                contributors: r.contributors,
                num_examples: r.num_examples,
                mean_train_loss: r.mean_train_loss.unwrap_or(f64::NAN),
                started_unix_ms: r.started_ms,
                finished_unix_ms: r.finished_ms,
                reason: r.reason,
                attempt: r.attempt,
                clip_norm: r.clip_norm.unwrap_or(0.0),
                next_clip_norm: r.next_clip_norm.unwrap_or(0.0),
                eval_sites: r.eval.as_ref().map_or(0, |e| e.sites),
                eval_examples: r.eval.as_ref().map_or(0, |e| e.examples),
                eval_accuracy: r.eval.as_ref().map_or(f64::NAN, |e| e.accuracy),
                eval_auc: r.eval.as_ref().and_then(|e| e.auc).unwrap_or(f64::NAN),
                eval_loss: r.eval.as_ref().map_or(f64::NAN, |e| e.loss),
                eval_noised: r.eval.as_ref().is_some_and(|e| e.noised),
            })
            .collect(),
        refusals: v
            .refusals
            .into_iter()
            .map(|r| pb::Refusal {
                site: r.site,
                round: r.round,
                reason: r.reason,
                at_unix_ms: r.at_ms,
            })
            .collect(),
        open_round: v.open.map(|o| pb::OpenRound {
            round: o.round,
            selected: o.selected,
            received: o.received,
            deadline_unix_ms: o.deadline_ms,
            min_sites: o.min_sites,
        }),
    }
}

pub(super) fn event_kind_pb(kind: &EventKind) -> pb::EventKind {
    match kind {
        EventKind::StateChanged => pb::EventKind::StateChanged,
        EventKind::RoundStarted => pb::EventKind::RoundStarted,
        EventKind::UpdateReceived => pb::EventKind::UpdateReceived,
        EventKind::RoundCommitted => pb::EventKind::RoundCommitted,
        EventKind::RoundFailed => pb::EventKind::RoundFailed,
        EventKind::SiteRefused => pb::EventKind::SiteRefused,
    }
}

pub(super) fn tensors_pb(layout: &[TensorSpec]) -> Vec<pb::TensorSpec> {
    layout
        .iter()
        .map(|t| pb::TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
        })
        .collect()
}

pub(super) fn event_pb(engine: &Engine, e: Event) -> Result<pb::StudyEvent, Status> {
    let status = engine.view(&e.study_id).map(status_pb)?;
    Ok(pb::StudyEvent {
        study_id: e.study_id,
        kind: event_kind_pb(&e.kind) as i32,
        round: e.round,
        site: e.site,
        message: e.message,
        at_unix_ms: e.at_ms,
        status: Some(status),
    })
}

pub(super) fn certificate_pb(engine: &Engine, issued: crate::pki::Issued) -> pb::CertificateResponse {
    pb::CertificateResponse {
        certificate_pem: issued.cert_pem,
        ca_pem: engine.ca_pem().unwrap_or_default(),
        not_after_unix_ms: (issued.not_after.unix_timestamp() * 1000) as u64,
    }
}
