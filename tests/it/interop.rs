//! Identities every standard tool accepts, against a real coordinator: for a P-256
//! consortium (the default) and an Ed25519 one, each runs a federated study under
//! secure aggregation and DP, then
//!
//! - `openssl pkey -noout` and `openssl x509 -noout` read every key and certificate
//!   that `medfl pki`, enrolment, renewal and the stores wrote;
//! - `curl` with the admin bundle gets `grpc-status: 0` from
//!   `grpc.health.v1.Health/Check`; with a site bundle an admin RPC gets
//!   `grpc-status: 7` (PermissionDenied);
//! - `medfl audit verify` accepts the audit log and each site's egress log;
//! - Python grpcio (`python/tests/test_interop.py`) passes the health check, lists
//!   studies, reads a status and the ledger with P-256 bundles, and fails its
//!   handshake against the Ed25519 coordinator.
//!
//! openssl and curl come with the machine; Python is `.venv/bin/python` with
//! `python/requirements-ci.txt` (`.ci/run` makes it) or `MEDFL_PYTHON`. Without one
//! the Python part is skipped with a loud message; under `CI=true` it fails instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_shared::sign::Algorithm;

fn run(command: &mut Command) -> std::process::Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e} (is it installed?)"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file under `dir` that holds a key or a certificate, by what it holds.
fn key_material(dir: &Path, found: &mut Vec<(PathBuf, &'static str)>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "sled" && n != "models") {
                key_material(&path, found);
            }
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".pk8") {
            found.push((path, "der-key"));
        } else if name.ends_with(".pem") || name.ends_with(".key") {
            let pem = std::fs::read_to_string(&path).unwrap_or_default();
            if pem.contains("PRIVATE KEY-----") {
                found.push((path, "key"));
            } else if pem.contains("CERTIFICATE-----") {
                found.push((path, "certificate"));
            }
        }
    }
}

/// `openssl pkey|x509 -noout` on every key and certificate under `dir`; returns how
/// many keys of each algorithm OpenSSL named (`ED25519` or `EC`).
fn openssl_reads_everything(dir: &Path) -> (usize, usize, usize) {
    let mut found = Vec::new();
    key_material(dir, &mut found);
    let (mut ec, mut ed, mut certs) = (0, 0, 0);
    for (path, kind) in &found {
        let path_s = path.to_str().expect("utf8");
        let output = match *kind {
            "certificate" => {
                certs += 1;
                run(Command::new("openssl").args(["x509", "-noout", "-in", path_s]))
            }
            "der-key" => {
                run(Command::new("openssl").args(["pkey", "-noout", "-text", "-inform", "DER", "-in", path_s]))
            }
            _ => run(Command::new("openssl").args(["pkey", "-noout", "-text", "-in", path_s])),
        };
        assert!(
            output.status.success(),
            "openssl cannot read {} ({kind}): {}",
            path.display(),
            text(&output.stderr)
        );
        let described = text(&output.stdout);
        if described.contains("ED25519 Private-Key") {
            ed += 1;
        } else if described.contains("Private-Key: (256 bit)") && described.contains("prime256v1") {
            ec += 1;
        }
        if *kind != "certificate" {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is mode {mode:o}, not 0600", path.display());
        }
    }
    (ec, ed, certs)
}

