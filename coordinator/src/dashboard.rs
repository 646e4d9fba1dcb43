//! The dashboard: a web view of the federation served by the coordinator over HTTPS
//! (`dashboard_listen`), with the coordinator's certificate from the consortium CA.
//!
//! Who may look: admins and auditors, by one of two credentials.
//! - Their client certificate, presented in the TLS handshake (a browser with the
//!   consortium identity installed).
//! - A one-time sign-in link from `medfl dashboard` (the `Audit.DashboardLogin` RPC,
//!   called with their certificate over mTLS). The link's token works once within five
//!   minutes and opens a session (an `HttpOnly`, `Secure`, `SameSite=Strict` cookie) of
//!   eight hours, bound to the identity and role that asked for it.
//!
//! Either way the identity is re-checked against the revocation list on every request.
//! Auditors read everything; admins may also pause, resume and abort the studies they
//! control. The assets are embedded in the binary (no CDN) and the pages carry a strict
//! content security policy: scripts and styles from this origin only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use medfl_shared::chart::{RoundPoint, epsilon_chart, ledger_name, training_charts};
use medfl_shared::identity::{Identity, Role};
use medfl_shared::manifest::StudyManifest;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::engine::{Engine, now_ms};
use crate::error::ServiceError;
use crate::governance::issued_secs;

/// A sign-in link works once, within this time.
const LINK_TTL: Duration = Duration::from_secs(300);
/// A session lasts this long.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
const COOKIE: &str = "medfl_session";
/// The header a state-changing request must carry: a page of another origin cannot
/// set it without a CORS preflight, which this server never grants.
const ACTION_HEADER: &str = "x-medfl-action";
/// Audit entries one page shows at most.
const AUDIT_LIMIT: usize = 2000;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/dashboard.js");
const APP_CSS: &str = include_str!("dashboard/dashboard.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Who a credential stands for, and the issue time of the certificate behind it (for
/// the revocation check).
#[derive(Debug, Clone)]
struct Grant {
    identity: Identity,
    issued: i64,
    expires: Instant,
}

/// The dashboard's address and its sign-in links and sessions (in memory: a restart
/// signs everyone out).
#[derive(Debug)]
pub struct Dashboard {
    /// The address browsers use, e.g. `https://coordinator.example:8443`.
    pub url: String,
    /// SHA-256 of the dashboard certificate (DER), hex, for people to compare with
    /// what their browser shows.
    pub certificate_sha256: String,
    links: Mutex<HashMap<String, Grant>>,
    sessions: Mutex<HashMap<String, Grant>>,
}

fn secret() -> Result<String, ServiceError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ServiceError::Internal("no system randomness for the dashboard token".into()))?;
    Ok(medfl_shared::chainlog::to_hex(&bytes))
}

