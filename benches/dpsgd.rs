//! DP-SGD training throughput (examples/s): vectorized per-example gradients against
//! a loop of single-example backward passes, on the same batches in the same run; and
//! whole DP-SGD steps (clipped gradients, noise, SGD) of an MLP of about 10^6
//! parameters with the noise drawn by `dp::sampler` against OpenDP's sampler.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medfl_shared::dp::GaussianNoise;
use medfl_shared::model::{ModelKind, ModelSpec};
use medfl_site_agent::dpsgd::{clipped_gradient_sum, clipped_gradient_sum_looped};

fn dpsgd(c: &mut Criterion) {
    let d = 30;
    let rows = 256;
    let x: Vec<f32> = (0..rows * d).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let y: Vec<f32> = (0..rows).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let mut group = c.benchmark_group("dpsgd_clipped_gradients");
    group.sample_size(10);
    group.throughput(Throughput::Elements(rows as u64));
    for (name, spec) in [
        (
            "logreg",
            ModelSpec {
                kind: ModelKind::LogisticRegression,
                hidden: vec![],
                external: None,
                input: None,
                conv: Vec::new(),
                checkpoint: None,
                lora: None,
            },
        ),
        (
            "mlp64",
            ModelSpec {
                kind: ModelKind::Mlp,
                hidden: vec![64],
                external: None,
                input: None,
                conv: Vec::new(),
                checkpoint: None,
                lora: None,
            },
        ),
    ] {
        let params = spec.init(d, 1);
        group.bench_function(format!("vectorized/{name}"), |b| {
            b.iter(|| clipped_gradient_sum(&spec, d, &params, &x, &y, 1.0).expect("vectorized"))
        });
        group.bench_function(format!("per_example_loop/{name}"), |b| {
            b.iter(|| clipped_gradient_sum_looped(&spec, d, &params, &x, &y, 1.0).expect("looped"))
        });
    }
    group.finish();
}

/// One DP-SGD step of an MLP 30 → 32768 → 1 (1,048,577 parameters) on a batch of 32
/// rows, as `train_dp` takes it: per-example clipped gradient sum, the Gaussian
/// mechanism at σ = 1 on the grid 2^−30, an SGD step. Noise by `dp::sampler`
/// (`add_to`) and by OpenDP's sampler (`add_to_opendp`), same run.
fn dpsgd_step(c: &mut Criterion) {
    let d = 30;
    let rows = 32;
    let x: Vec<f32> = (0..rows * d).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let y: Vec<f32> = (0..rows).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let spec = ModelSpec {
        kind: ModelKind::Mlp,
        hidden: vec![32_768],
        external: None,
        input: None,
        conv: Vec::new(),
        checkpoint: None,
        lora: None,
    };
    let mut params = spec.init(d, 1);
    let noise = GaussianNoise::new(params.len(), 1.0, 1.0).expect("noise");
    let mut group = c.benchmark_group("dpsgd_step_mlp_1e6");
    group
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(100));
    group.throughput(Throughput::Elements(1));
    for opendp in [false, true] {
        let name = if opendp { "opendp_sampler" } else { "dp_sampler" };
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut sum = clipped_gradient_sum(&spec, d, &params, &x, &y, 1.0)
                    .expect("gradients")
                    .sum;
                if opendp {
                    noise.add_to_opendp(&mut sum).expect("noise");
                } else {
                    noise.add_to(&mut sum).expect("noise");
                }
                params
                    .iter_mut()
                    .zip(&sum)
                    .for_each(|(p, g)| *p -= 0.1 * g / rows as f32);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, dpsgd, dpsgd_step);
criterion_main!(benches);
