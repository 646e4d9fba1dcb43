//! The agent's loop: register, long-poll for work, hand each
//! work item to [`crate::work`] (vet, train, release); reconnect with jittered
//! exponential backoff whenever the coordinator is away.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::unix_ms;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::policy::Policy;
pub use crate::settings::{AgentSettings, ConfigFile};

/// A failed call to the coordinator in one line (see [`medfl_proto::reach`]).
fn explain(status: &tonic::Status, target: &str) -> String {
    medfl_proto::reach::explain(status, target)
        .map(|(line, _)| line)
        .unwrap_or_else(|| status.message().to_string())
}

/// Backoff between reconnection attempts: 0.5 s doubling to 30 s, with ±50 % jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    rng: StdRng,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_millis(500),
            rng: StdRng::seed_from_u64(unix_ms(SystemTime::now())),
        }
    }
    fn reset(&mut self) {
        self.next = Duration::from_millis(500);
    }
    fn step(&mut self) -> Duration {
        let jitter = self.rng.random_range(0.5..1.5);
        let wait = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(Duration::from_secs(30));
        wait
    }
}

/// Runs the agent until `shutdown` fires.
pub async fn run(settings: AgentSettings, shutdown: CancellationToken) -> Result<()> {
    crate::device::select(settings.device);
    let profile = settings.profile();
    let mut client = SiteClient::new(profile.channel(settings.coordinator.as_deref())?);
    let settings = Arc::new(settings);
    // The metrics endpoint lives as long as this function (the guard cancels it when the
    // agent stops, returns or is dropped), so it never keeps the store open after.
    let metrics_stop = shutdown.child_token();
    let _metrics_guard = metrics_stop.clone().drop_guard();
    if let Some(addr) = settings.metrics_listen {
        let for_render = settings.clone();
        let render: medfl_proto::ops::Render = Arc::new(move || render_metrics(&for_render));
        let stop = metrics_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = medfl_proto::ops::serve(addr, render, stop).await {
                warn!(error = %e, %addr, "metrics endpoint stopped");
            }
        });
    }
    let mut backoff = Backoff::new();
    let mut next_renewal_try = std::time::Instant::now();
    let site = profile.file.name.clone();
    let target = settings
        .coordinator
        .clone()
        .unwrap_or_else(|| profile.file.coordinator.clone());
    info!(%site, coordinator = %target, "agent starting");
    'connect: while !shutdown.is_cancelled() {
        let register = pb::RegisterRequest {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            datasets: settings
                .datasets
                .iter()
                .map(|d| pb::DatasetInfo {
                    name: d.config.name.clone(),
                    columns: d
                        .columns
                        .iter()
                        .map(|(c, _)| c.clone())
                        .filter(|c| Some(c) != d.config.person_id.as_ref())
                        .collect(),
                })
                .collect(),
        };
        let names: Vec<&str> = register.datasets.iter().map(|d| d.name.as_str()).collect();
        settings.egress.record(
            "register",
            "",
            0,
            &prost::Message::encode_to_vec(&register),
            None,
            serde_json::json!({"datasets": names}),
        )?;
        if let Err(status) = client.register(register).await {
            let wait = backoff.step();
            warn!(why = %explain(&status, &target), retry_in = ?wait, "register failed");
            tokio::select! { _ = tokio::time::sleep(wait) => continue 'connect, _ = shutdown.cancelled() => break 'connect }
        }
        backoff.reset();
        info!("registered with the coordinator");
        loop {
            let current = settings.profile();
            if std::time::Instant::now() >= next_renewal_try && crate::renew::due(&current, settings.renew_before) {
                match crate::renew::renew(&mut client, &current, &settings.egress).await {
                    Ok(renewed) => {
                        let channel = renewed.channel(settings.coordinator.as_deref())?;
                        match settings.set_profile(renewed) {
                            Ok(()) => {
                                client = SiteClient::new(channel);
                                info!("certificate renewed; new connections use it");
                            }
                            Err(e) => warn!(
                                error = format!("{e:#}"),
                                "the renewed certificate is unusable; keeping the current one"
                            ),
                        }
                    }
                    Err(e) => {
                        next_renewal_try = std::time::Instant::now() + Duration::from_secs(600);
                        warn!(
                            error = format!("{e:#}"),
                            "certificate renewal failed; retrying in 10 minutes"
                        );
                    }
                }
            }
            let polled = tokio::select! {
                r = client.poll_work(pb::PollWorkRequest { wait_ms: 20_000 }) => r,
                _ = shutdown.cancelled() => break 'connect,
            };
            match polled {
                Ok(resp) => {
                    if let Some(work) = resp.into_inner().work {
                        tokio::select! {
                            r = crate::work::handle_work(&mut client, &settings, work) => if let Err(e) = r {
                                warn!(error = format!("{e:#}"), "work item failed");
                            },
                            _ = shutdown.cancelled() => break 'connect,
                        }
                    }
                }
                Err(status) => {
                    let wait = backoff.step();
                    warn!(why = %explain(&status, &target), retry_in = ?wait, "lost the coordinator");
                    tokio::select! { _ = tokio::time::sleep(wait) => continue 'connect, _ = shutdown.cancelled() => break 'connect }
                }
            }
        }
    }
    info!("agent stopped");
    Ok(())
}

/// The agent's metrics: what left the site by kind (from the egress log's writes),
/// refusals by reason, and the ε each dataset's ledger has spent at the policy's δ.
fn render_metrics(settings: &AgentSettings) -> Result<String, String> {
    use medfl_proto::ops::{family, label};
    let mut out = String::new();
    let totals = settings.egress.totals();
    family(
        &mut out,
        "medfl_agent_egress_messages_total",
        "counter",
        "Messages that left the site since the agent started, by kind (each first written to the egress log).",
        totals
            .iter()
            .map(|(k, t)| (format!("{{kind=\"{k}\"}}"), t.0 as f64))
            .collect(),
    );
    family(
        &mut out,
        "medfl_agent_egress_bytes_total",
        "counter",
        "Payload bytes that left the site since the agent started, by kind.",
        totals
            .iter()
            .map(|(k, t)| (format!("{{kind=\"{k}\"}}"), t.1 as f64))
            .collect(),
    );
    family(
        &mut out,
        "medfl_agent_refusals_total",
        "counter",
        "Work this site refused since the agent started, by the reason's first clause.",
        settings
            .egress
            .refusals()
            .iter()
            .map(|(r, n)| (format!("{{reason=\"{}\"}}", label(r)), *n as f64))
            .collect(),
    );
    let mut spent = Vec::new();
    for d in &settings.datasets {
        let eps = settings
            .ledger
            .spent(&d.config.ledger_name(), settings.policy.delta)
            .map_err(|e| e.to_string())?;
        spent.push((format!("{{dataset=\"{}\"}}", label(&d.config.name)), eps));
    }
    family(
        &mut out,
        "medfl_agent_epsilon_spent",
        "gauge",
        "ε this site's ledger has spent on each dataset, across all studies, at the policy's δ.",
        spent,
    );
    Ok(out)
}
