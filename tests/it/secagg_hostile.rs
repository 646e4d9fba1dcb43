//! A misbehaving coordinator: a fake Site service (real mTLS, the consortium's
//! coordinator certificate) that relays crafted secure-aggregation stages. The site's
//! own checks must refuse them and reveal nothing.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::common::serve_fake_coordinator;
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::manifest::StudyManifest;
use medfl_shared::secagg::{AdvertisedKeys, SessionParams, SiteSecrets, advert_signing_bytes, seal_shares};
use medfl_site_agent::secagg::{Credentials, SiteSession};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// What the fake coordinator tells the site at stage 3.
#[derive(Clone)]
struct Stage3 {
    survivors: Vec<String>,
    dropped: Vec<String>,
}

#[derive(Default)]
struct State {
    own_keys: Option<pb::SiteKeys>,
    own_shares: Vec<pb::SealedShare>,
    revealed: bool,
}

struct Fake {
    /// Keys of the other sites, correctly signed.
    others: Vec<pb::SiteKeys>,
    /// Whether stage 1 leaves out the site's own advertisement.
    drop_own_keys: bool,
    /// Shares the other sites sealed to the site.
    inbox: Vec<pb::SealedShare>,
    stage3: Stage3,
    state: Mutex<State>,
}

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not part of this fake"))
}

#[tonic::async_trait]
impl pb::site_server::Site for Fake {
    async fn register(&self, _: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        unimplemented()
    }
    async fn heartbeat(&self, _: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        unimplemented()
    }
    async fn poll_work(&self, _: Request<pb::PollWorkRequest>) -> Result<Response<pb::PollWorkResponse>, Status> {
        unimplemented()
    }
    type DownloadModelStream = Pin<Box<dyn futures::Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;
    async fn download_model(
        &self,
        _: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        unimplemented()
    }
    async fn upload_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let mut stream = request.into_inner();
        while stream.message().await?.is_some() {}
        Ok(Response::new(pb::UploadReceipt::default()))
    }
    async fn report_refusal(&self, _: Request<pb::RefusalReport>) -> Result<Response<pb::Ack>, Status> {
        Ok(Response::new(pb::Ack {}))
    }
    async fn report_metrics(&self, _: Request<pb::MetricsReport>) -> Result<Response<pb::Ack>, Status> {
        unimplemented()
    }
    async fn sec_agg_advertise(
        &self,
        request: Request<pb::SecAggAdvertiseRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let certificate_der = request
            .peer_certs()
            .and_then(|c| c.first().map(|c| c.as_ref().to_vec()))
            .unwrap_or_default();
        let req = request.into_inner();
        self.state.lock().expect("state").own_keys = Some(pb::SiteKeys {
            site: "hospital-a".into(),
            cipher_public_key: req.cipher_public_key,
            mask_public_key: req.mask_public_key,
            signature: req.signature,
            certificate_der,
            signature_algorithm: req.signature_algorithm,
        });
        Ok(Response::new(pb::Ack {}))
    }
    async fn sec_agg_poll(&self, request: Request<pb::SecAggPollRequest>) -> Result<Response<pb::SecAggStage>, Status> {
        let stage = request.into_inner().stage;
        let st = self.state.lock().expect("state");
        let mut out = pb::SecAggStage {
            stage,
            ready: true,
            ..Default::default()
        };
        let all: Vec<String> = ["hospital-a", "hospital-b", "hospital-c"].map(String::from).to_vec();
        match stage {
            1 => {
                out.u1 = self.others.clone();
                if !self.drop_own_keys {
                    out.u1.extend(st.own_keys.clone());
                }
            }
            2 => {
                out.u2 = all;
                out.inbox = self.inbox.clone();
                out.inbox
                    .extend(st.own_shares.iter().filter(|s| s.to == "hospital-a").cloned());
            }
            _ => {
                out.survivors = self.stage3.survivors.clone();
                out.dropped = self.stage3.dropped.clone();
            }
        }
        Ok(Response::new(out))
    }
    async fn sec_agg_share_keys(
        &self,
        request: Request<pb::SecAggShareKeysRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        self.state.lock().expect("state").own_shares = request.into_inner().shares;
        Ok(Response::new(pb::Ack {}))
    }
    async fn sec_agg_reveal(&self, _: Request<pb::SecAggRevealRequest>) -> Result<Response<pb::Ack>, Status> {
        self.state.lock().expect("state").revealed = true;
        Ok(Response::new(pb::Ack {}))
    }
    async fn renew_certificate(
        &self,
        _: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        unimplemented()
    }
}

