//! The coordinator's metrics for `metrics_listen` (see `medfl_proto::ops`; nothing here
//! is secret beyond what `study status` shows an admin). The gRPC port also answers
//! `grpc.health.v1.Health`.
//!
//! Study figures are read from the store at each scrape, so they survive restarts;
//! byte counters live in the process.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use medfl_proto::ops::{family, label, reason_kind};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::store::ROUND_OPEN;

pub use crate::counters::Counters;

/// Renders every metric.
pub fn render(engine: &Engine) -> Result<String> {
    let mut out = String::new();
    study_families(engine, &mut out)?;
    site_and_process_families(engine, &mut out)?;
    Ok(out)
}

/// The per-study families, read from the store at each scrape.
fn study_families(engine: &Engine, out: &mut String) -> Result<()> {
    let studies = engine.store.studies()?;
    let (mut committed, mut failed, mut durations, mut updates, mut epsilon, mut state) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut refusals = std::collections::BTreeMap::<(String, String), u64>::new();
    for s in &studies {
        let l = format!("{{study=\"{}\",name=\"{}\"}}", label(&s.id), label(&s.name));
        let rounds = engine.store.rounds(&s.id)?;
        let done: Vec<_> = rounds.iter().filter(|r| r.committed).collect();
        committed.push((l.clone(), done.len() as f64));
        failed.push((
            l.clone(),
            rounds.iter().filter(|r| !r.committed && r.reason != ROUND_OPEN).count() as f64,
        ));
        let seconds = done
            .iter()
            .map(|r| r.finished_ms.saturating_sub(r.started_ms))
            .sum::<u64>() as f64
            / 1000.0;
        durations.push((l.clone(), seconds, done.len()));
        updates.push((
            l.clone(),
            done.iter().map(|r| r.contributors.len()).sum::<usize>() as f64,
        ));
        let spent = engine.store.epsilon_spent(&s.id)?;
        epsilon.push((l.clone(), spent));
        state.push((
            format!(
                "{{study=\"{}\",name=\"{}\",state=\"{:?}\"}}",
                label(&s.id),
                label(&s.name),
                s.state
            ),
            1.0,
        ));
        for r in engine.store.refusals(&s.id)? {
            *refusals.entry((s.id.clone(), reason_kind(&r.reason))).or_default() += 1;
        }
    }
    family(
        out,
        "medfl_rounds_committed_total",
        "counter",
        "Rounds committed, by study.",
        committed,
    );
    family(
        out,
        "medfl_rounds_failed_total",
        "counter",
        "Round attempts that did not commit (quorum, deadline, interruption), by study.",
        failed,
    );
    // A summary without quantiles: its _sum and _count.
    let _ = writeln!(
        out,
        "# HELP medfl_round_duration_seconds Wall time of committed rounds, from start to commit.\n# TYPE medfl_round_duration_seconds summary"
    );
    for (labels, sum, count) in &durations {
        let _ = writeln!(out, "medfl_round_duration_seconds_sum{labels} {sum}");
        let _ = writeln!(out, "medfl_round_duration_seconds_count{labels} {count}");
    }
    family(
        out,
        "medfl_round_updates_total",
        "counter",
        "Site updates in committed rounds, by study.",
        updates,
    );
    family(
        out,
        "medfl_epsilon_spent",
        "gauge",
        "Largest ε any ledger of the study has spent (site level: the study-wide ledger).",
        epsilon,
    );
    family(
        out,
        "medfl_study_state",
        "gauge",
        "1 for each study's current state.",
        state,
    );
    family(
        out,
        "medfl_refusals_total",
        "counter",
        "Work refused by sites, by study and the reason's first clause.",
        refusals
            .into_iter()
            .map(|((study, reason), n)| {
                (
                    format!("{{study=\"{}\",reason=\"{}\"}}", label(&study), label(&reason)),
                    n as f64,
                )
            })
            .collect(),
    );
    Ok(())
}

/// Sites registered and connected, and this process's counters.
fn site_and_process_families(engine: &Engine, out: &mut String) -> Result<()> {
    let sites = engine.sites()?;
    let connected = sites.iter().filter(|s| engine.is_connected(&s.name)).count();
    family(
        out,
        "medfl_sites_connected",
        "gauge",
        "Registered sites heard from within the liveness timeout.",
        vec![(String::new(), connected as f64)],
    );
    family(
        out,
        "medfl_sites_registered",
        "gauge",
        "Sites that ever registered.",
        vec![(String::new(), sites.len() as f64)],
    );
    let c = &engine.counters;
    family(
        out,
        "medfl_updates_received_total",
        "counter",
        "Updates (plain or masked) received by this process.",
        vec![(String::new(), c.updates_received.load(Ordering::Relaxed) as f64)],
    );
    family(
        out,
        "medfl_update_bytes_received_total",
        "counter",
        "Bytes of update values received by this process.",
        vec![(String::new(), c.update_bytes_received.load(Ordering::Relaxed) as f64)],
    );
    family(
        out,
        "medfl_model_bytes_sent_total",
        "counter",
        "Bytes of global model values sent to sites by this process.",
        vec![(String::new(), c.model_bytes_sent.load(Ordering::Relaxed) as f64)],
    );
    family(
        out,
        "medfl_updates_folded_total",
        "counter",
        "FedAvg updates folded into a round's sum straight from the chunks they arrived in.",
        vec![(String::new(), c.updates_folded.load(Ordering::Relaxed) as f64)],
    );
    family(
        out,
        "medfl_fold_passes_total",
        "counter",
        "Passes over a round's sum that folded them: updates that complete while one folds \
         queue and fold together in the next (updates folded / passes = the mean batch).",
        vec![(String::new(), c.fold_passes.load(Ordering::Relaxed) as f64)],
    );
    Ok(())
}

/// Serves `/metrics` and `/healthz` on `addr` until `shutdown`.
pub async fn serve(addr: SocketAddr, engine: Arc<Engine>, shutdown: CancellationToken) -> Result<()> {
    let render: medfl_proto::ops::Render = Arc::new(move || render(&engine).map_err(|e| format!("{e:#}")));
    medfl_proto::ops::serve(addr, render, shutdown)
        .await
        .with_context(|| format!("serve metrics on {addr}"))
}
