//! Every refusal the foundation promises, each against a real coordinator over mTLS:
//! the caller gets the right status and a message it can act on, nothing is folded,
//! and the coordinator keeps serving.

use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_coordinator::pki::{self, IssueRequest};
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::admin_client::AdminClient;
use medfl_proto::v1::audit_client::AuditClient;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::identity::{Identity, Role};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

/// The connection was refused below gRPC (a handshake alert or a closed connection):
/// no RPC handler ran, so the status carries a transport error as its source.
fn assert_refused_by_transport(err: &tonic::Status) {
    assert!(
        std::error::Error::source(err).is_some(),
        "refused by a handler, not by the transport: {err:?}"
    );
    let text = format!("{err:?}").to_lowercase();
    assert!(
        [
            "alert",
            "connection closed",
            "connection reset",
            "broken pipe",
            "frame_size_error",
            "transport error"
        ]
        .iter()
        .any(|s| text.contains(s)),
        "{text}"
    );
}

async fn still_serving(fed: &mut Federation) {
    fed.admin
        .list_studies(pb::Empty {})
        .await
        .expect("the coordinator keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_consortium_certificate_get_no_rpc() {
    let mut fed = Federation::builder().sites(1).build().await.expect("federation starts");
    let admin = fed.profile("admin").expect("admin profile");

    // Plaintext HTTP/2.
    let plain = Endpoint::from_shared(format!("http://{}", fed.addr))
        .expect("url")
        .connect_lazy();
    let err = AdminClient::new(plain)
        .list_studies(pb::Empty {})
        .await
        .expect_err("plaintext refused");
    assert_refused_by_transport(&err);

    // TLS, but no client certificate: the handshake completes (enrolment needs it),
    // and every service but enrolment refuses the caller.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&admin.ca_pem))
        .domain_name("localhost");
    let no_cert = Endpoint::from_shared(format!("https://{}", fed.addr))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy();
    let err = AdminClient::new(no_cert.clone())
        .list_studies(pb::Empty {})
        .await
        .expect_err("no client cert refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("client certificate"), "{}", err.message());
    let err = SiteClient::new(no_cert)
        .heartbeat(pb::HeartbeatRequest {})
        .await
        .expect_err("no client cert refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A certificate from another CA with an admin identity.
    let other = tempfile::tempdir().expect("tempdir");
    pki::init(other.path(), medfl_shared::sign::Algorithm::P256).expect("other CA");
    let bundle = pki::issue(
        other.path(),
        &IssueRequest {
            identity: Identity::new(Role::Admin, "mallory".parse().expect("name")),
            dns: vec![],
            ips: vec![],
            days: 1,
            coordinator: None,
            algorithm: None,
        },
    )
    .expect("issue");
    let mallory = Profile::load(&bundle).expect("profile");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&admin.ca_pem))
        .identity(TlsIdentity::from_pem(&mallory.cert_pem, &mallory.key_pem))
        .domain_name("localhost");
    let foreign = Endpoint::from_shared(format!("https://{}", fed.addr))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy();
    let err = AdminClient::new(foreign)
        .list_studies(pb::Empty {})
        .await
        .expect_err("foreign CA refused");
    assert_refused_by_transport(&err);

    still_serving(&mut fed).await;
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_come_from_certificates_and_gate_every_service() {
    let fed = Federation::builder().sites(1).build().await.expect("federation starts");
    let site = fed
        .profile("hospital-a")
        .expect("site profile")
        .channel(None)
        .expect("channel");
    let err = AdminClient::new(site.clone())
        .list_studies(pb::Empty {})
        .await
        .expect_err("site may not administer");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("site/hospital-a may not call the admin service"),
        "{}",
        err.message()
    );
    let err = AdminClient::new(site.clone())
        .abort_study(pb::StudyRef { study_id: "s-x".into() })
        .await
        .expect_err("site may not abort");
    assert_eq!(err.code(), Code::PermissionDenied);

    let admin = fed.profile("admin").expect("admin").channel(None).expect("channel");
    let err = SiteClient::new(admin)
        .poll_work(pb::PollWorkRequest { wait_ms: 0 })
        .await
        .expect_err("admin is not a site");
    assert_eq!(err.code(), Code::PermissionDenied);

    let auditor = fed.profile("auditor").expect("auditor").channel(None).expect("channel");
    AuditClient::new(auditor.clone())
        .list_studies(pb::Empty {})
        .await
        .expect("auditors read the audit service");
    let err = AdminClient::new(auditor)
        .list_studies(pb::Empty {})
        .await
        .expect_err("auditors are read-only");
    assert_eq!(err.code(), Code::PermissionDenied);
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_updates_are_refused_and_nothing_is_folded() {
    let features = feature_names(3); // 4 parameters
    let mut fed = Federation::builder().sites(2).build().await.expect("federation starts");
    let mut site = fed.site_client("hospital-a").expect("client");
    register(&mut site, &features).await.expect("register");
    // hospital-b is selected too but never delivers, so the round stays open until its deadline.
    let mut idle = fed.site_client("hospital-b").expect("client");
    register(&mut idle, &features).await.expect("register");
    let id = fed
        .create_study(&manifest(&features, 1, 1, 4, 1))
        .await
        .expect("create");
    fed.start_study(&id).await.expect("start");
    let work = next_work(&mut site, Duration::from_secs(20)).await.expect("work");

    let received = |s: pb::StudyStatus| s.open_round.map(|o| o.received).unwrap_or_default();

    // Wrong shape: 5 values for a 4-parameter model.
    let err = upload(&mut site, &work, "bad-shape", 10, &[0.1; 5])
        .await
        .expect_err("wrong shape");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("does not match the study's model"),
        "{}",
        err.message()
    );
    // Right count, wrong tensors.
    let mut bad_tensors = header(&work, "bad-tensors", 10, 4);
    if let Some(pb::update_chunk::Body::Header(h)) = &mut bad_tensors.body {
        h.tensors[0].shape = vec![3, 1];
    }
    let msgs: Vec<_> = std::iter::once(bad_tensors)
        .chain(medfl_proto::stream::update_chunks(&[0.1; 4]))
        .collect();
    let err = site
        .upload_update(futures::stream::iter(msgs))
        .await
        .expect_err("wrong tensor shape");
    assert_eq!(err.code(), Code::InvalidArgument);

    // NaN and infinity.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = upload(&mut site, &work, "non-finite", 10, &[0.1, bad, 0.1, 0.1])
            .await
            .expect_err("non-finite");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("value 1 is not finite"), "{}", err.message());
    }

    // A chunk out of order, and a stream without a header.
    let msgs = vec![
        header(&work, "ooo", 10, 4),
        pb::UpdateChunk {
            body: Some(pb::update_chunk::Body::Data(pb::DataChunk {
                seq: 1,
                offset: 0,
                values: vec![0u8; 16].into(),
            })),
        },
    ];
    let err = site
        .upload_update(futures::stream::iter(msgs))
        .await
        .expect_err("out of order");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("out of order"), "{}", err.message());
    let msgs: Vec<_> = medfl_proto::stream::update_chunks(&[0.1; 4]).collect();
    let err = site
        .upload_update(futures::stream::iter(msgs))
        .await
        .expect_err("no header");
    assert_eq!(err.code(), Code::InvalidArgument);
    // A truncated stream.
    let msgs = vec![header(&work, "short", 10, 4)];
    let err = site
        .upload_update(futures::stream::iter(msgs))
        .await
        .expect_err("truncated");
    assert!(err.message().contains("ended after 0 of 4 values"), "{}", err.message());

    assert!(
        received(fed.status(&id).await.expect("status")).is_empty(),
        "no refused update was folded"
    );

    // The site can still deliver a good update, once; a retry with the same id is a no-op.
    upload(&mut site, &work, "good", 10, &[0.25; 4])
        .await
        .expect("good update accepted");
    let err = upload(&mut site, &work, "second", 10, &[0.25; 4])
        .await
        .expect_err("second update");
    assert_eq!(err.code(), Code::AlreadyExists);
    upload(&mut site, &work, "good", 10, &[0.25; 4])
        .await
        .expect("a retried delivery is acknowledged");
    assert_eq!(received(fed.status(&id).await.expect("status")), vec!["hospital-a"]);
    fed.wait_for_round(&id, 1, Duration::from_secs(60))
        .await
        .expect("round commits");
    let (_, g0) = fed.export(&id, Some(0)).await.expect("round 0");
    let (_, g1) = fed.export(&id, Some(1)).await.expect("round 1");
    for (a, b) in g0.iter().zip(&g1) {
        assert!(
            (b - a - 0.25).abs() < 1e-6,
            "exactly the one good update was applied: {a} -> {b}"
        );
    }

    // The round is now closed.
    let err = upload(&mut site, &work, "late", 10, &[0.25; 4])
        .await
        .expect_err("closed round");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("closed"), "{}", err.message());
    still_serving(&mut fed).await;
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_not_selected_or_unregistered_is_refused() {
    let features = feature_names(2);
    let mut fed = Federation::builder().sites(2).build().await.expect("federation starts");
    let mut a = fed.site_client("hospital-a").expect("client");
    let mut b = fed.site_client("hospital-b").expect("client");
    let err = b
        .poll_work(pb::PollWorkRequest { wait_ms: 0 })
        .await
        .expect_err("unregistered");
    assert_eq!(err.code(), Code::FailedPrecondition);
    register(&mut a, &features).await.expect("register");
    let manifest = manifest(&features, 1, 1, 30, 1).replace("[selection]", "[selection]\nsites = [\"hospital-a\"]");
    let id = fed.create_study(&manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    let work = next_work(&mut a, Duration::from_secs(20)).await.expect("work");
    register(&mut b, &features).await.expect("register");
    let err = upload(&mut b, &work, "intruder", 10, &[0.1; 3])
        .await
        .expect_err("not selected");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = b
        .download_model(pb::DownloadModelRequest {
            study_id: work.study_id.clone(),
            round: work.round,
        })
        .await
        .expect_err("not selected");
    assert_eq!(err.code(), Code::PermissionDenied);
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_manifest_is_refused_with_what_to_fix() {
    let mut fed = Federation::builder().sites(1).build().await.expect("federation starts");
    let bad = manifest(&feature_names(2), 0, 1, 30, 1);
    let err = fed
        .admin
        .create_study(pb::CreateStudyRequest {
            manifest_toml: bad,
            signature: vec![],
            signature_algorithm: String::new(),
        })
        .await
        .expect_err("zero rounds");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("rounds = 0"), "{}", err.message());
    let err = fed
        .admin
        .start_study(pb::StudyRef {
            study_id: "s-nope".into(),
        })
        .await
        .expect_err("unknown study");
    assert_eq!(err.code(), Code::NotFound);
    fed.shutdown().await.expect("clean shutdown");
}

#[test]
fn an_agent_with_a_csv_missing_its_label_column_says_which() {
    let dir = tempfile::tempdir().expect("tempdir");
    pki::init(&dir.path().join("pki"), medfl_shared::sign::Algorithm::P256).expect("CA");
    pki::issue(
        &dir.path().join("pki"),
        &IssueRequest {
            identity: Identity::new(Role::Site, "hospital-a".parse().expect("name")),
            dns: vec![],
            ips: vec![],
            days: 1,
            coordinator: None,
            algorithm: None,
        },
    )
    .expect("issue");
    std::fs::write(dir.path().join("data.csv"), "patient_id,radius,texture\np1,1.0,2.0\n").expect("csv");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "profile = \"pki/hospital-a\"\n[[datasets]]\nname = \"breast_cancer\"\npath = \"data.csv\"\nlabel = \"malignant\"\nid_column = \"patient_id\"\n",
    )
    .expect("config");
    let err = medfl_site_agent::AgentSettings::load(&config).expect_err("label column missing");
    let msg = format!("{err:#}");
    assert!(msg.contains("data.csv): column \"malignant\" is missing"), "{msg}");
    assert!(
        msg.contains("patient_id, radius, texture"),
        "the error lists the columns it found: {msg}"
    );
}
