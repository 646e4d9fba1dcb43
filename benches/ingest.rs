//! Update ingest over mTLS on loopback against raw loopback TCP, in the same run
//! (issue 7): 20 simulated sites each upload an update of about 10^6 values per round
//! through the real gRPC path (TLS 1.3 with client certificates, the chunked stream,
//! checks, the streaming fold); the ingest window is a round's start to its last
//! update. Two references send the same bytes over one loopback connection: plain
//! TCP, and TLS with the coordinator's own configuration and a site's certificate but
//! no HTTP/2 or gRPC (the most any ingest over this TLS stack could reach here).
//! Throughput is in bytes of update values.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const SITES: usize = 20;
const PARAMS: usize = 1_000_000;

fn ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The model size the manifest's MLP rounds to (32h + 1 values).
    let params = 32 * ((PARAMS - 1) / 32) + 1;
    let bytes = SITES * params * 4;
    let mut group = c.benchmark_group("ingest");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(format!("mtls_grpc/{SITES}x1e6"), |b| {
        b.iter_custom(|iters| {
            // One federation per sample; only the rounds' ingest windows are timed.
            let times = rt
                .block_on(medfl::bench::run_rounds(
                    SITES,
                    PARAMS,
                    iters as u32,
                    None,
                    medfl::bench::RoundDp::None,
                    1.0,
                ))
                .expect("rounds");
            assert_eq!(times.params, params);
            assert!(!times.ingest_seconds.is_empty(), "no round was timed");
            let mean = times.ingest_seconds.iter().sum::<f64>() / times.ingest_seconds.len() as f64;
            Duration::from_secs_f64(mean * iters as f64)
        })
    });
    for (name, tls) in [("raw_tcp", false), ("raw_mtls", true)] {
        group.bench_function(format!("{name}/{SITES}x1e6"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let gbps = rt
                        .block_on(async {
                            match tls {
                                true => medfl::bench::tls_reference(bytes).await,
                                false => medfl::bench::tcp_reference(bytes).await,
                            }
                        })
                        .expect(name);
                    total += Duration::from_secs_f64(bytes as f64 / (gbps * 1e9));
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
