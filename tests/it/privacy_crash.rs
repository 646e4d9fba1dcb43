//! A site that crashes between charging its ledger and releasing its update: the
//! charge and the update it pays for were kept together, so on restart the site sends
//! that same update, charged exactly once and released once.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::common::*;
use medfl::Federation;
use medfl_proto::v1 as pb;

fn agent(config: &std::path::Path, failpoint: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medfl"));
    cmd.args(["agent", "--config"]).arg(config).env("RUST_LOG", "warn");
    if failpoint {
        cmd.env("FAILPOINTS", "after_charge=return");
    }
    cmd.spawn().expect("start agent")
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(status) = child.try_wait().expect("poll child") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_charge_and_release_resends_the_paid_update_once() {
    let table = bundled_table();
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .sites(1)
        .dir(owned.path())
        .build()
        .await
        .expect("federation starts");
    // hospital-a's agent runs as its own process, from its own folder.
    let site = fed.dir.join("hospital-a");
    std::fs::write(site.join("data.csv"), table.to_csv("malignant")).expect("data");
    let config = site.join("agent.toml");
    std::fs::write(
        &config,
        "profile = \".\"\negress_log = \"egress.jsonl\"\n\n[[datasets]]\nname = \"breast_cancer\"\npath = \"data.csv\"\nlabel = \"malignant\"\nmax_epsilon = 5.0\n",
    )
    .expect("agent.toml");
    let d = table.columns.len();
    let zeros = vec!["0.0"; d].join(", ");
    let scale = table.x.chunks_exact(d).fold(vec![1f32; d], |m, r| {
        m.iter().zip(r).map(|(a, b)| a.max(b.abs())).collect()
    });
    let scale = scale.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(", ");
    let manifest = manifest(&table.columns, 1, 1, 120, 1).replace(
        "[selection]",
        &format!(
            "[data.scaling]\ncenter = [{zeros}]\nscale = [{scale}]\n\n[privacy]\nunit = \"record\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 0.1\nsteps_per_round = 5\nnoise_multiplier = 2.0\nbudget_epsilon = 5.0\n\n[strategy]\nweighting = \"uniform\"\n\n[selection]"
        ),
    );
    let id = fed.create_study(&manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");

    // First life: trains, charges (with the update kept), then dies before release.
    let mut first = agent(&config, true);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut first, Duration::from_secs(60)))
        .await
        .expect("join")
        .expect("the agent hits its failpoint");
    assert_eq!(status.code(), Some(137));
    let ledger = medfl_site_agent::ledger::Ledger::open(&site.join("agent-store")).expect("ledger");
    let after_crash = ledger.charges("breast_cancer").expect("charges");
    drop(ledger);
    assert_eq!(after_crash.len(), 1, "the charge was durable before the crash");
    assert!(
        egress_updates(&site.join("egress.jsonl")).is_empty(),
        "nothing was released"
    );

    // Second life: the round is still open; the site sends the update it paid for.
    let mut second = agent(&config, false);
    let done = fed
        .wait_for(&id, Duration::from_secs(120), |i| {
            i.state == pb::StudyState::Completed as i32
        })
        .await;
    let _ = second.kill();
    let _ = second.wait();
    let status = done.expect("study completes");
    assert_eq!(status.rounds.iter().filter(|r| r.committed).count(), 1);
    let ledger = medfl_site_agent::ledger::Ledger::open(&site.join("agent-store")).expect("ledger");
    let charges = ledger.charges("breast_cancer").expect("charges");
    assert_eq!(charges, after_crash, "no second charge: the same output was sent");
    let kept = ledger
        .release(&id, 1, &status.info.as_ref().expect("info").manifest_hash)
        .expect("read")
        .expect("the paid update is kept");
    let released = egress_updates(&site.join("egress.jsonl"));
    assert_eq!(released.len(), 1, "released exactly once");
    assert_eq!(
        released[0]["update_id"],
        kept.update_id.as_str(),
        "the update sent is the one paid for"
    );
    assert_eq!(released[0]["epsilon_after"], charges[0].epsilon_after);
    fed.shutdown().await.expect("clean shutdown");
}

/// The coordinator side: a site-level DP round's noise is drawn into the model file
/// before the batch that charges and publishes it. A crash in between leaves nothing
/// charged and nothing served; the restarted coordinator reruns the round with fresh
/// noise and charges it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_crash_before_commit_publishes_nothing_uncharged_and_charges_once() {
    let features = feature_names(3);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .sites(2)
        .dir(owned.path())
        .coordinator_process(std::path::Path::new(env!("CARGO_BIN_EXE_medfl")))
        .coordinator_env("FAILPOINTS", "before_commit=return")
        .build()
        .await
        .expect("federation starts");
    let mut clients = registered_sites(&fed, &features).await;
    let manifest = manifest(&features, 2, 2, 60, 1).replace(
        "[selection]",
        "[strategy]\nweighting = \"uniform\"\n\n[privacy]\nunit = \"site\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 1.0\nnoise_multiplier = 3.0\nbudget_epsilon = 10.0\n\n[selection]",
    );
    let id = fed.create_study(&manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    for (k, c) in clients.iter_mut().enumerate() {
        let work = next_work(c, Duration::from_secs(30)).await.expect("work");
        upload(c, &work, &format!("first-{k}"), 1, &[0.1; 4])
            .await
            .expect("upload");
    }
    let status = fed
        .wait_coordinator_exit(Duration::from_secs(30))
        .await
        .expect("the failpoint ends the coordinator");
    assert_eq!(status.code(), Some(137));
    {
        let store = medfl_coordinator::store::Store::open(&fed.dir.join("coordinator/store"), 1 << 20).expect("store");
        assert!(store.charges(&id).expect("charges").is_empty(), "nothing charged");
        let study = store.study(&id).expect("read").expect("study");
        assert_eq!(study.rounds_completed, 0, "nothing published");
    }

    fed.restart_coordinator().await.expect("restart without the failpoint");
    for c in clients.iter_mut() {
        register(c, &features).await.expect("sites reconnect");
    }
    for round in 1..=2 {
        for (k, c) in clients.iter_mut().enumerate() {
            let work = next_work(c, Duration::from_secs(30)).await.expect("work after restart");
            assert_eq!(work.round, round);
            upload(c, &work, &format!("again-{k}-{round}"), 1, &[0.1; 4])
                .await
                .expect("upload");
        }
        fed.wait_for_round(&id, round, Duration::from_secs(60))
            .await
            .expect("round commits");
    }
    let status = fed
        .wait_for(&id, Duration::from_secs(30), |i| {
            i.state == pb::StudyState::Completed as i32
        })
        .await
        .expect("completes");
    assert_eq!(status.info.expect("info").rounds_completed, 2);
    fed.kill_coordinator();
    let store = medfl_coordinator::store::Store::open(&fed.dir.join("coordinator/store"), 1 << 20).expect("store");
    let charges = store.charges(&id).expect("charges");
    let rounds: Vec<u32> = charges.iter().map(|c| c.round).collect();
    assert_eq!(rounds, vec![1, 2], "each released round charged exactly once");
}