const MANIFEST: &str = r#"
name = "hostile"
rounds = 1
[model]
kind = "logistic_regression"
[data]
dataset = "breast_cancer"
label = "malignant"
features = ["f0", "f1"]
[selection]
min_sites = 3
[strategy]
weighting = "uniform"
[secure_aggregation]
threshold = 2
clip_norm = 1.0
"#;

/// The session a work item for hospital-a names, and the work item itself.
fn session(manifest: &StudyManifest) -> (SessionParams, pb::WorkItem) {
    let sa = manifest.secagg().expect("secure");
    let (threshold, neighbours) = sa.session_shape(3);
    let params = SessionParams {
        study_id: "s-hostile".into(),
        round: 1,
        attempt: 1,
        roster: ["hospital-a", "hospital-b", "hospital-c"].map(String::from).to_vec(),
        threshold,
        num_values: manifest.num_params(),
        scale_log2: sa.quantizer(3, None).expect("quantizer").scale_log2,
        neighbours,
    };
    let work = pb::WorkItem {
        study_id: params.study_id.clone(),
        round: 1,
        manifest_hash: manifest.hash(),
        manifest_toml: manifest.to_toml(),
        deadline_unix_ms: 0,
        num_params: manifest.num_params(),
        secagg: Some(medfl_proto::secagg::session_to_pb(&params)),
        ..Default::default()
    };
    (params, work)
}

/// Serves `fake` with the consortium's coordinator identity; returns a client for
/// hospital-a connected to it.
async fn serve(fed: &Federation, fake: Arc<Fake>, stop: CancellationToken) -> SiteClient<tonic::transport::Channel> {
    let url = serve_fake_coordinator(fed, fake, stop).await;
    SiteClient::new(
        fed.profile("hospital-a")
            .expect("profile")
            .channel(Some(&url))
            .expect("channel"),
    )
}

