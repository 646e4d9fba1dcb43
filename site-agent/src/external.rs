//! A hospital's own trainer as a [`LocalTrainer`]: a process the agent starts for each
//! round, isolated, and speaks `medfl.trainer.v1` with over its standard input and
//! output (`proto/medfl/trainer/v1/trainer.proto`).
//!
//! Why standard input and output, not a socket: the trainer needs no path it could
//! share or find, nothing else on the host can connect to it, the channel ends when the
//! process does, and it works in a network namespace with nothing in it.
//!
//! Isolation (bubblewrap, `bwrap`, the sandbox Flatpak uses): the trainer runs in its
//! own PID, IPC, UTS and (unless `network = "host"`) network namespace, which holds only
//! a loopback device, so it cannot reach any other machine nor a service of the host;
//! in its own mount namespace it sees the system's programs and libraries read-only,
//! its root (code and environment) read-only, the approved dataset read-only, its
//! working directory and a private `/tmp`, and nothing else: not the agent's key,
//! ledger, store, policy or egress log, nor datasets the study did not approve, nor the
//! host's sockets. Its environment is cleared but for an allow-list. Optional limits
//! (`memory_mib`, `cpu_secs`) are `prlimit`s. At its timeout, or when it breaks the
//! protocol, its whole process group is killed.
//!
//! The agent stays the privacy boundary: what the trainer returns is checked here
//! (names, shapes, dtypes, byte counts, finiteness) and then treated by `work::train`
//! and `work::release` exactly as the built-in trainer's result: delta, clip, noise or
//! mask, charge, egress log. A fault is a [`TrainError::Fault`] naming only the trainer
//! and the kind of fault; the trainer's own words (its error text, its standard error)
//! stay in the site's log.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use medfl_proto::trainer_v1 as tp;
use medfl_shared::model::TensorSpec;
use prost::Message;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::trainer::{FaultKind, LocalTrainer, TrainError, TrainerOutput, TrainingMode, TrainingTask};

/// Values per chunk frame: 1 MiB of f32.
const CHUNK_VALUES: usize = 1 << 18;
/// The largest frame a trainer may send: a chunk and its framing, with room to spare.
const MAX_FRAME: usize = 8 << 20;
/// How much of a trainer's standard error the agent keeps (its tail), for the site's log.
const STDERR_TAIL: usize = 16 << 10;
/// How long a trainer told to cancel (at its timeout) has to stop before its process
/// group is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// `[trainers.NAME]` in agent.toml: one local trainer a manifest's `model.external.trainer`
/// may name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// The program and its arguments, run inside the sandbox from `root` (relative paths
    /// are the root's), e.g. `["/opt/trainer/.venv/bin/python", "train.py"]`.
    pub command: Vec<String>,
    /// The trainer's root: its code and its environment, read-only inside, and what
    /// `sha256` covers.
    pub root: PathBuf,
    /// The SHA-256 of everything under `root` as the site approved it
    /// (`medfl-agent trainer hash NAME` prints it). A trainer whose files differ is not
    /// run; without it no trainer runs.
    #[serde(default)]
    pub sha256: Option<String>,
    /// A writable directory for the trainer (checkpoints, caches); by default a fresh
    /// temporary directory per round, removed afterwards.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Names of the agent's environment variables the trainer may see; everything else
    /// is cleared (PATH is set to the system's).
    #[serde(default)]
    pub env: Vec<String>,
    /// Further paths the trainer may read, e.g. the Python installation a virtual
    /// environment points to.
    #[serde(default)]
    pub read_only: Vec<PathBuf>,
    /// Seconds a round's training may take before the process group is killed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Address-space limit (MiB), where the host offers `prlimit`.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// CPU-time limit (seconds), where the host offers `prlimit`.
    #[serde(default)]
    pub cpu_secs: Option<u64>,
    /// `none` (default): a network namespace with only loopback. `host`: the host's
    /// network, on purpose (logged at every run and shown by `policy check`).
    #[serde(default)]
    pub network: Network,
    /// Lets the trainer use the site's GPUs (`/dev/nvidia*`, `/dev/dri`).
    #[serde(default)]
    pub gpu: bool,
}

