//! Crash recovery: a coordinator process and agent processes killed with SIGKILL at
//! many points of a 10-round DP study. The study completes, every round is committed
//! once, and every ledger holds exactly one charge per released output.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::common::*;
use medfl::Federation;
use medfl_proto::v1 as pb;
use rand::{Rng, SeedableRng, rngs::StdRng};

const ROUNDS: u32 = 10;
const PRIVACY: &str = "sample_rate = 0.2\nsteps_per_round = 3\nnoise_multiplier = 1.5\nbudget_epsilon = 50.0";

fn crash_manifest(table: &medfl_site_agent::data::Table) -> String {
    dp_manifest(table, ROUNDS, 3, PRIVACY)
        .replace("max_attempts = 1", "max_attempts = 50")
        .replace("round_deadline_secs = 60", "round_deadline_secs = 2")
}

/// Checks what the issue asks after the crashes: completed, each round committed once,
/// the coordinator's ledger exactly the committed contributions (one audit entry per
/// charge), the audit log intact, and `audit recompute` agreeing.
async fn check_exactly_once(fed: &mut Federation, id: &str) -> pb::StudyStatus {
    let status = fed
        .wait_for(id, Duration::from_secs(240), |i| {
            i.state == pb::StudyState::Completed as i32
        })
        .await
        .expect("the study completes after the crashes");
    let info = status.info.clone().expect("info");
    assert_eq!(info.state, pb::StudyState::Completed as i32, "{}", info.reason);
    assert_eq!(info.rounds_completed, ROUNDS);
    let committed: Vec<u32> = status.rounds.iter().filter(|r| r.committed).map(|r| r.round).collect();
    assert_eq!(
        committed,
        (1..=ROUNDS).collect::<Vec<_>>(),
        "every round committed exactly once"
    );
    assert!(status.rounds.iter().all(|r| r.reason != "open"), "no attempt left open");
    // A committed round names exactly the selected sites it dropped at the deadline;
    // the laggard is among them whenever it was selected.
    for r in status.rounds.iter().filter(|r| r.committed) {
        let late: Vec<&String> = r.selected.iter().filter(|s| !r.contributors.contains(s)).collect();
        let want = if late.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = late.iter().map(|s| s.as_str()).collect();
            format!("dropped at the deadline (no update): {}", names.join(", "))
        };
        assert_eq!(r.reason, want, "round {}", r.round);
    }
    assert!(
        status.rounds.iter().any(|r| r.reason.contains("hospital-slow")),
        "the laggard is dropped, with the reason on record"
    );

    let contributed: BTreeSet<(u32, String)> = status
        .rounds
        .iter()
        .filter(|r| r.committed)
        .flat_map(|r| r.contributors.iter().map(move |s| (r.round, s.clone())))
        .collect();
    let charged: BTreeSet<(u32, String)> = audit_ledger(fed, id)
        .iter()
        .map(|c| {
            (
                c["round"].as_u64().expect("round") as u32,
                c["site"].as_str().expect("site").to_string(),
            )
        })
        .collect();
    assert_eq!(
        charged, contributed,
        "one charge per released contribution, none for anything else"
    );

    let auditor = fed.pki.join("auditor");
    let auditor = auditor.to_str().expect("utf8");
    let out = fed.dir.join("audit-after-crashes.jsonl");
    let export = medfl(&[
        "audit",
        "export",
        "--out",
        out.to_str().expect("utf8"),
        "--profile",
        auditor,
    ]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let verify = medfl(&["audit", "verify", out.to_str().expect("utf8")]);
    assert!(
        verify.status.success(),
        "the audit chain survives the kills: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let log = std::fs::read_to_string(&out).expect("export");
    let charge_entries = log.matches("\"action\":\"budget.charge\"").count();
    assert_eq!(charge_entries, contributed.len(), "no commit batch was applied twice");
    let recompute = medfl(&["audit", "recompute", "--study", id, "--profile", auditor]);
    assert!(
        recompute.status.success(),
        "{}",
        String::from_utf8_lossy(&recompute.stdout)
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_at_a_dozen_points_finishes_the_study_charging_once() {
    let (table, _, tables) = iid_site_tables(3);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .tables(tables)
        .dir(owned.path())
        .agent_policy("max_epsilon = 50.0")
        .coordinator_process(std::path::Path::new(env!("CARGO_BIN_EXE_medfl")))
        .build()
        .await
        .expect("federation starts");
    let laggard = spawn_laggard(&fed, table.columns.clone());
    let id = fed.create_study(&crash_manifest(&table)).await.expect("create");
    fed.start_study(&id).await.expect("start");
    let mut rng = StdRng::seed_from_u64(20261128);
    let mut kills = Vec::new();
    let started = Instant::now();
    let mut seen = 0;
    while kills.len() < 12 && started.elapsed() < Duration::from_secs(180) {
        // Wait for progress since the last restart (an attempt opened or ended), then
        // kill at a random moment of what follows.
        let status = fed.status(&id).await.expect("status");
        if status
            .info
            .as_ref()
            .is_some_and(|i| i.state != pb::StudyState::Running as i32)
        {
            break;
        }
        // Spread the kills over the whole study: kill k waits for round 1 + k·10/12.
        let rounds_done = status.info.as_ref().map_or(0, |i| i.rounds_completed);
        let target = 1 + kills.len() as u32 * ROUNDS / 12;
        if status.rounds.len() <= seen || rounds_done + 1 < target {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        seen = status.rounds.len();
        match kills.len() % 4 {
            // Between the commit batch (the charge) and the announcement (the release).
            1 => {
                fed.restart_coordinator_with_env(&[("FAILPOINTS", "after_commit=return")])
                    .await
                    .expect("restart with failpoint");
                let exit = fed.wait_coordinator_exit(Duration::from_secs(60)).await;
                kills.push(format!("after_commit at round {} ({exit:?})", rounds_done + 1));
            }
            // After the round's model is written, before the batch that commits it.
            3 => {
                fed.restart_coordinator_with_env(&[("FAILPOINTS", "before_commit=return")])
                    .await
                    .expect("restart with failpoint");
                let exit = fed.wait_coordinator_exit(Duration::from_secs(60)).await;
                kills.push(format!("before_commit at round {} ({exit:?})", rounds_done + 1));
            }
            _ => {
                let delay = rng.random_range(0..1500);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                fed.kill_coordinator();
                kills.push(format!("SIGKILL {delay} ms into round {}", rounds_done + 1));
            }
        }
        fed.restart_coordinator().await.expect("restart");
    }
    eprintln!("coordinator kill points survived ({}): {kills:#?}", kills.len());
    assert!(
        kills.len() >= 10,
        "only {} kill points before the study ended",
        kills.len()
    );
    let status = check_exactly_once(&mut fed, &id).await;
    laggard.abort();
    let interrupted = status
        .rounds
        .iter()
        .filter(|r| r.reason.starts_with("interrupted"))
        .count();
    assert!(
        interrupted >= 1,
        "kills mid-round leave interrupted attempts on the record"
    );
    // Attempt numbers never repeat within a round, across restarts.
    let mut attempts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for r in &status.rounds {
        attempts.entry(r.round).or_default().push(r.attempt);
    }
    for (round, list) in attempts {
        let unique: BTreeSet<_> = list.iter().collect();
        assert_eq!(unique.len(), list.len(), "round {round}: attempts {list:?}");
    }
    fed.stop_agents().await;
    // Each site's own ledger: one charge per round it released, never two.
    for name in fed.site_names.clone() {
        charged_once_per_round(&fed.dir.join(&name), &name);
    }
    fed.shutdown().await.expect("clean shutdown");
}

/// A site's own ledger holds one charge per round it released, never two; returns
/// the charges per round.
fn charged_once_per_round(site: &std::path::Path, name: &str) -> BTreeMap<u32, usize> {
    let ledger = medfl_site_agent::ledger::Ledger::open(&site.join("agent-store")).expect("site ledger");
    let mut per_round: BTreeMap<u32, usize> = BTreeMap::new();
    for c in ledger.charges("breast_cancer").expect("charges") {
        *per_round.entry(c.round).or_default() += 1;
    }
    assert!(
        per_round.values().all(|&n| n == 1),
        "{name} paid twice for a round: {per_round:?}"
    );
    per_round
}

fn spawn_agent(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["agent", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_at_a_dozen_points_never_pay_twice() {
    let (table, _, tables) = iid_site_tables(3);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .sites(3)
        .dir(owned.path())
        .build()
        .await
        .expect("federation starts");
    // Each hospital's agent runs as its own process, from its own folder.
    let mut configs = Vec::new();
    for (name, t) in fed.site_names.clone().iter().zip(&tables) {
        let site = fed.dir.join(name);
        std::fs::write(site.join("data.csv"), t.to_csv("malignant")).expect("data");
        let config = site.join("agent.toml");
        std::fs::write(
            &config,
            "profile = \".\"\n\n[policy]\nmax_epsilon = 50.0\n\n[[datasets]]\nname = \"breast_cancer\"\npath = \"data.csv\"\nlabel = \"malignant\"\n",
        )
        .expect("agent.toml");
        configs.push(config);
    }
    let mut agents: Vec<Child> = configs.iter().map(|c| spawn_agent(c)).collect();
    let laggard = spawn_laggard(&fed, table.columns.clone());
    let id = fed.create_study(&crash_manifest(&table)).await.expect("create");
    fed.start_study(&id).await.expect("start");
    let mut rng = StdRng::seed_from_u64(7);
    let mut kills = Vec::new();
    let started = Instant::now();
    while kills.len() < 12 && started.elapsed() < Duration::from_secs(180) {
        let status = fed.status(&id).await.expect("status");
        let info = status.info.clone().expect("info");
        if info.state != pb::StudyState::Running as i32 {
            break;
        }
        if info.rounds_completed + 1 < 1 + kills.len() as u32 * ROUNDS / 12 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let delay = rng.random_range(100..1200);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let victim = rng.random_range(0..agents.len());
        let _ = agents[victim].kill();
        let _ = agents[victim].wait();
        kills.push(format!(
            "{} killed {delay} ms later, round {}",
            fed.site_names[victim],
            info.rounds_completed + 1
        ));
        agents[victim] = spawn_agent(&configs[victim]);
    }
    eprintln!("agent kill points survived ({}): {kills:#?}", kills.len());
    assert!(
        kills.len() >= 10,
        "only {} kill points before the study ended",
        kills.len()
    );
    let _ = check_exactly_once(&mut fed, &id).await;
    laggard.abort();
    for a in &mut agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    for name in fed.site_names.clone() {
        let site = fed.dir.join(&name);
        let per_round = charged_once_per_round(&site, &name);
        // Every update that left was paid for, and a round resent carries the same update.
        let mut sent: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        for u in egress_updates(&site.join("agent-store").join("egress.jsonl")) {
            sent.entry(u["round"].as_u64().expect("round"))
                .or_default()
                .insert(u["update_id"].as_str().expect("id").to_string());
        }
        for (round, ids) in &sent {
            assert!(
                per_round.contains_key(&(*round as u32)),
                "{name} sent round {round} unpaid"
            );
            assert_eq!(
                ids.len(),
                1,
                "{name} round {round}: a retry sent a different update {ids:?}"
            );
        }
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_settles_the_open_round_exits_zero_and_a_restart_resumes() {
    let (table, _, tables) = iid_site_tables(3);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .tables(tables)
        .dir(owned.path())
        .agent_policy("max_epsilon = 50.0")
        .coordinator_process(std::path::Path::new(env!("CARGO_BIN_EXE_medfl")))
        .build()
        .await
        .expect("federation starts");
    let laggard = spawn_laggard(&fed, table.columns.clone());
    let id = fed.create_study(&crash_manifest(&table)).await.expect("create");
    fed.start_study(&id).await.expect("start");
    fed.wait_for_round(&id, 2, Duration::from_secs(60))
        .await
        .expect("two rounds");
    // Wait for an open attempt, then ask the process to stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fed
        .status(&id)
        .await
        .expect("status")
        .rounds
        .iter()
        .any(|r| r.reason == "open")
    {
        assert!(Instant::now() < deadline, "no round opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = fed.coordinator_pid().expect("a process").to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    assert!(sent.success());
    // The default grace period is 10 s; the process settles well within it.
    let exit = fed
        .wait_coordinator_exit(Duration::from_secs(15))
        .await
        .expect("exits within the grace period");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    fed.restart_coordinator().await.expect("restart");
    let status = fed.status(&id).await.expect("status");
    assert!(
        status
            .rounds
            .iter()
            .any(|r| r.reason.starts_with("interrupted: the coordinator was shutting down")),
        "the open round was settled as interrupted: {:?}",
        status.rounds.iter().map(|r| &r.reason).collect::<Vec<_>>()
    );
    let status = check_exactly_once(&mut fed, &id).await;
    assert!(status.rounds.iter().all(|r| r.reason != "open"));
    laggard.abort();
    fed.shutdown().await.expect("clean shutdown");
}
