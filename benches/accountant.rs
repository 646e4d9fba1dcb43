//! The PLD accountant's speed, beside the RDP accountant on the same mechanisms in the
//! same run: one ε of T = 10^4 Poisson-subsampled Gaussian steps, and a ledger of 100
//! rounds with different σ and q (heterogeneous composition).

use criterion::{Criterion, criterion_group, criterion_main};
use medfl_shared::accountant::{GaussianSteps, Sampling, epsilon_rdp};

fn steps(sigma: f64, q: f64, steps: u64) -> GaussianSteps {
    GaussianSteps {
        sigma,
        q,
        steps,
        sampling: Sampling::Poisson,
    }
}

fn accountant(c: &mut Criterion) {
    let mut group = c.benchmark_group("accountant");
    group.sample_size(10);
    let long = [steps(1.0, 0.01, 10_000)];
    // The accountant remembers recent compositions (a ledger asks for the same one
    // again): forget them, to time the composition.
    group.bench_function("pld/T=1e4", |b| {
        b.iter(|| {
            medfl_shared::pld::forget();
            medfl_shared::pld::epsilon(&long, 1e-5).expect("pld")
        })
    });
    group.bench_function("rdp/T=1e4", |b| b.iter(|| epsilon_rdp(&long, 1e-5).expect("rdp")));
    // 100 rounds of 20 DP-SGD steps each, σ and q varying by round.
    let ledger: Vec<GaussianSteps> = (0..100)
        .map(|r| steps(0.9 + 0.01 * f64::from(r % 20), 0.01 + 0.0005 * f64::from(r % 10), 20))
        .collect();
    group.bench_function("pld/100_rounds_heterogeneous", |b| {
        b.iter(|| {
            medfl_shared::pld::forget();
            medfl_shared::pld::epsilon(&ledger, 1e-5).expect("pld")
        })
    });
    // What a ledger pays when it asks again (a charge's check, then the charge).
    group.bench_function("pld/100_rounds_remembered", |b| {
        b.iter(|| medfl_shared::pld::epsilon(&ledger, 1e-5).expect("pld"))
    });
    group.bench_function("rdp/100_rounds_heterogeneous", |b| {
        b.iter(|| epsilon_rdp(&ledger, 1e-5).expect("rdp"))
    });
    group.finish();
}

criterion_group!(benches, accountant);
criterion_main!(benches);
