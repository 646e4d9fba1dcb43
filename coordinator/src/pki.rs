//! The consortium PKI: a CA, and certificates that name their holder as
//! `spiffe://medfl/<role>/<name>`, written as ready-to-use profile bundles.
//!
//! Keys are ECDSA P-256 by default or Ed25519 (`--algorithm`); an identity takes its
//! CA's algorithm unless asked otherwise. Every key file is PKCS#8 v1 PEM, mode 0600,
//! which OpenSSL, curl, Python, Go and Java read.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use medfl_proto::transport::{PROFILE_FILE, ProfileFile};
use medfl_shared::identity::{Identity, Role};
use medfl_shared::sign::{Algorithm, certificate_algorithm, private_key_pem};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const CONSORTIUM_FILE: &str = "consortium.toml";

/// Where members reach the coordinator; recorded when its certificate is issued and
/// used as the default in every later bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consortium {
    pub coordinator: String,
    pub server_name: String,
}

/// Creates a consortium CA with an `algorithm` key in `dir` (refuses to overwrite one).
pub fn init(dir: &Path, algorithm: Algorithm) -> Result<()> {
    if dir.join(CA_KEY).exists() {
        bail!("{} already holds a CA; refusing to overwrite it", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let key = new_key(algorithm).context("generate CA key")?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "medfl consortium CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    let cert = params.self_signed(&key).context("sign CA certificate")?;
    write_file(&dir.join(CA_CERT), &cert.pem())?;
    write_secret(&dir.join(CA_KEY), &private_key_pem(key.serialized_der()))?;
    Ok(())
}

/// The algorithm of the CA in `dir`.
pub fn ca_algorithm(dir: &Path) -> Result<Algorithm> {
    let pem =
        std::fs::read_to_string(dir.join(CA_CERT)).with_context(|| format!("read the CA in {}", dir.display()))?;
    pem_certificate_algorithm(&pem)
}

/// The key algorithm of the first certificate in `pem`.
pub fn pem_certificate_algorithm(pem: &str) -> Result<Algorithm> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).context("parse the certificate")?;
    Ok(certificate_algorithm(&der)?)
}

/// What to put in one issued certificate and its bundle.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub identity: Identity,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: i64,
    /// Coordinator URL for the profile; defaults to the consortium's.
    pub coordinator: Option<String>,
    /// The key's algorithm; defaults to the CA's.
    pub algorithm: Option<Algorithm>,
}

/// Issues a key and certificate signed by the CA in `dir` and writes the bundle
/// `dir/<name>/{cert.pem,key.pem,ca.pem,profile.toml}`; returns the bundle directory.
pub fn issue(dir: &Path, req: &IssueRequest) -> Result<PathBuf> {
    let ca_pem =
        std::fs::read_to_string(dir.join(CA_CERT)).with_context(|| format!("read the CA in {}", dir.display()))?;
    let ca_key_pem =
        std::fs::read_to_string(dir.join(CA_KEY)).with_context(|| format!("read the CA key in {}", dir.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parse CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parse CA certificate")?;

    let mut dns = req.dns.clone();
    let mut ips = req.ips.clone();
    if req.identity.role == Role::Coordinator && dns.is_empty() && ips.is_empty() {
        dns.push("localhost".into());
        ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    let algorithm = match req.algorithm {
        Some(a) => a,
        None => pem_certificate_algorithm(&ca_pem)?,
    };
    let key = new_key(algorithm).context("generate key")?;
    let now = OffsetDateTime::now_utc();
    let cert = leaf_params(&req.identity, &dns, &ips, now, req.days)?
        .signed_by(&key, &issuer)
        .context("sign certificate")?;

    let consortium = if req.identity.role == Role::Coordinator {
        let c = Consortium {
            coordinator: req.coordinator.clone().unwrap_or_else(|| {
                format!(
                    "https://{}:7443",
                    dns.first().cloned().unwrap_or_else(|| ips[0].to_string())
                )
            }),
            server_name: dns.first().cloned().unwrap_or_else(|| ips[0].to_string()),
        };
        write_file(&dir.join(CONSORTIUM_FILE), &toml::to_string(&c)?)?;
        c
    } else {
        let mut c = load_consortium(dir).unwrap_or(Consortium {
            coordinator: "https://localhost:7443".into(),
            server_name: "localhost".into(),
        });
        if let Some(addr) = &req.coordinator {
            c.coordinator = addr.clone();
        }
        c
    };

    let bundle = dir.join(req.identity.name.as_str());
    std::fs::create_dir_all(&bundle).with_context(|| format!("create {}", bundle.display()))?;
    write_file(&bundle.join("cert.pem"), &cert.pem())?;
    write_secret(&bundle.join("key.pem"), &private_key_pem(key.serialized_der()))?;
    write_file(&bundle.join("ca.pem"), &ca_pem)?;
    let profile = ProfileFile {
        role: req.identity.role.to_string(),
        name: req.identity.name.to_string(),
        coordinator: consortium.coordinator,
        server_name: consortium.server_name,
        cert: "cert.pem".into(),
        key: "key.pem".into(),
        ca: "ca.pem".into(),
    };
    write_file(&bundle.join(PROFILE_FILE), &toml::to_string(&profile)?)?;
    Ok(bundle)
}

/// A fresh key for a certificate: the same key signs what its holder signs (secure
/// aggregation adverts, study manifests), with the key's algorithm.
pub fn new_key(algorithm: Algorithm) -> Result<KeyPair> {
    let der = medfl_shared::sign::Signer::generate_pkcs8(algorithm)?;
    KeyPair::try_from(der).with_context(|| format!("load the new {algorithm} key"))
}

/// A self-signed ECDSA P-256 certificate and key (PEM) for the dashboard when the
/// operator gives none. Browsers accept neither Ed25519 server keys nor chains signed
/// with Ed25519, so an Ed25519 consortium's own keys cannot serve them.
pub fn self_signed_web_certificate(names: &[String], days: i64) -> Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate a P-256 key")?;
    let mut params = CertificateParams::new(names.to_vec()).context("dashboard certificate names")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "medfl dashboard (self-signed)");
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days);
    let cert = params.self_signed(&key).context("sign the dashboard certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// How far back a certificate's validity starts, for clocks that run behind. Its
/// issue time is `not_before + BACKDATE`, which revocation compares against.
pub const BACKDATE: Duration = Duration::hours(1);

fn leaf_params(
    identity: &Identity,
    dns: &[String],
    ips: &[IpAddr],
    issued: OffsetDateTime,
    days: i64,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, identity.to_string());
    params
        .subject_alt_names
        .push(SanType::URI(identity.uri().try_into().context("identity URI")?));
    for name in dns {
        params.subject_alt_names.push(SanType::DnsName(
            name.clone().try_into().with_context(|| format!("DNS name {name:?}"))?,
        ));
    }
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = issued - BACKDATE;
    params.not_after = issued + Duration::days(days.max(1));
    Ok(params)
}

/// The consortium CA, loaded by a coordinator that enrols sites.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate the CA signed over a CSR.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub not_after: OffsetDateTime,
}

