//! DP-SGD training throughput (examples/s): vectorized per-example gradients against
//! a loop of single-example backward passes, on the same batches in the same run.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
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
            },
        ),
        (
            "mlp64",
            ModelSpec {
                kind: ModelKind::Mlp,
                hidden: vec![64],
                external: None,
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

criterion_group!(benches, dpsgd);
criterion_main!(benches);
