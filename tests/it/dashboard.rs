//! The coordinator's dashboard against a real federation: headless Chromium signs in
//! with a one-time link and must show the ledger's ε values in the chart and the
//! table, and every round in the round table (it saves a screenshot); then the HTTPS
//! API itself: who may look (links, sessions, client certificates, revocation) and
//! who may pause, resume and abort.
//!
//! Chromium is Debian's `chromium` (`.ci/run` installs it), or `MEDFL_CHROMIUM`. On a
//! machine without one, the browser part is skipped with a loud message naming the
//! package (as it is with `MEDFL_SKIP_BROWSER=1`); under `CI=true` it always runs, and
//! a missing Chromium fails the test.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Trusts exactly one certificate: the dashboard's self-signed one.
#[derive(Debug)]
struct Pinned(Vec<u8>);

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.0.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the dashboard's certificate".into()))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// One HTTPS/1.1 request to the dashboard at `base`, optionally with a consortium
/// client certificate.
async fn https(
    base: &str,
    cert_der: &[u8],
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    client: Option<&Profile>,
) -> Reply {
    let authority = base.trim_start_matches("https://");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned(cert_der.to_vec())));
    let config = match client {
        Some(p) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(p.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client certificate"),
                PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).expect("client key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(authority).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("tls handshake");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn json(reply: &Reply) -> serde_json::Value {
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body))
}

/// The session cookie a sign-in link set (`name=value`).
fn session_cookie(reply: &Reply) -> String {
    reply
        .head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string()
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("MEDFL_CHROMIUM") {
        return Some(path.into());
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
}

/// Runs headless Chromium on `url`, trusting only the certificate whose SPKI hashes to
/// `spki`; returns its stdout (the DOM with `--dump-dom`).
fn run_chromium(binary: &Path, profile_dir: &Path, spki: &str, url: &str, extra: &[&str]) -> String {
    run_chromium_at_home(binary, None, profile_dir, spki, url, extra)
}

/// [`run_chromium`] with `HOME` set to `home`, whose `.pki/nssdb` is where Chromium
/// on Linux keeps client certificates.
fn run_chromium_at_home(
    binary: &Path,
    home: Option<&Path>,
    profile_dir: &Path,
    spki: &str,
    url: &str,
    extra: &[&str],
) -> String {
    let mut command = std::process::Command::new(binary);
    if let Some(home) = home {
        command.env("HOME", home);
    }
    let output = command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,2400",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Where `.ci/run` puts the Chromium policy that picks a client certificate issued by
/// the consortium CA for the loopback dashboard without asking (`AutoSelectCertificateForUrls`).
const CERTIFICATE_POLICY: &str = "/etc/chromium/policies/managed/medfl-client-certificates.json";

fn tool(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e} (.ci/run installs libnss3-tools and openssl)"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Opens the dashboard in headless Chromium holding `bundle`'s certificate and key in
/// its NSS database (as a person would import a PKCS#12 file), with no sign-in link;
/// returns the DOM. None (after saying why) when the selection policy is missing
/// outside CI.
fn open_with_client_certificate(binary: &Path, bundle: &Path, spki: &str, url: &str) -> Option<String> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !Path::new(CERTIFICATE_POLICY).exists() {
        assert!(
            !in_ci,
            "CI=true and no {CERTIFICATE_POLICY}: .ci/run writes it so Chromium picks the client certificate"
        );
        eprintln!(
            "\n*** SKIPPED: the dashboard's client-certificate sign-in in Chromium did not run: no {CERTIFICATE_POLICY} ***\n\
             *** (see .ci/run for its content). Under CI=true this is a failure, not a skip. ***\n"
        );
        return None;
    }
    let home = tempfile::tempdir().expect("tempdir");
    let nssdb = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).expect("nssdb");
    let db = format!("sql:{}", nssdb.display());
    let p12 = home.path().join("identity.p12");
    let file = |name: &str| bundle.join(name).to_str().expect("utf8").to_string();
    tool("certutil", &["-N", "-d", &db, "--empty-password"]);
    tool(
        "openssl",
        &[
            "pkcs12",
            "-export",
            "-in",
            &file("cert.pem"),
            "-inkey",
            &file("key.pem"),
            "-out",
            p12.to_str().expect("utf8"),
            "-passout",
            "pass:",
        ],
    );
    tool("pk12util", &["-i", p12.to_str().expect("utf8"), "-d", &db, "-W", ""]);
    let profile = tempfile::tempdir().expect("tempdir");
    Some(run_chromium_at_home(
        binary,
        Some(home.path()),
        profile.path(),
        spki,
        url,
        &["--dump-dom"],
    ))
}

