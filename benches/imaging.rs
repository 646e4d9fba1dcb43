//! Imaging throughput: CNN training examples/s on the CPU (plain minibatch training
//! against DP-SGD's micro-batches of one example, same run, same images), and DICOM
//! decoding MB/s on synthesized 512 × 512 files written by dicom-rs
//! (`dicom::synthesize`: 16-bit Explicit VR Little and Big Endian, 8-bit JPEG Baseline).
//! The files stay in `target/dicom-bench/`; `scripts/dicom_bench.py` times pydicom on them
//! in the same session for the ratio.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medfl_shared::manifest::Training;
use medfl_shared::model::{ConvBlock, Io, ModelKind, ModelSpec, Norm};
use medfl_site_agent::dpsgd::clipped_gradient_sum;
use medfl_site_agent::train::{LocalProblem, Start, train};

/// The demo's conv net on 8×8 greyscale images, ten classes.
fn demo_cnn() -> ModelSpec {
    let block = |channels| ConvBlock {
        channels,
        kernel: 3,
        norm: Norm::Group,
        groups: 4,
        pool: 2,
    };
    ModelSpec {
        kind: ModelKind::Cnn,
        hidden: vec![64],
        external: None,
        input: Some([1, 8, 8]),
        conv: vec![block(16), block(32)],
        checkpoint: None,
        lora: None,
    }
}

fn cnn_training(c: &mut Criterion) {
    let spec = demo_cnn();
    let io = Io {
        inputs: 64,
        outputs: 10,
    };
    let rows = 256;
    let x: Vec<f32> = (0..rows * 64).map(|i| (i * 37 % 101) as f32 / 101.0).collect();
    let y: Vec<f32> = (0..rows).map(|i| (i % 10) as f32).collect();
    let params = spec.init(io, 1);
    let training = Training {
        local_epochs: 1,
        batch_size: 32,
        learning_rate: 0.01,
        ..Training::default()
    };
    let mut group = c.benchmark_group("cnn_training_8x8");
    group.sample_size(10);
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("plain_minibatch_32", |b| {
        b.iter(|| {
            let local = LocalProblem {
                spec: &spec,
                n_features: 64,
                outputs: 10,
                params: &params,
                start_on: Start::Initial,
                x: &x,
                y: &y,
                persons: &[],
                training: &training,
                base: None,
            };
            train(&local, 1).expect("trained")
        })
    });
    group.bench_function("dp_micro_batches_of_one", |b| {
        b.iter(|| clipped_gradient_sum(&spec, io, &params, &x, &y, 1.0).expect("clipped"))
    });
    group.finish();
}

fn dicom_decoding(c: &mut Criterion) {
    // Kept under target/ so that `scripts/dicom_bench.py` can time pydicom on the same files.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dicom-bench");
    std::fs::create_dir_all(&dir).expect("target/dicom-bench");
    let files = medfl_site_agent::data::dicom::synthesize(&dir, 512).expect("synthesized files");
    let mut group = c.benchmark_group("dicom_decode_512x512x16");
    group.sample_size(10);
    for (name, path) in &files {
        let bytes = std::fs::metadata(path).expect("file").len();
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(name.as_str(), |b| {
            b.iter(|| medfl_site_agent::data::dicom::read(path, false).expect("decoded"))
        });
    }
    group.finish();
}

criterion_group!(benches, cnn_training, dicom_decoding);
criterion_main!(benches);
