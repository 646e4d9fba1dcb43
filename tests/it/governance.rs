//! Governance end to end: roles on every RPC (from the protocol's own descriptors),
//! per-study admin rights, enrolment with one-time tokens, revocation of open
//! connections, the signed audit log and its offline verification, and the site's
//! refusal of anything it did not approve.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_coordinator::pki::{self, IssueRequest};
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::admin_client::AdminClient;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::identity::{Identity, Role};
use medfl_shared::manifest::StudyManifest;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

/// Calls `/medfl.v1.<service>/<method>` with an empty message (valid protobuf for every
/// message type), with the streaming shape the descriptor gives.
async fn call_any(channel: Channel, service: &str, method: &prost_types::MethodDescriptorProto) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(format!("/medfl.v1.{service}/{}", method.name()))
        .map_err(|e| Status::internal(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<pb::Empty, pb::Empty>::default();
    let one = || futures::stream::iter(vec![pb::Empty {}]);
    match (method.client_streaming(), method.server_streaming()) {
        (false, false) => grpc.unary(Request::new(pb::Empty {}), path, codec).await.map(|_| ()),
        (true, false) => grpc
            .client_streaming(Request::new(one()), path, codec)
            .await
            .map(|_| ()),
        (false, true) => grpc
            .server_streaming(Request::new(pb::Empty {}), path, codec)
            .await
            .map(|_| ()),
        (true, true) => grpc.streaming(Request::new(one()), path, codec).await.map(|_| ()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_every_wrong_role_and_callers_without_a_certificate() {
    let fed = Federation::builder().sites(1).build().await.expect("federation starts");
    let set = prost_types::FileDescriptorSet::decode(medfl_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let callers = [
        (Role::Site, fed.site_names[0].as_str()),
        (Role::Admin, "admin"),
        (Role::Auditor, "auditor"),
        (Role::Coordinator, "coordinator"),
    ];
    let allowed = |service: &str| -> Option<&'static [Role]> {
        match service {
            "Site" => Some(&[Role::Site]),
            "Admin" => Some(&[Role::Admin]),
            "Audit" => Some(&[Role::Auditor, Role::Admin]),
            "Enrollment" => None, // the token is the credential
            other => panic!("service {other} has no access rule in this test: add one, and one in auth.rs"),
        }
    };
    let ca = fed.profile("admin").expect("admin").ca_pem;
    let anonymous = Endpoint::from_shared(format!("https://{}", fed.addr))
        .expect("url")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .domain_name("localhost"),
        )
        .expect("tls")
        .connect_lazy();
    let mut checked = 0;
    for file in &set.file {
        for service in &file.service {
            let Some(roles) = allowed(service.name()) else {
                continue;
            };
            for method in &service.method {
                for (role, name) in callers {
                    if roles.contains(&role) {
                        continue;
                    }
                    let channel = fed.profile(name).expect("profile").channel(None).expect("channel");
                    let err = call_any(channel, service.name(), method)
                        .await
                        .expect_err("a wrong role must be refused");
                    assert_eq!(
                        err.code(),
                        Code::PermissionDenied,
                        "{role} calling {}/{}: {err:?}",
                        service.name(),
                        method.name()
                    );
                    checked += 1;
                }
                let err = call_any(anonymous.clone(), service.name(), method)
                    .await
                    .expect_err("no certificate must be refused");
                assert_eq!(
                    err.code(),
                    Code::Unauthenticated,
                    "anonymous {}/{}",
                    service.name(),
                    method.name()
                );
                checked += 1;
            }
        }
    }
    // 3 services, every method: a new RPC adds its rows here by itself.
    assert!(checked > 60, "only {checked} (caller, RPC) pairs checked");
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_controls_only_its_own_studies_and_creation_must_be_signed() {
    let mut fed = Federation::builder().sites(1).build().await.expect("federation starts");
    let other = pki::issue(
        &fed.pki,
        &IssueRequest {
            identity: Identity::new(Role::Admin, "admin-b".parse().expect("name")),
            dns: vec![],
            ips: vec![],
            days: 1,
            coordinator: Some(format!("https://{}", fed.addr)),
            algorithm: None,
        },
    )
    .expect("issue");
    let other = Profile::load(&other).expect("profile");
    let mut b = AdminClient::new(other.channel(None).expect("channel"));
    let text = manifest(&feature_names(2), 1, 1, 30, 1);
    let id = fed.create_study(&text).await.expect("create");
    // Reading is open to every admin; control is not.
    b.get_study_status(pb::StudyRef { study_id: id.clone() })
        .await
        .expect("any admin reads");
    let err = b
        .abort_study(pb::StudyRef { study_id: id.clone() })
        .await
        .expect_err("admin-b did not create it");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("admin/admin"), "{}", err.message());
    // Listed in a manifest's admins, admin-b may control that study.
    let shared = format!("admins = [\"admin-b\"]\n{text}");
    let shared_id = fed.create_study(&shared).await.expect("create shared");
    b.abort_study(pb::StudyRef { study_id: shared_id })
        .await
        .expect("listed admin controls it");
    // A creation request signed by another key, or not signed, is refused.
    let mut forged = other.signed_create(&text).expect("sign");
    let err = fed
        .admin
        .create_study(forged.clone())
        .await
        .expect_err("signed by admin-b's key");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("signature"), "{}", err.message());
    forged.signature.clear();
    let err = fed.admin.create_study(forged).await.expect_err("unsigned");
    assert_eq!(err.code(), Code::InvalidArgument);
    fed.shutdown().await.expect("clean shutdown");
}

fn anonymous_tls(fed: &Federation) -> std::path::PathBuf {
    fed.pki.join("ca.pem")
}

/// An enrolment token for site `name`, valid `ttl_secs`.
async fn invite_token(fed: &mut Federation, name: &str, ttl_secs: u64) -> String {
    fed.admin
        .invite_site(pb::InviteRequest {
            name: name.into(),
            ttl_secs,
            certificate_days: 2,
        })
        .await
        .expect("invite")
        .into_inner()
        .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_revocation_and_reenrolment() {
    let mut fed = Federation::builder().sites(1).build().await.expect("federation starts");
    let url = format!("https://{}", fed.addr);
    let ca = anonymous_tls(&fed);
    let token = invite_token(&mut fed, "hospital-new", 600).await;
    let out = fed.dir.join("enrolled");
    let profile = medfl_site_agent::enroll::enroll(&url, &token, &ca, &out, Some("localhost"), None)
        .await
        .expect("enrols");
    assert_eq!(profile.file.name, "hospital-new");
    let key = std::fs::read_to_string(out.join("key.pem")).expect("key");
    assert!(key.contains("PRIVATE KEY"), "the key was made on the site");
    let mut site = SiteClient::new(profile.channel(None).expect("channel"));
    register(&mut site, &feature_names(2))
        .await
        .expect("the enrolled site registers");

    // A token works once, and not after it expires.
    let again = medfl_site_agent::enroll::enroll(&url, &token, &ca, &fed.dir.join("again"), Some("localhost"), None)
        .await
        .expect_err("second use");
    assert!(format!("{again:#}").contains("already used"), "{again:#}");
    let short = invite_token(&mut fed, "hospital-late", 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let late = medfl_site_agent::enroll::enroll(&url, &short, &ca, &fed.dir.join("late"), Some("localhost"), None)
        .await
        .expect_err("expired");
    assert!(format!("{late:#}").contains("expired"), "{late:#}");
    // A CSR that asks for another identity than the token's is refused.
    let wrong = invite_token(&mut fed, "hospital-x", 600).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let csr = pki::csr_for(&Identity::new(Role::Site, "hospital-y".parse().expect("name")), &key).expect("csr");
    let channel = Endpoint::from_shared(url.clone())
        .expect("url")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read_to_string(&ca).expect("ca")))
                .domain_name("localhost"),
        )
        .expect("tls")
        .connect_lazy();
    let err = pb::enrollment_client::EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            token: wrong,
            csr_der: csr,
        })
        .await
        .expect_err("wrong name");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("hospital-y"), "{}", err.message());

    // Revocation closes an open long poll within seconds and refuses reconnects.
    let mut polling = site.clone();
    let poll = tokio::spawn(async move { polling.poll_work(pb::PollWorkRequest { wait_ms: 25_000 }).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    fed.admin
        .revoke(pb::RevokeRequest {
            role: "site".into(),
            name: "hospital-new".into(),
        })
        .await
        .expect("revoke");
    let ended = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("the open stream is closed, not left to run out")
        .expect("task");
    assert!(ended.is_err(), "the revoked site's poll must fail: {ended:?}");
    let mut fresh = SiteClient::new(profile.channel(None).expect("channel"));
    let err = fresh
        .heartbeat(pb::HeartbeatRequest {})
        .await
        .expect_err("revoked on reconnect");
    assert_ne!(err.code(), Code::Ok);
    let list = fed.admin.list_sites(pb::Empty {}).await.expect("list").into_inner();
    assert!(
        list.revoked
            .iter()
            .any(|r| r.name == "hospital-new" && r.role == "site")
    );
    // Other identities are untouched, and the site can be enrolled anew.
    fed.admin.list_studies(pb::Empty {}).await.expect("admin still served");
    let token = invite_token(&mut fed, "hospital-new", 600).await;
    let renewed = medfl_site_agent::enroll::enroll(&url, &token, &ca, &fed.dir.join("re"), Some("localhost"), None)
        .await
        .expect("re-enrols");
    let mut back = SiteClient::new(renewed.channel(None).expect("channel"));
    register(&mut back, &feature_names(2))
        .await
        .expect("a new certificate works");
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_exports_and_verify_names_each_tampering() {
    let features = feature_names(3);
    let text = manifest(&features, 2, 2, 30, 1);
    let (mut fed, clients, id) = started_simulated_study(2, &features, &text).await;
    for round in 1..=2 {
        for (i, mut c) in clients.iter().cloned().enumerate() {
            let work = next_work(&mut c, Duration::from_secs(30)).await.expect("work");
            assert_eq!(work.round, round);
            upload(
                &mut c,
                &work,
                &format!("u{i}-{round}"),
                10,
                &vec![0.1; work.num_params as usize],
            )
            .await
            .expect("upload");
        }
        fed.wait_for_round(&id, round, Duration::from_secs(60))
            .await
            .expect("round commits");
    }
    fed.export(&id, None).await.expect("an admin exports the model");
    let auditor = fed.pki.join("auditor");
    let out = fed.dir.join("audit.jsonl");
    let out_s = out.to_str().expect("utf8");
    let export = medfl(&[
        "audit",
        "export",
        "--out",
        out_s,
        "--profile",
        auditor.to_str().expect("utf8"),
    ]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let good = std::fs::read_to_string(&out).expect("export");
    for action in [
        "site.register",
        "study.create",
        "study.state",
        "round.start",
        "round.commit",
        "model.export",
    ] {
        assert!(good.contains(&format!("\"action\":\"{action}\"")), "no {action} entry");
    }
    let ok = medfl(&["audit", "verify", out_s]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("OK"));

    let lines: Vec<&str> = good.lines().collect();
    let verify = |mutated: Vec<String>, needle: &str| {
        let path = fed.dir.join("tampered.jsonl");
        std::fs::write(&path, mutated.join("\n")).expect("write");
        let r = medfl(&["audit", "verify", path.to_str().expect("utf8")]);
        let stderr = String::from_utf8_lossy(&r.stderr).to_string();
        assert!(!r.status.success(), "tampering ({needle}) passed");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    };
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut flipped = owned(&lines);
    flipped[3] = flipped[3].replacen("\"actor\":\"", "\"actor\":\"x", 1);
    verify(flipped, "line 4: entry 2 was altered");
    let mut deleted = owned(&lines);
    deleted.remove(3);
    verify(deleted, "line 4: entry 2 expected, found entry 3");
    let mut swapped = owned(&lines);
    swapped.swap(4, 5);
    verify(swapped, "line 5: entry 3 expected, found entry 4");
    let mut truncated = owned(&lines);
    truncated.truncate(lines.len() - 3);
    verify(truncated, "no signed checkpoint");
    // Re-signing an altered entry needs the coordinator's key: another key's
    // signature is a forgery.
    let forger = medfl_shared::sign::Signer::from_pkcs8(
        &medfl_shared::sign::Signer::generate_pkcs8(medfl_shared::sign::Algorithm::P256).expect("key"),
    )
    .expect("signer");
    let mut forged = owned(&lines);
    let mut entry: serde_json::Value = serde_json::from_str(&forged[2]).expect("entry");
    let hash = medfl_shared::chainlog::from_hex(entry["hash"].as_str().expect("hash")).expect("hex");
    entry["signature"] = medfl_shared::chainlog::to_hex(&forger.sign(&hash)).into();
    forged[2] = entry.to_string();
    verify(forged, "line 3: entry 1 carries a signature the log's key did not make");
    // Pinning the key refuses a log re-signed whole by someone else.
    let public_key = serde_json::from_str::<serde_json::Value>(lines[0]).expect("header")["public_key"]
        .as_str()
        .expect("key")
        .to_string();
    let pinned = medfl(&["audit", "verify", out_s, "--public-key", &public_key]);
    assert!(pinned.status.success());
    let wrong_pin = medfl(&["audit", "verify", out_s, "--public-key", &forger.public_key_hex()]);
    assert!(!wrong_pin.status.success());

    // The study's own view, filtered; and the log keeps growing past the export.
    let filtered = medfl(&[
        "audit",
        "log",
        "--study",
        &id,
        "--json",
        "--profile",
        auditor.to_str().expect("utf8"),
    ]);
    assert!(filtered.status.success());
    let entries = String::from_utf8_lossy(&filtered.stdout).to_string();
    assert!(entries.lines().count() >= 6, "{entries}");
    assert!(entries.lines().all(|l| l.contains(&id)), "{entries}");
    fed.shutdown().await.expect("clean shutdown");
}

// ---------------------------------------------------------------- the site's own checks

/// A coordinator that hands out crafted work items and records what the site answers.
#[derive(Default)]
struct Crafted {
    items: Mutex<Vec<pb::WorkItem>>,
    refusals: Mutex<Vec<(u32, String)>>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this fake"))
}

#[tonic::async_trait]
impl pb::site_server::Site for Crafted {
    async fn register(&self, _: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        Ok(Response::new(pb::RegisterResponse {
            site_name: "hospital-a".into(),
            heartbeat_interval_ms: 5000,
        }))
    }
    async fn heartbeat(&self, _: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(pb::HeartbeatResponse {}))
    }
    async fn poll_work(&self, _: Request<pb::PollWorkRequest>) -> Result<Response<pb::PollWorkResponse>, Status> {
        let work = self.items.lock().expect("items").pop();
        if work.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Response::new(pb::PollWorkResponse { work }))
    }
    type DownloadModelStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;
    async fn download_model(
        &self,
        _: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        unimplemented()
    }
    async fn upload_update(
        &self,
        _: Request<tonic::Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        unimplemented()
    }
    async fn report_refusal(&self, request: Request<pb::RefusalReport>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        self.refusals.lock().expect("refusals").push((r.round, r.reason));
        Ok(Response::new(pb::Ack {}))
    }
    async fn report_metrics(&self, _: Request<pb::MetricsReport>) -> Result<Response<pb::Ack>, Status> {
        unimplemented()
    }
    async fn sec_agg_advertise(&self, _: Request<pb::SecAggAdvertiseRequest>) -> Result<Response<pb::Ack>, Status> {
        unimplemented()
    }
    async fn sec_agg_poll(&self, _: Request<pb::SecAggPollRequest>) -> Result<Response<pb::SecAggStage>, Status> {
        unimplemented()
    }
    async fn sec_agg_share_keys(&self, _: Request<pb::SecAggShareKeysRequest>) -> Result<Response<pb::Ack>, Status> {
        unimplemented()
    }
    async fn sec_agg_reveal(&self, _: Request<pb::SecAggRevealRequest>) -> Result<Response<pb::Ack>, Status> {
        unimplemented()
    }
    async fn renew_certificate(
        &self,
        _: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        unimplemented()
    }
}

/// A work item for `manifest_toml`, signed by `admin` over `signed_toml`'s hash.
fn signed_work(admin: &Profile, round: u32, manifest_toml: &str, signed_toml: &str) -> pb::WorkItem {
    let manifest = StudyManifest::from_toml(manifest_toml).expect("manifest");
    let request = admin.signed_create(signed_toml).expect("sign");
    let cert = rustls::pki_types::pem::PemObject::from_pem_slice(admin.cert_pem.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .expect("cert");
    pb::WorkItem {
        study_id: "s-crafted".into(),
        round,
        manifest_hash: manifest.hash(),
        manifest_toml: manifest_toml.to_string(),
        deadline_unix_ms: u64::MAX,
        num_params: manifest.num_params(),
        secagg: None,
        manifest_signature: request.signature,
        manifest_signature_algorithm: request.signature_algorithm,
        creator_certificate_der: cert,
        settings: Some(medfl_proto::settings::settings_to_pb(&manifest.round_settings())),
        query: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_refuses_what_it_did_not_approve_and_says_why() {
    let fed = Federation::builder().sites(1).build().await.expect("pki");
    let table = bundled_table();
    let approved = manifest(&table.columns, 3, 1, 30, 1);
    let approved_hash = StudyManifest::from_toml(&approved).expect("m").hash();
    // One byte changed after approval: 0.05 -> 0.06.
    let changed = approved.replace("learning_rate = 0.05", "learning_rate = 0.06");
    let admin = fed.profile("admin").expect("admin");
    let mut asks_more = signed_work(&admin, 3, &approved, &approved);
    if let Some(s) = asks_more.settings.as_mut() {
        s.learning_rate = 0.5;
    }
    let mut unsigned = signed_work(&admin, 4, &approved, &approved);
    unsigned.manifest_signature = vec![0; 64];
    let fake = Arc::new(Crafted {
        // popped from the end
        items: Mutex::new(vec![
            unsigned,
            asks_more,
            signed_work(&admin, 2, &changed, &approved),
            signed_work(&admin, 1, &changed, &changed),
        ]),
        ..Default::default()
    });

    let stop = CancellationToken::new();
    let url = serve_fake_coordinator(&fed, fake.clone(), stop.clone()).await;

    // A real agent whose policy approves exactly one manifest.
    let dir = fed.dir.join("crafted-site");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("data.csv"), table.to_csv("malignant")).expect("csv");
    std::fs::write(
        dir.join("policy.toml"),
        format!("approved_manifests = [\"{approved_hash}\"]\nallow_non_dp = true\n"),
    )
    .expect("policy");
    let site_profile = fed.pki.join(&fed.site_names[0]);
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "profile = {:?}\ncoordinator = {url:?}\npolicy_file = \"policy.toml\"\n\n[[datasets]]\nname = \"breast_cancer\"\npath = \"data.csv\"\nlabel = \"malignant\"\n",
            site_profile.display().to_string()
        ),
    )
    .expect("agent.toml");

    // `policy check` explains in words, ahead of time.
    std::fs::write(dir.join("changed.toml"), &changed).expect("m");
    std::fs::write(dir.join("approved.toml"), &approved).expect("m");
    let config = dir.join("agent.toml");
    let config = config.to_str().expect("utf8");
    let check = medfl(&[
        "agent",
        "--config",
        config,
        "policy",
        "check",
        "--manifest",
        dir.join("changed.toml").to_str().expect("utf8"),
    ]);
    assert!(!check.status.success());
    let said = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        said.contains("REFUSED") && said.contains("not among this site's approved manifests"),
        "{said}"
    );
    let check = medfl(&[
        "agent",
        "--config",
        config,
        "policy",
        "check",
        "--manifest",
        dir.join("approved.toml").to_str().expect("utf8"),
    ]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    assert!(String::from_utf8_lossy(&check.stdout).contains("ACCEPTED"));

    let settings = medfl_site_agent::AgentSettings::load(&dir.join("agent.toml")).expect("settings");
    let egress = settings.egress.path().to_path_buf();
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(medfl_site_agent::run(settings, agent_stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fake.refusals.lock().expect("refusals").len() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent_stop.cancel();
    agent.await.expect("agent task").expect("agent stops cleanly");
    stop.cancel();
    let refusals = fake.refusals.lock().expect("refusals").clone();
    assert_eq!(refusals.len(), 4, "{refusals:?}");
    let reason = |round: u32| {
        refusals
            .iter()
            .find(|(r, _)| *r == round)
            .map(|(_, s)| s.clone())
            .expect("refused")
    };
    assert!(
        reason(1).contains("not among this site's approved manifests"),
        "{}",
        reason(1)
    );
    assert!(
        reason(2).contains("does not carry admin/admin's signature"),
        "{}",
        reason(2)
    );
    assert!(
        reason(3).contains("learning_rate 0.5 (approved: 0.05)"),
        "{}",
        reason(3)
    );
    assert!(reason(4).contains("signature"), "{}", reason(4));
    // Every refusal left the site through its egress log first.
    let log = std::fs::read_to_string(&egress).expect("egress");
    medfl_shared::chainlog::verify_export(&log, None, false).expect("egress log verifies");
    assert_eq!(log.matches("\"action\":\"refusal\"").count(), 4);
    let shown = medfl(&["agent", "--config", config, "egress"]);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    assert!(String::from_utf8_lossy(&shown.stdout).contains("hash chain and signatures check"));
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_certificate_before_expiry_without_stopping_work() {
    // Harness certificates last 30 days; asking for renewal with 1000 h (41 days) left
    // makes it due at once, and the 60-day certificate the coordinator issues is not.
    let (table, _, tables) = iid_site_tables(2);
    let mut fed = Federation::builder()
        .tables(tables)
        .coordinator_setting("certificate_days = 60")
        .agent_setting("renew_before_expiry_hours = 1000")
        .build()
        .await
        .expect("federation starts");
    let before: Vec<String> = fed
        .site_names
        .iter()
        .map(|n| std::fs::read_to_string(fed.dir.join(n).join("cert.pem")).expect("cert"))
        .collect();
    let (id, _) = complete_study(&mut fed, &manifest(&table.columns, 2, 2, 60, 2), 2).await;
    for (name, old) in fed.site_names.clone().iter().zip(before) {
        let profile = Profile::load(&fed.dir.join(name)).expect("profile");
        assert_ne!(profile.cert_pem, old, "{name} renewed its certificate");
        let (remaining, _) = medfl_site_agent::renew::validity(&profile).expect("validity");
        assert!(
            remaining > 59 * 86_400,
            "{name}: the renewed certificate lasts 60 days ({remaining} s left)"
        );
        assert!(!medfl_site_agent::renew::due(
            &profile,
            Some(Duration::from_secs(1000 * 3600))
        ));
    }
    let auditor = fed.pki.join("auditor");
    let log = medfl(&["audit", "log", "--json", "--profile", auditor.to_str().expect("utf8")]);
    let log = String::from_utf8_lossy(&log.stdout).to_string();
    assert_eq!(
        log.matches("\"action\":\"site.renew\"").count(),
        2,
        "one renewal per site: {log}"
    );
    assert!(log.contains(&id));
    fed.shutdown().await.expect("clean shutdown");
}
