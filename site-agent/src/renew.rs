//! Certificate renewal: before its certificate expires the agent makes a new key,
//! sends a CSR over its current mTLS identity and switches to the new certificate
//! without stopping its work. The profile directory keeps one consistent pair: the new
//! key and certificate are written under new names, then `profile.toml` is replaced
//! atomically to point at them.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use medfl_proto::transport::{PROFILE_FILE, Profile};
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::identity::Identity;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::transport::Channel;

use crate::egress::EgressLog;

/// The certificate's remaining and total validity, in seconds.
pub fn validity(profile: &Profile) -> Option<(i64, i64)> {
    let der = CertificateDer::from_pem_slice(profile.cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    let now = medfl_shared::unix_ms(SystemTime::now()) as i64 / 1000;
    Some((
        v.not_after.timestamp() - now,
        v.not_after.timestamp() - v.not_before.timestamp(),
    ))
}

/// Why the site's certificate cannot be used now (expired, or not valid yet, which is
/// usually a wrong clock), in words; `None` when it is within its validity.
pub fn unusable(profile: &Profile) -> Option<String> {
    let der = CertificateDer::from_pem_slice(profile.cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    let now = medfl_shared::unix_ms(SystemTime::now()) as i64 / 1000;
    if now > v.not_after.timestamp() {
        return Some(format!(
            "the site's certificate expired on {}: issue a new bundle (medfl pki issue) or enroll again",
            v.not_after
        ));
    }
    if now < v.not_before.timestamp() {
        return Some(format!(
            "the site's certificate is not valid before {}: check this machine's clock (it reads {} s since 1970)",
            v.not_before, now
        ));
    }
    None
}

/// Whether the certificate should be renewed now: when less than `before` is left,
/// or, without `before`, less than a third of its lifetime.
pub fn due(profile: &Profile, before: Option<Duration>) -> bool {
    match validity(profile) {
        Some((remaining, lifetime)) => {
            let threshold = before.map_or(lifetime / 3, |b| b.as_secs() as i64);
            remaining < threshold
        }
        None => false,
    }
}

/// Renews the certificate of `profile` through `client`; returns the new profile.
pub async fn renew(client: &mut SiteClient<Channel>, profile: &Profile, egress: &EgressLog) -> Result<Profile> {
    // The new key keeps the current key's algorithm.
    let algorithm = profile.signer()?.algorithm();
    let (key, csr_der) = crate::enroll::key_and_csr(algorithm)?;
    let request = pb::RenewRequest { csr_der };
    egress.record(
        "renew",
        "",
        0,
        &prost::Message::encode_to_vec(&request),
        None,
        serde_json::json!({}),
    )?;
    let issued = client
        .renew_certificate(request)
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator refused the renewal ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).context("the renewed certificate")?;
    let renewed = Identity::from_cert_der(&der).context("the renewed certificate names no identity")?;
    let mine = Identity::from_cert_der(
        &CertificateDer::from_pem_slice(profile.cert_pem.as_bytes()).context("the current certificate")?,
    )?;
    if renewed != mine {
        bail!("the coordinator renewed {renewed}, but this agent is {mine}");
    }
    let stamp = medfl_shared::unix_ms(SystemTime::now());
    let cert_name = format!("cert-{stamp}.pem");
    let key_name = format!("key-{stamp}.pem");
    crate::enroll::write(&profile.dir.join(&cert_name), &issued.certificate_pem, false)?;
    crate::enroll::write(
        &profile.dir.join(&key_name),
        &medfl_shared::sign::private_key_pem(key.serialized_der()),
        true,
    )?;
    let mut file = profile.file.clone();
    let (old_cert, old_key) = (file.cert.clone(), file.key.clone());
    file.cert = cert_name.into();
    file.key = key_name.into();
    let tmp = profile.dir.join(format!("{PROFILE_FILE}.tmp"));
    crate::enroll::write(&tmp, &toml::to_string(&file)?, false)?;
    std::fs::rename(&tmp, profile.dir.join(PROFILE_FILE)).context("replace profile.toml")?;
    // The old pair is no longer referenced; remove it if a renewal wrote it.
    for old in [old_cert, old_key] {
        if old.to_string_lossy().contains('-') {
            let _ = std::fs::remove_file(profile.dir.join(old));
        }
    }
    Ok(Profile::load(&profile.dir)?)
}