impl Dashboard {
    /// The dashboard at `url`, serving the certificate chain `cert_pem`.
    pub fn new(url: String, cert_pem: &str) -> Result<Self> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let leaf = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .context("the dashboard certificate file has no certificate")?
            .context("parse the dashboard certificate")?;
        Ok(Dashboard {
            url: url.trim_end_matches('/').to_string(),
            certificate_sha256: medfl_shared::sha256_hex(&leaf),
            links: Mutex::default(),
            sessions: Mutex::default(),
        })
    }

    /// A one-time sign-in link for `identity` (whose certificate is `cert_der`), and
    /// when it expires (ms since the epoch). Only admins and auditors get one.
    pub fn link(&self, identity: &Identity, cert_der: &[u8]) -> Result<(String, u64), ServiceError> {
        if !matches!(identity.role, Role::Admin | Role::Auditor) {
            return Err(ServiceError::PermissionDenied(format!(
                "{identity} may not use the dashboard: it is for admins and auditors"
            )));
        }
        let issued = issued_secs(cert_der)
            .ok_or_else(|| ServiceError::InvalidArgument("the caller's certificate has no validity period".into()))?;
        let token = secret()?;
        let mut links = self.links.lock().expect("links lock");
        let now = Instant::now();
        links.retain(|_, g| g.expires > now);
        links.insert(
            medfl_shared::sha256_hex(token.as_bytes()),
            Grant {
                identity: identity.clone(),
                issued,
                expires: now + LINK_TTL,
            },
        );
        Ok((
            format!("{}/login?token={token}", self.url),
            now_ms() + LINK_TTL.as_millis() as u64,
        ))
    }

    /// Spends a sign-in token: a new session id, or None for an unknown, used or
    /// expired token.
    fn redeem(&self, token: &str) -> Option<(String, Grant)> {
        let grant = self
            .links
            .lock()
            .expect("links lock")
            .remove(&medfl_shared::sha256_hex(token.as_bytes()))?;
        let now = Instant::now();
        if grant.expires <= now {
            return None;
        }
        let id = secret().ok()?;
        let grant = Grant {
            expires: now + SESSION_TTL,
            ..grant
        };
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, g| g.expires > now);
        sessions.insert(medfl_shared::sha256_hex(id.as_bytes()), grant.clone());
        Some((id, grant))
    }

    fn session(&self, id: &str) -> Option<Grant> {
        let sessions = self.sessions.lock().expect("sessions lock");
        sessions
            .get(&medfl_shared::sha256_hex(id.as_bytes()))
            .filter(|g| g.expires > Instant::now())
            .cloned()
    }

    fn end_session(&self, id: &str) {
        self.sessions
            .lock()
            .expect("sessions lock")
            .remove(&medfl_shared::sha256_hex(id.as_bytes()));
    }
}

// ---------------------------------------------------------------------- TLS listener

/// A connection's peer: its address and, when it presented one, its certificate's
/// identity.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    identity: Option<(Identity, i64)>,
}

/// The dashboard's connections, handshakes done (a client certificate is optional).
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some((stream, addr)) => {
                let identity = crate::tls::peer_identity(&stream);
                (stream, Peer { addr, identity })
            }
            // The accept loop stopped (shutdown): wait for the server to notice.
            None => std::future::pending().await,
        }
    }
    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            identity: None,
        })
    }
}

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

// ---------------------------------------------------------------------- server

#[derive(Clone)]
struct App {
    engine: Arc<Engine>,
    dashboard: Arc<Dashboard>,
}

/// Who is looking, and by which credential.
#[derive(Debug, Clone)]
struct Viewer {
    identity: Identity,
    via: &'static str,
}

/// Serves the dashboard on `listener` until `shutdown`, with `tls` from
/// [`crate::tls::dashboard_config`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    engine: Arc<Engine>,
    dashboard: Arc<Dashboard>,
    shutdown: CancellationToken,
) -> Result<()> {
    info!(addr = %listener.local_addr()?, url = %dashboard.url, "dashboard on HTTPS");
    let app = App { engine, dashboard };
    let api = Router::new()
        .route("/", get(index))
        .route("/api/overview", get(overview))
        .route("/api/studies/{id}", get(study))
        .route("/api/audit", get(audit))
        .route("/api/queries", get(queries))
        .route("/api/studies/{id}/{action}", post(control))
        .route("/logout", post(logout))
        .layer(axum::middleware::from_fn_with_state(app.clone(), authenticate));
    let router = Router::new()
        .route("/login", get(login))
        .route(
            "/assets/dashboard.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route("/assets/dashboard.css", get(|| async { asset("text/css", APP_CSS) }))
        .merge(api)
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(app);
    let local = listener.local_addr()?;
    let listener = TlsListener {
        rx: crate::tls::handshakes(listener, tls, shutdown.clone()),
        local,
    };
    axum::serve(listener, router.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serve the dashboard")
}

async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "private, max-age=300"),
        ],
        body,
    )
        .into_response()
}

