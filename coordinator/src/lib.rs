//! The medfl coordinator: a gRPC server over mutual TLS that runs training studies
//! across hospital sites: studies and their manifests, the round engine, streaming
//! FedAvg aggregation, the sled store, and the consortium PKI.
//!
//! It never sees patient rows: sites send model updates only. It never trusts a
//! message for who is calling: roles come from verified certificates (see [`auth`]).
#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod counters;
pub mod dashboard;
pub mod engine;
pub mod error;
pub mod governance;
pub mod metrics;
pub mod pki;
pub mod revocation;
pub mod secagg;
pub mod service;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use medfl_proto::transport::Profile;
use medfl_proto::v1::{
    admin_server::AdminServer, audit_server::AuditServer, enrollment_server::EnrollmentServer, site_server::SiteServer,
};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::{Access, RoleGate};
use crate::engine::{Engine, EngineConfig};
use crate::service::{AdminService, AuditService, EnrollmentService, SiteService};
use crate::store::Store;

/// HTTP/2 flow-control windows: per stream, and per connection.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 8 << 20;

/// `coordinator.toml`. Relative paths are relative to the file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address to listen on, e.g. `0.0.0.0:7443`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory of the sled store.
    pub store: PathBuf,
    /// The coordinator's identity bundle (`profile.toml` or its directory).
    pub profile: PathBuf,
    /// Seconds without contact after which a site is not selected.
    #[serde(default = "default_liveness")]
    pub liveness_timeout_secs: u64,
    /// Memory for decoding uploads in flight, MiB.
    #[serde(default = "default_staging")]
    pub staging_budget_mib: u64,
    /// sled page cache, MiB.
    #[serde(default = "default_cache")]
    pub store_cache_mib: u64,
    /// Seconds to settle the open round and flush on shutdown.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// The consortium CA directory (`ca.pem`, `ca.key`): with it the coordinator
    /// enrols sites (`medfl site invite`) and renews their certificates.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Days a certificate renewed by a site stays valid.
    #[serde(default = "default_certificate_days")]
    pub certificate_days: u32,
    /// Memory a round of a robust strategy (median, trimmed mean, Krum) may hold: it
    /// keeps every update of the round, N × model bytes. MiB.
    #[serde(default = "default_robust_memory")]
    pub robust_memory_mib: u64,
    /// Address for `/metrics` (Prometheus) and `/healthz` over plain HTTP, e.g.
    /// `127.0.0.1:9464`; absent means none. Keep it inside the operator's network.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Address for the dashboard (HTTPS with the coordinator's certificate), e.g.
    /// `0.0.0.0:8443`; absent means none.
    #[serde(default)]
    pub dashboard_listen: Option<SocketAddr>,
    /// The dashboard's address as browsers reach it (a name in the coordinator's
    /// certificate), e.g. `https://coordinator.example.org:8443`. Sign-in links use it.
    /// Default: `https://localhost:PORT`.
    #[serde(default)]
    pub dashboard_url: Option<String>,
    /// The dashboard's certificate chain and key (PEM): a web certificate your browsers
    /// trust (ECDSA or RSA; browsers do not trust the consortium CA, nor take Ed25519 keys).
    /// Without them the coordinator makes a self-signed P-256 certificate in the store
    /// directory on first start and `medfl dashboard` prints its fingerprint.
    #[serde(default)]
    pub dashboard_cert: Option<PathBuf>,
    #[serde(default)]
    pub dashboard_key: Option<PathBuf>,
}

fn default_robust_memory() -> u64 {
    4096
}

fn default_certificate_days() -> u32 {
    30
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}
fn default_liveness() -> u64 {
    30
}
fn default_staging() -> u64 {
    64
}
fn default_cache() -> u64 {
    64
}
fn default_grace() -> u64 {
    10
}

/// A validated configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub store: PathBuf,
    pub profile: Profile,
    pub engine: EngineConfig,
    pub store_cache_bytes: u64,
    pub grace: Duration,
    pub ca: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub dashboard_listen: Option<SocketAddr>,
    pub dashboard_url: Option<String>,
    /// The dashboard's certificate and key files, when the operator gives them.
    pub dashboard_tls: Option<(PathBuf, PathBuf)>,
}

impl Settings {
    /// Reads and validates `coordinator.toml`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let file: ConfigFile = toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_file(file, base)
    }

    pub fn from_file(file: ConfigFile, base: &Path) -> Result<Self> {
        let profile = Profile::load(&base.join(&file.profile)).context("load the coordinator's profile")?;
        if profile.file.role != "coordinator" {
            anyhow::bail!(
                "profile {} is for role {:?}; the coordinator needs a coordinator certificate",
                file.profile.display(),
                profile.file.role
            );
        }
        if file.liveness_timeout_secs == 0 {
            anyhow::bail!("liveness_timeout_secs must be at least 1");
        }
        Ok(Settings {
            listen: file.listen,
            store: base.join(&file.store),
            profile,
            engine: EngineConfig {
                liveness_timeout: Duration::from_secs(file.liveness_timeout_secs),
                staging_budget_bytes: file.staging_budget_mib << 20,
                certificate_days: file.certificate_days.max(1),
                robust_memory_bytes: file.robust_memory_mib << 20,
            },
            store_cache_bytes: file.store_cache_mib << 20,
            grace: Duration::from_secs(file.shutdown_grace_secs),
            ca: file.ca.map(|p| base.join(p)),
            metrics_listen: file.metrics_listen,
            dashboard_listen: file.dashboard_listen,
            dashboard_tls: match (file.dashboard_cert, file.dashboard_key) {
                (Some(cert), Some(key)) => Some((base.join(cert), base.join(key))),
                (None, None) => None,
                _ => anyhow::bail!("dashboard_cert and dashboard_key go together: give both or neither"),
            },
            dashboard_url: file.dashboard_url,
        })
    }
}

