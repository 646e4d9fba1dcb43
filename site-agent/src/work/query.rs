//! A federated-analytics query at this site, in the same three steps as a round:
//!
//! 1. vet: the query's text and hash, the admin's signature (under the query tag), its
//!    plan, this site's policy (columns, statistics, ε per query, k, approved hashes,
//!    per-site answers), the dataset, and the secure-aggregation session;
//! 2. answer: the exact integer answer (pushed down to PostgreSQL, or scanned), then
//!    this site's discrete Gaussian noise per statistic (the whole σ alone, or its
//!    σ/√t share under secure aggregation), from the one audited sampler in `dp`;
//! 3. release: the charge lands durably (plain answers kept with it, so a retry resends
//!    the very same noisy answer), the egress log gets its entry, and the answer leaves
//!    plain or masked.
//!
//! A site answers a query once: its ledger holds exactly one charge per query.

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow};
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::accountant::epsilon_rdp;
use medfl_shared::model::TensorSpec;
use medfl_shared::query::{QueryManifest, QueryPlan, gaussian_step};
use medfl_shared::unix_ms;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::{Refusal, WorkError};
use crate::ledger::{ChargeRequest, LedgerError};
use crate::secagg::SiteSession;
use crate::settings::AgentSettings;

/// The tensor a query's answer travels as (the coordinator's layout for queries).
const ANSWER_TENSOR: &str = "answer";

/// Largest |value| a plain answer carries exactly as f32.
const PLAIN_LIMIT: i64 = 1 << 24;

