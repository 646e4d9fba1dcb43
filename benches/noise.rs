//! Noise throughput of the privacy step, same run: the Gaussian at our grid (k = −30)
//! drawn by `dp::sampler`, by OpenDP's own sampler, and OpenDP at its default grid;
//! the discrete Gaussian of distributed DP and queries. Reported as values/s.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;

fn noise(c: &mut Criterion) {
    let mut group = c.benchmark_group("gaussian_noise");
    group.sample_size(10);
    for n in [10_000usize, 100_000, 1_000_000] {
        let values = vec![0.25f32; n];
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("medfl_k-30/{n}"), |b| {
            b.iter(|| medfl_shared::dp::add_gaussian_noise(&values, 1.0, 1.1).expect("noise"))
        });
    }
    // OpenDP's own sampler at the same grid, the mechanism medfl drew with before.
    let n = 10_000;
    let noise = medfl_shared::dp::GaussianNoise::new(n, 1.0, 1.1).expect("mechanism");
    let mut values = vec![0.25f32; n];
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(format!("opendp_k-30/{n}"), |b| {
        b.iter(|| noise.add_to_opendp(&mut values).expect("noise"))
    });
    // OpenDP's default grid is ~100x slower: measured on 10^4 coordinates only.
    let n = 10_000;
    let input = vec![0.25f64; n];
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(format!("opendp_default_k/{n}"), |b| {
        b.iter(|| {
            let domain = VectorDomain::new(AtomDomain::<f64>::new_non_nan()).with_size(n);
            let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(domain, L2Distance::<f64>::default(), 1.1, None)
                .expect("measurement");
            m.invoke(&input).expect("noise")
        })
    });
    group.finish();
}

/// The discrete Gaussian of distributed DP and the queries: the exact integer sampler
/// ([CKS20] in u128 arithmetic, across the cores) beside OpenDP's arbitrary-precision
/// sampler and the raw AES-CTR keystream words it draws from, same run.
fn discrete(c: &mut Criterion) {
    let mut group = c.benchmark_group("discrete_gaussian");
    group.sample_size(10);
    for sigma in [5.0f64, 1000.0] {
        let n = 1_000_000;
        let mut words = vec![0u32; n];
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("medfl_cks20_sigma{sigma}/{n}"), |b| {
            b.iter(|| medfl_shared::dp::add_discrete_gaussian(&mut words, sigma).expect("noise"))
        });
        let n = 10_000;
        let mut words = vec![0u32; n];
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("opendp_sigma{sigma}/{n}"), |b| {
            b.iter(|| medfl_shared::dp::add_discrete_gaussian_opendp(&mut words, sigma).expect("noise"))
        });
    }
    let n = 1_000_000;
    let mut words = vec![0u32; n];
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(format!("aes_ctr_keystream/{n}"), |b| {
        b.iter(|| medfl_shared::secagg::add_keystream(&[7u8; 32], 0, &mut words, false))
    });
    group.finish();
}

criterion_group!(benches, noise, discrete);
criterion_main!(benches);