fn default_timeout() -> u64 {
    3600
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    #[default]
    None,
    Host,
}

impl TrainerConfig {
    pub fn validate(&self, name: &str) -> Result<()> {
        if self.command.is_empty() || self.command[0].is_empty() {
            anyhow::bail!("[trainers.{name}] has no command");
        }
        if !self.root.is_absolute() || !self.root.is_dir() {
            anyhow::bail!(
                "[trainers.{name}] root {} must be an absolute path to a directory",
                self.root.display()
            );
        }
        if let Some(h) = &self.sha256
            && (h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()))
        {
            anyhow::bail!("[trainers.{name}] sha256 must be 64 hex digits");
        }
        if self.timeout_secs == 0 {
            anyhow::bail!("[trainers.{name}] timeout_secs must be at least 1");
        }
        for p in self.read_only.iter().chain(&self.workdir) {
            if !p.is_absolute() {
                anyhow::bail!("[trainers.{name}] {} must be an absolute path", p.display());
            }
        }
        Ok(())
    }
}

/// SHA-256 over every file, directory and link under `root`, in path order: each
/// entry's relative path, its kind and its bytes (a link's target), length-prefixed.
pub fn tree_sha256(root: &Path) -> Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut stack = vec![PathBuf::new()];
    let mut buf = vec![0u8; 1 << 20];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("read {}", dir.display()))?
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("read {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        // Reverse so the stack pops subdirectories in name order.
        let mut subdirs = Vec::new();
        for entry in entries {
            let path = rel.join(entry.file_name());
            let kind = entry.file_type().with_context(|| format!("stat {}", path.display()))?;
            let name = path.to_string_lossy();
            let mut field = |tag: u8, bytes: &[u8]| {
                ctx.update(&[tag]);
                ctx.update(&(bytes.len() as u64).to_be_bytes());
                ctx.update(bytes);
            };
            field(b'p', name.as_bytes());
            if kind.is_symlink() {
                let target = std::fs::read_link(root.join(&path))?;
                field(b'l', target.to_string_lossy().as_bytes());
            } else if kind.is_dir() {
                field(b'd', &[]);
                subdirs.push(path);
            } else if kind.is_file() {
                let full = root.join(&path);
                let mut f = std::fs::File::open(&full).with_context(|| format!("read {}", full.display()))?;
                let len = f.metadata()?.len();
                ctx.update(b"f");
                ctx.update(&len.to_be_bytes());
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    ctx.update(&buf[..n]);
                }
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(medfl_shared::hex::to_hex(ctx.finish().as_ref()))
}

/// Whether bubblewrap can make a sandbox on this host (installed, and namespaces allowed).
pub fn sandbox_available() -> bool {
    Command::new("bwrap")
        .args(["--ro-bind", "/", "/", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What a sandboxed `python` must read beyond the system's directories: its virtual
/// environment and the installation that environment points to (`sys.prefix`,
/// `sys.base_prefix`), once it has checked it can import `modules`.
pub fn python_read_only(python: &Path, modules: &[&str]) -> Result<Vec<PathBuf>> {
    let script = format!(
        "import sys{}; print(sys.prefix); print(sys.base_prefix)",
        modules.iter().map(|m| format!(", {m}")).collect::<String>()
    );
    let out = Command::new(python)
        .args(["-c", &script])
        .output()
        .with_context(|| format!("run {}", python.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} cannot import {}: {}",
            python.display(),
            modules.join(", "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| std::fs::canonicalize(l.trim()).with_context(|| format!("resolve {l}")))
        .collect()
}

/// A site trainer, configured, for one dataset.
#[derive(Debug, Clone)]
pub struct ExternalTrainer {
    pub name: String,
    pub config: TrainerConfig,
    /// The approved dataset's file, bound read-only.
    pub dataset_path: PathBuf,
    /// What must stay out of reach: the agent's store, profile, config and policy files,
    /// the datasets the study did not approve. Covered over wherever a bound path holds them.
    pub hidden: Vec<PathBuf>,
}

/// The system directories a trainer may read.
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc/alternatives"];
const SYSTEM_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
];

impl ExternalTrainer {
    /// The command line that runs the trainer isolated, working in `workdir`.
    pub fn sandbox_command(&self, workdir: &Path) -> Vec<String> {
        let c = &self.config;
        let mut argv: Vec<String> = Vec::new();
        let mut limits = Vec::new();
        if let Some(m) = c.memory_mib {
            limits.push(format!("--as={}", m.saturating_mul(1 << 20)));
        }
        if let Some(s) = c.cpu_secs {
            limits.push(format!("--cpu={s}"));
        }
        if !limits.is_empty() {
            argv.push("prlimit".into());
            argv.extend(limits);
            argv.push("--".into());
        }
        let s = |p: &Path| p.to_string_lossy().into_owned();
        argv.extend(
            [
                "bwrap",
                "--die-with-parent",
                "--new-session",
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--clearenv",
                "--setenv",
                "PATH",
                "/usr/local/bin:/usr/bin:/bin",
                "--setenv",
                "PYTHONDONTWRITEBYTECODE",
                "1",
                "--setenv",
                "MEDFL_TRAINER",
                &self.name,
            ]
            .map(String::from),
        );
        if c.network == Network::None {
            argv.push("--unshare-net".into());
        }
        for key in &c.env {
            if let Ok(value) = std::env::var(key) {
                argv.extend(["--setenv".into(), key.clone(), value]);
            }
        }
        for dir in SYSTEM_DIRS.iter().chain(SYSTEM_FILES) {
            argv.extend(["--ro-bind-try".into(), dir.to_string(), dir.to_string()]);
        }
        argv.extend(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"].map(String::from));
        if c.gpu {
            for dev in [
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia0",
                "/dev/dri",
            ] {
                argv.extend(["--dev-bind-try".into(), dev.into(), dev.into()]);
            }
        }
        let mut bound: Vec<&Path> = Vec::new();
        for p in c.read_only.iter().chain([&c.root, &self.dataset_path]) {
            argv.extend(["--ro-bind".into(), s(p), s(p)]);
            bound.push(p);
        }
        argv.extend(["--bind".into(), s(workdir), s(workdir)]);
        bound.push(workdir);
        // Cover whatever must stay hidden where a bound path holds it: a tmpfs over a
        // directory, an empty file over a file.
        for h in &self.hidden {
            let reachable = bound.iter().any(|b| h.starts_with(b))
                || SYSTEM_DIRS.iter().any(|d| h.starts_with(d))
                || h.starts_with("/etc");
            if !reachable || h == &self.dataset_path || workdir.starts_with(h) || c.root.starts_with(h) {
                continue;
            }
            if h.is_dir() {
                argv.extend(["--tmpfs".into(), s(h)]);
            } else if h.exists() {
                argv.extend(["--ro-bind".into(), "/dev/null".into(), s(h)]);
            }
        }
        // The command runs from its root (relative paths in `command` are the root's);
        // its writable place is MEDFL_WORKDIR, also its HOME and TMPDIR.
        for key in ["MEDFL_WORKDIR", "HOME", "TMPDIR"] {
            argv.extend(["--setenv".into(), key.into(), s(workdir)]);
        }
        argv.extend(["--chdir".into(), s(&c.root), "--".into()]);
        argv.extend(c.command.iter().cloned());
        argv
    }

    fn fault(&self, kind: FaultKind, detail: impl std::fmt::Display) -> TrainError {
        warn!(trainer = %self.name, fault = %kind, %detail, "the trainer failed");
        TrainError::Fault {
            trainer: self.name.clone(),
            kind,
        }
    }

    fn check_approved(&self) -> Result<(), TrainError> {
        let Some(approved) = &self.config.sha256 else {
            let now = tree_sha256(&self.config.root).unwrap_or_else(|e| format!("unreadable: {e:#}"));
            return Err(self.fault(
                FaultKind::NotApproved,
                format!("no sha256 in [trainers.{}]; its files hash to {now}", self.name),
            ));
        };
        let now = tree_sha256(&self.config.root).map_err(|e| self.fault(FaultKind::Changed, format!("{e:#}")))?;
        if !now.eq_ignore_ascii_case(approved) {
            return Err(self.fault(
                FaultKind::Changed,
                format!("its files hash to {now}, the site approved {approved}"),
            ));
        }
        Ok(())
    }
}

/// Writes one length-delimited frame.
fn write_frame(out: &mut impl Write, frame: &tp::AgentFrame) -> std::io::Result<()> {
    out.write_all(&frame.encode_length_delimited_to_vec())
}

/// Writes `AgentFrame{chunk: Chunk{tensor, offset, data}}` with `data` straight from
/// `bytes` (the protobuf encoding written by hand, so the values are not copied again).
fn write_chunk(out: &mut impl Write, tensor: u32, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let mut inner = Vec::with_capacity(24);
    if tensor != 0 {
        encode_key(1, WireType::Varint, &mut inner);
        encode_varint(u64::from(tensor), &mut inner);
    }
    if offset != 0 {
        encode_key(2, WireType::Varint, &mut inner);
        encode_varint(offset, &mut inner);
    }
    if !bytes.is_empty() {
        encode_key(3, WireType::LengthDelimited, &mut inner);
        encode_varint(bytes.len() as u64, &mut inner);
    }
    let chunk_len = inner.len() + bytes.len();
    let mut head = Vec::with_capacity(16);
    encode_key(2, WireType::LengthDelimited, &mut head);
    encode_varint(chunk_len as u64, &mut head);
    let frame_len = head.len() + chunk_len;
    let mut prefix = Vec::with_capacity(10 + head.len() + inner.len());
    encode_varint(frame_len as u64, &mut prefix);
    debug_assert_eq!(prefix.len(), encoded_len_varint(frame_len as u64));
    prefix.extend_from_slice(&head);
    prefix.extend_from_slice(&inner);
    out.write_all(&prefix)?;
    out.write_all(bytes)
}

/// Reads one length-delimited frame of at most [`MAX_FRAME`] bytes; None at a clean end.
fn read_frame(input: &mut impl Read) -> std::result::Result<Option<tp::TrainerFrame>, String> {
    let mut len: u64 = 0;
    for i in 0..10 {
        let mut byte = [0u8];
        match input.read(&mut byte) {
            Ok(0) if i == 0 => return Ok(None),
            Ok(0) => return Err("the output ended inside a frame's length".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        len |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            break;
        }
        if i == 9 {
            return Err("a frame length longer than a varint".into());
        }
    }
    if len as usize > MAX_FRAME {
        return Err(format!("a frame of {len} bytes (the limit is {MAX_FRAME})"));
    }
    let mut buf = vec![0u8; len as usize];
    input
        .read_exact(&mut buf)
        .map_err(|e| format!("the output ended inside a frame: {e}"))?;
    // Decoded from `Bytes`, a chunk's data is a slice of this buffer, not a copy.
    tp::TrainerFrame::decode(prost::bytes::Bytes::from(buf))
        .map(Some)
        .map_err(|e| format!("a frame that does not decode: {e}"))
}

fn spec_pb(t: &TensorSpec) -> tp::TensorSpec {
    tp::TensorSpec {
        name: t.name.clone(),
        dtype: "f32".into(),
        shape: t.shape.clone(),
    }
}

/// The task frame for `task`.
fn task_frame(name: &str, task: &TrainingTask, layout: &[TensorSpec]) -> tp::AgentFrame {
    let ext = task.external.as_ref();
    let (center, scale) = ext
        .and_then(|e| e.scaling.as_ref())
        .map(|s| {
            (
                s.center.iter().map(|v| *v as f64).collect(),
                s.scale.iter().map(|v| *v as f64).collect(),
            )
        })
        .unwrap_or_default();
    let privacy = match &task.mode {
        TrainingMode::Plain { .. } => tp::Privacy {
            unit: "none".into(),
            ..Default::default()
        },
        TrainingMode::SiteLevel => tp::Privacy {
            unit: "site".into(),
            ..Default::default()
        },
        TrainingMode::DpSgd { config, .. } => tp::Privacy {
            unit: "record".into(),
            noise_multiplier: config.noise_multiplier,
            sample_rate: config.sample_rate,
            steps: config.steps as u64,
            clip_norm: config.clip_norm,
        },
    };
    tp::AgentFrame {
        body: Some(tp::agent_frame::Body::Task(tp::Task {
            study_id: ext.map(|e| e.study_id.clone()).unwrap_or_default(),
            round: ext.map_or(0, |e| e.round),
            trainer: name.to_string(),
            dataset: ext.map(|e| e.dataset.clone()).unwrap_or_default(),
            dataset_path: ext
                .map(|e| e.dataset_path.to_string_lossy().into_owned())
                .unwrap_or_default(),
            label: ext.map(|e| e.label.clone()).unwrap_or_default(),
            features: ext.map(|e| e.features.clone()).unwrap_or_default(),
            center,
            scale,
            local_epochs: task.training.local_epochs,
            batch_size: task.training.batch_size,
            learning_rate: task.training.learning_rate,
            optimizer: format!("{:?}", task.training.optimizer).to_lowercase(),
            seed: task.seed,
            privacy: Some(privacy),
            tensors: layout.iter().map(spec_pb).collect(),
        })),
    }
}

/// Sends the task, the model in chunks and End.
fn send_task(
    stdin: &mut impl Write,
    first: tp::AgentFrame,
    model: &[f32],
    layout: &[TensorSpec],
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, stdin);
    write_frame(&mut out, &first)?;
    let mut at = 0usize;
    let mut bytes = Vec::with_capacity(CHUNK_VALUES * 4);
    for (index, t) in layout.iter().enumerate() {
        let len = t.len() as usize;
        let values = &model[at..at + len];
        for (k, run) in values.chunks(CHUNK_VALUES).enumerate() {
            bytes.clear();
            for v in run {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            write_chunk(&mut out, index as u32, (k * CHUNK_VALUES) as u64, &bytes)?;
        }
        at += len;
    }
    write_frame(
        &mut out,
        &tp::AgentFrame {
            body: Some(tp::agent_frame::Body::End(tp::End {})),
        },
    )?;
    out.flush()
}

/// What the reader took from the trainer's output.
struct Received {
    params: Vec<f32>,
    delta: bool,
    examples: u64,
    metrics: BTreeMap<String, f64>,
    noise_multiplier: f64,
}

/// Why reading the trainer's answer failed.
enum ReadFault {
    Reported { kind: String, reason: String },
    Exited(String),
    Protocol(String),
    Layout(String),
    NonFinite(String),
}

fn read_answer(stdout: impl Read, layout: &[TensorSpec], total: usize) -> std::result::Result<Received, ReadFault> {
    let mut input = BufReader::with_capacity(1 << 20, stdout);
    let next = |input: &mut BufReader<_>| -> std::result::Result<tp::TrainerFrame, ReadFault> {
        match read_frame(input) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(ReadFault::Exited("its output ended before its answer".into())),
            Err(e) => Err(ReadFault::Protocol(e)),
        }
    };
    use tp::trainer_frame::Body;
    let result = loop {
        match next(&mut input)?.body {
            Some(Body::Progress(_)) => continue,
            Some(Body::Result(r)) => break r,
            Some(Body::Error(e)) => {
                return Err(ReadFault::Reported {
                    kind: e.kind,
                    reason: e.reason,
                });
            }
            other => return Err(ReadFault::Protocol(format!("expected a result, got {other:?}"))),
        }
    };
    let expected: Vec<tp::TensorSpec> = layout.iter().map(spec_pb).collect();
    if result.tensors != expected {
        let got: Vec<String> = result
            .tensors
            .iter()
            .map(|t| format!("{} {} {:?}", t.name, t.dtype, t.shape))
            .collect();
        return Err(ReadFault::Layout(format!(
            "the result's tensors are [{}]; the study's layout is [{}]",
            got.join(", "),
            layout
                .iter()
                .map(|t| format!("{} f32 {:?}", t.name, t.shape))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let starts: Vec<usize> = layout
        .iter()
        .scan(0usize, |at, t| {
            let s = *at;
            *at += t.len() as usize;
            Some(s)
        })
        .collect();
    let mut params = vec![0f32; total];
    // Chunks must arrive in order, each tensor contiguous from offset 0.
    let (mut tensor, mut offset) = (0usize, 0u64);
    loop {
        match next(&mut input)?.body {
            Some(Body::Progress(_)) => {}
            Some(Body::Chunk(c)) => {
                while tensor < layout.len() && offset == layout[tensor].len() {
                    tensor += 1;
                    offset = 0;
                }
                if tensor >= layout.len() {
                    return Err(ReadFault::Layout("more values than the layout holds".into()));
                }
                if c.tensor as usize != tensor || c.offset != offset {
                    return Err(ReadFault::Protocol(format!(
                        "chunk of tensor {} at {} where tensor {tensor} at {offset} was due",
                        c.tensor, c.offset
                    )));
                }
                if c.data.len() % 4 != 0 {
                    return Err(ReadFault::Layout(format!(
                        "a chunk of {} bytes is not whole f32s",
                        c.data.len()
                    )));
                }
                let n = (c.data.len() / 4) as u64;
                if offset + n > layout[tensor].len() {
                    return Err(ReadFault::Layout(format!(
                        "tensor {} has {} values; the trainer sent more",
                        layout[tensor].name,
                        layout[tensor].len()
                    )));
                }
                let at = starts[tensor] + offset as usize;
                for (slot, b) in params[at..at + n as usize].iter_mut().zip(c.data.chunks_exact(4)) {
                    let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if !v.is_finite() {
                        return Err(ReadFault::NonFinite(format!("tensor {}", layout[tensor].name)));
                    }
                    *slot = v;
                }
                offset += n;
            }
            Some(Body::End(_)) => break,
            Some(Body::Error(e)) => {
                return Err(ReadFault::Reported {
                    kind: e.kind,
                    reason: e.reason,
                });
            }
            other => return Err(ReadFault::Protocol(format!("expected a chunk, got {other:?}"))),
        }
    }
    while tensor < layout.len() && offset == layout[tensor].len() {
        tensor += 1;
        offset = 0;
    }
    if tensor != layout.len() {
        return Err(ReadFault::Layout(format!(
            "the result ended at tensor {} value {offset}; the layout has {} tensors",
            tensor,
            layout.len()
        )));
    }
    Ok(Received {
        params,
        delta: result.delta,
        examples: result.examples,
        metrics: result.metrics.into_iter().collect(),
        noise_multiplier: result.noise_multiplier,
    })
}

/// Keeps the last [`STDERR_TAIL`] bytes of a stream, reading it to its end.
fn keep_tail(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<(Vec<u8>, u64)> {
    std::thread::spawn(move || {
        let mut tail: Vec<u8> = Vec::new();
        let mut total = 0u64;
        let mut buf = [0u8; 8192];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 2 * STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        if tail.len() > STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
        (tail, total)
    })
}

/// Kills the trainer's whole process group (bwrap leads it), then reaps it.
fn kill_group(child: &Mutex<Child>) {
    let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
    let pid = child.id();
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

impl LocalTrainer for ExternalTrainer {
    fn name(&self) -> &str {
        &self.name
    }

    fn train(&self, task: TrainingTask) -> Result<TrainerOutput, TrainError> {
        self.check_approved()?;
        if self.config.network == Network::Host {
            warn!(trainer = %self.name, "network = \"host\": this trainer runs with the host's network, as the site configured");
        }
        let layout = task.spec.layout(task.n_features);
        let total = layout.iter().map(TensorSpec::len).sum::<u64>() as usize;
        if total != task.start.len() {
            return Err(TrainError::Other(anyhow!(
                "the model has {} values, its layout {total}",
                task.start.len()
            )));
        }
        let scratch;
        let workdir = match &self.config.workdir {
            Some(w) => {
                std::fs::create_dir_all(w).with_context(|| format!("create {}", w.display()))?;
                w.clone()
            }
            None => {
                scratch = tempfile::Builder::new()
                    .prefix(&format!("medfl-trainer-{}-", self.name))
                    .tempdir()
                    .context("a working directory for the trainer")?;
                scratch.path().to_path_buf()
            }
        };
        let argv = self.sandbox_command(&workdir);
        let started = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                self.fault(
                    FaultKind::Unavailable,
                    format!(
                        "{e}: install bubblewrap (bwrap){}",
                        if argv[0] == "prlimit" {
                            " and util-linux (prlimit)"
                        } else {
                            ""
                        }
                    ),
                )
            })?;
        let stdin = child.stdin.take().context("the trainer's stdin")?;
        let stdout = child.stdout.take().context("the trainer's stdout")?;
        let stderr = child.stderr.take().context("the trainer's stderr")?;
        let child = Arc::new(Mutex::new(child));
        let tail = keep_tail(stderr);
        // At the timeout the watchdog asks the trainer to cancel, then kills the group
        // after a grace period; `done` stops it.
        let (done, stop) = mpsc::channel::<()>();
        let (cancel, cancelled) = mpsc::channel::<()>();
        let timeout = Duration::from_secs(self.config.timeout_secs);
        let watchdog = {
            let child = child.clone();
            let cancel = cancel.clone();
            std::thread::spawn(move || match stop.recv_timeout(timeout) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = cancel.send(());
                    if stop.recv_timeout(CANCEL_GRACE).is_err() {
                        kill_group(&child);
                    }
                    true
                }
                _ => false,
            })
        };
        let first = task_frame(&self.name, &task, &layout);
        let start = task.start;
        // The writer sends the task and the model, then keeps the trainer's stdin open
        // to send Cancel if the watchdog asks, until every sender is gone.
        let writer = std::thread::spawn({
            let layout = layout.clone();
            move || {
                let mut stdin = stdin;
                let r = send_task(&mut stdin, first, &start, &layout);
                if r.is_ok() && cancelled.recv().is_ok() {
                    let frame = tp::AgentFrame {
                        body: Some(tp::agent_frame::Body::Cancel(tp::Cancel {})),
                    };
                    let _ = write_frame(&mut stdin, &frame).and_then(|()| stdin.flush());
                }
                (r, start)
            }
        });
        let answer = read_answer(stdout, &layout, total);
        // Give a trainer that answered a moment to exit, then make sure it is gone.
        let exited = {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let status = child.lock().unwrap_or_else(|p| p.into_inner()).try_wait();
                match status {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if Instant::now() < deadline && answer.is_ok() => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => break None,
                }
            }
        };
        kill_group(&child);
        let _ = done.send(());
        let timed_out = watchdog.join().unwrap_or(false);
        drop(cancel);
        let (sent, start) = writer.join().map_err(|_| anyhow!("the task writer panicked"))?;
        let (stderr_tail, stderr_bytes) = tail.join().unwrap_or_default();
        let stderr_text = String::from_utf8_lossy(&stderr_tail).into_owned();
        info!(
            trainer = %self.name,
            secs = started.elapsed().as_secs_f64(),
            ?exited,
            stderr_bytes,
            "trainer finished"
        );
        let detail = |what: String| format!("{what}; exit {exited:?}; the last of its stderr: {stderr_text}");
        if timed_out {
            return Err(self.fault(FaultKind::Timeout, detail(format!("killed after {timeout:?}"))));
        }
        let received = match answer {
            Ok(r) => r,
            Err(ReadFault::Reported { kind, reason }) => {
                return Err(self.fault(FaultKind::Reported(sanitize_kind(&kind)), detail(reason)));
            }
            Err(ReadFault::Exited(w)) => return Err(self.fault(FaultKind::Exited, detail(w))),
            Err(ReadFault::Protocol(w)) => return Err(self.fault(FaultKind::Protocol, detail(w))),
            Err(ReadFault::Layout(w)) => return Err(self.fault(FaultKind::Layout, detail(w))),
            Err(ReadFault::NonFinite(w)) => return Err(self.fault(FaultKind::NonFinite, detail(w))),
        };
        if let Err(e) = sent {
            // It answered without reading the whole model: it did not train on it.
            return Err(self.fault(
                FaultKind::Protocol,
                detail(format!("it stopped reading the model: {e}")),
            ));
        }
        let mut params = received.params;
        if received.delta {
            params.iter_mut().zip(&start).for_each(|(p, s)| *p += s);
            if params.iter().any(|v| !v.is_finite()) {
                return Err(self.fault(FaultKind::NonFinite, "the delta overflowed the model"));
            }
        }
        Ok(TrainerOutput {
            params,
            examples: received.examples,
            loss: received.metrics.get("loss").copied(),
            control_next: None,
            // What the trainer says it applied; the agent compares it with its charge.
            noise_multiplier: (received.noise_multiplier > 0.0).then_some(received.noise_multiplier),
        })
    }
}

/// A trainer's own error kind, as it may appear in a refusal: lower-case letters,
/// digits and `_`, at most 32 characters; anything else becomes `other`.
fn sanitize_kind(kind: &str) -> String {
    let ok = !kind.is_empty()
        && kind.len() <= 32
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok { kind.to_string() } else { "other".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_hash_sees_any_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("pkg")).expect("mkdir");
        std::fs::write(dir.path().join("pkg/a.py"), "x = 1\n").expect("write");
        std::fs::write(dir.path().join("train.py"), "print()\n").expect("write");
        let first = tree_sha256(dir.path()).expect("hash");
        assert_eq!(first, tree_sha256(dir.path()).expect("hash"), "stable");
        std::fs::write(dir.path().join("pkg/a.py"), "x = 2\n").expect("write");
        let changed = tree_sha256(dir.path()).expect("hash");
        assert_ne!(first, changed);
        std::fs::write(dir.path().join("pkg/b.py"), "").expect("write");
        assert_ne!(
            changed,
            tree_sha256(dir.path()).expect("hash"),
            "a new empty file counts"
        );
    }

    #[test]
    fn frames_over_the_limit_or_cut_short_are_refused() {
        let mut big = Vec::new();
        prost::encoding::encode_varint((MAX_FRAME + 1) as u64, &mut big);
        assert!(read_frame(&mut big.as_slice()).expect_err("too big").contains("limit"));
        let mut short = Vec::new();
        prost::encoding::encode_varint(10, &mut short);
        short.extend_from_slice(&[1, 2]);
        assert!(read_frame(&mut short.as_slice()).expect_err("short").contains("ended"));
        assert!(read_frame(&mut [].as_slice()).expect("clean end").is_none());
    }

    #[test]
    fn a_hand_written_chunk_frame_is_what_prost_writes() {
        for (tensor, offset, data) in [
            (0u32, 0u64, vec![]),
            (3, 262_144, vec![1u8, 2, 3, 4]),
            (7, 0, vec![9; 300]),
        ] {
            let mut ours = Vec::new();
            write_chunk(&mut ours, tensor, offset, &data).expect("write");
            let frame = tp::AgentFrame {
                body: Some(tp::agent_frame::Body::Chunk(tp::Chunk {
                    tensor,
                    offset,
                    data: data.clone().into(),
                })),
            };
            assert_eq!(
                ours,
                frame.encode_length_delimited_to_vec(),
                "tensor {tensor} offset {offset}"
            );
        }
    }

    #[test]
    fn kinds_from_a_trainer_are_sanitized() {
        assert_eq!(sanitize_kind("data"), "data");
        assert_eq!(sanitize_kind("out_of_memory"), "out_of_memory");
        assert_eq!(sanitize_kind("/home/alice/patients.csv"), "other");
        assert_eq!(sanitize_kind(&"a".repeat(40)), "other");
    }
}
