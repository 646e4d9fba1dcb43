//! Crash points for the crash tests, through the `fail` crate, compiled only with the
//! `failpoints` feature (a plain `cargo test` turns it on through the root package's
//! dev-dependencies; a release build has neither the points nor their names).
//!
//! A point ends the process at once with status 137, as a kill would: no destructor
//! runs, so nothing flushes a store that a real crash would not have flushed (a panic
//! would be caught by tokio and unwind). Points are armed by the `FAILPOINTS`
//! environment variable, `name=return` pairs separated by `;`, read by
//! [`setup_from_env`] when a binary starts.

/// Ends the process at the named point when it is armed. Expands to nothing unless the
/// calling crate's `failpoints` feature is on.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoints::crash_if_armed($name);
    };
}

/// Arms the points `FAILPOINTS` names (`after_charge=return;before_commit=return`).
#[cfg(feature = "failpoints")]
pub fn setup_from_env() {
    let Ok(spec) = std::env::var("FAILPOINTS") else { return };
    for pair in spec.split(';').filter(|p| !p.trim().is_empty()) {
        let Some((name, actions)) = pair.split_once('=') else {
            tracing::warn!(pair, "FAILPOINTS: expected name=actions");
            continue;
        };
        if let Err(e) = fail::cfg(name.trim(), actions.trim()) {
            tracing::warn!(name, error = %e, "FAILPOINTS: cannot arm the point");
        }
    }
}

/// Without the `failpoints` feature there are no points to arm.
#[cfg(not(feature = "failpoints"))]
pub fn setup_from_env() {}

/// Ends the process with status 137 if the point `name` is armed.
#[cfg(feature = "failpoints")]
pub fn crash_if_armed(name: &str) {
    fail::eval(name, |_| {
        tracing::warn!(failpoint = name, "failpoint: ending the process as a crash would");
        std::process::exit(137)
    });
}
