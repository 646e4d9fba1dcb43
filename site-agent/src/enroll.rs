//! `medfl-agent enroll`: the site makes its own key (it never leaves the site), sends a
//! CSR with the admin's one-time token over TLS (the coordinator verified against the
//! consortium CA; the site has no certificate yet) and writes its identity bundle.

use std::path::Path;

use anyhow::{Context, Result, bail};
use medfl_proto::transport::{PROFILE_FILE, Profile, ProfileFile};
use medfl_proto::v1 as pb;
use medfl_proto::v1::enrollment_client::EnrollmentClient;
use medfl_shared::identity::{Identity, Role};
use medfl_shared::sign::{Algorithm, private_key_pem};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// A fresh `algorithm` key and a CSR over it (DER); the CSR names no identity, the
/// token decides which site it enrols.
pub fn key_and_csr(algorithm: Algorithm) -> Result<(rcgen::KeyPair, Vec<u8>)> {
    let der = medfl_shared::sign::Signer::generate_pkcs8(algorithm)?;
    let key = rcgen::KeyPair::try_from(der).context("generate the site's key")?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "medfl site enrolment");
    let csr = params.serialize_request(&key).context("make the CSR")?;
    Ok((key, csr.der().to_vec()))
}

/// Enrols with `token`; the site's key takes the consortium CA's algorithm unless
/// `algorithm` asks for the other.
pub async fn enroll(
    coordinator: &str,
    token: &str,
    ca: &Path,
    out: &Path,
    server_name: Option<&str>,
    algorithm: Option<Algorithm>,
) -> Result<Profile> {
    let ca_pem = std::fs::read_to_string(ca).with_context(|| format!("read the consortium CA {}", ca.display()))?;
    let algorithm = match algorithm {
        Some(a) => a,
        None => {
            let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
                .with_context(|| format!("{} holds no certificate", ca.display()))?;
            medfl_shared::sign::certificate_algorithm(&der)?
        }
    };
    let server_name = match server_name {
        Some(s) => s.to_string(),
        None => coordinator
            .trim_start_matches("https://")
            .split([':', '/'])
            .next()
            .unwrap_or("localhost")
            .to_string(),
    };
    if out.join(PROFILE_FILE).exists() {
        bail!("{} already holds an identity; refusing to overwrite it", out.display());
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name(server_name.clone());
    let channel = Endpoint::from_shared(coordinator.to_string())
        .with_context(|| format!("coordinator address {coordinator:?}"))?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connect to {coordinator}"))?;
    let (key, csr_der) = key_and_csr(algorithm)?;
    let issued = EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            token: token.trim().to_string(),
            csr_der,
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the coordinator refused the enrolment ({:?}): {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).context("the issued certificate")?;
    let identity = Identity::from_cert_der(&der).context("the issued certificate names no identity")?;
    if identity.role != Role::Site {
        bail!("the coordinator issued a certificate for {identity}, not for a site");
    }
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    write(&out.join("cert.pem"), &issued.certificate_pem, false)?;
    write(&out.join("key.pem"), &private_key_pem(key.serialized_der()), true)?;
    write(&out.join("ca.pem"), &ca_pem, false)?;
    let profile = ProfileFile {
        role: "site".into(),
        name: identity.name.to_string(),
        coordinator: coordinator.to_string(),
        server_name,
        cert: "cert.pem".into(),
        key: "key.pem".into(),
        ca: "ca.pem".into(),
    };
    write(&out.join(PROFILE_FILE), &toml::to_string(&profile)?, false)?;
    Ok(Profile::load(out)?)
}

pub(crate) fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", path.display()))
}
