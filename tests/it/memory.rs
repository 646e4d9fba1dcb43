//! Coordinator memory while aggregating 100 updates of a 10-million-parameter model
//! must stay under 3 × model size + 64 MiB, whatever the number of sites.
//!
//! The coordinator runs as its own process (the real `medfl coordinator` binary); the
//! test resets that process's peak RSS (`VmHWM`) just before the uploads and reads it
//! once the round has committed. The 50 simulated sites run in the test process.

use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_shared::chunk::{CHUNK_VALUES, encode};

const SITES: usize = 100;
const HIDDEN: usize = 3150; // 30 → 3150 → 3150 → 1: 10,026,451 parameters

fn vm_hwm_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("procfs");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM value");
    kib * 1024
}

/// The update of site `k`: the constant `(k + 1) / 1000`, generated chunk by chunk.
fn synthetic_update(
    work: &pb::WorkItem,
    k: usize,
    n: usize,
) -> impl futures::Stream<Item = pb::UpdateChunk> + Send + 'static {
    let head = header(work, &format!("mem-{k}"), (k + 1) as u64, n as u64);
    let value = (k + 1) as f32 / 1000.0;
    let chunks = (0..n.div_ceil(CHUNK_VALUES)).map(move |i| {
        let len = CHUNK_VALUES.min(n - i * CHUNK_VALUES);
        pb::UpdateChunk {
            body: Some(pb::update_chunk::Body::Data(pb::DataChunk {
                seq: i as u64,
                offset: (i * CHUNK_VALUES) as u64,
                values: encode(&vec![value; len]).into(),
            })),
        }
    });
    futures::stream::iter(std::iter::once(head).chain(chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_memory_stays_within_three_models_plus_64_mib() {
    let features = feature_names(30);
    let mut fed = Federation::builder()
        .sites(SITES)
        .coordinator_process(std::path::Path::new(env!("CARGO_BIN_EXE_medfl")))
        .build()
        .await
        .expect("federation starts");
    let pid = fed.coordinator_pid().expect("coordinator runs as a process");
    let manifest = manifest(&features, 1, SITES as u32, 600, 1).replace(
        "kind = \"logistic_regression\"",
        &format!("kind = \"mlp\"\nhidden = [{HIDDEN}, {HIDDEN}]"),
    );
    let mut clients = registered_sites(&fed, &features).await;
    let id = fed.create_study(&manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    let mut works = Vec::new();
    for c in clients.iter_mut() {
        works.push(next_work(c, Duration::from_secs(60)).await.expect("work"));
    }
    let n = works[0].num_params as usize;
    assert_eq!(n, 10_026_451);
    let model_bytes = (n * 4) as u64;

    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset peak RSS");
    let baseline = vm_hwm_bytes(pid);
    // Four sites upload at a time, as a burst of hospitals would.
    let mut pending: Vec<_> = clients.into_iter().zip(works).enumerate().collect();
    while !pending.is_empty() {
        let batch: Vec<_> = pending.drain(..pending.len().min(4)).collect();
        let uploads = batch.into_iter().map(|(k, (mut client, work))| async move {
            client.upload_update(synthetic_update(&work, k, n)).await.map(|_| ())
        });
        for result in futures::future::join_all(uploads).await {
            result.expect("upload accepted");
        }
    }
    let status = fed
        .wait_for_round(&id, 1, Duration::from_secs(600))
        .await
        .expect("round commits");
    let peak = vm_hwm_bytes(pid);
    let bound = 3 * model_bytes + (64 << 20);
    eprintln!(
        "coordinator peak RSS while aggregating {SITES} updates of {n} parameters: {:.1} MiB (baseline {:.1} MiB; model {:.1} MiB; bound {:.1} MiB)",
        peak as f64 / 1048576.0,
        baseline as f64 / 1048576.0,
        model_bytes as f64 / 1048576.0,
        bound as f64 / 1048576.0
    );
    assert_eq!(status.rounds[0].contributors.len(), SITES);
    assert!(
        peak < bound,
        "peak RSS {peak} bytes exceeds 3 × model + 64 MiB = {bound} bytes"
    );

    // And the aggregate is right: Σ_k w_k c_k / Σ_k w_k with w_k = k + 1, c_k = (k + 1) / 1000.
    let (_, g0) = fed.export(&id, Some(0)).await.expect("initial");
    let (_, g1) = fed.export(&id, Some(1)).await.expect("round 1");
    let want: f64 =
        (1..=SITES).map(|k| (k * k) as f64 / 1000.0).sum::<f64>() / (1..=SITES).map(|k| k as f64).sum::<f64>();
    for i in [0, n / 2, n - 1] {
        assert!(
            ((g1[i] - g0[i]) as f64 - want).abs() < 1e-4,
            "param {i}: {} vs {want}",
            g1[i] - g0[i]
        );
    }
    fed.shutdown().await.expect("clean shutdown");
}