/// Creates and starts the long study (once) and waits until its open round has the
/// three real sites' updates and waits on the laggard. Returns its id.
async fn start_long(fed: &mut Federation, manifest: &str, id: &mut Option<String>) -> String {
    let id = match id {
        Some(id) => id.clone(),
        None => {
            let created = fed.create_study(manifest).await.expect("create");
            fed.start_study(&created).await.expect("start");
            *id = Some(created.clone());
            created
        }
    };
    for _ in 0..300 {
        let status = fed.status(&id).await.expect("status");
        if status
            .open_round
            .as_ref()
            .is_some_and(|o| o.selected.len() == 4 && o.received.len() == 3)
        {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("round 1 of the long study never had 3 of 4 updates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_real_ledger_and_rounds_and_lets_only_admins_act() {
    let (table, _, tables) = iid_site_tables(3);
    let mut fed = Federation::builder()
        .tables(tables)
        .agent_policy("max_epsilon = 1000.0")
        .dashboard()
        .build()
        .await
        .expect("federation starts");
    let base = fed.dashboard_url.clone().expect("dashboard url");
    let privacy = "sample_rate = 0.2\nsteps_per_round = 3\nnoise_multiplier = 1.5\nbudget_epsilon = 20.0";
    let (id, status) = complete_study(&mut fed, &dp_manifest(&table, 4, 3, privacy), 3).await;
    let mut audit =
        pb::audit_client::AuditClient::new(fed.profile("auditor").expect("profile").channel(None).expect("channel"));
    let ledger = audit
        .get_ledger(pb::LedgerRequest {
            study_id: id.clone(),
            site: String::new(),
            dataset: String::new(),
        })
        .await
        .expect("ledger")
        .into_inner();
    assert_eq!(ledger.charges.len(), 12, "3 sites × 4 rounds");
    // A cohort query: its released counts appear with error bars.
    let query_id = fed
        .create_query(
            "name = \"large tumours\"\ndataset = \"breast_cancer\"\nfilter = \"radius_mean > 15\"\nepsilon = 1.0\n\n[[statistics]]\nkind = \"histogram\"\ncolumns = [\"malignant\"]\nedges = [[0, 1, 2]]\n",
        )
        .await
        .expect("create query");
    let query = fed.wait_query(&query_id, Duration::from_secs(60)).await.expect("query");
    assert_eq!(query.state, "released", "{query:?}");
    let cert_pem = std::fs::read_to_string(fed.dir.join("coordinator/store/dashboard-cert.pem")).expect("cert");
    let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .expect("der")
        .to_vec();

    let long = dp_manifest(&table, 200, 3, privacy).replace("budget_epsilon = 20.0", "budget_epsilon = 1000.0");
    let _laggard = spawn_laggard(&fed, table.columns.clone());
    let mut long_id = None;

    // ---- headless Chromium
    // Under CI the browser part always runs: a missing Chromium fails the test there.
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    match (chromium(), std::env::var("MEDFL_SKIP_BROWSER").as_deref()) {
        (None, _) if in_ci => panic!(
            "CI=true and no Chromium found: .ci/run installs Debian's chromium (apt-get install chromium), \
             or set MEDFL_CHROMIUM to a Chromium binary"
        ),
        (_, Ok("1")) if !in_ci => eprintln!("MEDFL_SKIP_BROWSER=1: the browser part of this test did not run"),
        (None, _) => eprintln!(
            "\n*** SKIPPED: the browser part of the dashboard test did not run: no Chromium found.  ***\n\
             *** Install Debian's package `chromium` (apt-get install chromium), or set MEDFL_CHROMIUM ***\n\
             *** to a Chromium binary. Under CI=true this is a failure, not a skip.                   ***\n"
        ),
        (Some(binary), _) => {
            let key_pem = std::fs::read_to_string(fed.dir.join("coordinator/store/dashboard-key.pem")).expect("key");
            let key = rcgen::KeyPair::from_pem(&key_pem).expect("key");
            let digest = medfl_shared::sha256_hex(&rcgen::PublicKeyData::subject_public_key_info(&key));
            let digest: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&digest[2 * i..2 * i + 2], 16).expect("hex"))
                .collect();
            let spki = base64(&digest);
            let browser_dir = tempfile::tempdir().expect("tempdir");
            let link = fed.dashboard_link("auditor").await.expect("link");
            let dom = run_chromium(&binary, browser_dir.path(), &spki, &link, &["--dump-dom"]);
            assert!(dom.contains("auditor/auditor (auditor, by session)"), "{dom}");
            // The query's result: a bar chart with an error bar per released cell.
            let result = dom
                .split(&format!("data-query-result=\"{query_id}\""))
                .nth(1)
                .and_then(|rest| rest.split("</svg>").next())
                .unwrap_or_else(|| panic!("no result of {query_id} in {dom}"));
            assert_eq!(result.matches("class=\"error-bar\"").count(), 2, "{result}");
            // The ε chart: a point per charge, with the ledger's value.
            let chart = dom
                .split("id=\"epsilon-chart\"")
                .nth(1)
                .and_then(|rest| rest.split("</svg>").next())
                .unwrap_or_else(|| panic!("no ε chart in {dom}"));
            for c in &ledger.charges {
                let point = format!("{} / {} round {}: {:.4}", c.site, c.dataset, c.round, c.epsilon_after);
                assert!(chart.contains(&point), "the chart lacks {point:?}: {chart}");
            }
            assert!(chart.contains("budget 20.0000"), "{chart}");
            // The ledger table: each site's ε after the last round.
            for site in &fed.site_names {
                let last = ledger
                    .charges
                    .iter()
                    .filter(|c| &c.site == site)
                    .map(|c| c.epsilon_after)
                    .fold(0.0, f64::max);
                let marker = format!("data-ledger=\"{site} / breast_cancer\" data-epsilon=\"");
                let shown: f64 = dom
                    .split(&marker)
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no ledger row for {site}"));
                assert!(
                    (shown - last).abs() <= 1e-12 * last,
                    "{site}: shown {shown}, ledger {last}"
                );
                assert!(last > 0.0);
            }
            // The round table: every committed round with its contributors.
            for r in status.rounds.iter().filter(|r| r.committed) {
                let row = format!("data-round=\"{}\" data-committed=\"true\"", r.round);
                let cells = dom
                    .split(&row)
                    .nth(1)
                    .and_then(|rest| rest.split("</tr>").next())
                    .unwrap_or_else(|| panic!("no row for round {}", r.round));
                assert!(cells.contains(&r.contributors.join(", ")), "{cells}");
                assert!(cells.contains(&format!("<td>{}</td>", r.num_examples)), "{cells}");
            }
            let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
            let link = fed.dashboard_link("admin").await.expect("link");
            let second = tempfile::tempdir().expect("tempdir");
            run_chromium(
                &binary,
                second.path(),
                &spki,
                &link,
                &[&format!("--screenshot={}", shot.display())],
            );
            let png = std::fs::read(&shot).expect("the screenshot");
            assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "{} bytes", png.len());
            eprintln!("dashboard screenshot: {}", shot.display());

            // A P-256 admin certificate in the browser signs in by itself: no link.
            if let Some(dom) = open_with_client_certificate(&binary, &fed.pki.join("admin"), &spki, &base) {
                assert!(dom.contains("admin/admin (admin, by certificate)"), "{dom}");
            }

            // The live round: a long study with a site that never delivers keeps round 1
            // open with 3 of 4 updates in; the page lists who is still training.
            start_long(&mut fed, &long, &mut long_id).await;
            let link = fed.dashboard_link("auditor").await.expect("link");
            let third = tempfile::tempdir().expect("tempdir");
            let live_shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-live.png");
            run_chromium(
                &binary,
                third.path(),
                &spki,
                &link,
                &[&format!("--screenshot={}", live_shot.display())],
            );
            let link = fed.dashboard_link("auditor").await.expect("link");
            let fourth = tempfile::tempdir().expect("tempdir");
            let dom = run_chromium(&binary, fourth.path(), &spki, &link, &["--dump-dom"]);
            let current = dom
                .split("id=\"current-round\"")
                .nth(1)
                .and_then(|rest| rest.split("</div>").next())
                .unwrap_or_else(|| panic!("no current round in {dom}"));
            assert!(current.contains("Current round 1"), "{current}");
            assert!(current.contains("3 of 4 updates received"), "{current}");
            assert!(current.contains("hospital-slow — training"), "{current}");
            for site in &fed.site_names {
                assert!(current.contains(&format!("{site} — update received")), "{current}");
            }
            eprintln!("live round screenshot: {}", live_shot.display());
        }
    }

    // ---- the HTTPS API: who may look
    let anonymous = https(&base, &cert_der, "GET", "/", &[], None).await;
    assert_eq!(anonymous.status, 401);
    assert!(
        anonymous.body.contains("medfl dashboard --profile"),
        "{}",
        anonymous.body
    );
    assert!(anonymous.head.contains("content-security-policy: default-src 'none'"));
    let forged = https(&base, &cert_der, "GET", "/login?token=00ff", &[], None).await;
    assert_eq!(forged.status, 401);
    assert!(
        forged.body.contains("unknown, already used or expired"),
        "{}",
        forged.body
    );

    let link = fed.dashboard_link("auditor").await.expect("link");
    let path = &link[base.len()..];
    let signed_in = https(&base, &cert_der, "GET", path, &[], None).await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.head);
    assert!(
        signed_in.head.contains("HttpOnly; Secure; SameSite=Strict"),
        "{}",
        signed_in.head
    );
    let auditor = session_cookie(&signed_in);
    assert_eq!(
        https(&base, &cert_der, "GET", path, &[], None).await.status,
        401,
        "a link works once"
    );
    let cookie = [("Cookie", auditor.as_str())];
    let overview = https(&base, &cert_der, "GET", "/api/overview", &cookie, None).await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    let overview = json(&overview);
    assert_eq!(overview["viewer"]["identity"], "auditor/auditor");
    let listed = overview["studies"].as_array().expect("studies");
    let first = listed
        .iter()
        .find(|s| s["id"] == id.as_str())
        .expect("the first study is listed");
    assert_eq!(first["state"], "completed");
    assert_eq!(first["rounds_completed"], 4);
    assert_eq!(
        overview["sites"].as_array().map(Vec::len),
        Some(4),
        "three hospitals and the laggard"
    );
    let study = json(&https(&base, &cert_der, "GET", &format!("/api/studies/{id}"), &cookie, None).await);
    assert_eq!(study["can_control"], false);
    assert_eq!(study["ledgers"].as_array().map(Vec::len), Some(3));
    let missing = https(&base, &cert_der, "GET", "/api/studies/s-nope", &cookie, None).await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(
        json(&missing)["error"].as_str().is_some_and(|e| e.contains("s-nope")),
        "{}",
        missing.body
    );
    let audit_page = json(
        &https(
            &base,
            &cert_der,
            "GET",
            "/api/audit?action=budget.charge",
            &cookie,
            None,
        )
        .await,
    );
    assert_eq!(
        audit_page["entries"].as_array().map(Vec::len),
        Some(15),
        "12 rounds' and 3 query charges: {audit_page}"
    );
    let queries = json(&https(&base, &cert_der, "GET", "/api/queries", &cookie, None).await);
    let listed = &queries["queries"][0];
    assert_eq!(listed["id"], query_id.as_str());
    assert_eq!(
        listed["result"]["statistics"][0]["values"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(
        listed["result"]["statistics"][0]["values"][0]["std"]
            .as_f64()
            .is_some_and(|s| s > 0.0)
    );

    // A consortium client certificate signs in by itself; a site's does not get in.
    let admin_profile = fed.profile("admin").expect("admin");
    let by_cert = https(&base, &cert_der, "GET", "/api/overview", &[], Some(&admin_profile)).await;
    assert_eq!(json(&by_cert)["viewer"]["via"], "certificate");
    let site_profile = fed.profile(&fed.site_names[0].clone()).expect("site");
    let site = https(&base, &cert_der, "GET", "/api/overview", &[], Some(&site_profile)).await;
    assert_eq!(site.status, 403);
    assert!(site.body.contains("for admins and auditors"), "{}", site.body);

    // ---- who may act: the long study paused, resumed and aborted from the dashboard.
    let long_id = start_long(&mut fed, &long, &mut long_id).await;
    let pause = format!("/api/studies/{long_id}/pause");
    let refused = https(
        &base,
        &cert_der,
        "POST",
        &pause,
        &[("Cookie", &auditor), ("x-medfl-action", "pause")],
        None,
    )
    .await;
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains("may only read"), "{}", refused.body);
    let forged = https(&base, &cert_der, "POST", &pause, &[], Some(&admin_profile)).await;
    assert_eq!(forged.status, 403, "a POST without the dashboard's header is refused");
    let cross = https(
        &base,
        &cert_der,
        "POST",
        &pause,
        &[("x-medfl-action", "pause"), ("Origin", "https://evil.example")],
        Some(&admin_profile),
    )
    .await;
    assert_eq!(cross.status, 403, "another origin is refused");
    let unknown = https(
        &base,
        &cert_der,
        "POST",
        &format!("/api/studies/{long_id}/delete"),
        &[("x-medfl-action", "delete")],
        Some(&admin_profile),
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert!(unknown.body.contains("pause, resume or abort"), "{}", unknown.body);
    let admin_link = fed.dashboard_link("admin").await.expect("link");
    let admin = session_cookie(&https(&base, &cert_der, "GET", &admin_link[base.len()..], &[], None).await);
    for (action, state) in [
        ("pause", pb::StudyState::Paused),
        ("resume", pb::StudyState::Running),
        ("abort", pb::StudyState::Aborted),
    ] {
        let reply = https(
            &base,
            &cert_der,
            "POST",
            &format!("/api/studies/{long_id}/{action}"),
            &[("Cookie", &admin), ("x-medfl-action", action)],
            None,
        )
        .await;
        assert_eq!(reply.status, 200, "{action}: {}", reply.body);
        let info = fed.status(&long_id).await.expect("status").info.expect("info");
        assert_eq!(info.state, state as i32, "after {action}");
    }
    let again = https(
        &base,
        &cert_der,
        "POST",
        &format!("/api/studies/{long_id}/resume"),
        &[("Cookie", &admin), ("x-medfl-action", "resume")],
        None,
    )
    .await;
    assert_eq!(again.status, 409, "an aborted study does not resume: {}", again.body);
    let states = json(
        &https(
            &base,
            &cert_der,
            "GET",
            &format!("/api/audit?study={long_id}&action=study.state&actor=admin"),
            &cookie,
            None,
        )
        .await,
    );
    let states: Vec<String> = states["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .rev()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e["details"].as_str().expect("details")).expect("json")["state"]
                .to_string()
        })
        .collect();
    assert_eq!(
        states,
        ["\"running\"", "\"paused\"", "\"running\"", "\"aborted\""],
        "start, then the dashboard's three"
    );

    // Revoking the auditor ends its session at the next request.
    fed.admin
        .revoke(pb::RevokeRequest {
            role: "auditor".into(),
            name: "auditor".into(),
        })
        .await
        .expect("revoke");
    let revoked = https(&base, &cert_der, "GET", "/api/overview", &cookie, None).await;
    assert_eq!(revoked.status, 401);
    assert!(revoked.body.contains("revoked"), "{}", revoked.body);
    tokio::time::timeout(Duration::from_secs(30), fed.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}