fn json_response(value: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        value.to_string(),
    )
        .into_response()
}

/// An error for a person: its status and a sentence saying what to do.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, json_response(json!({ "error": message.into() }))).into_response()
}

fn service_error(e: ServiceError) -> Response {
    use tonic::Code;
    let status = match e.code() {
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition | Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refuse(status, e.to_string())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

const SIGN_IN: &str = "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>medfl dashboard: sign in</title>\
<link rel=\"stylesheet\" href=\"/assets/dashboard.css\"></head><body><main class=\"narrow\"><h1>medfl dashboard</h1>\
<p>MESSAGE</p><p>Sign in with your consortium client certificate (admin or auditor), or run\
<code>medfl dashboard --profile your-profile.toml</code> and open the one-time link it prints.</p></main></body></html>";

fn sign_in_page(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        SIGN_IN.replace("MESSAGE", &medfl_shared::chart::esc(message)),
    )
        .into_response()
}

/// Resolves the viewer from the TLS client certificate or the session cookie, refuses
/// everyone else, and re-checks revocation.
async fn authenticate(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    mut request: Request,
    next: Next,
) -> Response {
    let page = request.uri().path() == "/";
    let deny = |status, message: String| {
        if page {
            sign_in_page(status, &message)
        } else {
            refuse(status, message)
        }
    };
    let (identity, issued, via) = if let Some((identity, issued)) = peer.identity.clone() {
        (identity, issued, "certificate")
    } else if let Some(grant) = cookie(request.headers(), COOKIE).and_then(|id| app.dashboard.session(id)) {
        (grant.identity, grant.issued, "session")
    } else {
        return deny(
            StatusCode::UNAUTHORIZED,
            "You are not signed in, or your session ended.".into(),
        );
    };
    if app.engine.revocations.is_revoked(&identity, issued) {
        return deny(
            StatusCode::UNAUTHORIZED,
            format!("The certificate of {identity} was revoked; ask the consortium admin for a new enrolment."),
        );
    }
    if !matches!(identity.role, Role::Admin | Role::Auditor) {
        return deny(
            StatusCode::FORBIDDEN,
            format!("{identity} may not use the dashboard: it is for admins and auditors."),
        );
    }
    if request.method() == Method::POST {
        // Cross-site request forgery: a state change must come from this origin's script.
        let headers = request.headers();
        let same_origin = match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
            (Some(origin), Some(host)) => origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("https://"))
                .is_some_and(|o| Some(o) == host.to_str().ok()),
            (None, _) => true,
            _ => false,
        };
        if !headers.contains_key(ACTION_HEADER) || !same_origin {
            return refuse(
                StatusCode::FORBIDDEN,
                "state changes come from the dashboard's own page (x-medfl-action header, same origin)",
            );
        }
    }
    request.extensions_mut().insert(Viewer { identity, via });
    next.run(request).await
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

async fn login(State(app): State<App>, Query(q): Query<LoginQuery>) -> Response {
    let Some((id, grant)) = q.token.as_deref().and_then(|t| app.dashboard.redeem(t)) else {
        return sign_in_page(
            StatusCode::UNAUTHORIZED,
            "This sign-in link is unknown, already used or expired (links work once, for five minutes).",
        );
    };
    info!(identity = %grant.identity, "dashboard sign-in");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        SESSION_TTL.as_secs()
    );
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, "/".to_string()), (header::SET_COOKIE, cookie)],
    )
        .into_response()
}

async fn logout(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        app.dashboard.end_session(id);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict"),
        )],
        json_response(json!({ "signed_out": true })),
    )
        .into_response()
}

async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML).into_response()
}

/// Runs store reads off the reactor.
async fn blocking(f: impl FnOnce() -> Result<Value, ServiceError> + Send + 'static) -> Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => json_response(v),
        Ok(Err(e)) => service_error(e),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("dashboard task failed: {e}")),
    }
}