/// The dashboard's certificate chain and key (PEM): the operator's files, or a
/// self-signed P-256 certificate kept in the store directory (made on first start, for
/// localhost, the loopback addresses and the host of `url`).
fn dashboard_certificate(settings: &Settings, url: &str) -> Result<(String, String)> {
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
    if let Some((cert, key)) = &settings.dashboard_tls {
        return Ok((read(cert)?, read(key)?));
    }
    let (cert, key) = (
        settings.store.join("dashboard-cert.pem"),
        settings.store.join("dashboard-key.pem"),
    );
    if cert.exists() && key.exists() {
        return Ok((read(&cert)?, read(&key)?));
    }
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let host = url
        .trim_start_matches("https://")
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    if !host.is_empty() && !names.iter().any(|n| n == host) {
        names.push(host.to_string());
    }
    let (cert_pem, key_pem) = pki::self_signed_web_certificate(&names, 825)?;
    std::fs::create_dir_all(&settings.store)?;
    pki::write_secret(&key, &key_pem)?;
    std::fs::write(&cert, &cert_pem).with_context(|| format!("write {}", cert.display()))?;
    info!(cert = %cert.display(), "made a self-signed dashboard certificate; set dashboard_cert and dashboard_key for one your browsers trust");
    Ok((cert_pem, key_pem))
}

/// Serves until `shutdown` fires, then stops taking RPCs, settles the open rounds
/// (they are recorded as interrupted and resume on restart) and flushes the store.
pub async fn run(listener: TcpListener, settings: Settings, shutdown: CancellationToken) -> Result<()> {
    let store = Store::open(&settings.store, settings.store_cache_bytes)
        .with_context(|| format!("open sled store {}", settings.store.display()))?;
    let ca = match &settings.ca {
        Some(dir) => {
            Some(pki::Ca::load(dir).with_context(|| format!("load the consortium CA from {}", dir.display()))?)
        }
        None => None,
    };
    let tracker = TaskTracker::new();
    let engine = Engine::new(
        store.clone(),
        settings.engine.clone(),
        ca,
        tracker.clone(),
        shutdown.clone(),
    )
    .context("load the revocation list")?;
    let tls = tls::server_config(&settings.profile, engine.revocations.clone())?;
    let gate = |access| RoleGate::new(access, engine.revocations.clone());
    engine.resume_running().context("resume running studies")?;
    info!(addr = %listener.local_addr()?, "coordinator listening (mTLS, TLS 1.3)");

    if let Some(addr) = settings.metrics_listen {
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = metrics::serve(addr, engine, shutdown).await {
                tracing::error!(error = format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    let dashboard = match settings.dashboard_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind the dashboard address {addr}"))?;
            let port = listener.local_addr()?.port();
            let url = settings
                .dashboard_url
                .clone()
                .unwrap_or_else(|| format!("https://localhost:{port}"));
            let (cert, key) = dashboard_certificate(&settings, &url)?;
            let tls = tls::dashboard_config(&settings.profile, engine.revocations.clone(), &cert, &key)?;
            let dashboard = Arc::new(dashboard::Dashboard::new(url, &cert)?);
            let (engine, shutdown, d) = (engine.clone(), shutdown.clone(), dashboard.clone());
            tracker.spawn(async move {
                if let Err(e) = dashboard::serve(listener, tls, engine, d, shutdown).await {
                    tracing::error!(error = format!("{e:#}"), "dashboard stopped");
                }
            });
            Some(dashboard)
        }
        None => None,
    };
    // grpc.health.v1 for probes and load balancers: the server ("") and each service
    // serve while the coordinator runs (no certificate needed, as for enrolment).
    let (health, health_service) = tonic_health::server::health_reporter();
    for service in [
        "",
        "medfl.v1.Site",
        "medfl.v1.Admin",
        "medfl.v1.Audit",
        "medfl.v1.Enrollment",
    ] {
        health
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    let incoming = tls::incoming(listener, tls, engine.revocations.clone(), shutdown.clone());
    tonic::transport::Server::builder()
        // HTTP/2's default 64 KiB windows stall a model upload every 64 KiB; these let a
        // site keep a few chunks in flight (the staging budget still bounds memory).
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(SiteServer::with_interceptor(
            SiteService { engine: engine.clone() },
            gate(Access::SITE),
        ))
        .add_service(AdminServer::with_interceptor(
            AdminService { engine: engine.clone() },
            gate(Access::ADMIN),
        ))
        .add_service(AuditServer::with_interceptor(
            AuditService {
                engine: engine.clone(),
                dashboard,
            },
            gate(Access::AUDIT),
        ))
        .add_service(health_service)
        .add_service(EnrollmentServer::with_interceptor(
            EnrollmentService { engine: engine.clone() },
            gate(Access::ENROLLMENT),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await
        .context("serve gRPC")?;

    tracker.close();
    if tokio::time::timeout(settings.grace, tracker.wait()).await.is_err() {
        warn!(grace = ?settings.grace, "study drivers did not settle within the grace period");
    }
    store.flush().context("flush store")?;
    info!("coordinator stopped");
    Ok(())
}
