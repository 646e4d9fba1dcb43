//! Secure aggregation throughput: keystream expansion (ns per 32-bit word), one site's
//! masking for n = 10 and n = 100 at d = 10^6, and the coordinator's unmasking for
//! n = 100 with 10 % dropout at d = 10^6, and the coordinator's masked sum (mod 2^32,
//! across cores). A plain single-threaded wrapping `a += b` pass over the same vector is
//! measured in the same run as the memory-bandwidth reference.

use std::collections::HashMap;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medfl_shared::secagg::{AdvertisedKeys, MaskPlan, SessionParams, SiteSecrets, add_keystream};

const D: usize = 1_000_000;

fn session(n: usize) -> (SessionParams, Vec<SiteSecrets>, Vec<(String, AdvertisedKeys)>) {
    let params = SessionParams {
        study_id: "bench".into(),
        round: 1,
        attempt: 1,
        roster: (0..n).map(|i| format!("site-{i:03}")).collect(),
        threshold: (n / 2 + 1) as u32,
        num_values: D as u64,
        scale_log2: 16,
        neighbours: 0,
    };
    let secrets: Vec<SiteSecrets> = (0..n).map(|_| SiteSecrets::generate().expect("keys")).collect();
    let keys = params
        .roster
        .iter()
        .cloned()
        .zip(secrets.iter().map(|s| s.public()))
        .collect();
    (params, secrets, keys)
}

fn secagg(c: &mut Criterion) {
    let mut group = c.benchmark_group("secagg");
    group.sample_size(10);
    let mut values = vec![1u32; D];
    let other = vec![3u32; D];
    group.throughput(Throughput::Elements(D as u64));
    group.bench_function("baseline_wrapping_add/1e6", |b| {
        b.iter(|| {
            for (a, x) in values.iter_mut().zip(&other) {
                *a = a.wrapping_add(*x);
            }
        })
    });
    // The coordinator's masked sum: the same add, split across the cores, at 10^6 and
    // at 10^7 (where the vectors leave the caches), each beside the plain pass.
    group.bench_function("masked_sum_threaded/1e6", |b| {
        b.iter(|| medfl_shared::aggregate::add_wrapping(&mut values, &other))
    });
    let mut big = vec![1u32; 10 * D];
    let big_other = vec![3u32; 10 * D];
    group.throughput(Throughput::Elements(10 * D as u64));
    group.bench_function("baseline_wrapping_add/1e7", |b| {
        b.iter(|| {
            for (a, x) in big.iter_mut().zip(&big_other) {
                *a = a.wrapping_add(*x);
            }
        })
    });
    group.bench_function("masked_sum_threaded/1e7", |b| {
        b.iter(|| medfl_shared::aggregate::add_wrapping(&mut big, &big_other))
    });
    drop((big, big_other));
    group.throughput(Throughput::Elements(D as u64));
    group.bench_function("keystream/1e6", |b| {
        b.iter(|| add_keystream(&[9; 32], 0, &mut values, false))
    });
    for n in [10usize, 100] {
        let (params, secrets, keys) = session(n);
        group.bench_function(format!("mask_one_site/n={n}/1e6"), |b| {
            b.iter(|| {
                let plan = MaskPlan::for_site(&params, &secrets[0], &params.roster[0], &keys).expect("plan");
                plan.apply(0, &mut values);
            })
        });
    }
    // SecAgg+ at n = 100: 14 neighbours (2·⌈log2 100⌉) instead of 99.
    let (mut params, secrets, keys) = session(100);
    params.neighbours = 14;
    group.bench_function("mask_one_site_secagg+/n=100,k=14/1e6", |b| {
        b.iter(|| {
            let plan = MaskPlan::for_site(&params, &secrets[0], &params.roster[0], &keys).expect("plan");
            plan.apply(0, &mut values);
        })
    });
    // Unmasking at n = 100 with 10 dropped: 90 self masks and 90 × 10 pair masks.
    let (params, _, keys) = session(100);
    let survivors: Vec<(String, AdvertisedKeys)> = keys[10..].to_vec();
    let seeds: HashMap<String, [u8; 32]> = survivors.iter().map(|(s, _)| (s.clone(), [5u8; 32])).collect();
    // Any 32 bytes are a valid X25519 secret; the cost does not depend on which.
    let dropped: HashMap<String, [u8; 32]> = (0..10u8).map(|i| (keys[i as usize].0.clone(), [i + 1; 32])).collect();
    group.bench_function("unmask/n=100/drop=10/1e6", |b| {
        b.iter(|| {
            let plan = MaskPlan::for_unmasking(&params, &survivors, &seeds, &dropped).expect("plan");
            plan.apply(0, &mut values);
        })
    });
    group.finish();
}

criterion_group!(benches, secagg);
criterion_main!(benches);
