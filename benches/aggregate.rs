//! Aggregation throughput: the coordinator's fold (little-endian chunks straight off
//! the wire, weighted, into one f32 accumulator, on the machine's cores) beside a plain
//! `a += b` loop over the same data in the same run, the memory-bandwidth reference.
//! Group `fedavg`: N ∈ {10, 100, 1000} × d ∈ {10^5, 10^6, 10^7}, four distinct updates
//! cycled so memory stays a few models. Group `fedavg_distinct`: every update distinct
//! (N·d up to 10^8), with the batched fold of updates that complete together beside the
//! one-at-a-time fold and the plain loop. Throughput is in bytes of update per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use medfl_coordinator::engine::MAX_STAGED_UPDATES;
use medfl_shared::aggregate::{WeightedSum, plain_pass, synthetic_update};
use medfl_shared::chunk::chunks;

fn aggregation(c: &mut Criterion) {
    let threads = medfl_shared::cores();
    let mut group = c.benchmark_group("fedavg");
    group.sample_size(10);
    for d in [100_000usize, 1_000_000, 10_000_000] {
        let decoded: Vec<Vec<f32>> = (0..4).map(|k| synthetic_update(d, k + 1)).collect();
        let encoded: Vec<Vec<Vec<u8>>> = decoded.iter().map(|u| chunks(u).map(|c| c.2).collect()).collect();
        let refs: Vec<Vec<&[u8]>> = encoded
            .iter()
            .map(|u| u.iter().map(|c| c.as_slice()).collect())
            .collect();
        for n in [10usize, 100, 1000] {
            if n * d > 1_000_000_000 {
                continue; // 4 TB of traffic per sample: out of this machine's time budget
            }
            group.throughput(Throughput::Bytes((n * d * 4) as u64));
            let id = format!("n{n}_d{d}");
            group.bench_function(BenchmarkId::new("fold_le_bytes", &id), |b| {
                let mut acc = WeightedSum::new(d);
                b.iter(|| {
                    acc.reset(d);
                    for k in 0..n {
                        acc.fold_chunks(&refs[k % 4], (k + 1) as f64, threads).expect("fold");
                    }
                    acc.sum_slice(0..1)[0]
                })
            });
            group.bench_function(BenchmarkId::new("plain_add_reference", &id), |b| {
                let mut acc = vec![0f32; d];
                let updates: Vec<&[f32]> = (0..n).map(|k| decoded[k % 4].as_slice()).collect();
                b.iter(|| {
                    acc.fill(0.0);
                    plain_pass(&mut acc, &updates, threads)
                })
            });
        }
    }
    group.finish();

    // Every update distinct, as the coordinator receives them and as a library given N
    // updates reads them (N = 100, d = 10^6 is the comparison with Flower's
    // `aggregate`): the batched fold of updates that complete together, the fold one
    // at a time, and the plain loop.
    let mut group = c.benchmark_group("fedavg_distinct");
    group.sample_size(10);
    for (n, d) in [(100usize, 100_000usize), (100, 1_000_000), (10, 10_000_000)] {
        let decoded: Vec<Vec<f32>> = (0..n).map(|k| synthetic_update(d, k as u64 + 1)).collect();
        let encoded: Vec<Vec<Vec<u8>>> = decoded.iter().map(|u| chunks(u).map(|c| c.2).collect()).collect();
        let refs: Vec<Vec<&[u8]>> = encoded
            .iter()
            .map(|u| u.iter().map(|c| c.as_slice()).collect())
            .collect();
        let weighted: Vec<(&[&[u8]], f64)> = refs
            .iter()
            .enumerate()
            .map(|(k, r)| (r.as_slice(), (k + 1) as f64))
            .collect();
        group.throughput(Throughput::Bytes((n * d * 4) as u64));
        let id = format!("n{n}_d{d}");
        group.bench_function(BenchmarkId::new("fold_batch_64", &id), |b| {
            let mut acc = WeightedSum::new(d);
            b.iter(|| {
                acc.reset(d);
                for batch in weighted.chunks(MAX_STAGED_UPDATES) {
                    acc.fold_batch(batch, threads).expect("fold batch");
                }
                acc.sum_slice(0..1)[0]
            })
        });
        group.bench_function(BenchmarkId::new("fold_le_bytes", &id), |b| {
            let mut acc = WeightedSum::new(d);
            b.iter(|| {
                acc.reset(d);
                for (u, w) in &weighted {
                    acc.fold_chunks(u, *w, threads).expect("fold");
                }
                acc.sum_slice(0..1)[0]
            })
        });
        group.bench_function(BenchmarkId::new("plain_add_reference", &id), |b| {
            let mut acc = vec![0f32; d];
            let updates: Vec<&[f32]> = decoded.iter().map(|u| u.as_slice()).collect();
            b.iter(|| {
                acc.fill(0.0);
                plain_pass(&mut acc, &updates, threads)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, aggregation);
criterion_main!(benches);