pub(crate) async fn answer(
    client: &mut SiteClient<Channel>,
    settings: &Arc<AgentSettings>,
    work: &pb::WorkItem,
) -> Result<(), WorkError> {
    let query = QueryManifest::from_toml(&work.manifest_toml).map_err(|e| Refusal::InvalidManifest(e.to_string()))?;
    let hash = query.hash();
    if hash != work.manifest_hash {
        return Err(Refusal::HashMismatch {
            got: work.manifest_hash.clone(),
            computed: hash,
        }
        .into());
    }
    check_signature(settings, work, &hash).map_err(|e| Refusal::NotApproved(format!("{e:#}")))?;
    let for_plan = query.clone();
    let plan = tokio::task::spawn_blocking(move || for_plan.plan())
        .await
        .context("planning task")?
        .map_err(|e| Refusal::PrivacySettings(e.to_string()))?;
    let site = settings.profile().file.name.clone();
    // Secure aggregation: the session must be the approved query's, before anything.
    let mut session = match (query.secure_aggregation, work.secagg.is_some()) {
        (true, _) => Some(
            SiteSession::for_query(work, &query, plan.len(), &site)
                .map_err(|e| Refusal::SecureAggregationSetup(e.to_string()))?,
        ),
        (false, true) => {
            return Err(Refusal::SecureAggregationSetup(
                "the work item carries a session; the approved query runs without secure aggregation".into(),
            )
            .into());
        }
        (false, false) => None,
    };
    let threshold = session.as_ref().map(SiteSession::threshold);
    let z = plan.charged_multiplier(threshold);
    let step = gaussian_step(z);
    let epsilon = epsilon_rdp(&[step], query.delta).map_err(|e| Refusal::PrivacySettings(e.to_string()))?;
    let reasons = settings
        .policy
        .review_query(&query, epsilon, &settings.dataset_caps(), unix_ms(SystemTime::now()));
    if !reasons.is_empty() {
        return Err(Refusal::Policy(reasons).into());
    }
    let dataset = settings
        .datasets
        .iter()
        .find(|d| d.config.name == query.dataset)
        .cloned()
        .ok_or_else(|| Refusal::NoDataset(query.dataset.clone()))?;
    let ledger = dataset.config.ledger_name();
    let cap = dataset.config.max_epsilon.unwrap_or(settings.policy.max_epsilon);
    // One charge per query: a plain answer already paid for is sent again as it was;
    // a masked one cannot be (its noise was a share of this session's), so it is not.
    let paid = settings
        .ledger
        .charges(&ledger)
        .context("read the ledger")?
        .into_iter()
        .any(|c| c.study_id == work.study_id && c.manifest_hash == work.manifest_hash);
    if paid {
        let kept = settings
            .ledger
            .release(&work.study_id, 1, &work.manifest_hash)
            .context("read the ledger's releases")?;
        return match (kept, session.is_some()) {
            (Some(r), false) => {
                info!(query = %work.study_id, "resending the answer this site already paid for");
                let noisy: Vec<i64> = r.values.iter().map(|v| *v as i64).collect();
                log_egress(settings, work, &noisy, r.epsilon_after, false)?;
                upload(client, work, &r.update_id, &r.values).await?;
                Ok(())
            }
            _ => Err(Refusal::Policy(vec![format!(
                "this site already answered query {} (its one charge is in the ledger)",
                work.study_id
            )])
            .into()),
        };
    }
    // The cap, checked before anything starts (the charge itself comes later and
    // checks again): a site that cannot pay says so at once, not at a stage timeout.
    if let Err(e) = settings
        .ledger
        .check(&ledger, &[step], true, cap, settings.policy.delta)
    {
        return Err(match e {
            e @ LedgerError::WouldExceed { .. } => Refusal::Budget(e).into(),
            e => WorkError::Failed(anyhow::Error::from(e).context("read the ledger")),
        });
    }
    // The exact answer, fitted to what the sums hold, and its noise: all off the reactor.
    let sites = session.as_ref().map_or(1, SiteSession::roster_len);
    let sigmas = plan.site_sigmas(threshold);
    let plain = session.is_none();
    let (reader, for_answer, for_noise, noise_sigmas) = (dataset.clone(), query.clone(), plan.clone(), sigmas.clone());
    let answered = tokio::task::spawn_blocking(move || {
        let (mut exact, path) =
            crate::data::query::exact_answer(&reader, &for_answer, &for_noise).map_err(AnswerError::Data)?;
        fit_headroom(&for_noise, &mut exact, &noise_sigmas, sites, plain).map_err(AnswerError::Refused)?;
        let noisy =
            noised(&for_noise, &exact, &noise_sigmas).map_err(|e| AnswerError::Failed(anyhow!("noise: {e}")))?;
        Ok::<_, AnswerError>((noisy, path))
    })
    .await
    .context("query task")?;
    let (noisy, path) = match answered {
        Ok(v) => v,
        Err(AnswerError::Data(e)) => {
            warn!(dataset = %dataset.config.name, error = %e, "the dataset cannot answer the query");
            return Err(Refusal::Data {
                dataset: dataset.config.name.clone(),
                kind: e.kind(),
            }
            .into());
        }
        Err(AnswerError::Refused(r)) => return Err(r.into()),
        Err(AnswerError::Failed(e)) => return Err(e.into()),
    };
    info!(query = %work.study_id, path = path.name(), values = noisy.len(), secure = session.is_some(), "query answered");
    let update_id = format!("{site}-{}-{}", work.study_id, unix_ms(SystemTime::now()));
    let request = ChargeRequest {
        dataset: &ledger,
        study_id: &work.study_id,
        round: work.round,
        manifest_hash: &work.manifest_hash,
        mechanism: step,
        clip_norm: 0.0,
        cap,
        delta: settings.policy.delta,
        declared_by: None,
        discrete: true,
        evaluation: None,
    };
    let Some(session) = session.as_mut() else {
        // Plain: the charge lands with the noisy answer it pays for, then it leaves.
        let as_f32: Vec<f32> = noisy.iter().map(|v| *v as f32).collect();
        let charge = charge(settings, &request, Some((&update_id, &as_f32))).map_err(work_error)?;
        log_egress(settings, work, &noisy, charge.epsilon_after, false)?;
        upload(client, work, &update_id, &as_f32).await?;
        return Ok(());
    };
    // Masked: keys and shares carry nothing of the data, so the charge comes after
    // them (a session that fails to gather t sites charges no one) and before the
    // noisy answer leaves, masked.
    session.log_to(settings.egress.clone());
    let creds = settings.credentials();
    let words: Vec<u32> = noisy.iter().map(|v| *v as i32 as u32).collect();
    let layout = answer_layout(&plan);
    let outcome = async {
        session.advertise(client, &creds).await?;
        session.share_keys(client, &creds).await?;
        let charge = charge(settings, &request, None)?;
        // A site that dies after its charge and before its masked answer leaves
        // (dropout tests): it keeps its charge, the others recover without it.
        medfl_proto::failpoint!("secagg_after_share");
        log_egress(settings, work, &noisy, charge.epsilon_after, true)?;
        session.send_words(client, work, &layout, &update_id, words).await?;
        session.reveal(client).await
    }
    .await;
    match outcome {
        Ok(()) => Ok(()),
        Err(e) if e.downcast_ref::<crate::secagg::Refusal>().is_some() => {
            Err(Refusal::SecureAggregation(e.to_string()).into())
        }
        Err(e) => Err(work_error(e)),
    }
}

