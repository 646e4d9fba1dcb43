//! A whole federation on this machine: a consortium PKI, a coordinator bound to
//! `127.0.0.1:0` with sled on disk, site agents (real ones with data, or bare
//! identities for simulated sites driven by a test), and an admin client, all over
//! real gRPC with mutual TLS. The demo and every end-to-end test use this one harness.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use medfl_coordinator::pki::{self, IssueRequest};
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::admin_client::AdminClient;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::identity::{Identity, Role};
use medfl_site_agent::data::Table;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Configures a [`Federation`].
#[derive(Debug, Clone)]
pub struct FederationBuilder {
    sites: usize,
    tables: Option<Vec<Table>>,
    csvs: Option<Vec<String>>,
    dataset: String,
    label: String,
    dir: Option<PathBuf>,
    liveness_secs: u64,
    staging_budget_mib: u64,
    coordinator_binary: Option<PathBuf>,
    coordinator_env: Vec<(String, String)>,
    dataset_extra: Vec<(usize, String)>,
    dataset_postgres: Vec<(usize, String)>,
    policy: Option<String>,
    coordinator_extra: String,
    agent_extra: String,
    dashboard: bool,
    metrics: bool,
    algorithm: medfl_shared::sign::Algorithm,
}

struct Agent {
    name: String,
    shutdown: CancellationToken,
    task: JoinHandle<Result<()>>,
}

/// A running federation; see the module docs.
pub struct Federation {
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub addr: SocketAddr,
    pub pki: PathBuf,
    pub site_names: Vec<String>,
    pub admin: AdminClient<Channel>,
    /// The dashboard's address, when the builder asked for one.
    pub dashboard_url: Option<String>,
    /// The coordinator's `/metrics` and `/healthz` port, when the builder asked for it.
    pub metrics_port: Option<u16>,
    coordinator: Option<Coordinator>,
    coordinator_binary: Option<PathBuf>,
    agents: Vec<Agent>,
}

