//! The `medfl-agent` binary's documented exit statuses for a configuration it cannot
//! use (README, "Exit status"). Building this test also gives `deploy/check.sh` the
//! real `target/debug/medfl-agent` to verify the systemd unit against.

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medfl-agent"))
        .args(args)
        .output()
        .expect("run medfl-agent")
}

#[test]
fn a_missing_config_is_status_64_with_one_line() {
    let out = agent(&[]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--config agent.toml is required"), "{stderr}");
}

#[test]
fn an_unreadable_config_is_status_64_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "profile = \"nowhere\"\n[[datasets]]\nname = 5\n").expect("write");
    let out = agent(&["--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad configuration"), "{stderr}");
    assert!(stderr.contains("agent.toml"), "{stderr}");
}
