//! Fine-tuning's cost per round at a site, LoRA adapters against the full model at the
//! same settings (the demo's conv net on 8×8 images, ten classes, over a checkpoint):
//! local training (2 epochs of minibatches of 32 over 240 images, Adam), one DP-SGD
//! step's clipped per-example gradients (60 examples), and the secure-aggregation masks
//! a site adds to what it sends (a self mask and one pairwise mask per peer, 3 sites).
//! What travels per round is printed: 4 bytes a value, as f32 or as masked 32-bit words.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medfl_shared::manifest::Training;
use medfl_shared::model::{Checkpoint, Io, Lora, ModelKind, ModelSpec, TensorSpec};
use medfl_site_agent::cnn::clipped_gradient_sum;
use medfl_site_agent::train::{LocalProblem, Start, train};

const IO: Io = Io {
    inputs: 64,
    outputs: 10,
};

fn arms() -> [(&'static str, ModelSpec); 2] {
    let base = ModelSpec {
        kind: ModelKind::Cnn,
        hidden: vec![64],
        external: None,
        input: Some([1, 8, 8]),
        conv: medfl::demo::demo_conv(),
        checkpoint: Some(Checkpoint {
            file: "pretrained.safetensors".into(),
            sha256: "0".repeat(64),
        }),
        lora: None,
    };
    let lora = ModelSpec {
        lora: Some(Lora {
            rank: 4,
            alpha: Some(8),
            targets: vec!["conv0".into(), "conv1".into(), "fc0".into()],
            head: true,
            seed: 1,
        }),
        ..base.clone()
    };
    [("full", base), ("lora_r4", lora)]
}

fn finetune_round(c: &mut Criterion) {
    let rows = 240;
    let x: Vec<f32> = (0..rows * 64).map(|i| (i * 37 % 101) as f32 / 101.0).collect();
    let y: Vec<f32> = (0..rows).map(|i| (i % 10) as f32).collect();
    let training = Training {
        local_epochs: 2,
        batch_size: 32,
        learning_rate: 0.01,
        ..Training::default()
    };
    let [(_, full), _] = arms();
    let checkpoint = full.base_spec().init(IO, 3);
    let model: u64 = full.base_layout(IO).iter().map(TensorSpec::len).sum();
    let mut group = c.benchmark_group("finetune_round");
    group.sample_size(10);
    for (name, spec) in arms() {
        let start = spec.init(IO, 0);
        let travelling = start.len();
        eprintln!(
            "{name}: {travelling} values travel per round ({} bytes up per site, {:.1}% of the model's {model})",
            travelling * 4,
            100.0 * travelling as f64 / model as f64
        );
        group.throughput(Throughput::Elements(rows as u64 * 2));
        group.bench_function(format!("{name}/local_training"), |b| {
            b.iter(|| {
                let local = LocalProblem {
                    spec: &spec,
                    n_features: 64,
                    outputs: 10,
                    params: &start,
                    start_on: Start::Initial,
                    x: &x,
                    y: &y,
                    persons: &[],
                    training: &training,
                    base: Some(&checkpoint),
                };
                train(&local, 1).expect("trained")
            })
        });
        group.throughput(Throughput::Elements(60));
        group.bench_function(format!("{name}/dp_step_60_examples"), |b| {
            b.iter(|| {
                clipped_gradient_sum(&spec, IO, Some(&checkpoint), &start, &x[..60 * 64], &y[..60], 1.0)
                    .expect("clipped")
            })
        });
        group.throughput(Throughput::Bytes(travelling as u64 * 4));
        group.bench_function(format!("{name}/secagg_masks_3_sites"), |b| {
            let mut words = vec![0u32; travelling];
            b.iter(|| {
                for key in [[1u8; 32], [2u8; 32], [3u8; 32]] {
                    medfl_shared::prg::add_keystream(&key, 0, &mut words, false);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, finetune_round);
criterion_main!(benches);