/// One gRPC call by curl with the bundle `bundle`: the response head and trailers.
/// The request carries one empty message, or no body at all when `refused` (the call
/// is refused before its body is read, and curl 7.88 reports the server's
/// RST_STREAM(NO_ERROR) for a body still in flight as a framing error).
fn curl(fed: &Federation, bundle: &Path, method: &str, refused: bool) -> String {
    let frame = fed.dir.join(if refused { "no-body.grpc" } else { "empty.grpc" });
    // A gRPC frame: not compressed, length 0 (an empty message).
    std::fs::write(&frame, if refused { &[][..] } else { &[0u8; 5][..] }).expect("frame");
    let port = fed.addr.port();
    let file = |name: &str| bundle.join(name).to_str().expect("utf8").to_string();
    let output = run(Command::new("curl").args([
        "-sS",
        "--http2",
        "--max-time",
        "20",
        "--resolve",
        &format!("localhost:{port}:127.0.0.1"),
        "--cacert",
        &file("ca.pem"),
        "--cert",
        &file("cert.pem"),
        "--key",
        &file("key.pem"),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        &format!("@{}", frame.display()),
        "-D",
        "-",
        "-o",
        "/dev/null",
        &format!("https://localhost:{port}/{method}"),
    ]));
    assert!(
        output.status.success(),
        "curl with {} failed: {}",
        bundle.display(),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// A site enrolled through an invitation (its key made by the agent) and then renewed,
/// so that both write paths leave files for OpenSSL to read.
async fn enrol_and_renew(fed: &mut Federation) -> PathBuf {
    let token = fed
        .admin
        .invite_site(pb::InviteRequest {
            name: "hospital-enrolled".into(),
            ttl_secs: 600,
            certificate_days: 2,
        })
        .await
        .expect("invite")
        .into_inner()
        .token;
    let out = fed.dir.join("enrolled");
    let url = format!("https://{}", fed.addr);
    let profile =
        medfl_site_agent::enroll::enroll(&url, &token, &fed.pki.join("ca.pem"), &out, Some("localhost"), None)
            .await
            .expect("enrols");
    let mut client = pb::site_client::SiteClient::new(profile.channel(None).expect("channel"));
    let egress = medfl_site_agent::egress::EgressLog::open(
        &out.join("egress.jsonl"),
        medfl_site_agent::egress::load_or_create_key(&out.join("egress-key.pk8")).expect("egress key"),
        "site/hospital-enrolled",
    )
    .expect("egress log");
    let renewed = medfl_site_agent::renew::renew(&mut client, &profile, &egress)
        .await
        .expect("renews");
    assert_ne!(renewed.cert_pem, profile.cert_pem);
    out
}

fn secure_dp_manifest(table: &medfl_site_agent::data::Table) -> String {
    dp_manifest(
        table,
        2,
        3,
        "sample_rate = 0.2\nsteps_per_round = 3\nnoise_multiplier = 1.5\nbudget_epsilon = 20.0",
    )
    .replace(
        "[selection]",
        "[secure_aggregation]\nthreshold = 2\nclip_norm = 10.0\n\n[selection]",
    )
}

/// Builds a federation of `algorithm`, completes a secure DP study, and checks
/// OpenSSL, curl and `medfl audit verify`. Returns it with the study's id.
async fn federation_of(algorithm: Algorithm) -> (Federation, String) {
    let (table, _, tables) = iid_site_tables(3);
    let mut fed = Federation::builder()
        .tables(tables)
        .algorithm(algorithm)
        .agent_policy("max_epsilon = 1000.0")
        .build()
        .await
        .expect("federation starts");
    let (id, _) = complete_study(&mut fed, &secure_dp_manifest(&table), 3).await;
    let enrolled = enrol_and_renew(&mut fed).await;
    assert_eq!(
        medfl_proto::transport::Profile::load(&enrolled)
            .expect("profile")
            .signer()
            .expect("key")
            .algorithm(),
        algorithm,
        "an enrolled site takes the CA's algorithm"
    );

    let (ec, ed, certs) = openssl_reads_everything(&fed.dir);
    eprintln!("{algorithm}: openssl read {ec} P-256 keys, {ed} Ed25519 keys and {certs} certificates");
    // CA + coordinator + admin + auditor + 3 sites + the enrolled (renewed) site.
    let identities = 8;
    match algorithm {
        Algorithm::P256 => assert!(ec >= identities, "{ec} P-256 keys"),
        Algorithm::Ed25519 => assert!(ed >= identities, "{ed} Ed25519 keys"),
    }
    assert!(certs >= identities, "{certs} certificates");

    let health = curl(&fed, &fed.pki.join("admin"), "grpc.health.v1.Health/Check", false);
    assert!(health.contains("grpc-status: 0"), "{health}");
    let site = fed.pki.join(&fed.site_names[0]);
    let denied = curl(&fed, &site, "medfl.v1.Admin/ListStudies", true);
    assert!(denied.contains("grpc-status: 7"), "{denied}");

    let audit = fed.dir.join("audit.jsonl");
    let export = medfl(&[
        "audit",
        "export",
        "--out",
        audit.to_str().expect("utf8"),
        "--profile",
        fed.pki.join("auditor").to_str().expect("utf8"),
    ]);
    assert!(export.status.success(), "{}", text(&export.stderr));
    let mut logs = vec![audit];
    logs.extend(fed.site_names.iter().map(|s| fed.dir.join(s).join("egress.jsonl")));
    for log in logs {
        let verified = medfl(&["audit", "verify", log.to_str().expect("utf8")]);
        assert!(
            verified.status.success(),
            "{}: {}",
            log.display(),
            text(&verified.stderr)
        );
    }
    (fed, id)
}

fn python_unittest(python: &Path, case: &str, env: &[(&str, PathBuf)]) -> String {
    let mut command = Command::new(python);
    command
        .current_dir(repo().join("python"))
        .args(["-m", "unittest", "-v", case])
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for (k, v) in env {
        command.env(k, v);
    }
    let output = run(&mut command);
    let all = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "python {case} failed:\n{all}");
    assert!(!all.contains("skipped"), "python {case} skipped a test:\n{all}");
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p256_bundles_work_with_openssl_curl_and_python() {
    let (fed, id) = federation_of(Algorithm::P256).await;
    if let Some(python) = python() {
        let out = python_unittest(
            &python,
            "tests.test_interop.P256Bundles",
            &[
                ("MEDFL_ADMIN", fed.pki.join("admin")),
                ("MEDFL_AUDITOR", fed.pki.join("auditor")),
                ("MEDFL_SITE", fed.pki.join(&fed.site_names[0])),
                ("MEDFL_STUDY", PathBuf::from(&id)),
            ],
        );
        assert!(out.contains(&format!("ledger of {id}")), "{out}");
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_consortia_keep_working_and_grpc_core_refuses_them() {
    let (fed, _) = federation_of(Algorithm::Ed25519).await;
    if let Some(python) = python() {
        let out = python_unittest(
            &python,
            "tests.test_interop.Ed25519Bundles",
            &[("MEDFL_ED25519_ADMIN", fed.pki.join("admin"))],
        );
        assert!(out.contains("HANDSHAKE_FAILURE"), "{out}");
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[test]
fn the_python_stubs_are_current_with_the_proto() {
    let Some(python) = python() else { return };
    let has_tools = Command::new(&python)
        .args(["-c", "import grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_tools || !in_ci(),
        "CI=true and {} has no grpc_tools: pip install -r python/requirements-ci.txt",
        python.display()
    );
    if !has_tools {
        eprintln!(
            "*** SKIPPED: {} has no grpcio-tools to regenerate the stubs ***",
            python.display()
        );
        return;
    }
    let output = run(Command::new(&python)
        .arg(repo().join("python/generate.py"))
        .arg("--check"));
    assert!(
        output.status.success(),
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}
