//! The coordinator's side of secure aggregation: one [`SecureRound`] per round
//! attempt, holding what the sites sent at each stage, and the unmasking at the end.
//! The protocol and its math are in `medfl_shared::secagg`; the coordinator only
//! relays, checks the shape of what it relays, and sums masked inputs mod 2^32, so it
//! never holds one site's update in the clear.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use medfl_proto::v1 as pb;
use medfl_shared::secagg::{
    AdvertisedKeys, MaskPlan, Quantizer, SessionParams, reconstruct_mask_key, reconstruct_seed,
};
use tokio::sync::watch;

use crate::error::ServiceError;

/// Bytes of one sealed share pair: two 33-byte shares and a 16-byte tag.
const SEALED_LEN: usize = 2 * 33 + 16;
const SHARE_LEN: usize = 33;

/// Stages: 0 keys, 1 shares, 2 masked inputs, 3 reveals, 4 done.
#[derive(Debug)]
struct State {
    stage: u32,
    failed: Option<String>,
    adverts: BTreeMap<String, pb::SiteKeys>,
    shares: BTreeMap<String, Vec<pb::SealedShare>>,
    u1: Vec<String>,
    u2: Vec<String>,
    u3: Vec<String>,
    sum: Vec<u32>,
    masked: BTreeSet<String>,
    reveals: BTreeMap<String, Vec<pb::RevealedShare>>,
}

/// One secure-aggregation session: one attempt at one round.
#[derive(Debug)]
pub struct SecureRound {
    pub params: SessionParams,
    pub session_id: [u8; 32],
    pub quantizer: Quantizer,
    state: Mutex<State>,
    stage: watch::Sender<u32>,
}

fn refuse(msg: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument(msg.into())
}