impl Ca {
    /// Loads `dir/ca.pem` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Self> {
        let ca_pem =
            std::fs::read_to_string(dir.join(CA_CERT)).with_context(|| format!("read the CA in {}", dir.display()))?;
        let key_pem = std::fs::read_to_string(dir.join(CA_KEY))
            .with_context(|| format!("read the CA key in {}", dir.display()))?;
        let key = KeyPair::from_pem(&key_pem).context("parse CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).context("parse CA certificate")?;
        Ok(Ca { issuer, ca_pem })
    }

    /// Signs a certificate for `identity` over the public key of `csr_der`, after
    /// checking the CSR's own signature (the requester holds the key) and that any
    /// identity it asks for is `identity`. Its issue time is `issued`.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        issued: OffsetDateTime,
        days: i64,
    ) -> std::result::Result<Issued, String> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| format!("the CSR does not parse or its signature does not verify: {e}"))?;
        for san in &csr.params.subject_alt_names {
            if let SanType::URI(uri) = san
                && uri.as_str() != identity.uri()
            {
                return Err(format!(
                    "the CSR asks for {}, but this enrolment is for {}",
                    uri.as_str(),
                    identity.uri()
                ));
            }
        }
        let cert = leaf_params(identity, &[], &[], issued, days)
            .map_err(|e| format!("{e:#}"))?
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| format!("signing failed: {e}"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            not_after: issued + Duration::days(days.max(1)),
        })
    }
}

/// A CSR for `identity` made with `key` (DER), as an enrolling agent sends it.
pub fn csr_for(identity: &Identity, key: &KeyPair) -> Result<Vec<u8>> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, identity.to_string());
    params
        .subject_alt_names
        .push(SanType::URI(identity.uri().try_into().context("identity URI")?));
    Ok(params.serialize_request(key).context("make the CSR")?.der().to_vec())
}

fn load_consortium(dir: &Path) -> Option<Consortium> {
    toml::from_str(&std::fs::read_to_string(dir.join(CONSORTIUM_FILE)).ok()?).ok()
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), Algorithm::P256).expect("init CA");
        assert!(
            init(dir.path(), Algorithm::P256).is_err(),
            "a second init must not overwrite the CA"
        );
        let identity = Identity::new(Role::Site, "hospital-a".parse().expect("name"));
        let bundle = issue(
            dir.path(),
            &IssueRequest {
                identity: identity.clone(),
                dns: vec![],
                ips: vec![],
                days: 30,
                coordinator: None,
                algorithm: None,
            },
        )
        .expect("issue");
        let profile = medfl_proto::transport::Profile::load(&bundle).expect("load profile");
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(profile.cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .expect("cert pem");
        assert_eq!(Identity::from_cert_der(&der).expect("identity"), identity);
        assert_eq!(certificate_algorithm(&der).expect("algorithm"), Algorithm::P256);
        assert_eq!(profile.signer().expect("key").algorithm(), Algorithm::P256);
    }

    #[test]
    fn an_identity_takes_its_cas_algorithm_unless_asked_otherwise() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), Algorithm::Ed25519).expect("init CA");
        assert_eq!(ca_algorithm(dir.path()).expect("CA"), Algorithm::Ed25519);
        let issue_as = |name: &str, algorithm| {
            let req = IssueRequest {
                identity: Identity::new(Role::Admin, name.parse().expect("name")),
                dns: vec![],
                ips: vec![],
                days: 30,
                coordinator: None,
                algorithm,
            };
            medfl_proto::transport::Profile::load(&issue(dir.path(), &req).expect("issue")).expect("profile")
        };
        let same = issue_as("alice", None);
        assert_eq!(same.signer().expect("key").algorithm(), Algorithm::Ed25519);
        let other = issue_as("bob", Some(Algorithm::P256));
        assert_eq!(other.signer().expect("key").algorithm(), Algorithm::P256);
        // PKCS#8 v1 (RFC 8410): 48 bytes for Ed25519, no attached public key.
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(same.key_pem.as_bytes()).expect("pem");
        assert_eq!(der.secret_pkcs8_der().len(), 48);
        for key in [
            dir.path().join("ca.key"),
            same.dir.join("key.pem"),
            other.dir.join("key.pem"),
        ] {
            let mode = std::fs::metadata(&key).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
    }
}