fn manifest_of(toml: &str) -> Option<StudyManifest> {
    StudyManifest::from_toml(toml).ok()
}

/// Federated-analytics queries, newest first: state, who answered, and each released
/// statistic as numbers with their noise's std and a server-drawn bar chart with
/// error bars.
async fn queries(State(app): State<App>) -> Response {
    blocking(move || {
        let mut out = Vec::new();
        let mut all = app.engine.store.queries()?;
        all.sort_by_key(|q| std::cmp::Reverse(q.created_ms));
        for q in all {
            let result: Option<medfl_shared::query::QueryResult> = serde_json::from_str::<Value>(&q.result_json)
                .ok()
                .and_then(|v| serde_json::from_value(v.get("total")?.clone()).ok());
            let charts: Vec<String> = result
                .iter()
                .flat_map(|r| r.statistics.iter())
                .map(|s| {
                    let labels = if s.labels.is_empty() {
                        vec![s.kind.clone()]
                    } else {
                        s.labels.clone()
                    };
                    let title = format!(
                        "{}{} (share {:.2} of ε)",
                        s.kind,
                        if s.columns.is_empty() {
                            String::new()
                        } else {
                            format!(" of {}", s.columns.join(" × "))
                        },
                        s.share
                    );
                    medfl_shared::chart::bar_chart(
                        &title,
                        &labels,
                        &s.values.iter().map(|v| v.value).collect::<Vec<_>>(),
                        &s.values.iter().map(|v| v.std).collect::<Vec<_>>(),
                    )
                })
                .collect();
            out.push(json!({
                "id": q.id, "name": q.name, "dataset": q.dataset, "state": q.state, "reason": q.reason,
                "created_by": q.created_by, "created_ms": q.created_ms, "epsilon": q.epsilon,
                "selected": q.selected, "answered": q.answered, "refused": q.refused,
                "result": result, "charts": charts,
            }));
        }
        Ok(json!({ "queries": out }))
    })
    .await
}

async fn overview(State(app): State<App>, axum::Extension(viewer): axum::Extension<Viewer>) -> Response {
    blocking(move || {
        let engine = &app.engine;
        let mut studies = Vec::new();
        let mut refusals_by_site: HashMap<String, Vec<Value>> = HashMap::new();
        for s in engine.store.studies()? {
            let manifest = manifest_of(&s.manifest_toml);
            let spent = engine.store.epsilon_spent(&s.id)?;
            for r in engine.store.refusals(&s.id)? {
                refusals_by_site.entry(r.site.clone()).or_default().push(json!({
                    "study": s.id, "round": r.round, "reason": r.reason, "at_ms": r.at_ms,
                }));
            }
            studies.push(json!({
                "id": s.id,
                "name": s.name,
                "state": s.state,
                "rounds_completed": s.rounds_completed,
                "rounds_total": s.rounds_total,
                "created_by": s.created_by,
                "created_ms": s.created_ms,
                "epsilon_spent": spent,
                "budget_epsilon": manifest.as_ref().and_then(|m| m.privacy.as_ref()).map(|p| p.budget_epsilon),
            }));
        }
        let sites: Vec<Value> = engine
            .sites()?
            .into_iter()
            .map(|s| {
                let last_seen = engine
                    .last_seen(&s.name)
                    .map(|t| now_ms().saturating_sub(t.elapsed().as_millis() as u64));
                let mut refusals = refusals_by_site.remove(&s.name).unwrap_or_default();
                refusals.sort_by_key(|r| std::cmp::Reverse(r["at_ms"].as_u64()));
                json!({
                    "name": s.name,
                    "connected": engine.is_connected(&s.name),
                    "last_seen_ms": last_seen,
                    "agent_version": s.agent_version,
                    "datasets": s.datasets.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
                    "refusals": refusals,
                })
            })
            .collect();
        Ok(json!({
            "viewer": { "identity": viewer.identity.to_string(), "role": viewer.identity.role.as_str(), "via": viewer.via },
            "now_ms": now_ms(),
            "studies": studies,
            "sites": sites,
            "revoked": engine.store.revocations()?,
        }))
    })
    .await
}

