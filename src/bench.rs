//! `medfl bench`: sizing tools for operators. `aggregate` runs the coordinator's
//! aggregation kernels on synthetic updates beside a plain `a += b` loop over the same
//! data, measured in the same run; `round` runs whole rounds with simulated sites over
//! mTLS on loopback beside raw loopback transfers of the same bytes, over plain TCP
//! and over the coordinator's TLS without HTTP/2 or gRPC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use medfl_shared::aggregate::{WeightedSum, plain_pass, synthetic_update};
use medfl_shared::chunk::all_finite_le;
use medfl_shared::chunk::{CHUNK_VALUES, chunks};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The privacy of `medfl bench round`'s study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoundDp {
    None,
    Site,
    Distributed,
}

/// Which sampler this build draws noise with: `dp::sampler`, or OpenDP's everywhere
/// when built with the `opendp-noise` feature (the "before" of the noise figures).
pub const NOISE_SAMPLER: &str = if cfg!(feature = "opendp-noise") {
    "opendp"
} else {
    "dp::sampler"
};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Aggregation throughput of N updates of D parameters, beside a plain-loop
    /// memory-bandwidth reference measured in the same run.
    Aggregate {
        #[arg(long, default_value_t = 100)]
        sites: usize,
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        /// Threads for the fold (default: the machine's cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Repetitions; the median is reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// The strategy whose kernel runs: fedavg (the streaming fold), a server
        /// optimizer (the fold, then its step over the model) or a robust aggregator
        /// (over N distinct updates held in memory, as the coordinator holds them).
        #[arg(long, default_value = "fedavg", value_parser = crate::strategies::STRATEGIES)]
        strategy: String,
        /// FedAvg: how many distinct updates to cycle through (default: every one of the
        /// N, as the coordinator receives them, as far as 2 GiB of updates allow; fewer
        /// stay in cache and read faster than a coordinator would).
        #[arg(long)]
        distinct: Option<usize>,
        /// FedAvg: the most whole updates folded in one pass, as the coordinator folds
        /// the updates that complete together (at most 64, its staging limit); 1 folds
        /// them one at a time, as it does when they arrive one by one.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long)]
        json: bool,
    },
    /// Whole rounds with N simulated sites sending D-parameter updates over mTLS on
    /// loopback (training replaced by a fixed update), beside raw loopback TCP and raw
    /// TLS (the coordinator's TLS configuration without HTTP/2 or gRPC).
    Round {
        #[arg(long, default_value_t = 100)]
        sites: usize,
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Differential privacy in the rounds: none, site (the coordinator noises the
        /// sum of clipped updates) or distributed (site level under secure aggregation:
        /// each site adds its discrete Gaussian share before masking).
        #[arg(long, value_enum, default_value_t = RoundDp::None)]
        dp: RoundDp,
        /// The noise multiplier σ with --dp site|distributed (clip norm 1).
        #[arg(long, default_value_t = 1.0)]
        sigma: f64,
        #[arg(long)]
        json: bool,
    },
    /// Noise throughput, same run: the exact discrete Gaussian of `dp::sampler` (both
    /// cores), OpenDP's discrete Gaussian sampler, and the raw AES-CTR keystream words.
    Noise {
        #[arg(long, default_value_t = 1_000_000)]
        values: usize,
        /// σ of the discrete Gaussian (integer units).
        #[arg(long, default_value_t = 5.0)]
        sigma: f64,
        /// Noise std σ·C of the Gaussian on the grid 2^−30 (DP-SGD, site-level DP).
        #[arg(long, default_value_t = 1.1)]
        grid_std: f64,
        #[arg(long)]
        json: bool,
    },
    /// Latency of a federated-analytics histogram query under secure aggregation over N
    /// simulated sites (each its own mTLS identity and session; the data scan replaced,
    /// the protocol and, unless --no-noise, each site's discrete Gaussian share real),
    /// from `query create` to the released totals.
    Query {
        #[arg(long, default_value_t = 100)]
        sites: usize,
        #[arg(long, default_value_t = 10_000)]
        bins: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Sites send no noise share (to see the protocol's own cost).
        #[arg(long)]
        no_noise: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Aggregate {
            sites,
            params,
            threads,
            repeats,
            strategy,
            distinct,
            batch,
            json,
        } => {
            let threads = threads.unwrap_or_else(medfl_shared::cores);
            let distinct = distinct.unwrap_or_else(|| sites.min(((2usize << 30) / (params.max(1) * 4)).max(1)));
            let r = tokio::task::spawn_blocking(move || {
                if strategy == "fedavg" || strategy == "fedprox" {
                    aggregate(sites, params, distinct, batch, threads, repeats.max(1))
                } else {
                    aggregate_strategy(&strategy, sites, params, threads, repeats.max(1))
                }
            })
            .await??;
            if json {
                println!("{r}");
            } else {
                println!(
                    "aggregate {sites} updates x {params} params on {threads} threads, {}: {:.2} GB/s{}{}, \
                     plain a += b {:.2} GB/s (= {:.0} % of it); peak RSS {:.1} MiB",
                    r["strategy"].as_str().unwrap_or("fedavg"),
                    r["gbps"].as_f64().unwrap_or(0.0),
                    r["one_at_a_time_gbps"]
                        .as_f64()
                        .map(|g| format!(" in batches of {}, one at a time {g:.2} GB/s", r["batch"]))
                        .unwrap_or_default(),
                    r["check_gbps"]
                        .as_f64()
                        .map(|c| format!(", checks {c:.2} GB/s"))
                        .unwrap_or_default(),
                    r["reference_gbps"].as_f64().unwrap_or(0.0),
                    100.0 * r["ratio"].as_f64().unwrap_or(0.0),
                    r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
                );
            }
            Ok(())
        }
        BenchCommand::Noise {
            values,
            sigma,
            grid_std,
            json,
        } => {
            let r = tokio::task::spawn_blocking(move || noise_throughput(values.max(1), sigma, grid_std)).await??;
            if json {
                println!("{r}");
            } else {
                println!(
                    "discrete Gaussian σ = {sigma}: medfl {:.3} M values/s, OpenDP {:.1} K values/s ({:.0}×); AES-CTR keystream {:.0} M words/s",
                    r["medfl_per_second"].as_f64().unwrap_or(0.0) / 1e6,
                    r["opendp_per_second"].as_f64().unwrap_or(0.0) / 1e3,
                    r["ratio"].as_f64().unwrap_or(0.0),
                    r["keystream_words_per_second"].as_f64().unwrap_or(0.0) / 1e6,
                );
                println!(
                    "Gaussian on the grid 2^-30, σ·C = {grid_std}: medfl {:.3} M values/s, OpenDP {:.1} K values/s ({:.0}×)",
                    r["grid_medfl_per_second"].as_f64().unwrap_or(0.0) / 1e6,
                    r["grid_opendp_per_second"].as_f64().unwrap_or(0.0) / 1e3,
                    r["grid_ratio"].as_f64().unwrap_or(0.0),
                );
            }
            Ok(())
        }
        BenchCommand::Query {
            sites,
            bins,
            repeats,
            no_noise,
            json,
        } => {
            let r = query_latency(sites, bins, repeats.max(1), !no_noise).await?;
            if json {
                println!("{r}");
            } else {
                println!(
                    "{sites} sites, a {bins}-bin histogram under secure aggregation: {:.3} s from create to release (median of {repeats}; {})",
                    r["latency_seconds"].as_f64().unwrap_or(0.0),
                    if no_noise {
                        "no noise shares"
                    } else {
                        "each site drawing its noise share"
                    }
                );
            }
            Ok(())
        }
        BenchCommand::Round {
            sites,
            params,
            rounds,
            dp,
            sigma,
            json,
        } => {
            let r = round(sites, params, rounds.max(1), dp, sigma).await?;
            if json {
                println!("{r}");
            } else {
                if dp != RoundDp::None {
                    println!("{dp:?} DP at σ = {sigma}, noise drawn by {NOISE_SAMPLER}");
                }
                println!(
                    "{sites} sites x {params} params over mTLS: round {:.2} s (median of {rounds}), ingest {:.2} GB/s; \
                     raw loopback TCP {:.2} GB/s (ingest = {:.0} % of it), raw mTLS without gRPC {:.2} GB/s \
                     (ingest = {:.0} % of it)",
                    r["round_seconds"].as_f64().unwrap_or(0.0),
                    r["ingest_gbps"].as_f64().unwrap_or(0.0),
                    r["tcp_reference_gbps"].as_f64().unwrap_or(0.0),
                    100.0 * r["ratio"].as_f64().unwrap_or(0.0),
                    r["tls_reference_gbps"].as_f64().unwrap_or(0.0),
                    100.0 * r["ratio_to_tls"].as_f64().unwrap_or(0.0),
                );
                if let Some(peak) = r["coordinator_peak_rss_bytes"].as_u64() {
                    let model = r["model_bytes"].as_u64().unwrap_or(1);
                    println!(
                        "coordinator peak RSS {} MiB = {:.2} × the {} MiB model",
                        peak >> 20,
                        peak as f64 / model as f64,
                        model >> 20
                    );
                }
            }
            Ok(())
        }
    }
}

/// `medfl bench noise`: values per second of each sampler on `values` values (OpenDP
/// on a hundredth of them, at least 1000: it is that much slower), same run: the
/// discrete Gaussian at `sigma`, and the Gaussian mechanism on the grid 2^−30 at noise
/// std `grid_std` (sensitivity 1) as DP-SGD and site-level DP draw it.
pub fn noise_throughput(values: usize, sigma: f64, grid_std: f64) -> Result<serde_json::Value> {
    let grid_rate = |n: usize, opendp: bool| -> Result<f64> {
        let noise = medfl_shared::dp::GaussianNoise::new(n, 1.0, grid_std)?;
        let mut v = vec![0.25f32; n];
        let start = std::time::Instant::now();
        if opendp {
            noise.add_to_opendp(&mut v)?;
        } else {
            noise.add_to(&mut v)?;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    let grid_ours = grid_rate(values, false)?;
    let grid_theirs = grid_rate((values / 100).max(1000), true)?;
    let rate = |n: usize, f: &dyn Fn(&mut [u32]) -> Result<()>| -> Result<f64> {
        let mut words = vec![0u32; n];
        let start = std::time::Instant::now();
        f(&mut words)?;
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    let ours = rate(values, &|w| Ok(medfl_shared::dp::add_discrete_gaussian(w, sigma)?))?;
    let theirs = rate((values / 100).max(1000), &|w| {
        Ok(medfl_shared::dp::add_discrete_gaussian_opendp(w, sigma)?)
    })?;
    let key = [7u8; 32];
    let stream = rate(values, &|w| {
        medfl_shared::prg::add_keystream(&key, 0, w, false);
        Ok(())
    })?;
    Ok(serde_json::json!({
        "values": values, "sigma": sigma, "medfl_per_second": ours, "opendp_per_second": theirs,
        "ratio": ours / theirs, "keystream_words_per_second": stream, "cores": medfl_shared::cores(),
        "grid_std": grid_std, "grid_medfl_per_second": grid_ours, "grid_opendp_per_second": grid_theirs,
        "grid_ratio": grid_ours / grid_theirs,
    }))
}

/// `medfl bench query`: the median latency of `repeats` histogram queries of `bins`
/// bins over `sites` simulated sites under secure aggregation (one process: the sites
/// share this machine's cores, so with noise this is an upper bound on what sites on
/// their own machines would see).
pub async fn query_latency(sites: usize, bins: usize, repeats: usize, noise: bool) -> Result<serde_json::Value> {
    if sites < 2 || bins == 0 {
        bail!("--sites must be at least 2 and --bins at least 1");
    }
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut fed = crate::Federation::builder()
        .sites(sites)
        .dir(dir.path())
        .liveness_secs(600)
        .build()
        .await?;
    let names = fed.site_names.clone();
    let connected = crate::load::connect(&fed, &names, "bench", &["x".to_string()]).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = crate::load::answer_queries(&fed, connected, noise, stop.clone())?;
    let edges: Vec<String> = (0..=bins).map(|i| i.to_string()).collect();
    let manifest = format!(
        "name = \"bench\"\ndataset = \"bench\"\nepsilon = 1.0\nmin_sites = 2\ndeadline_secs = 600\n\n[[statistics]]\nkind = \"histogram\"\ncolumns = [\"x\"]\nedges = [[{}]]\n",
        edges.join(", ")
    );
    let mut times = Vec::new();
    for _ in 0..repeats {
        let start = std::time::Instant::now();
        let id = fed.create_query(&manifest).await?;
        let q = fed.wait_query(&id, std::time::Duration::from_secs(900)).await?;
        if q.state != "released" || q.answered.len() != sites {
            bail!(
                "query {id} {} with {} of {sites} answers: {}",
                q.state,
                q.answered.len(),
                q.reason
            );
        }
        times.push(start.elapsed().as_secs_f64());
    }
    stop.cancel();
    while let Some(done) = tasks.join_next().await {
        done.context("a simulated site panicked")??;
    }
    fed.shutdown().await?;
    Ok(serde_json::json!({
        "sites": sites, "bins": bins, "noise": noise, "repeats": repeats,
        "latency_seconds": median(times.clone()), "all_seconds": times,
    }))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn peak_rss() -> u64 {
    crate::load::rss_bytes(std::process::id()).map_or(0, |r| r.1)
}

/// The coordinator's aggregation path on `sites` updates of `params` values: each
/// update's little-endian chunks (as they arrive) checked finite, then folded with its
/// weight into one accumulator, in batches of up to `batch` whole updates
/// ([`WeightedSum::fold_batch`], as the coordinator folds updates that complete
/// together) and, in the same run, one at a time ([`WeightedSum::fold_chunks`], as it
/// folds updates that arrive one by one). `distinct` different updates are kept and
/// cycled through.
pub fn aggregate(
    sites: usize,
    params: usize,
    distinct: usize,
    batch: usize,
    threads: usize,
    repeats: usize,
) -> Result<serde_json::Value> {
    if sites == 0 || params == 0 || distinct == 0 || batch == 0 {
        bail!("--sites, --params, --distinct and --batch must be at least 1");
    }
    let distinct = sites.min(distinct);
    let batch = batch.min(medfl_coordinator::engine::MAX_STAGED_UPDATES);
    let decoded: Vec<Vec<f32>> = (0..distinct).map(|k| synthetic_update(params, k as u64 + 1)).collect();
    let encoded: Vec<Vec<Vec<u8>>> = decoded.iter().map(|u| chunks(u).map(|c| c.2).collect()).collect();
    let refs: Vec<Vec<&[u8]>> = encoded
        .iter()
        .map(|u| u.iter().map(|c| c.as_slice()).collect())
        .collect();
    let bytes = (sites * params * 4) as f64;
    let updates: Vec<&[f32]> = (0..sites).map(|k| decoded[k % distinct].as_slice()).collect();
    let weighted: Vec<(&[&[u8]], f64)> = (0..sites)
        .map(|k| (refs[k % distinct].as_slice(), (k + 1) as f64))
        .collect();
    let mut acc = WeightedSum::new(params);
    let mut single = WeightedSum::new(params);
    let mut reference = vec![0f32; params];
    let (mut fold, mut one, mut check, mut plain) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let start = Instant::now();
        for k in 0..sites {
            if !refs[k % distinct].iter().all(|c| all_finite_le(c)) {
                bail!("synthetic update {k} is not finite");
            }
        }
        check.push(bytes / start.elapsed().as_secs_f64() / 1e9);

        acc.reset(params);
        let start = Instant::now();
        for group in weighted.chunks(batch) {
            acc.fold_batch(group, threads)?;
        }
        fold.push(bytes / start.elapsed().as_secs_f64() / 1e9);

        single.reset(params);
        let start = Instant::now();
        for (chunks, weight) in &weighted {
            single.fold_chunks(chunks, *weight, threads)?;
        }
        one.push(bytes / start.elapsed().as_secs_f64() / 1e9);

        plain.push(plain_reference(&updates, &mut reference, threads));
    }
    // Keep the results observable so no loop is optimized away.
    let head = params.min(16);
    let checksum = acc.sum_slice(0..head).iter().sum::<f32>()
        + single.sum_slice(0..head).iter().sum::<f32>()
        + reference[..head].iter().sum::<f32>();
    let (gbps, reference_gbps) = (median(fold), median(plain));
    Ok(json!({
        "strategy": "fedavg",
        "sites": sites,
        "distinct": distinct,
        "params": params,
        "threads": threads,
        "repeats": repeats,
        "batch": batch,
        "gbps": gbps,
        "one_at_a_time_gbps": median(one),
        "check_gbps": median(check),
        "reference_gbps": reference_gbps,
        "ratio": gbps / reference_gbps,
        "peak_rss_bytes": peak_rss(),
        "checksum": checksum,
    }))
}

/// `a += b` over `updates` into `reference` on `threads` threads (whole chunks each):
/// the memory-bandwidth reference, in GB/s of update bytes.
fn plain_reference(updates: &[&[f32]], reference: &mut [f32], threads: usize) -> f64 {
    reference.fill(0.0);
    let start = Instant::now();
    plain_pass(reference, updates, threads);
    (updates.len() * reference.len() * 4) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// A strategy's kernel on `sites` updates of `params` values, beside the plain loop.
/// Robust aggregators run over `sites` distinct updates in memory (the coordinator
/// holds a robust round's updates); a server optimizer runs the FedAvg fold, then its
/// step over the model with its state, and is timed for both.
pub fn aggregate_strategy(
    name: &str,
    sites: usize,
    params: usize,
    threads: usize,
    repeats: usize,
) -> Result<serde_json::Value> {
    use medfl_shared::manifest::Robust;
    use medfl_shared::strategy::{coordinate_median, multi_krum, trimmed_mean};
    if sites == 0 || params == 0 {
        bail!("--sites and --params must be at least 1");
    }
    let (strategy, _) =
        crate::strategies::demo_strategy(name, sites.max(5), medfl_shared::manifest::Weighting::Uniform)?;
    let robust = strategy.robust(sites);
    let distinct = if robust.is_some() { sites } else { sites.min(4) };
    let held = distinct as u64 * params as u64 * 4;
    if held > 32 << 30 {
        bail!(
            "{sites} distinct updates of {params} values need {} GiB; use fewer",
            held >> 30
        );
    }
    let updates: Vec<Vec<f32>> = (0..distinct).map(|k| synthetic_update(params, k as u64 + 1)).collect();
    let refs: Vec<&[f32]> = (0..sites).map(|k| updates[k % distinct].as_slice()).collect();
    let bytes = (sites * params * 4) as f64;
    let optimizer = strategy.server_optimizer();
    let mut out = vec![0f32; params];
    let mut model = vec![0f32; params];
    let mut state = vec![0f32; params * optimizer.slots()];
    let mut acc = WeightedSum::new(params);
    let mut reference = vec![0f32; params];
    let (mut runs, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let start = Instant::now();
        match robust {
            Some(Robust::Median) => coordinate_median(&refs, &mut out, threads)?,
            Some(Robust::TrimmedMean { trim }) => trimmed_mean(&refs, trim, &mut out, threads)?,
            Some(Robust::Krum { f, m }) => {
                multi_krum(&refs, f, m, &mut out, threads)?;
            }
            None => {
                acc.reset(params);
                for u in &refs {
                    acc.fold(u, 1.0)?;
                }
                let mut index = 0;
                for (x, mean) in model
                    .chunks_mut(CHUNK_VALUES)
                    .zip(acc.sum_slice(0..params).chunks(CHUNK_VALUES))
                {
                    let len = x.len();
                    let slots = optimizer.slots();
                    let s = &mut state[index * slots..(index + len) * slots];
                    optimizer.step(x, mean, s);
                    index += len;
                }
            }
        }
        runs.push(bytes / start.elapsed().as_secs_f64() / 1e9);
        plain.push(plain_reference(&refs, &mut reference, threads));
    }
    let checksum = out[..params.min(16)].iter().sum::<f32>()
        + model[..params.min(16)].iter().sum::<f32>()
        + reference[..params.min(16)].iter().sum::<f32>();
    let (gbps, reference_gbps) = (median(runs), median(plain));
    Ok(json!({
        "strategy": name,
        "sites": sites,
        "params": params,
        "threads": threads,
        "repeats": repeats,
        "gbps": gbps,
        "reference_gbps": reference_gbps,
        "ratio": gbps / reference_gbps,
        "peak_rss_bytes": peak_rss(),
        "checksum": checksum,
    }))
}

/// Writes `bytes` bytes to `s` in 1 MiB blocks, then shuts its sending side.
async fn fill(s: &mut (impl AsyncWrite + Unpin), bytes: usize) -> std::io::Result<()> {
    let block = vec![7u8; 1 << 20];
    let mut sent = 0;
    while sent < bytes {
        let n = block.len().min(bytes - sent);
        s.write_all(&block[..n]).await?;
        sent += n;
    }
    s.shutdown().await
}

/// Reads `s` to its end into a 1 MiB buffer: the bytes read, and when the last came.
async fn drain(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(usize, Instant)> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok((got, Instant::now()));
        }
        got += n;
    }
}

/// Raw loopback TCP: one connection carrying `bytes` bytes, in GB/s.
pub async fn tcp_reference(bytes: usize) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move { drain(&mut listener.accept().await?.0).await });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let start = Instant::now();
    fill(&mut s, bytes).await?;
    let (got, end) = reader.await??;
    if got != bytes {
        bail!("the TCP reference received {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / (end - start).as_secs_f64() / 1e9)
}

/// Raw mTLS on loopback: one TLS connection with the coordinator's own TLS
/// configuration (TLS 1.3, its certificate, the consortium's client verifier) and a
/// site's certificate, carrying `bytes` bytes of application data, in GB/s (the
/// handshake is not timed). Client and server offer the cipher suites in the order a
/// site's channel does, so they agree on the same one (AES-256-GCM). HTTP/2 and gRPC
/// are left out, so this is the most any update ingest over this TLS stack could reach
/// on this machine.
pub async fn tls_reference(bytes: usize) -> Result<f64> {
    use medfl_coordinator::pki::{self, IssueRequest};
    use medfl_shared::identity::{Identity, Role};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let dir = tempfile::tempdir().context("temporary directory")?;
    pki::init(dir.path(), medfl_shared::sign::Algorithm::P256)?;
    let issue = |role: Role, name: &str| -> Result<medfl_proto::transport::Profile> {
        let bundle = pki::issue(
            dir.path(),
            &IssueRequest {
                identity: Identity::new(role, name.parse()?),
                dns: vec![],
                ips: vec![],
                days: 1,
                coordinator: Some("https://127.0.0.1:1".into()),
                algorithm: None,
            },
        )?;
        Ok(medfl_proto::transport::Profile::load(&bundle)?)
    };
    let (coordinator, site) = (issue(Role::Coordinator, "coordinator")?, issue(Role::Site, "site-1")?);
    let server = medfl_coordinator::tls::server_config(&coordinator, Default::default())?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(site.ca_pem.as_bytes()) {
        roots.add(ca.context("parse the CA")?).context("add the CA")?;
    }
    let chain = CertificateDer::pem_slice_iter(site.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parse the site certificate")?;
    let key = PrivateKeyDer::from_pem_slice(site.key_pem.as_bytes()).context("parse the site key")?;
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let reader = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        drain(&mut acceptor.accept(tcp).await?).await
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
        .context("the TLS reference's handshake")?;
    let start = Instant::now();
    // Sends close_notify at the end.
    fill(&mut s, bytes).await?;
    let (got, end) = reader.await??;
    // Read to the end, so that the server's session tickets are consumed (closing with
    // unread bytes would reset the connection).
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut Vec::new())).await;
    if got != bytes {
        bail!("the TLS reference received {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / (end - start).as_secs_f64() / 1e9)
}

/// Runs `rounds` rounds over mTLS on loopback (an in-process coordinator, `sites`
/// simulated sites answering each round with the same update of about `params`
/// values) and times them.
pub async fn run_rounds(
    sites: usize,
    params: usize,
    rounds: u32,
    coordinator: Option<&std::path::Path>,
    dp: RoundDp,
    sigma: f64,
) -> Result<RoundTimes> {
    use medfl_proto::v1 as pb;
    // An MLP 30 → h → 1 has 32h + 1 parameters, up to the manifest's widest layer;
    // beyond it the model is one tensor of the sites' own trainers (medfl knows only
    // its layout), so a round of any size fits the manifest's limits.
    let hidden = (params.saturating_sub(1) / 32).max(1);
    let mlp = hidden <= 65_536;
    let actual = if mlp { 32 * hidden + 1 } else { params };
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut builder = crate::Federation::builder()
        .sites(sites)
        .dir(dir.path())
        // Two uploads in flight; one for models of 256 MiB and more, whose rounds the
        // coordinator's memory bound (3 × the model + 64 MiB: the sum, one upload, the
        // broadcast) is measured on.
        .staging_budget_mib(((actual * 4) >> 20) as u64 * if actual * 4 >= 256 << 20 { 1 } else { 2 } + 64)
        .metrics();
    if let Some(binary) = coordinator {
        builder = builder.coordinator_process(binary);
    }
    let mut fed = builder.build().await?;
    let features: Vec<String> = (0..30).map(|i| format!("f{i}")).collect();
    let names = fed.site_names.clone();
    let connected = crate::load::connect(&fed, &names, "bench", &features).await?;
    let feature_list: Vec<String> = features.iter().map(|f| format!("{f:?}")).collect();
    let model = if mlp {
        format!("kind = \"mlp\"\nhidden = [{hidden}]")
    } else {
        format!(
            "kind = \"external\"\n\n[model.external]\ntrainer = \"bench\"\ntensors = [{{ name = \"w\", shape = [{actual}] }}]"
        )
    };
    // Site-level DP at clip norm 1 (the sites' updates are within it), with a budget
    // no round count reaches: the noise is what is measured.
    let privacy = match dp {
        RoundDp::None => String::new(),
        RoundDp::Site | RoundDp::Distributed => format!(
            "\n[privacy]\nunit = \"site\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 1.0\nnoise_multiplier = {sigma}\nbudget_epsilon = 1000000.0\n"
        ),
    };
    let secure = if dp == RoundDp::Distributed {
        // Stages wait long enough for OpenDP's sampler (the `opendp-noise` build).
        format!(
            "\n[secure_aggregation]\nthreshold = {}\nclip_norm = 1.0\nstage_timeout_secs = 3600\n",
            sites / 2 + 1
        )
    } else {
        String::new()
    };
    let manifest = format!(
        "name = \"bench\"\nrounds = {rounds}\n\n[model]\n{model}\n\n[data]\ndataset = \"bench\"\nlabel = \"y\"\nfeatures = [{}]\n\n[selection]\nmin_sites = {sites}\nround_deadline_secs = 3600\nmax_attempts = 1\n\n[strategy]\nweighting = \"uniform\"\n{privacy}{secure}",
        feature_list.join(", ")
    );
    let id = fed.create_study(&manifest).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut update = synthetic_update(actual, 3);
    if dp != RoundDp::None {
        let norm = medfl_shared::dp::l2_norm(&update);
        medfl_shared::dp::scale_to_norm(&mut update, norm, 0.5);
    }
    let update = Arc::new(update);
    let tasks = if dp == RoundDp::Distributed {
        crate::load::answer_secure_rounds(&fed, connected, update, stop.clone())?
    } else {
        crate::load::answer_rounds(connected, update, stop.clone())
    };
    // The study's event feed times each round's ingest: from its start to its last update.
    let mut events = fed
        .admin
        .watch_study(pb::StudyRef { study_id: id.clone() })
        .await?
        .into_inner();
    // Per round: (started, last update received, committed), in Unix ms.
    type Windows = std::collections::BTreeMap<u32, (u64, u64, u64)>;
    let windows: Arc<std::sync::Mutex<Windows>> = Default::default();
    let seen = windows.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(e)) = events.message().await {
            let mut windows = seen.lock().unwrap_or_else(|p| p.into_inner());
            let w = windows.entry(e.round).or_insert((u64::MAX, 0, 0));
            match pb::EventKind::try_from(e.kind) {
                Ok(pb::EventKind::RoundStarted) => w.0 = e.at_unix_ms,
                Ok(pb::EventKind::UpdateReceived) => w.1 = w.1.max(e.at_unix_ms),
                Ok(pb::EventKind::RoundCommitted) => w.2 = e.at_unix_ms,
                _ => {}
            }
        }
    });
    fed.start_study(&id).await?;
    let status = fed
        .wait_for(&id, Duration::from_secs(3600), |i| {
            i.state != pb::StudyState::Running as i32
        })
        .await?;
    stop.cancel();
    drop(tasks);
    // The last RoundCommitted event is sent before the study completes; let it land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    watcher.abort();
    let windows = windows.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let info = status.info.clone().context("no study info")?;
    if info.state != pb::StudyState::Completed as i32 {
        bail!("the benchmark study ended as {}: {}", info.state, info.reason);
    }
    // A round runs from its start to its commit (the noise, the model written and
    // charged), as its RoundCommitted event says; the record's own end is its close.
    let committed: std::collections::BTreeMap<u32, f64> = windows
        .iter()
        .filter(|(_, (start, _, done))| *start != u64::MAX && done > start)
        .map(|(round, (start, _, done))| (*round, (done - start) as f64 / 1000.0))
        .collect();
    let round_seconds: Vec<f64> = status
        .rounds
        .iter()
        .filter(|r| r.committed)
        .map(|r| {
            committed
                .get(&r.round)
                .copied()
                .unwrap_or((r.finished_unix_ms - r.started_unix_ms) as f64 / 1000.0)
        })
        .collect();
    let ingest_seconds: Vec<f64> = windows
        .values()
        .filter(|(start, end, _)| *start != u64::MAX && end > start)
        .map(|(start, end, _)| (end - start) as f64 / 1000.0)
        .collect();
    // The coordinator's own peak RSS, when it runs as its own process.
    let coordinator_peak_rss = fed
        .coordinator_pid()
        .and_then(|pid| crate::load::rss_bytes(pid).ok())
        .map(|(_, peak)| peak);
    let metrics = match fed.metrics_port {
        Some(port) => scrape(port).await?,
        None => String::new(),
    };
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
    };
    let updates_per_fold_pass = match (sample("medfl_updates_folded_total"), sample("medfl_fold_passes_total")) {
        (Some(updates), Some(passes)) if passes > 0.0 => Some(updates / passes),
        _ => None,
    };
    fed.shutdown().await?;
    Ok(RoundTimes {
        params: actual,
        round_seconds,
        ingest_seconds,
        updates_per_fold_pass,
        coordinator_peak_rss,
    })
}

