//! Identity profiles and mutually authenticated TLS channels to the coordinator.
//!
//! A profile is the bundle `medfl pki issue` writes: certificate, key, consortium CA
//! and a `profile.toml` naming the coordinator. The CLI, the agent and the coordinator
//! itself all load their identity through [`Profile::load`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The file name of a profile inside a bundle directory.
pub const PROFILE_FILE: &str = "profile.toml";

/// `profile.toml`. Relative paths are relative to the profile's own directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// `site`, `admin`, `auditor` or `coordinator`.
    pub role: String,
    pub name: String,
    /// Coordinator URL, e.g. `https://coordinator.example.org:7443`.
    pub coordinator: String,
    /// The DNS name (or IP) in the coordinator's certificate.
    pub server_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A loaded profile: the PEM material in memory.
#[derive(Clone)]
pub struct Profile {
    pub file: ProfileFile,
    pub dir: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("Profile")
            .field("file", &self.file)
            .field("dir", &self.dir)
            .finish()
    }
}

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parse {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid coordinator address {addr:?}: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("configure TLS: {0}")]
    Tls(tonic::transport::Error),
    #[error("the profile's key: {0}")]
    Key(String),
}

fn read(path: &Path) -> Result<String, TransportError> {
    std::fs::read_to_string(path).map_err(|source| TransportError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Profile {
    /// Loads `path`, a `profile.toml` or the directory that holds one.
    pub fn load(path: &Path) -> Result<Self, TransportError> {
        let file_path = if path.is_dir() {
            path.join(PROFILE_FILE)
        } else {
            path.to_path_buf()
        };
        let text = read(&file_path)?;
        let file: ProfileFile = toml::from_str(&text).map_err(|source| TransportError::Parse {
            path: file_path.clone(),
            source,
        })?;
        let dir = file_path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Profile {
            cert_pem: read(&dir.join(&file.cert))?,
            key_pem: read(&dir.join(&file.key))?,
            ca_pem: read(&dir.join(&file.ca))?,
            file,
            dir,
        })
    }

    /// Returns an mTLS channel to the profile's coordinator (or to `coordinator` when
    /// given). The channel connects lazily and reconnects by itself after a failure.
    pub fn channel(&self, coordinator: Option<&str>) -> Result<Channel, TransportError> {
        let addr = coordinator.unwrap_or(&self.file.coordinator).to_string();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(self.file.server_name.clone());
        let endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|source| TransportError::Address { addr, source })?
            .tls_config(tls)
            .map_err(TransportError::Tls)?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            // Room for a few 1 MiB chunks in flight (HTTP/2's default window is 64 KiB).
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20));
        Ok(endpoint.connect_lazy())
    }

    /// The certificate's key as a signer (P-256 or Ed25519, as the certificate's).
    pub fn signer(&self) -> Result<medfl_shared::sign::Signer, TransportError> {
        use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| TransportError::Key(e.to_string()))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(TransportError::Key("not a PKCS#8 key".into()));
        };
        medfl_shared::sign::Signer::from_pkcs8(pkcs8.secret_pkcs8_der()).map_err(|e| TransportError::Key(e.to_string()))
    }

    /// A study-creation request for `manifest_toml`, signed with this admin's key
    /// over the manifest's canonical hash.
    pub fn signed_create(&self, manifest_toml: &str) -> Result<crate::v1::CreateStudyRequest, TransportError> {
        let manifest = medfl_shared::manifest::StudyManifest::from_toml(manifest_toml)
            .map_err(|e| TransportError::Key(format!("the manifest to sign does not parse: {e}")))?;
        let signer = self.signer()?;
        let signature = signer.sign(&medfl_shared::sign::study_signing_bytes(&manifest.hash()));
        Ok(crate::v1::CreateStudyRequest {
            manifest_toml: manifest_toml.to_string(),
            signature,
            signature_algorithm: signer.algorithm().name().to_string(),
        })
    }
}

impl Profile {
    /// A query's create request, signed like a study's (under the query tag).
    pub fn signed_query(&self, manifest_toml: &str) -> Result<crate::v1::CreateStudyRequest, TransportError> {
        let manifest = medfl_shared::query::QueryManifest::from_toml(manifest_toml)
            .map_err(|e| TransportError::Key(format!("the query to sign does not parse: {e}")))?;
        let signer = self.signer()?;
        let signature = signer.sign(&medfl_shared::sign::query_signing_bytes(&manifest.hash()));
        Ok(crate::v1::CreateStudyRequest {
            manifest_toml: manifest_toml.to_string(),
            signature,
            signature_algorithm: signer.algorithm().name().to_string(),
        })
    }
}

/// Reads a signing key (PKCS#8 DER, either algorithm) from `path`, or makes a P-256 one
/// there on first use: owner-only (0600), created exclusively and fsynced before it is
/// used. The coordinator's audit key and each site's egress key; keys made before
/// P-256 became the default stay Ed25519, and verifiers accept both.
pub fn load_or_create_signing_key(path: &Path) -> Result<medfl_shared::sign::Signer, TransportError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TransportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let der = match std::fs::read(path) {
        Ok(der) => der,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pkcs8 = medfl_shared::sign::Signer::generate_pkcs8(medfl_shared::sign::Algorithm::RECOMMENDED)
                .map_err(|e| TransportError::Key(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(&pkcs8).and_then(|()| f.sync_all()).map_err(io)?;
            pkcs8
        }
        Err(e) => return Err(io(e)),
    };
    medfl_shared::sign::Signer::from_pkcs8(&der).map_err(|e| TransportError::Key(format!("{}: {e}", path.display())))
}
