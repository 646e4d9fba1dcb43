//! Why a call to the coordinator failed, in one line a person can act on.
//!
//! tonic reports a refused connection as `code: 'The service is currently
//! unavailable', message: "tcp connect error", source: tonic::transport::Error(…)`.
//! The CLI and the agent show [`explain`]'s sentence instead, and exit with the
//! matching [`Failure`] status.

use std::error::Error;

use tonic::Code;

/// The kind of failure, which decides the process's exit status (sysexits.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The coordinator could not be reached (down, wrong address, timeout): 69.
    Unreachable,
    /// A certificate was refused, expired or not yet valid, or the role may not do
    /// this: 77.
    Identity,
    /// The coordinator answered with an error about the request itself: 1.
    Refused,
}

impl Failure {
    /// The exit status for this kind of failure.
    pub fn exit_code(self) -> u8 {
        match self {
            Failure::Unreachable => 69,
            Failure::Identity => 77,
            Failure::Refused => 1,
        }
    }
}

/// One line saying why a call to the coordinator at `coordinator` failed, and the
/// kind of failure; `None` when `error` holds no gRPC status (it did not come from a
/// call).
pub fn explain(error: &(dyn Error + 'static), coordinator: &str) -> Option<(String, Failure)> {
    let chain: Vec<&(dyn Error + 'static)> =
        std::iter::successors(Some(error), |e: &&(dyn Error + 'static)| (*e).source()).collect();
    let status = chain.iter().find_map(|e| e.downcast_ref::<tonic::Status>())?;
    // The transport's own words sit below the status, innermost last.
    let below: Vec<String> = std::iter::successors(status.source(), |e: &&(dyn Error + 'static)| (*e).source())
        .map(|e| e.to_string())
        .collect();
    let text = below.join(": ").to_lowercase();
    let detail = below.last().cloned().unwrap_or_else(|| status.message().to_string());
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let line = match status.code() {
        Code::Unavailable if has(&["connection refused"]) => (
            format!("cannot reach the coordinator at {coordinator} (connection refused): is it running?"),
            Failure::Unreachable,
        ),
        Code::Unavailable if has(&["dns error", "failed to lookup", "name or service not known"]) => (
            format!(
                "cannot resolve the coordinator's host in {coordinator}: check the address in the profile or --coordinator"
            ),
            Failure::Unreachable,
        ),
        Code::Unavailable if has(&["timed out", "timeout"]) => (
            format!(
                "the coordinator at {coordinator} did not answer in time: check the address and that its port is open"
            ),
            Failure::Unreachable,
        ),
        Code::Unavailable if has(&["notvalidyet", "not valid yet"]) => (
            format!(
                "the TLS handshake with {coordinator} failed: a certificate is not valid yet ({detail}); check this machine's clock"
            ),
            Failure::Identity,
        ),
        Code::Unavailable if has(&["expired"]) => (
            format!(
                "the TLS handshake with {coordinator} failed: a certificate has expired ({detail}); renew the identity bundle"
            ),
            Failure::Identity,
        ),
        Code::Unavailable if has(&["certificate", "alert", "handshake", "tls"]) => (
            format!(
                "the TLS handshake with {coordinator} failed ({detail}): the coordinator refused this identity's certificate \
                 (revoked, or issued by another consortium), or the profile's CA is not the coordinator's"
            ),
            Failure::Identity,
        ),
        Code::Unavailable => (
            format!("cannot reach the coordinator at {coordinator}: {detail}"),
            Failure::Unreachable,
        ),
        Code::DeadlineExceeded => (
            format!(
                "the coordinator at {coordinator} did not answer in time: {}",
                status.message()
            ),
            Failure::Unreachable,
        ),
        Code::Unauthenticated | Code::PermissionDenied => (
            format!("the coordinator refused this identity: {}", status.message()),
            Failure::Identity,
        ),
        code => (
            format!("the coordinator answered {}: {}", code_name(code), status.message()),
            Failure::Refused,
        ),
    };
    Some(line)
}

/// A gRPC code as people read it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented (is the coordinator older than this client?)",
        Code::Internal => "internal error",
        Code::Cancelled => "cancelled",
        _ => "an error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Io(&'static str);
    impl std::fmt::Display for Io {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for Io {}

    fn status_over(code: Code, message: &str, cause: &'static str) -> tonic::Status {
        let mut status = tonic::Status::new(code, message);
        status.set_source(std::sync::Arc::new(Io(cause)));
        status
    }

    #[test]
    fn a_refused_connection_is_one_line_that_names_the_address() {
        let status = status_over(
            Code::Unavailable,
            "tcp connect error",
            "Connection refused (os error 111)",
        );
        let (line, kind) = explain(&status, "https://127.0.0.1:39263").expect("a status");
        assert_eq!(
            line,
            "cannot reach the coordinator at https://127.0.0.1:39263 (connection refused): is it running?"
        );
        assert_eq!(kind.exit_code(), 69);
    }

    #[test]
    fn certificate_problems_are_identity_failures() {
        for (cause, words) in [
            ("invalid peer certificate: Expired", "has expired"),
            ("invalid peer certificate: NotValidYet", "clock"),
            (
                "received fatal alert: BadCertificate",
                "refused this identity's certificate",
            ),
        ] {
            let status = status_over(Code::Unavailable, "tls handshake", cause);
            let (line, kind) = explain(&status, "https://c:7443").expect("a status");
            assert!(line.contains(words), "{cause}: {line}");
            assert_eq!(kind, Failure::Identity);
        }
    }

    #[test]
    fn answers_keep_their_message_and_other_errors_are_not_explained() {
        let status = tonic::Status::not_found("no study s-9");
        let (line, kind) = explain(&status, "https://c:7443").expect("a status");
        assert_eq!(line, "the coordinator answered not found: no study s-9");
        assert_eq!(kind, Failure::Refused);
        assert!(explain(&Io("disk full"), "https://c:7443").is_none());
    }
}