/// Starts `medfl coordinator` on the federation's coordinator folder, logging to
/// `coordinator.log` there (appended across restarts).
fn spawn_coordinator(binary: &Path, coord_dir: &Path, env: &[(String, String)]) -> Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(coord_dir.join("coordinator.log"))?;
    std::process::Command::new(binary)
        .args(["coordinator", "--config"])
        .arg(coord_dir.join("coordinator.toml"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", binary.display()))
}

enum Coordinator {
    Task(CancellationToken, JoinHandle<Result<()>>),
    Process(std::process::Child),
}

impl Drop for Federation {
    fn drop(&mut self) {
        // A child coordinator must not outlive a test that panicked.
        if let Some(Coordinator::Process(child)) = &mut self.coordinator {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("dir", &self.dir)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A loopback port free at the time of asking (the OS picks it; whoever binds next
/// gets it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Returns the name of site `i`: hospital-a, hospital-b, … then hospital-27, ….
pub fn site_name(i: usize) -> String {
    if i < 26 {
        format!("hospital-{}", (b'a' + i as u8) as char)
    } else {
        format!("hospital-{}", i + 1)
    }
}

impl Default for FederationBuilder {
    fn default() -> Self {
        FederationBuilder {
            sites: 3,
            tables: None,
            csvs: None,
            dataset: "breast_cancer".into(),
            label: "malignant".into(),
            dir: None,
            liveness_secs: 30,
            staging_budget_mib: 64,
            coordinator_binary: None,
            coordinator_env: Vec::new(),
            dataset_extra: Vec::new(),
            dataset_postgres: Vec::new(),
            policy: None,
            coordinator_extra: String::new(),
            agent_extra: String::new(),
            dashboard: false,
            metrics: false,
            algorithm: medfl_shared::sign::Algorithm::RECOMMENDED,
        }
    }
}

impl FederationBuilder {
    /// Number of sites (identities issued; agents started when tables are given).
    pub fn sites(mut self, n: usize) -> Self {
        self.sites = n;
        self
    }

    /// Runs a real agent per table, each offering its table as the dataset.
    pub fn tables(mut self, tables: Vec<Table>) -> Self {
        self.sites = tables.len();
        self.tables = Some(tables);
        self
    }

    pub fn dataset(mut self, name: &str, label: &str) -> Self {
        self.dataset = name.into();
        self.label = label.into();
        self
    }

    /// Keeps everything under `dir` instead of a temporary directory.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    pub fn liveness_secs(mut self, secs: u64) -> Self {
        self.liveness_secs = secs;
        self
    }

    pub fn staging_budget_mib(mut self, mib: u64) -> Self {
        self.staging_budget_mib = mib;
        self
    }

    /// Appends TOML lines to the `[[datasets]]` entry of site `index`'s agent.toml
    /// (e.g. a tighter `max_epsilon`); a key the entry has already is replaced.
    pub fn dataset_setting(mut self, index: usize, toml_lines: &str) -> Self {
        self.dataset_extra.push((index, toml_lines.to_string()));
        self
    }

    /// Runs a real agent per CSV text (a header line, the label among the columns),
    /// each offering it as the dataset: for columns a [`Table`] cannot hold (text
    /// categories, class names).
    pub fn csvs(mut self, csvs: Vec<String>) -> Self {
        self.sites = csvs.len();
        self.csvs = Some(csvs);
        self
    }

    /// Reads site `index`'s dataset from a database instead of its CSV: `toml_lines` are
    /// the `[datasets.postgres]` table's keys (the site's rows must be there already).
    pub fn dataset_in_postgres(self, index: usize, toml_lines: &str) -> Self {
        self.dataset_source(index, &format!("[datasets.postgres]\n{toml_lines}"))
    }

    /// Replaces site `index`'s CSV by another source: `section` is its TOML table with
    /// its header (`[datasets.omop]` and its keys).
    pub fn dataset_source(mut self, index: usize, section: &str) -> Self {
        self.dataset_postgres.push((index, section.to_string()));
        self
    }

    /// Appends top-level TOML lines to coordinator.toml (e.g. `certificate_days = 60`).
    pub fn coordinator_setting(mut self, toml_lines: &str) -> Self {
        self.coordinator_extra.push_str(toml_lines);
        self.coordinator_extra.push('\n');
        self
    }

    /// Adds top-level TOML lines to every agent.toml (e.g. `renew_before_expiry_hours`).
    pub fn agent_setting(mut self, toml_lines: &str) -> Self {
        self.agent_extra.push_str(toml_lines);
        self.agent_extra.push('\n');
        self
    }

    /// Gives every agent this `[policy]` (TOML lines) instead of the default one.
    pub fn agent_policy(mut self, toml_lines: &str) -> Self {
        self.policy = Some(toml_lines.to_string());
        self
    }

    /// Runs the coordinator as a child process of this `medfl` binary
    /// (`medfl coordinator --config …`) instead of a task in this process.
    pub fn coordinator_process(mut self, medfl_binary: &Path) -> Self {
        self.coordinator_binary = Some(medfl_binary.to_path_buf());
        self
    }

    /// Sets an environment variable for the first coordinator process (e.g. a
    /// `FAILPOINTS`); [`Federation::restart_coordinator`] starts it without.
    /// Serves the coordinator's dashboard on a free loopback port.
    pub fn dashboard(mut self) -> Self {
        self.dashboard = true;
        self
    }

    /// The consortium's key algorithm (P-256 unless set).
    pub fn algorithm(mut self, algorithm: medfl_shared::sign::Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Serves the coordinator's `/metrics` and `/healthz` on a free loopback port.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    pub fn coordinator_env(mut self, key: &str, value: &str) -> Self {
        self.coordinator_env.push((key.into(), value.into()));
        self
    }

    pub async fn build(self) -> Result<Federation> {
        let (dir, temp) = match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::tempdir().context("create temporary federation dir")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        // The CA sits at the root; each party's folder holds its identity bundle and,
        // for the coordinator and agents, its config, store or data.
        let pki_dir = dir.clone();
        pki::init(&pki_dir, self.algorithm)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind coordinator port")?;
        let addr = listener.local_addr()?;
        let url = format!("https://127.0.0.1:{}", addr.port());
        let issue = |role: Role, name: &str| -> Result<PathBuf> {
            pki::issue(
                &pki_dir,
                &IssueRequest {
                    identity: Identity::new(role, name.parse()?),
                    dns: if role == Role::Coordinator {
                        vec!["localhost".into()]
                    } else {
                        vec![]
                    },
                    ips: if role == Role::Coordinator {
                        vec![[127, 0, 0, 1].into()]
                    } else {
                        vec![]
                    },
                    days: 30,
                    coordinator: Some(url.clone()),
                    algorithm: None,
                },
            )
        };
        issue(Role::Coordinator, "coordinator")?;
        issue(Role::Admin, "admin")?;
        issue(Role::Auditor, "auditor")?;
        let site_names: Vec<String> = (0..self.sites).map(site_name).collect();
        for name in &site_names {
            issue(Role::Site, name)?;
        }

        // The coordinator, from a real config file.
        let coord_dir = dir.join("coordinator");
        std::fs::create_dir_all(&coord_dir)?;
        let dashboard_url = if self.dashboard {
            Some(format!(
                "https://127.0.0.1:{}",
                free_port().context("a port for the dashboard")?
            ))
        } else {
            None
        };
        let metrics_port = if self.metrics {
            Some(free_port().context("a port for the metrics")?)
        } else {
            None
        };
        // The optional HTTP listeners' lines of coordinator.toml.
        let mut listeners = match &dashboard_url {
            Some(url) => format!(
                "dashboard_listen = \"{}\"\ndashboard_url = \"{url}\"\n",
                url.trim_start_matches("https://")
            ),
            None => String::new(),
        };
        if let Some(port) = metrics_port {
            listeners.push_str(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
        }
        let config = format!(
            "listen = \"{addr}\"\nstore = \"store\"\nprofile = \".\"\nliveness_timeout_secs = {}\nstaging_budget_mib = {}\nstore_cache_mib = 16\nca = {:?}\n{listeners}",
            self.liveness_secs,
            self.staging_budget_mib,
            pki_dir.display().to_string()
        ) + &self.coordinator_extra;
        std::fs::write(coord_dir.join("coordinator.toml"), config)?;
        let coordinator = match &self.coordinator_binary {
            None => {
                let settings = medfl_coordinator::Settings::load(&coord_dir.join("coordinator.toml"))?;
                let token = CancellationToken::new();
                Coordinator::Task(
                    token.clone(),
                    tokio::spawn(medfl_coordinator::run(listener, settings, token)),
                )
            }
            Some(binary) => {
                // The child binds the same port once this process lets go of it.
                drop(listener);
                Coordinator::Process(spawn_coordinator(binary, &coord_dir, &self.coordinator_env)?)
            }
        };

        let admin = AdminClient::new(Profile::load(&pki_dir.join("admin"))?.channel(None)?);
        let mut fed = Federation {
            dir: dir.clone(),
            _temp: temp,
            addr,
            pki: pki_dir,
            site_names: site_names.clone(),
            admin,
            dashboard_url,
            metrics_port,
            coordinator: Some(coordinator),
            coordinator_binary: self.coordinator_binary.clone(),
            agents: Vec::new(),
        };

        // Real agents, each from its own config file and CSV.
        let csvs = match (self.tables, self.csvs) {
            (Some(tables), _) => Some(tables.iter().map(|t| t.to_csv(&self.label)).collect::<Vec<_>>()),
            (None, csvs) => csvs,
        };
        if let Some(csvs) = csvs {
            for (index, (name, csv)) in site_names.iter().zip(csvs).enumerate() {
                let site_dir = dir.join(name);
                std::fs::create_dir_all(&site_dir)?;
                std::fs::write(site_dir.join("data.csv"), csv)?;
                let mut agent_toml = format!(
                    "profile = \".\"\negress_log = \"egress.jsonl\"\n{}\n[[datasets]]\nname = \"{}\"\npath = \"data.csv\"\nlabel = \"{}\"\nfeatures = \"all_numeric\"\nmissing = \"drop\"\n",
                    self.agent_extra, self.dataset, self.label
                );
                if let Some(policy) = &self.policy {
                    agent_toml = agent_toml.replace("\n[[datasets]]", &format!("\n[policy]\n{policy}\n\n[[datasets]]"));
                }
                for (_, extra) in self.dataset_extra.iter().filter(|(i, _)| *i == index) {
                    for line in extra.lines() {
                        // A key the entry already has (`missing`, `features`) is replaced.
                        let key = line.split('=').next().unwrap_or("").trim();
                        let entry = agent_toml.rfind("[[datasets]]").unwrap_or(agent_toml.len());
                        let (head, tail) = agent_toml.split_at(entry);
                        let tail: String = tail
                            .lines()
                            .filter(|l| key.is_empty() || l.split('=').next().is_none_or(|k| k.trim() != key))
                            .map(|l| format!("{l}\n"))
                            .collect();
                        agent_toml = format!("{head}{tail}");
                        agent_toml.push_str(line);
                        agent_toml.push('\n');
                    }
                }
                for (_, pg) in self.dataset_postgres.iter().filter(|(i, _)| *i == index) {
                    agent_toml = agent_toml.replace("path = \"data.csv\"\n", "");
                    agent_toml.push_str(&format!("{pg}\n"));
                }
                std::fs::write(site_dir.join("agent.toml"), agent_toml)?;
                fed.start_agent(name)?;
            }
        }
        fed.wait_until_serving().await?;
        Ok(fed)
    }
}

impl Federation {
    pub fn builder() -> FederationBuilder {
        FederationBuilder::default()
    }

    /// Starts (or restarts) the agent of site `name` from its `agent.toml`.
    pub fn start_agent(&mut self, name: &str) -> Result<()> {
        let settings = medfl_site_agent::AgentSettings::load(&self.dir.join(name).join("agent.toml"))?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(medfl_site_agent::run(settings, shutdown.clone()));
        self.agents.retain(|a| a.name != name);
        self.agents.push(Agent {
            name: name.to_string(),
            shutdown,
            task,
        });
        Ok(())
    }

    /// Stops a site's agent gracefully and waits (up to 30 s) until it let go of its store.
    pub async fn stop_agent(&mut self, name: &str) {
        if let Some(pos) = self.agents.iter().position(|a| a.name == name) {
            let agent = self.agents.remove(pos);
            agent.shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(30), agent.task).await;
        }
    }

    /// Kills a site's agent abruptly, as a crash or a pulled cable would.
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(pos) = self.agents.iter().position(|a| a.name == name) {
            let agent = self.agents.remove(pos);
            agent.task.abort();
        }
    }

    async fn wait_until_serving(&mut self) -> Result<()> {
        self.wait_until_serving_or_exited(false).await
    }

    /// Waits until the coordinator answers; with `exit_ok`, a coordinator process that
    /// exited by itself (e.g. at a failpoint) also ends the wait.
    async fn wait_until_serving_or_exited(&mut self, exit_ok: bool) -> Result<()> {
        let start = Instant::now();
        loop {
            if exit_ok
                && let Some(Coordinator::Process(child)) = &mut self.coordinator
                && child.try_wait()?.is_some()
            {
                return Ok(());
            }
            match self.admin.list_studies(pb::Empty {}).await {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > Duration::from_secs(60) => {
                    bail!(
                        "coordinator did not come up: {e}; its log ends:\n{}",
                        self.coordinator_log_tail()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn profile(&self, name: &str) -> Result<Profile> {
        Ok(Profile::load(&self.pki.join(name))?)
    }

    /// An mTLS site client with the identity of `name`, for simulated sites.
    pub fn site_client(&self, name: &str) -> Result<SiteClient<Channel>> {
        Ok(SiteClient::new(self.profile(name)?.channel(None)?))
    }

    /// A one-time dashboard sign-in link for the identity `name` (admin or auditor).
    pub async fn dashboard_link(&self, name: &str) -> Result<String> {
        let mut client = medfl_proto::v1::audit_client::AuditClient::new(self.profile(name)?.channel(None)?);
        let link = client
            .dashboard_login(pb::Empty {})
            .await
            .with_context(|| format!("a dashboard link for {name}"))?;
        Ok(link.into_inner().url)
    }

    pub async fn create_study(&mut self, manifest_toml: &str) -> Result<String> {
        let info = self
            .admin
            .create_study(self.profile("admin")?.signed_create(manifest_toml)?)
            .await
            .context("create study")?
            .into_inner();
        Ok(info.study_id)
    }

    /// Signs and creates a federated-analytics query as the admin; returns its id.
    pub async fn create_query(&mut self, manifest_toml: &str) -> Result<String> {
        let q = self
            .admin
            .create_query(self.profile("admin")?.signed_query(manifest_toml)?)
            .await
            .context("create query")?
            .into_inner();
        Ok(q.query_id)
    }

    /// Waits until query `id` is released or failed.
    pub async fn wait_query(&mut self, id: &str, timeout: Duration) -> Result<pb::QueryStatus> {
        let start = Instant::now();
        loop {
            let q = self
                .admin
                .get_query(pb::QueryRef { query_id: id.into() })
                .await?
                .into_inner();
            if q.state != "running" {
                return Ok(q);
            }
            if start.elapsed() > timeout {
                bail!("query {id} still running after {timeout:?}: {q:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn start_study(&mut self, id: &str) -> Result<()> {
        self.admin
            .start_study(pb::StudyRef {
                study_id: id.to_string(),
            })
            .await
            .context("start study")?;
        Ok(())
    }

    pub async fn status(&mut self, id: &str) -> Result<pb::StudyStatus> {
        Ok(self
            .admin
            .get_study_status(pb::StudyRef {
                study_id: id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Waits until the study committed `n` rounds, or ended; returns its status.
    pub async fn wait_for_round(&mut self, id: &str, n: u32, timeout: Duration) -> Result<pb::StudyStatus> {
        self.wait_for(id, timeout, |info| info.rounds_completed >= n).await
    }

    /// Waits until `done` holds for the study's info, or the study ended.
    pub async fn wait_for(
        &mut self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&pb::StudyInfo) -> bool,
    ) -> Result<pb::StudyStatus> {
        let start = Instant::now();
        loop {
            let status = self.status(id).await?;
            let info = status.info.clone().unwrap_or_default();
            let ended = matches!(
                info.state(),
                pb::StudyState::Completed
                    | pb::StudyState::Aborted
                    | pb::StudyState::Failed
                    | pb::StudyState::BudgetExhausted
            );
            if done(&info) || ended {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!(
                    "study {id} still at {} rounds ({:?}) after {timeout:?}",
                    info.rounds_completed,
                    info.state()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Exports a committed model (`None`: the latest) as its flat values.
    pub async fn export(&mut self, id: &str, round: Option<u32>) -> Result<(pb::ModelHeader, Vec<f32>)> {
        let stream = self
            .admin
            .export_model(pb::ExportModelRequest {
                study_id: id.to_string(),
                round,
            })
            .await
            .context("export model")?
            .into_inner();
        Ok(medfl_proto::stream::read_model(stream).await?)
    }

    /// Stops every agent gracefully (their stores close), keeping the federation's
    /// directory, so a test can read what the sites recorded.
    pub async fn stop_agents(&mut self) {
        for agent in self.agents.drain(..) {
            agent.shutdown.cancel();
            let _ = agent.task.await;
        }
    }

    /// Stops agents, then the coordinator (which settles its rounds and flushes).
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop_agents().await;
        match self.coordinator.take() {
            Some(Coordinator::Task(token, task)) => {
                token.cancel();
                task.await.context("coordinator task")??;
            }
            Some(Coordinator::Process(mut child)) => {
                let pid = child.id().to_string();
                std::process::Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .context("send SIGTERM")?;
                let status = child.wait().context("wait for the coordinator")?;
                if !status.success() {
                    bail!("coordinator exited with {status}");
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Stops the coordinator abruptly: its task is dropped mid-flight, or its
    /// process gets SIGKILL.
    pub fn kill_coordinator(&mut self) {
        match self.coordinator.take() {
            Some(Coordinator::Task(_, task)) => task.abort(),
            Some(Coordinator::Process(mut child)) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            None => {}
        }
    }

    /// Waits up to `timeout` for a coordinator process to exit by itself; returns its
    /// exit code (`None` if it is still running or not a process).
    pub async fn wait_coordinator_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(Coordinator::Process(child)) = &mut self.coordinator
                && let Ok(Some(status)) = child.try_wait()
            {
                self.coordinator = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Starts the coordinator process again on the same config and store, after it
    /// was killed or exited.
    pub async fn restart_coordinator(&mut self) -> Result<()> {
        self.restart_coordinator_with_env(&[]).await
    }

    /// Like [`Federation::restart_coordinator`], with environment variables for the new
    /// process (e.g. a `FAILPOINTS`).
    pub async fn restart_coordinator_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        self.kill_coordinator();
        let Some(binary) = &self.coordinator_binary else {
            bail!("only a coordinator process can be restarted (see FederationBuilder::coordinator_process)");
        };
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let child = spawn_coordinator(binary, &self.dir.join("coordinator"), &env)?;
        self.coordinator = Some(Coordinator::Process(child));
        // A process started with a failpoint may reach it (and exit) before a probe
        // sees it serving; both are fine then.
        self.wait_until_serving_or_exited(!env.is_empty()).await
    }

    /// The last lines of a coordinator process's log, for failure messages.
    fn coordinator_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("coordinator").join("coordinator.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The coordinator's process id, when it runs as a child process.
    pub fn coordinator_pid(&self) -> Option<u32> {
        match &self.coordinator {
            Some(Coordinator::Process(child)) => Some(child.id()),
            _ => None,
        }
    }
}
