//! Caller identities: `spiffe://medfl/<role>/<name>` URI SANs in certificates.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The trust domain every medfl identity lives in.
pub const TRUST_DOMAIN: &str = "medfl";

/// What a caller may do; fixed by its certificate, never by a message field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Site,
    Admin,
    Auditor,
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "site" => Ok(Role::Site),
            "admin" => Ok(Role::Admin),
            "auditor" => Ok(Role::Auditor),
            "coordinator" => Ok(Role::Coordinator),
            other => Err(IdentityError::UnknownRole(other.to_string())),
        }
    }
}

/// A validated principal name: 1 to 64 characters of `[a-z0-9._-]`, starting with a
/// letter or digit, so it is safe in URIs, file names, store keys and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        let first_ok = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if s.len() > 64 || !first_ok || !s.chars().all(ok_char) {
            return Err(IdentityError::BadName(s));
        }
        Ok(Name(s))
    }
}

impl FromStr for Name {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::try_from(s.to_string())
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A verified caller: role and name, as read from its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: Name,
}

impl Identity {
    pub fn new(role: Role, name: Name) -> Self {
        Identity { role, name }
    }

    /// Returns the SPIFFE URI that names this identity in a certificate.
    pub fn uri(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}/{}", self.role, self.name)
    }

    /// Parses `spiffe://medfl/<role>/<name>`.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .and_then(|r| r.strip_prefix(TRUST_DOMAIN))
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| IdentityError::NotMedfl(uri.to_string()))?;
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::NotMedfl(uri.to_string()))?;
        Ok(Identity {
            role: role.parse()?,
            name: name.parse()?,
        })
    }

    /// Reads the one medfl URI SAN of a DER certificate. The certificate must already
    /// have been verified against the consortium CA by the TLS layer.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?
            .ok_or(IdentityError::NoIdentity)?;
        let mut found = None;
        for general_name in &san.value.general_names {
            if let GeneralName::URI(uri) = general_name
                && uri.starts_with("spiffe://")
            {
                if found.is_some() {
                    return Err(IdentityError::Ambiguous);
                }
                found = Some(Identity::from_uri(uri)?);
            }
        }
        found.ok_or(IdentityError::NoIdentity)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("unknown role {0:?}: expected site, admin, auditor or coordinator")]
    UnknownRole(String),
    #[error("invalid name {0:?}: use 1 to 64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
    BadName(String),
    #[error("{0:?} is not a medfl identity (expected spiffe://medfl/<role>/<name>)")]
    NotMedfl(String),
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate carries no spiffe://medfl/<role>/<name> URI SAN")]
    NoIdentity,
    #[error("certificate carries more than one spiffe:// URI SAN")]
    Ambiguous,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips() {
        let id = Identity::new(Role::Site, "hospital-a".parse().expect("valid name"));
        assert_eq!(id.uri(), "spiffe://medfl/site/hospital-a");
        assert_eq!(Identity::from_uri(&id.uri()), Ok(id));
    }

    #[test]
    fn refuses_foreign_and_malformed_uris() {
        assert!(matches!(
            Identity::from_uri("spiffe://other/site/a"),
            Err(IdentityError::NotMedfl(_))
        ));
        assert!(matches!(
            Identity::from_uri("spiffe://medfl/root/a"),
            Err(IdentityError::UnknownRole(_))
        ));
        assert!(matches!(
            Identity::from_uri("spiffe://medfl/site/A/../b"),
            Err(IdentityError::BadName(_))
        ));
        assert!(matches!(
            Identity::from_uri("spiffe://medfl/site"),
            Err(IdentityError::NotMedfl(_))
        ));
    }
}