/// How computing the noisy answer can end early.
enum AnswerError {
    Data(crate::data::DataError),
    Refused(Refusal),
    Failed(anyhow::Error),
}

/// A refused charge is a refusal; anything else failed here.
fn work_error(e: anyhow::Error) -> WorkError {
    match e.downcast::<ChargeRefused>() {
        Ok(refused) => refused.0.into(),
        Err(e) => e.into(),
    }
}

/// A charge the ledger refused (the dataset's cap), carried through the session's
/// `anyhow` steps to become the refusal it is.
#[derive(Debug)]
struct ChargeRefused(Refusal);

impl std::fmt::Display for ChargeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ChargeRefused {}

/// Charges the ledger durably (with the plain answer it pays for, when given).
fn charge(
    settings: &AgentSettings,
    request: &ChargeRequest<'_>,
    release: Option<(&str, &[f32])>,
) -> Result<crate::ledger::Charge> {
    match settings.ledger.charge_release(request, release) {
        Ok(c) => {
            info!(ledger = %request.dataset, epsilon_before = c.epsilon_before, epsilon_after = c.epsilon_after, "query charged");
            Ok(c)
        }
        Err(e @ LedgerError::WouldExceed { .. }) => Err(ChargeRefused(Refusal::Budget(e)).into()),
        Err(e) => Err(anyhow::Error::from(e).context("charge the ledger")),
    }
}

/// The query's creator signed its hash under the query tag with an admin certificate
/// of the consortium CA.
fn check_signature(settings: &AgentSettings, work: &pb::WorkItem, hash: &str) -> Result<()> {
    let creds = settings.credentials();
    let admin = creds
        .verify_certificate(&work.creator_certificate_der)
        .context("the query's creator certificate")?;
    if admin.role != medfl_shared::identity::Role::Admin {
        anyhow::bail!("the query was created by {admin}, who is not an admin");
    }
    let signed = medfl_shared::sign::verify_by_certificate(
        &work.creator_certificate_der,
        &work.manifest_signature_algorithm,
        &medfl_shared::sign::query_signing_bytes(hash),
        &work.manifest_signature,
    )?;
    if !signed {
        anyhow::bail!("query {hash} does not carry {admin}'s signature: it is not the query the admin asked");
    }
    Ok(())
}

fn answer_layout(plan: &QueryPlan) -> Vec<TensorSpec> {
    vec![TensorSpec {
        name: ANSWER_TENSOR.into(),
        shape: vec![plan.len() as u64],
    }]
}

/// Keeps a sum over `sites` sites (noise within 12 σ) from wrapping 32-bit arithmetic,
/// and a plain answer within what f32 carries exactly, without a refusal that depends
/// on the data (which would itself say something about it): the exact answer is clamped
/// to a bound computed from public numbers only (the roster's size, σ), a 1-Lipschitz
/// map that keeps every statistic's sensitivity, so the charge still holds. Only a σ
/// too large for any answer to fit refuses, and that depends on the query alone.
fn fit_headroom(plan: &QueryPlan, exact: &mut [i64], sigmas: &[f64], sites: usize, plain: bool) -> Result<(), Refusal> {
    let limit = if plain {
        PLAIN_LIMIT as f64
    } else {
        2f64.powi(31) / sites as f64
    };
    for (p, sigma) in plan.parts.iter().zip(sigmas) {
        let room = (limit - 12.0 * sigma).floor();
        if room < 1.0 {
            return Err(Refusal::PrivacySettings(format!(
                "statistic {}'s noise is too large to sum exactly over {sites} sites: use a coarser quantum or narrower bounds",
                p.statistic + 1
            )));
        }
        let room = room as i64;
        let mut clamped = 0usize;
        for v in &mut exact[p.offset..p.offset + p.len()] {
            if v.abs() > room {
                *v = (*v).clamp(-room, room);
                clamped += 1;
            }
        }
        if clamped > 0 {
            // The local log only: the coordinator is not told.
            warn!(
                statistic = p.statistic + 1,
                clamped, "values clamped to what a 32-bit sum holds"
            );
        }
    }
    Ok(())
}