/// What [`run_rounds`] measured: each committed round's wall time and its ingest
/// window (from its start to its last update), in seconds, for `params` values.
#[derive(Debug, Clone)]
pub struct RoundTimes {
    pub params: usize,
    pub round_seconds: Vec<f64>,
    pub ingest_seconds: Vec<f64>,
    /// The coordinator's mean batch of the group commit: near 1 while updates arrive
    /// one by one, higher when they queue behind a fold.
    pub updates_per_fold_pass: Option<f64>,
    /// The coordinator process's peak RSS (VmHWM), when it ran as its own process.
    pub coordinator_peak_rss: Option<u64>,
}

/// The coordinator's `/metrics` text on `port` (plain HTTP on loopback).
async fn scrape(port: u16) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connect to the coordinator's metrics")?;
    let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// Transfers behind each reference of [`round`].
const REFERENCE_REPEATS: usize = 5;

/// Whole rounds over mTLS on loopback: an in-process coordinator, `sites` simulated
/// sites answering each round with the same `params`-value update.
pub async fn round(sites: usize, params: usize, rounds: u32, dp: RoundDp, sigma: f64) -> Result<serde_json::Value> {
    // The coordinator runs as its own process of this binary, so its memory is its own.
    let binary = std::env::current_exe().ok();
    let times = run_rounds(sites, params, rounds, binary.as_deref(), dp, sigma).await?;
    let actual = times.params;
    let round_seconds = median(times.round_seconds);
    let ingest_seconds = if times.ingest_seconds.is_empty() {
        round_seconds
    } else {
        median(times.ingest_seconds)
    };
    let bytes = sites * actual * 4;
    let ingest_gbps = bytes as f64 / ingest_seconds / 1e9;
    // Single transfers of a round's bytes vary by half on a shared machine; the
    // references are medians, interleaved so that both see the same conditions.
    let (mut tcp, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..REFERENCE_REPEATS {
        tcp.push(tcp_reference(bytes).await?);
        tls.push(tls_reference(bytes).await?);
    }
    let (tcp, tls) = (median(tcp), median(tls));
    Ok(json!({
        "sites": sites,
        "params": actual,
        "rounds": rounds,
        "dp": format!("{dp:?}").to_lowercase(),
        "sigma": (dp != RoundDp::None).then_some(sigma),
        "noise_sampler": NOISE_SAMPLER,
        "round_seconds": round_seconds,
        "ingest_seconds": ingest_seconds,
        "ingest_gbps": ingest_gbps,
        "tcp_reference_gbps": tcp,
        "ratio": ingest_gbps / tcp,
        "tls_reference_gbps": tls,
        "ratio_to_tls": ingest_gbps / tls,
        "updates_per_fold_pass": times.updates_per_fold_pass,
        "coordinator_peak_rss_bytes": times.coordinator_peak_rss,
        "model_bytes": actual * 4,
        "peak_rss_bytes": peak_rss(),
    }))
}
