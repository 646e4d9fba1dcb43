//! Load: 200 simulated sites (each its own certificate and mTLS connection, in this
//! process) through 10 rounds against one coordinator process, and 1000 connected idle
//! sites whose heartbeats are all served. Coordinator memory is read from procfs and
//! reported (`cargo test --test load -- --nocapture`).

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl::load::{answer_rounds, connect, heartbeat_all, rss_bytes};
use medfl_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

const MIB: f64 = 1024.0 * 1024.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sites_complete_ten_rounds() {
    const SITES: usize = 200;
    let features = feature_names(30);
    let mut fed = Federation::builder()
        .sites(SITES)
        .coordinator_process(std::path::Path::new(env!("CARGO_BIN_EXE_medfl")))
        .build()
        .await
        .expect("federation starts");
    let pid = fed.coordinator_pid().expect("a process");
    let names = fed.site_names.clone();
    let sites = connect(&fed, &names, "breast_cancer", &features)
        .await
        .expect("connect");
    let (rss_idle, _) = rss_bytes(pid).expect("rss");
    let id = fed
        .create_study(&manifest(&features, 10, SITES as u32, 120, 1))
        .await
        .expect("create");
    let stop = CancellationToken::new();
    let mut tasks = answer_rounds(sites, Arc::new(vec![0.001; 31]), stop.clone());
    fed.start_study(&id).await.expect("start");
    let status = fed
        .wait_for(&id, Duration::from_secs(600), |i| {
            i.state != pb::StudyState::Running as i32
        })
        .await
        .expect("the study ends");
    stop.cancel();
    let mut delivered = 0;
    while let Some(r) = tasks.join_next().await {
        delivered += r.expect("task").expect("site");
    }
    let info = status.info.clone().expect("info");
    assert_eq!(info.state, pb::StudyState::Completed as i32, "{}", info.reason);
    let committed: Vec<_> = status.rounds.iter().filter(|r| r.committed).collect();
    assert_eq!(committed.len(), 10);
    assert!(committed.iter().all(|r| r.contributors.len() == SITES));
    assert_eq!(delivered, 10 * SITES as u32);
    let (rss, peak) = rss_bytes(pid).expect("rss");
    eprintln!(
        "200 sites x 10 rounds: coordinator RSS {:.1} MiB idle with 200 connections, {:.1} MiB after, peak {:.1} MiB",
        rss_idle as f64 / MIB,
        rss as f64 / MIB,
        peak as f64 / MIB
    );
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_sites_have_every_heartbeat_served() {
    const SITES: usize = 1000;
    let features = feature_names(30);
    let mut fed = Federation::builder()
        .sites(SITES)
        .liveness_secs(120)
        .coordinator_process(std::path::Path::new(env!("CARGO_BIN_EXE_medfl")))
        .build()
        .await
        .expect("federation starts");
    let pid = fed.coordinator_pid().expect("a process");
    let names = fed.site_names.clone();
    let sites = connect(&fed, &names, "breast_cancer", &features)
        .await
        .expect("connect");
    for _ in 0..3 {
        assert_eq!(heartbeat_all(&sites).await, SITES, "every heartbeat served");
    }
    let listed = fed.admin.list_sites(pb::Empty {}).await.expect("list").into_inner();
    assert_eq!(listed.sites.iter().filter(|s| s.connected).count(), SITES);
    let (rss, peak) = rss_bytes(pid).expect("rss");
    eprintln!(
        "1000 idle sites: coordinator RSS {:.1} MiB ({:.1} KiB per connection), peak {:.1} MiB",
        rss as f64 / MIB,
        rss as f64 / 1024.0 / SITES as f64,
        peak as f64 / MIB
    );
    fed.shutdown().await.expect("clean shutdown");
}

/// `medfl bench round --dp site|distributed` runs whole DP rounds: the coordinator's
/// site-level noise, and simulated sites that quantize, noise and mask under secure
/// aggregation as agents do; each round commits and is timed to its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_bench_rounds_commit() {
    use medfl::bench::{RoundDp, run_rounds};
    for dp in [RoundDp::Site, RoundDp::Distributed] {
        let times = run_rounds(3, 2_000, 2, None, dp, 1.0)
            .await
            .unwrap_or_else(|e| panic!("{dp:?} rounds: {e:#}"));
        assert_eq!(times.round_seconds.len(), 2, "{dp:?}: both rounds committed");
        assert!(
            times.round_seconds.iter().all(|s| *s > 0.0),
            "{dp:?}: {:?}",
            times.round_seconds
        );
    }
}
