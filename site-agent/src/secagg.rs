//! The site's side of secure aggregation (SecAgg, Bonawitz et al. 2017): one
//! [`SiteSession`] per work item that carries a session. The site checks everything
//! the coordinator relays (session parameters against the approved manifest, every
//! other site's certificate and signature, the rosters, the unmask request) and
//! aborts its participation with a reason when a check fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::identity::{Identity, Role};
use medfl_shared::manifest::StudyManifest;
use medfl_shared::secagg::{
    AdvertisedKeys, DistributedNoise, MaskPlan, Quantizer, SessionParams, SharePair, SiteSecrets, advert_signing_bytes,
    check_rosters, check_unmask_request, open_shares, seal_shares,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tonic::transport::Channel;
use tracing::info;

/// A refusal of the session: the site stops taking part, and says why.
#[derive(Debug)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

fn refuse<T>(msg: impl Into<String>) -> Result<T> {
    Err(Refusal(msg.into()).into())
}

/// The site's identity as secure aggregation uses it: the key of its certificate to
/// sign its advertisement, and the consortium CA to check everyone else's.
pub struct Credentials {
    key: medfl_shared::sign::Signer,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn from_profile(profile: &Profile) -> Result<Self> {
        let key = profile.signer().context("the site's certificate key")?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(profile.ca_pem.as_bytes()) {
            roots.add(ca.context("parse the consortium CA")?)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .context("build the certificate verifier")?;
        Ok(Credentials { key, verifier })
    }

    /// Signs `message` with the site's certificate key; returns the signature and its
    /// algorithm's label.
    pub fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, &'static str)> {
        Ok((self.key.sign(message), self.key.algorithm().name()))
    }

    /// Checks that `der` chains to the consortium CA and returns whom it names.
    pub fn verify_certificate(&self, der: &[u8]) -> Result<Identity> {
        let cert = CertificateDer::from(der);
        if let Err(e) = self.verifier.verify_client_cert(&cert, &[], UnixTime::now()) {
            return refuse(format!(
                "the certificate does not verify against the consortium CA: {e}"
            ));
        }
        Identity::from_cert_der(der).map_err(|e| Refusal(format!("the certificate names no identity: {e}")).into())
    }

    /// Checks that `keys` come from a site certificate of the consortium CA naming
    /// `keys.site`, signed by that certificate's key for this session.
    pub fn verify(&self, session: &[u8; 32], keys: &pb::SiteKeys) -> Result<AdvertisedKeys> {
        let site = &keys.site;
        let identity = self
            .verify_certificate(&keys.certificate_der)
            .map_err(|e| Refusal(format!("the certificate relayed for {site}: {e}")))?;
        if identity.role != Role::Site || identity.name.as_str() != site {
            return refuse(format!("the certificate relayed for {site} belongs to {identity}"));
        }
        let advertised = AdvertisedKeys {
            cipher: key32(&keys.cipher_public_key, site)?,
            mask: key32(&keys.mask_public_key, site)?,
        };
        let signed = medfl_shared::sign::verify_by_certificate(
            &keys.certificate_der,
            &keys.signature_algorithm,
            &advert_signing_bytes(session, site, &advertised),
            &keys.signature,
        )
        .map_err(|e| Refusal(format!("the certificate relayed for {site}: {e}")))?;
        if !signed {
            return refuse(format!(
                "the keys relayed for {site} do not carry its signature for this session"
            ));
        }
        Ok(advertised)
    }
}

fn key32(bytes: &[u8], site: &str) -> Result<[u8; 32]> {
    <[u8; 32]>::try_from(bytes).map_err(|_| Refusal(format!("a public key of {site} is not 32 bytes")).into())
}

/// One site's part in one session.
#[derive(Debug)]
pub struct SiteSession {
    params: SessionParams,
    session_id: [u8; 32],
    me: String,
    secrets: SiteSecrets,
    quantizer: Quantizer,
    /// This site's share of the noise, under site-level DP.
    noise: Option<DistributedNoise>,
    stage_timeout: Duration,
    u1: Vec<(String, AdvertisedKeys)>,
    u2: Vec<String>,
    inbox: HashMap<String, SharePair>,
    revealed: bool,
    /// Where each message is logged before it leaves (the agent's egress log).
    egress: Option<Arc<crate::egress::EgressLog>>,
}

impl SiteSession {
    /// Checks the work item's session against the study's own manifest and this
    /// site, and draws fresh keys for it. `dp_sigma` is the study's noise multiplier
    /// from the site's own privacy plan (needed under site-level DP, where the site
    /// adds its share of the noise).
    pub fn new(work: &pb::WorkItem, manifest: &StudyManifest, me: &str, dp_sigma: Option<f64>) -> Result<Self> {
        let Some(sa) = manifest.secagg() else {
            return refuse("the work item carries a secure-aggregation session, the manifest has none");
        };
        let Some(s) = &work.secagg else {
            return refuse("the manifest requires secure aggregation, the work item carries no session");
        };
        let params = medfl_proto::secagg::session_from_pb(work, s);
        params.validate().map_err(|e| Refusal(e.to_string()))?;
        let session_id = params.session_id();
        if s.session_id != session_id {
            return refuse("the session id is not the hash of the session's parameters");
        }
        if params.x_of(me).is_none() {
            return refuse(format!("{me} is not on the session's roster"));
        }
        if params.num_values != manifest.num_params() {
            return refuse(format!(
                "the session masks {} values, the approved model has {}",
                params.num_values,
                manifest.num_params()
            ));
        }
        let n = params.roster.len();
        let (threshold, neighbours) = sa.session_shape(n);
        if params.threshold < threshold {
            return refuse(format!(
                "threshold {} is below the approved {threshold} for {n} sites",
                params.threshold
            ));
        }
        if params.neighbours != neighbours {
            return refuse(format!(
                "{} neighbours per site, the approved graph has {neighbours} for {n} sites",
                params.neighbours
            ));
        }
        let noise = match (manifest.distributed_dp(), dp_sigma) {
            (false, _) => None,
            (true, Some(sigma)) => manifest.distributed_noise(sigma, params.threshold),
            (true, None) => return refuse("site-level DP under secure aggregation needs the study's σ"),
        };
        let quantizer = sa.quantizer(n, noise.as_ref()).map_err(|e| Refusal(e.to_string()))?;
        if quantizer.scale_log2 != params.scale_log2 {
            return refuse(format!(
                "quantization scale 2^{} is not the approved 2^{} for {n} sites (it could wrap the sum)",
                params.scale_log2, quantizer.scale_log2
            ));
        }
        Ok(SiteSession {
            params,
            session_id,
            me: me.to_string(),
            secrets: SiteSecrets::generate().map_err(|e| anyhow!("{e}"))?,
            quantizer,
            noise,
            stage_timeout: Duration::from_secs(sa.stage_timeout_secs),
            u1: Vec::new(),
            u2: Vec::new(),
            inbox: HashMap::new(),
            revealed: false,
            egress: None,
        })
    }

    /// Checks a query's session (federated analytics) against the approved query and
    /// this site, and draws fresh keys for it: `len` values at scale 2^0 on the full
    /// graph, with a threshold of at least the query's `session_threshold`.
    pub fn for_query(
        work: &pb::WorkItem,
        query: &medfl_shared::query::QueryManifest,
        len: usize,
        me: &str,
    ) -> Result<Self> {
        let Some(s) = &work.secagg else {
            return refuse("the query asks for secure aggregation, the work item carries no session");
        };
        let params = medfl_proto::secagg::session_from_pb(work, s);
        params.validate().map_err(|e| Refusal(e.to_string()))?;
        let session_id = params.session_id();
        if s.session_id != session_id {
            return refuse("the session id is not the hash of the session's parameters");
        }
        if params.x_of(me).is_none() {
            return refuse(format!("{me} is not on the session's roster"));
        }
        if params.num_values != len as u64 {
            return refuse(format!(
                "the session masks {} values, the approved query's answer has {len}",
                params.num_values
            ));
        }
        let n = params.roster.len();
        let threshold = query.session_threshold(n);
        if params.threshold < threshold || params.threshold as usize > n {
            return refuse(format!(
                "threshold {} is not between the approved {threshold} and the {n} sites",
                params.threshold
            ));
        }
        if params.neighbours != 0 || params.scale_log2 != 0 {
            return refuse("a query's session runs on the full graph at scale 2^0");
        }
        Ok(SiteSession {
            params,
            session_id,
            me: me.to_string(),
            secrets: SiteSecrets::generate().map_err(|e| anyhow!("{e}"))?,
            quantizer: Quantizer {
                clip_norm: 1.0,
                range: 1.0,
                scale_log2: 0,
            },
            noise: None,
            stage_timeout: Duration::from_secs(query.deadline_secs.min(60)),
            u1: Vec::new(),
            u2: Vec::new(),
            inbox: HashMap::new(),
            revealed: false,
            egress: None,
        })
    }

    /// The session's threshold t: the fewest sites whose inputs an unmasked sum holds.
    pub fn threshold(&self) -> u32 {
        self.params.threshold
    }

    /// The number of sites on the session's roster.
    pub fn roster_len(&self) -> usize {
        self.params.roster.len()
    }

    /// Logs every message of this session to `egress` before it is sent.
    pub fn log_to(&mut self, egress: Arc<crate::egress::EgressLog>) {
        self.egress = Some(egress);
    }

    fn record(&self, kind: &'static str, message: &impl prost::Message) -> Result<()> {
        match &self.egress {
            Some(log) => log.record(
                kind,
                &self.params.study_id,
                self.params.round,
                &message.encode_to_vec(),
                None,
                serde_json::json!({"attempt": self.params.attempt}),
            ),
            None => Ok(()),
        }
    }

    /// This session's public keys, as the site advertises them.
    pub fn public_keys(&self) -> AdvertisedKeys {
        self.secrets.public()
    }

    /// Round 0: advertises this session's public keys, signed.
    pub async fn advertise(&mut self, client: &mut SiteClient<Channel>, creds: &Credentials) -> Result<()> {
        let keys = self.secrets.public();
        let (signature, algorithm) = creds.sign(&advert_signing_bytes(&self.session_id, &self.me, &keys))?;
        let request = pb::SecAggAdvertiseRequest {
            session_id: self.session_id.to_vec(),
            cipher_public_key: keys.cipher.to_vec(),
            mask_public_key: keys.mask.to_vec(),
            signature,
            signature_algorithm: algorithm.to_string(),
        };
        self.record("secagg.advertise", &request)?;
        client.sec_agg_advertise(request).await.context("advertise keys")?;
        Ok(())
    }

    async fn wait_stage(&self, client: &mut SiteClient<Channel>, stage: u32) -> Result<pb::SecAggStage> {
        // Stage 1 may wait for other sites' training, up to the round deadline.
        let start = Instant::now();
        let limit = self.stage_timeout * 2 + Duration::from_secs(if stage == 1 { 7 * 24 * 3600 } else { 0 });
        loop {
            let reply = client
                .sec_agg_poll(pb::SecAggPollRequest {
                    session_id: self.session_id.to_vec(),
                    stage,
                    wait_ms: 1000,
                })
                .await
                .context("poll the secure-aggregation session")?
                .into_inner();
            if reply.failed {
                bail!(
                    "the secure-aggregation session ended at stage {stage}: {}",
                    reply.reason
                );
            }
            if reply.ready {
                if reply.stage != stage {
                    return refuse(format!(
                        "asked for stage {stage}, the coordinator answered {}",
                        reply.stage
                    ));
                }
                return Ok(reply);
            }
            if start.elapsed() > limit {
                bail!("stage {stage} did not open within {limit:?}");
            }
        }
    }

    /// Round 1: checks U1's certificates, signatures and size, then seals a share pair
    /// to each member.
    pub async fn share_keys(&mut self, client: &mut SiteClient<Channel>, creds: &Credentials) -> Result<()> {
        let stage = self.wait_stage(client, 1).await?;
        let mut u1 = Vec::new();
        for keys in &stage.u1 {
            u1.push((keys.site.clone(), creds.verify(&self.session_id, keys)?));
        }
        u1.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<String> = u1.iter().map(|k| k.0.clone()).collect();
        check_rosters(&self.params, &[&names]).map_err(|e| Refusal(e.to_string()))?;
        let peers = names.iter().filter(|v| self.params.are_peers(&self.me, v)).count();
        if peers < self.params.threshold as usize {
            return refuse(format!(
                "only {peers} of this site's neighbours (itself included) are in U1, fewer than t = {}",
                self.params.threshold
            ));
        }
        match u1.iter().find(|(s, _)| s == &self.me) {
            Some((_, k)) if *k == self.secrets.public() => {}
            _ => return refuse("U1 does not carry this site's own keys as it advertised them"),
        }
        let shares = seal_shares(&self.params, &self.secrets, &self.me, &u1).map_err(|e| Refusal(e.to_string()))?;
        self.u1 = u1;
        let request = pb::SecAggShareKeysRequest {
            session_id: self.session_id.to_vec(),
            shares: shares
                .into_iter()
                .map(|(to, ciphertext)| pb::SealedShare {
                    from: self.me.clone(),
                    to,
                    ciphertext,
                })
                .collect(),
        };
        self.record("secagg.shares", &request)?;
        client.sec_agg_share_keys(request).await.context("share keys")?;
        Ok(())
    }

    /// Round 2: opens one share pair from every member of U2, then quantizes, masks
    /// and uploads `delta`. Returns the masked words that left the site.
    pub async fn send_masked(
        &mut self,
        client: &mut SiteClient<Channel>,
        work: &pb::WorkItem,
        manifest: &StudyManifest,
        update_id: &str,
        delta: &[f32],
    ) -> Result<Vec<u32>> {
        let quantizer = self.quantizer;
        let noise_std = self.noise.as_ref().map(|n| n.site_std(&quantizer));
        let delta = delta.to_vec();
        // Quantizing and drawing the noise take a while at 10^7 values: off the reactor.
        let masked = tokio::task::spawn_blocking(move || -> Result<Vec<u32>> {
            let mut masked = Vec::new();
            quantizer.quantize(&delta, &mut masked).map_err(|e| anyhow!("{e}"))?;
            if let Some(std) = noise_std {
                // Noise before masking: no one ever sees this site's input without it.
                medfl_shared::dp::add_discrete_gaussian(&mut masked, std).map_err(|e| anyhow!("{e}"))?;
            }
            Ok(masked)
        })
        .await
        .context("the quantize and noise task")??;
        self.send_words(client, work, &manifest.layout(), update_id, masked)
            .await
    }

    /// Round 2 for words already in Z_2^32 (quantized, noised: a training update, or a
    /// query's noisy answer): opens one share pair from every member of U2, masks and
    /// uploads them. Returns the masked words that left the site.
    pub async fn send_words(
        &mut self,
        client: &mut SiteClient<Channel>,
        work: &pb::WorkItem,
        layout: &[medfl_shared::model::TensorSpec],
        update_id: &str,
        mut masked: Vec<u32>,
    ) -> Result<Vec<u32>> {
        let stage = self.wait_stage(client, 2).await?;
        let u1_names: Vec<String> = self.u1.iter().map(|k| k.0.clone()).collect();
        check_rosters(&self.params, &[&u1_names, &stage.u2]).map_err(|e| Refusal(e.to_string()))?;
        if !stage.u2.contains(&self.me) {
            return refuse("U2 leaves out this site although it shared its keys");
        }
        for from in stage.u2.iter().filter(|v| self.params.are_peers(&self.me, v)) {
            let sealed = stage
                .inbox
                .iter()
                .find(|s| &s.from == from && s.to == self.me)
                .ok_or_else(|| Refusal(format!("no share pair from {from}, a member of U2")))?;
            let keys = self
                .u1
                .iter()
                .find(|k| &k.0 == from)
                .map(|k| k.1)
                .ok_or_else(|| Refusal(format!("{from} is not in U1")))?;
            let pair = open_shares(&self.params, &self.secrets, &self.me, from, &keys, &sealed.ciphertext)
                .map_err(|e| Refusal(e.to_string()))?;
            self.inbox.insert(from.clone(), pair);
        }
        self.u2 = stage.u2.clone();
        let u2_keys: Vec<(String, AdvertisedKeys)> =
            self.u1.iter().filter(|k| self.u2.contains(&k.0)).cloned().collect();
        MaskPlan::for_site(&self.params, &self.secrets, &self.me, &u2_keys)
            .map_err(|e| Refusal(e.to_string()))?
            .apply(0, &mut masked);
        let mut header = medfl_proto::stream::update_header(work, layout, update_id, 1, masked.len() as u64, None);
        if let Some(pb::update_chunk::Body::Header(h)) = &mut header.body {
            h.secagg_session_id = self.session_id.to_vec();
        }
        let messages: Vec<pb::UpdateChunk> = std::iter::once(header)
            .chain(medfl_proto::stream::masked_chunks(&masked))
            .collect();
        client
            .upload_update(futures::stream::iter(messages))
            .await
            .context("upload the masked input")?;
        Ok(masked)
    }

    /// Round 3: checks the unmask request and answers it once: the self-seed share of
    /// each survivor, the masking-key share of each dropped site, never both.
    pub async fn reveal(&mut self, client: &mut SiteClient<Channel>) -> Result<()> {
        if self.revealed {
            return refuse("this site already answered the session's unmask request");
        }
        let stage = self.wait_stage(client, 3).await?;
        let u1_names: Vec<String> = self.u1.iter().map(|k| k.0.clone()).collect();
        check_rosters(&self.params, &[&u1_names, &self.u2, &stage.survivors]).map_err(|e| Refusal(e.to_string()))?;
        check_unmask_request(&self.params, &self.u2, &stage.survivors, &stage.dropped, &self.me)
            .map_err(|e| Refusal(e.to_string()))?;
        let mut shares = Vec::new();
        for site in self.u2.iter().filter(|v| self.params.are_peers(&self.me, v)) {
            let pair = self
                .inbox
                .get(site)
                .ok_or_else(|| Refusal(format!("no share pair from {site}")))?;
            let survivor = stage.survivors.contains(site);
            shares.push(pb::RevealedShare {
                site: site.clone(),
                self_seed: survivor,
                share: if survivor {
                    pair.self_seed.clone()
                } else {
                    pair.mask_key.clone()
                },
            });
        }
        self.revealed = true;
        let request = pb::SecAggRevealRequest {
            session_id: self.session_id.to_vec(),
            shares,
        };
        self.record("secagg.reveal", &request)?;
        client.sec_agg_reveal(request).await.context("reveal shares")?;
        info!(
            survivors = stage.survivors.len(),
            dropped = stage.dropped.len(),
            "unmask request answered"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
name = "sa"
rounds = 2
[model]
kind = "logistic_regression"
[data]
dataset = "d"
label = "y"
features = ["a", "b"]
[selection]
min_sites = 3
[strategy]
weighting = "uniform"
[secure_aggregation]
threshold = 2
clip_norm = 1.0
"#;

    fn work(manifest: &StudyManifest, tweak: impl Fn(&mut SessionParams)) -> pb::WorkItem {
        let sa = manifest.secagg().expect("secagg");
        let mut params = SessionParams {
            study_id: "s-1".into(),
            round: 1,
            attempt: 1,
            roster: vec!["a".into(), "b".into(), "c".into()],
            threshold: sa.session_shape(3).0,
            num_values: manifest.num_params(),
            scale_log2: sa.quantizer(3, None).expect("quantizer").scale_log2,
            neighbours: 0,
        };
        tweak(&mut params);
        pb::WorkItem {
            study_id: params.study_id.clone(),
            round: params.round,
            manifest_hash: manifest.hash(),
            manifest_toml: manifest.to_toml(),
            deadline_unix_ms: 0,
            num_params: manifest.num_params(),
            secagg: Some(medfl_proto::secagg::session_to_pb(&params)),
            ..Default::default()
        }
    }

    fn refusal(work: &pb::WorkItem, manifest: &StudyManifest, me: &str) -> String {
        SiteSession::new(work, manifest, me, None)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn a_session_that_differs_from_the_approved_manifest_is_refused() {
        let m = StudyManifest::from_toml(MANIFEST).expect("manifest");
        assert!(SiteSession::new(&work(&m, |_| {}), &m, "b", None).is_ok());
        assert!(refusal(&work(&m, |_| {}), &m, "z").contains("not on the session's roster"));
        let coarse = work(&m, |p| p.scale_log2 += 1);
        assert!(
            refusal(&coarse, &m, "a").contains("could wrap"),
            "{}",
            refusal(&coarse, &m, "a")
        );
        let lax = work(&m, |p| {
            p.roster.push("d".into());
            p.threshold = 2;
        });
        assert!(refusal(&lax, &m, "a").contains("below the approved"));
        let bigger = work(&m, |p| p.num_values += 1);
        assert!(refusal(&bigger, &m, "a").contains("approved model has"));
        let mut forged = work(&m, |_| {});
        if let Some(s) = &mut forged.secagg {
            s.session_id[0] ^= 1;
        }
        assert!(refusal(&forged, &m, "a").contains("not the hash"));
        let mut missing = work(&m, |_| {});
        missing.secagg = None;
        assert!(refusal(&missing, &m, "a").contains("carries no session"));
    }
}
