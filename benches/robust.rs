//! Robust aggregators and server optimizers beside a plain FedAvg pass over the same
//! updates in the same run: N = 100 updates of d = 10^6 parameters (Flower's
//! `aggregate_median`, `aggregate_trimmed_avg` and `aggregate_krum` take 3–15 s on it
//! on this machine; `benches/compare_flower.sh` measures them). Throughput is in bytes
//! of update per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use medfl_shared::aggregate::{WeightedSum, synthetic_update};
use medfl_shared::strategy::{ServerOptimizer, coordinate_median, multi_krum, trimmed_mean};

fn robust(c: &mut Criterion) {
    let threads = medfl_shared::cores();
    let (n, d) = (100usize, 1_000_000usize);
    let updates: Vec<Vec<f32>> = (0..n).map(|k| synthetic_update(d, k as u64 + 1)).collect();
    let refs: Vec<&[f32]> = updates.iter().map(|u| u.as_slice()).collect();
    let mut group = c.benchmark_group("robust");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((n * d * 4) as u64));
    let id = format!("n{n}_d{d}");
    let mut out = vec![0f32; d];
    group.bench_function(BenchmarkId::new("fedavg_reference", &id), |b| {
        let mut acc = WeightedSum::new(d);
        b.iter(|| {
            acc.reset(d);
            for u in &refs {
                acc.fold(u, 1.0).expect("fold");
            }
            acc.sum_slice(0..1)[0]
        })
    });
    group.bench_function(BenchmarkId::new("median", &id), |b| {
        b.iter(|| coordinate_median(&refs, &mut out, threads).expect("median"))
    });
    group.bench_function(BenchmarkId::new("trimmed_mean_0.1", &id), |b| {
        b.iter(|| trimmed_mean(&refs, n / 10, &mut out, threads).expect("trimmed mean"))
    });
    group.bench_function(BenchmarkId::new("krum_f10", &id), |b| {
        b.iter(|| multi_krum(&refs, 10, 1, &mut out, threads).expect("krum"))
    });
    group.finish();

    // The server optimizer's step over one model (read x, Δ, m, v; write x, m, v).
    let mut group = c.benchmark_group("server_optimizer");
    group.sample_size(10);
    let d = 10_000_000usize;
    let delta = synthetic_update(d, 3);
    let mut model = synthetic_update(d, 4);
    for (name, opt) in [
        ("fedavg", ServerOptimizer::Avg { lr: 1.0 }),
        ("fedavgm", ServerOptimizer::AvgM { lr: 1.0, momentum: 0.9 }),
        (
            "fedadam",
            ServerOptimizer::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
        ),
        (
            "fedyogi",
            ServerOptimizer::Yogi {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
        ),
    ] {
        let mut state = vec![0f32; d * opt.slots()];
        group.throughput(Throughput::Bytes((d * 4) as u64));
        group.bench_function(BenchmarkId::new(name, format!("d{d}")), |b| {
            let chunk = 1 << 16;
            b.iter(|| {
                for (i, (x, dl)) in model.chunks_mut(chunk).zip(delta.chunks(chunk)).enumerate() {
                    let s = &mut state[i * chunk * opt.slots()..(i * chunk + x.len()) * opt.slots()];
                    opt.step(x, dl, s);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, robust);
criterion_main!(benches);