impl SecureRound {
    pub fn new(params: SessionParams, quantizer: Quantizer) -> Result<Self, ServiceError> {
        params
            .validate()
            .map_err(|e| ServiceError::FailedPrecondition(e.to_string()))?;
        Ok(SecureRound {
            session_id: params.session_id(),
            params,
            quantizer,
            state: Mutex::new(State {
                stage: 0,
                failed: None,
                adverts: BTreeMap::new(),
                shares: BTreeMap::new(),
                u1: Vec::new(),
                u2: Vec::new(),
                u3: Vec::new(),
                sum: Vec::new(),
                masked: BTreeSet::new(),
                reveals: BTreeMap::new(),
            }),
            stage: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn to_pb(&self) -> pb::SecAggSession {
        medfl_proto::secagg::session_to_pb(&self.params)
    }

    pub fn check_session(&self, session_id: &[u8]) -> Result<(), ServiceError> {
        if session_id != self.session_id {
            return Err(ServiceError::FailedPrecondition(
                "the secure-aggregation session id is not the open round's (a replay from an earlier round or attempt?)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn expect_stage(state: &State, stage: u32, what: &str) -> Result<(), ServiceError> {
        if let Some(reason) = &state.failed {
            return Err(ServiceError::FailedPrecondition(format!(
                "the session failed: {reason}"
            )));
        }
        if state.stage != stage {
            return Err(ServiceError::FailedPrecondition(format!(
                "{what} belongs to stage {stage}, the session is at stage {}",
                state.stage
            )));
        }
        Ok(())
    }

    /// Round 0: a site's keys (and the certificate it connected with).
    pub fn advertise(
        &self,
        site: &str,
        req: pb::SecAggAdvertiseRequest,
        certificate_der: Vec<u8>,
    ) -> Result<(), ServiceError> {
        let mut st = self.lock();
        Self::expect_stage(&st, 0, "advertising keys")?;
        if self.params.x_of(site).is_none() {
            return Err(ServiceError::PermissionDenied(format!(
                "{site} is not on this session's roster"
            )));
        }
        if st.adverts.contains_key(site) {
            return Err(ServiceError::AlreadyExists(format!(
                "{site} already advertised its keys"
            )));
        }
        if req.cipher_public_key.len() != 32 || req.mask_public_key.len() != 32 {
            return Err(refuse("public keys must be 32-byte X25519 keys"));
        }
        if req.signature.is_empty() || req.signature.len() > 128 {
            return Err(refuse(
                "the advertisement needs a P-256 or Ed25519 signature of at most 128 bytes",
            ));
        }
        if let Err(e) = medfl_shared::sign::Algorithm::from_label(&req.signature_algorithm) {
            return Err(refuse(format!("the advertisement's signature_algorithm: {e}")));
        }
        st.adverts.insert(
            site.to_string(),
            pb::SiteKeys {
                site: site.to_string(),
                cipher_public_key: req.cipher_public_key,
                mask_public_key: req.mask_public_key,
                signature: req.signature,
                certificate_der,
                signature_algorithm: req.signature_algorithm,
            },
        );
        Ok(())
    }

    /// Whether `site` has started this session (its work item is taken).
    pub fn has_advertised(&self, site: &str) -> bool {
        self.lock().adverts.contains_key(site)
    }

    /// Round 1: one sealed pair from `site` to every member of U1.
    pub fn share_keys(&self, site: &str, shares: Vec<pb::SealedShare>) -> Result<(), ServiceError> {
        let mut st = self.lock();
        Self::expect_stage(&st, 1, "sharing keys")?;
        if !st.u1.iter().any(|s| s == site) {
            return Err(ServiceError::PermissionDenied(format!("{site} is not in U1")));
        }
        if st.shares.contains_key(site) {
            return Err(ServiceError::AlreadyExists(format!("{site} already shared its keys")));
        }
        let to: BTreeSet<&str> = shares.iter().map(|s| s.to.as_str()).collect();
        let peers = self.peers_in(&st.u1, site);
        if to != peers || shares.len() != peers.len() {
            return Err(refuse(
                "share keys with exactly one sealed pair for every site of U1 that is this site or its neighbour",
            ));
        }
        if shares
            .iter()
            .any(|s| s.from != site || s.ciphertext.len() != SEALED_LEN)
        {
            return Err(refuse(format!(
                "every sealed pair must come from {site} and be {SEALED_LEN} bytes"
            )));
        }
        st.shares.insert(site.to_string(), shares);
        Ok(())
    }

    /// The members of `set` that exchange shares with `site` (itself included).
    fn peers_in<'a>(&self, set: &'a [String], site: &str) -> BTreeSet<&'a str> {
        set.iter()
            .filter(|v| self.params.are_peers(site, v))
            .map(String::as_str)
            .collect()
    }

    /// Whether `site` may send a masked input now.
    pub fn check_masked(&self, site: &str) -> Result<(), ServiceError> {
        Self::may_send_masked(&self.lock(), site)
    }

    fn may_send_masked(st: &State, site: &str) -> Result<(), ServiceError> {
        Self::expect_stage(st, 2, "a masked input")?;
        if !st.u2.iter().any(|s| s == site) {
            return Err(ServiceError::PermissionDenied(format!("{site} is not in U2")));
        }
        if st.masked.contains(site) {
            return Err(ServiceError::AlreadyExists(format!(
                "{site} already sent its masked input"
            )));
        }
        Ok(())
    }

    /// Round 2: adds a complete masked input into the sum (mod 2^32).
    pub fn add_masked(&self, site: &str, values: &[u32]) -> Result<(), ServiceError> {
        // Checked under the same lock as the sum, so two concurrent streams from one
        // site cannot both be added.
        let mut st = self.lock();
        Self::may_send_masked(&st, site)?;
        if values.len() as u64 != self.params.num_values {
            return Err(refuse("masked input of the wrong length"));
        }
        if st.sum.is_empty() {
            st.sum = vec![0; values.len()];
        }
        medfl_shared::aggregate::add_wrapping(&mut st.sum, values);
        st.masked.insert(site.to_string());
        Ok(())
    }

    /// Round 3: `site`'s shares: the self-seed share of each survivor, the masking-key
    /// share of each dropped site, one per site of U2.
    pub fn reveal(&self, site: &str, shares: Vec<pb::RevealedShare>) -> Result<(), ServiceError> {
        let mut st = self.lock();
        Self::expect_stage(&st, 3, "revealing shares")?;
        if !st.u3.iter().any(|s| s == site) {
            return Err(ServiceError::PermissionDenied(format!(
                "{site} is not among the survivors"
            )));
        }
        if st.reveals.contains_key(site) {
            return Err(ServiceError::AlreadyExists(format!(
                "{site} already answered the unmask request"
            )));
        }
        let survivors: BTreeSet<&str> = st.u3.iter().map(String::as_str).collect();
        let named: BTreeSet<&str> = shares.iter().map(|s| s.site.as_str()).collect();
        let peers = self.peers_in(&st.u2, site);
        if named != peers || shares.len() != peers.len() {
            return Err(refuse(
                "reveal exactly one share for every site of U2 that is this site or its neighbour",
            ));
        }
        for s in &shares {
            if s.self_seed != survivors.contains(s.site.as_str()) || s.share.len() != SHARE_LEN {
                return Err(refuse(format!(
                    "the share for {} must be its {} share ({SHARE_LEN} bytes)",
                    s.site,
                    if survivors.contains(s.site.as_str()) {
                        "self-seed"
                    } else {
                        "masking-key"
                    }
                )));
            }
        }
        st.reveals.insert(site.to_string(), shares);
        Ok(())
    }

    /// What a site polling for `stage` gets: not ready yet, failed, or the stage's inputs.
    pub fn poll(&self, site: &str, stage: u32) -> Result<Option<pb::SecAggStage>, ServiceError> {
        if !(1..=3).contains(&stage) {
            return Err(refuse(format!("stage {stage} is not 1, 2 or 3")));
        }
        let st = self.lock();
        if let Some(reason) = &st.failed {
            return Ok(Some(pb::SecAggStage {
                stage,
                failed: true,
                reason: reason.clone(),
                ..Default::default()
            }));
        }
        if st.stage < stage {
            return Ok(None);
        }
        let mut out = pb::SecAggStage {
            stage,
            ready: true,
            ..Default::default()
        };
        match stage {
            1 => out.u1 = st.u1.iter().filter_map(|s| st.adverts.get(s).cloned()).collect(),
            2 => {
                out.u2 = st.u2.clone();
                out.inbox = st
                    .u2
                    .iter()
                    .filter_map(|from| st.shares.get(from)?.iter().find(|s| s.to == site).cloned())
                    .collect();
            }
            _ => {
                out.survivors = st.u3.clone();
                out.dropped = st.u2.iter().filter(|s| !st.u3.contains(s)).cloned().collect();
            }
        }
        Ok(Some(out))
    }

    /// A receiver that changes whenever the stage advances or the session fails.
    pub fn watch(&self) -> watch::Receiver<u32> {
        self.stage.subscribe()
    }

    /// How many sites of the current stage's set have answered, and how many may.
    pub fn progress(&self) -> (usize, usize) {
        let st = self.lock();
        match st.stage {
            0 => (st.adverts.len(), self.params.roster.len()),
            1 => (st.shares.len(), st.u1.len()),
            2 => (st.masked.len(), st.u2.len()),
            3 => (st.reveals.len(), st.u3.len()),
            _ => (0, 0),
        }
    }

    /// Closes the current stage with whoever answered; fails the session (nothing
    /// released) when fewer than t did. Returns the failure reason, if any.
    pub fn advance(&self) -> Option<String> {
        let t = self.params.threshold as usize;
        let mut st = self.lock();
        let (answered, name): (Vec<String>, &str) = match st.stage {
            0 => (st.adverts.keys().cloned().collect(), "advertised keys"),
            1 => (st.shares.keys().cloned().collect(), "shared keys"),
            2 => (st.masked.iter().cloned().collect(), "sent a masked input"),
            3 => (st.reveals.keys().cloned().collect(), "answered the unmask request"),
            _ => return None,
        };
        if answered.len() < t {
            let reason = format!(
                "only {} sites {name} at secure-aggregation stage {}, the threshold is {t}; nothing was released",
                answered.len(),
                st.stage
            );
            st.failed = Some(reason.clone());
            st.sum = Vec::new();
            drop(st);
            self.stage.send_modify(|s| *s += 100);
            return Some(reason);
        }
        match st.stage {
            0 => st.u1 = answered,
            1 => st.u2 = answered,
            2 => st.u3 = answered,
            _ => {}
        }
        st.stage += 1;
        let stage = st.stage;
        drop(st);
        self.stage.send_replace(stage);
        None
    }

    /// Marks the session failed (e.g. the round was aborted), waking every poller.
    pub fn fail(&self, reason: &str) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(reason.to_string());
            st.sum = Vec::new();
        }
        drop(st);
        self.stage.send_modify(|s| *s += 100);
    }

    /// After stage 3: reconstructs the secrets, removes the masks and returns the
    /// decoded sum of U3's quantized updates and U3. CPU-heavy: call off the reactor.
    /// The sites whose masked input was summed.
    pub fn masked_sites(&self) -> Vec<String> {
        self.lock().masked.iter().cloned().collect()
    }

    pub fn unmask(&self) -> Result<(Vec<f32>, Vec<String>), ServiceError> {
        let (sum, u3) = self.unmask_words()?;
        let mut decoded = vec![0f32; sum.len()];
        self.quantizer.dequantize(&sum, &mut decoded);
        Ok((decoded, u3))
    }

    /// The unmasked sum as words mod 2^32 (two's complement integers: a query's noisy
    /// totals), and U3.
    pub fn unmask_words(&self) -> Result<(Vec<u32>, Vec<String>), ServiceError> {
        let t = self.params.threshold;
        let st = self.lock();
        if st.stage != 4 {
            return Err(ServiceError::FailedPrecondition(
                "the session has not finished its stages".into(),
            ));
        }
        let key_of = |site: &str| -> Result<AdvertisedKeys, ServiceError> {
            let k = st
                .adverts
                .get(site)
                .ok_or_else(|| ServiceError::Internal(format!("no keys for {site}")))?;
            let arr = |b: &[u8]| <[u8; 32]>::try_from(b).map_err(|_| ServiceError::Internal("key length".into()));
            Ok(AdvertisedKeys {
                cipher: arr(&k.cipher_public_key)?,
                mask: arr(&k.mask_public_key)?,
            })
        };
        let mut shares_of: HashMap<&str, Vec<Vec<u8>>> = HashMap::new();
        for revealed in st.reveals.values() {
            for s in revealed {
                shares_of.entry(s.site.as_str()).or_default().push(s.share.clone());
            }
        }
        let failed = |site: &str, e: medfl_shared::secagg::SecAggError| {
            ServiceError::FailedPrecondition(format!("cannot reconstruct the secret of {site}: {e}"))
        };
        let mut seeds = HashMap::new();
        let mut survivors = Vec::new();
        for u in &st.u3 {
            let shares = shares_of.get(u.as_str()).cloned().unwrap_or_default();
            seeds.insert(u.clone(), reconstruct_seed(&shares, t).map_err(|e| failed(u, e))?);
            survivors.push((u.clone(), key_of(u)?));
        }
        let mut dropped = HashMap::new();
        for v in st.u2.iter().filter(|v| !st.u3.contains(v)) {
            let shares = shares_of.get(v.as_str()).cloned().unwrap_or_default();
            let key = reconstruct_mask_key(&shares, t, v, &key_of(v)?.mask).map_err(|e| failed(v, e))?;
            dropped.insert(v.clone(), key);
        }
        let plan = MaskPlan::for_unmasking(&self.params, &survivors, &seeds, &dropped)
            .map_err(|e| ServiceError::FailedPrecondition(e.to_string()))?;
        let mut sum = st.sum.clone();
        let u3 = st.u3.clone();
        drop(st);
        plan.apply(0, &mut sum);
        Ok((sum, u3))
    }
}