async fn study(
    State(app): State<App>,
    axum::Extension(viewer): axum::Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    blocking(move || study_view(&app.engine, &viewer, &id)).await
}

/// One study: its state, the open round, every round, the ledgers and the charts.
fn study_view(engine: &Engine, viewer: &Viewer, id: &str) -> Result<Value, ServiceError> {
    let view = engine.view(id)?;
    let s = &view.study;
    let manifest = manifest_of(&s.manifest_toml);
    let privacy = manifest.as_ref().and_then(|m| m.privacy.as_ref());
    let charges = engine.store.charges(id)?;
    let mut ledgers = std::collections::BTreeMap::<(&str, &str), Vec<(u32, f64)>>::new();
    for c in &charges {
        ledgers
            .entry((&c.site, &c.dataset))
            .or_default()
            .push((c.round, c.epsilon_after));
    }
    let epsilon = privacy.map(|p| {
        let points = charges
            .iter()
            .map(|c| (c.site.as_str(), c.dataset.as_str(), c.round, c.epsilon_after));
        epsilon_chart(points, p.delta, p.budget_epsilon)
    });
    let points: Vec<RoundPoint> = view
        .rounds
        .iter()
        .filter(|r| r.committed)
        .map(|r| RoundPoint {
            round: r.round,
            train_loss: r.mean_train_loss,
            eval: r.eval.as_ref().map(|e| (e.accuracy, e.loss)),
            clip_norm: r.clip_norm,
        })
        .collect();
    let can_control =
        viewer.identity.role == Role::Admin && crate::governance::may_control(s, &viewer.identity).is_ok();
    Ok(json!({
        "now_ms": now_ms(),
        "study": {
            "id": s.id, "name": s.name, "state": s.state, "reason": s.reason,
            "rounds_completed": s.rounds_completed, "rounds_total": s.rounds_total,
            "created_by": s.created_by, "created_ms": s.created_ms, "manifest_hash": s.manifest_hash,
        },
        "manifest_toml": s.manifest_toml,
        "strategy": manifest.as_ref().map(|m| m.strategy.kind),
        "secure_aggregation": manifest.as_ref().is_some_and(|m| m.secure_aggregation.is_some()),
        "privacy": privacy.map(|p| json!({
            "unit": p.unit, "budget_epsilon": p.budget_epsilon, "delta": p.delta,
            "accountant": "the tighter of RDP and PLD of the Poisson-subsampled Gaussian",
            "epsilon_method": charges.last().map(|c| c.method),
            // Record-level DP inside the sites' own trainers: their word, not medfl's.
            "enforcement": crate::store::enforcement(charges.iter().find_map(|c| c.declared_by.as_deref())),
        })),
        "open": view.open.as_ref().map(|o| json!({
            "round": o.round, "selected": o.selected, "received": o.received,
            "deadline_ms": o.deadline_ms, "min_sites": o.min_sites,
        })),
        "rounds": view.rounds,
        "refusals": view.refusals,
        "ledgers": ledgers.iter().map(|((site, dataset), points)| json!({
            "name": ledger_name(site, dataset), "site": site, "dataset": dataset,
            "spent": points.last().map(|p| p.1).unwrap_or(0.0),
            "rounds": points,
        })).collect::<Vec<_>>(),
        "charts": { "epsilon": epsilon, "training": training_charts(&points) },
        "can_control": can_control,
    }))
}

#[derive(Deserialize)]
struct AuditQuery {
    study: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    text: Option<String>,
}