/// hospital-b and hospital-c: their secrets and correctly signed keys.
fn other_sites(fed: &Federation, params: &SessionParams) -> (Vec<SiteSecrets>, Vec<pb::SiteKeys>) {
    let session = params.session_id();
    let mut secrets = Vec::new();
    let mut keys = Vec::new();
    for name in ["hospital-b", "hospital-c"] {
        let s = SiteSecrets::generate().expect("keys");
        let public = s.public();
        let creds = Credentials::from_profile(&fed.profile(name).expect("profile")).expect("credentials");
        let pem = std::fs::read(fed.pki.join(name).join("cert.pem")).expect("cert");
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
            .expect("pem")
            .as_ref()
            .to_vec();
        let (signature, algorithm) = creds
            .sign(&advert_signing_bytes(&session, name, &public))
            .expect("sign");
        keys.push(pb::SiteKeys {
            site: name.into(),
            cipher_public_key: public.cipher.to_vec(),
            mask_public_key: public.mask.to_vec(),
            signature,
            certificate_der: der,
            signature_algorithm: algorithm.into(),
        });
        secrets.push(s);
    }
    (secrets, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_refuses_crafted_rosters_and_reveals_nothing() {
    let fed = Federation::builder()
        .sites(3)
        .build()
        .await
        .expect("pki and coordinator");
    let manifest = StudyManifest::from_toml(MANIFEST).expect("manifest");
    let (params, work) = session(&manifest);
    let (secrets, others) = other_sites(&fed, &params);
    let creds = Credentials::from_profile(&fed.profile("hospital-a").expect("profile")).expect("credentials");
    let delta = vec![0.1f32; manifest.num_params() as usize];

    // 1. U1 without the site's own keys (a coordinator swapping them out).
    let stop = CancellationToken::new();
    let fake = Arc::new(Fake {
        others: others.clone(),
        drop_own_keys: true,
        inbox: Vec::new(),
        stage3: Stage3 {
            survivors: Vec::new(),
            dropped: Vec::new(),
        },
        state: Mutex::default(),
    });
    let mut client = serve(&fed, fake.clone(), stop.clone()).await;
    let mut s = SiteSession::new(&work, &manifest, "hospital-a", None).expect("session");
    s.advertise(&mut client, &creds).await.expect("advertise");
    let err = s.share_keys(&mut client, &creds).await.expect_err("own keys missing");
    assert!(err.to_string().contains("does not carry this site's own keys"), "{err}");
    assert!(
        fake.state.lock().expect("state").own_shares.is_empty(),
        "no share left the site"
    );
    stop.cancel();

    // 2. An unmask request naming hospital-c both survivor and dropped: revealing both
    // of its shares would expose its input.
    let u1: Vec<(String, AdvertisedKeys)> = others
        .iter()
        .map(|k| {
            let key = |b: &[u8]| <[u8; 32]>::try_from(b).expect("32 bytes");
            (
                k.site.clone(),
                AdvertisedKeys {
                    cipher: key(&k.cipher_public_key),
                    mask: key(&k.mask_public_key),
                },
            )
        })
        .collect();
    let stop = CancellationToken::new();
    let mut fake = Fake {
        others: others.clone(),
        drop_own_keys: false,
        inbox: Vec::new(),
        stage3: Stage3 {
            survivors: ["hospital-a", "hospital-b", "hospital-c"].map(String::from).to_vec(),
            dropped: vec!["hospital-c".to_string()],
        },
        state: Mutex::default(),
    };
    let mut s = SiteSession::new(&work, &manifest, "hospital-a", None).expect("session");
    // The other sites seal their shares to hospital-a's keys for this session.
    seal_others_to(s.public_keys(), &mut fake, &secrets, &u1, &params);
    let fake = Arc::new(fake);
    let mut client = serve(&fed, fake.clone(), stop.clone()).await;
    s.advertise(&mut client, &creds).await.expect("advertise");
    s.share_keys(&mut client, &creds).await.expect("honest stage 1");
    s.send_masked(&mut client, &work, &manifest, "a-1", &delta)
        .await
        .expect("honest stage 2");
    let err = s.reveal(&mut client).await.expect_err("crafted unmask request");
    assert!(err.to_string().contains("both survivor and dropped"), "{err}");
    assert!(!fake.state.lock().expect("state").revealed, "nothing was revealed");
    stop.cancel();
    fed.shutdown().await.expect("clean shutdown");
}

/// Fills the fake's inbox with hospital-b's and hospital-c's shares sealed to
/// hospital-a, whose advertised keys are `own`.
fn seal_others_to(
    own: AdvertisedKeys,
    fake: &mut Fake,
    secrets: &[SiteSecrets],
    others: &[(String, AdvertisedKeys)],
    params: &SessionParams,
) {
    let mut u1 = others.to_vec();
    u1.push(("hospital-a".to_string(), own));
    u1.sort_by(|a, b| a.0.cmp(&b.0));
    for (secret, (name, _)) in secrets.iter().zip(others) {
        for (to, ciphertext) in seal_shares(params, secret, name, &u1).expect("seal") {
            if to == "hospital-a" {
                fake.inbox.push(pb::SealedShare {
                    from: name.clone(),
                    to,
                    ciphertext,
                });
            }
        }
    }
}