/// The exact answer with this site's discrete Gaussian noise, part by part.
fn noised(plan: &QueryPlan, exact: &[i64], sigmas: &[f64]) -> Result<Vec<i64>, medfl_shared::dp::DpError> {
    let mut words: Vec<u32> = exact.iter().map(|v| *v as i32 as u32).collect();
    for (p, sigma) in plan.parts.iter().zip(sigmas) {
        medfl_shared::dp::add_discrete_gaussian(&mut words[p.offset..p.offset + p.len()], *sigma)?;
    }
    Ok(words.iter().map(|w| *w as i32 as i64).collect())
}

/// Streams a plain noisy answer: header, then chunks.
async fn upload(client: &mut SiteClient<Channel>, work: &pb::WorkItem, update_id: &str, values: &[f32]) -> Result<()> {
    let layout = vec![TensorSpec {
        name: ANSWER_TENSOR.into(),
        shape: vec![values.len() as u64],
    }];
    let header = medfl_proto::stream::update_header(work, &layout, update_id, 1, values.len() as u64, None);
    let messages: Vec<pb::UpdateChunk> = std::iter::once(header)
        .chain(medfl_proto::stream::update_chunks(values))
        .collect();
    client
        .upload_update(futures::stream::iter(messages))
        .await
        .context("upload the query's answer")?;
    Ok(())
}

/// The egress log's entry for the noisy answer that leaves next (masked or plain).
fn log_egress(
    settings: &AgentSettings,
    work: &pb::WorkItem,
    noisy: &[i64],
    epsilon_after: f64,
    masked: bool,
) -> Result<()> {
    let bytes: Vec<u8> = noisy.iter().flat_map(|v| v.to_le_bytes()).collect();
    settings.egress.record(
        if masked { "masked_query_answer" } else { "query_answer" },
        &work.study_id,
        work.round,
        &bytes,
        Some(epsilon_after),
        serde_json::json!({
            "manifest_hash": work.manifest_hash,
            "values": noisy.len(),
            "noisy_answer": noisy,
            "secure_aggregation": masked,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_plan() -> QueryPlan {
        QueryManifest::from_toml("name = \"c\"\ndataset = \"d\"\nepsilon = 1.0\n\n[[statistics]]\nkind = \"count\"\n")
            .expect("query")
            .plan()
            .expect("plan")
    }

    #[test]
    fn answers_beyond_the_sum_are_clamped_by_public_numbers_not_refused() {
        let plan = count_plan();
        let sigmas = plan.site_sigmas(Some(2));
        let mut exact = vec![5_000_000_000i64];
        fit_headroom(&plan, &mut exact, &sigmas, 3, false).expect("clamped, not refused");
        let room = (2f64.powi(31) / 3.0 - 12.0 * sigmas[0]).floor() as i64;
        assert_eq!(exact, vec![room]);
        let mut small = vec![-42i64];
        fit_headroom(&plan, &mut small, &sigmas, 3, false).expect("fits");
        assert_eq!(small, vec![-42]);
        // Plain answers stay within what f32 carries exactly.
        let mut plain = vec![1i64 << 30];
        fit_headroom(&plan, &mut plain, &plan.site_sigmas(None), 1, true).expect("clamped");
        assert!(plain[0] < 1 << 24);
        // A σ no answer could fit under refuses, whatever the data.
        let huge = vec![1e12];
        assert!(fit_headroom(&plan, &mut [0], &huge, 3, false).is_err());
    }
}