async fn audit(State(app): State<App>, Query(q): Query<AuditQuery>) -> Response {
    blocking(move || {
        // The entries only: no checkpoint to sign for a page that polls.
        let study = q.study.as_deref().filter(|s| !s.is_empty());
        let entries = app.engine.store.audit_entries(study)?;
        let total = entries.len();
        let has = |field: &str, want: &Option<String>| {
            want.as_deref()
                .filter(|w| !w.is_empty())
                .is_none_or(|w| field.to_lowercase().contains(&w.to_lowercase()))
        };
        let matching: Vec<Value> = entries
            .iter()
            .rev()
            .filter(|e| has(&e.actor, &q.actor) && has(&e.action, &q.action) && has(&e.details, &q.text))
            .take(AUDIT_LIMIT)
            .map(|e| {
                json!({
                    "seq": e.seq, "at_ms": e.at_ms, "actor": e.actor, "action": e.action,
                    "study": e.study, "details": e.details, "hash": e.hash,
                })
            })
            .collect();
        Ok(json!({ "total": total, "limit": AUDIT_LIMIT, "entries": matching }))
    })
    .await
}

async fn control(
    State(app): State<App>,
    axum::Extension(viewer): axum::Extension<Viewer>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    if viewer.identity.role != Role::Admin {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "{} may only read: pausing, resuming and aborting are for admins",
                viewer.identity
            ),
        );
    }
    blocking(move || {
        let engine = &app.engine;
        engine.authorize_control(&id, &viewer.identity)?;
        let by = viewer.identity.to_string();
        let study = match action.as_str() {
            "pause" => engine.pause_study(&id, &by)?,
            "resume" => engine.resume_study(&id, &by)?,
            "abort" => engine.abort_study(&id, &by)?,
            other => {
                return Err(ServiceError::NotFound(format!(
                    "no action {other:?}: the dashboard can pause, resume or abort"
                )));
            }
        };
        info!(study = %id, %action, %by, "study control from the dashboard");
        Ok(json!({ "id": study.id, "state": study.state }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dashboard(url: &str) -> Dashboard {
        let (cert, _) = crate::pki::self_signed_web_certificate(&["localhost".into()], 1).expect("certificate");
        let d = Dashboard::new(url.into(), &cert).expect("dashboard");
        assert_eq!(d.url, "https://localhost:8443");
        assert_eq!(d.certificate_sha256.len(), 64);
        d
    }

    fn identity(role: Role, name: &str) -> Identity {
        Identity::new(role, name.parse().expect("name"))
    }

    #[test]
    fn links_work_once_and_open_a_session_for_their_identity() {
        let d = dashboard("https://localhost:8443/");
        let alice = identity(Role::Auditor, "alice");
        let grant = Grant {
            identity: alice.clone(),
            issued: 0,
            expires: Instant::now() + LINK_TTL,
        };
        d.links
            .lock()
            .expect("lock")
            .insert(medfl_shared::sha256_hex(b"t"), grant);
        let (session, g) = d.redeem("t").expect("first use");
        assert_eq!(g.identity, alice);
        assert!(d.redeem("t").is_none(), "a link works once");
        assert_eq!(d.session(&session).map(|g| g.identity), Some(alice));
        d.end_session(&session);
        assert!(d.session(&session).is_none());
        assert!(d.session("forged").is_none());
    }

    #[test]
    fn expired_links_and_site_identities_are_refused() {
        let d = dashboard("https://localhost:8443");
        let grant = Grant {
            identity: identity(Role::Admin, "bob"),
            issued: 0,
            expires: Instant::now(),
        };
        d.links
            .lock()
            .expect("lock")
            .insert(medfl_shared::sha256_hex(b"old"), grant);
        assert!(d.redeem("old").is_none());
        let err = d
            .link(&identity(Role::Site, "hospital-a"), b"")
            .expect_err("sites have no dashboard");
        assert!(err.to_string().contains("admins and auditors"), "{err}");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; medfl_session=abc; b=2"));
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
