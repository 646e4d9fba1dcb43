//! A throwaway PostgreSQL cluster for the connector tests: Debian's `postgresql`
//! package, `initdb` into a temporary directory, a free loopback port and a private
//! socket directory, stopped and removed when dropped.
//!
//! Debian keeps the server binaries in `/usr/lib/postgresql/<version>/bin`, and
//! `initdb` refuses to run as root, so as root they run as the `postgres` user.
//! Without the package the tests skip loudly (naming it) outside CI and fail under
//! `CI=true`, like the browser test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The password of the `medfl_reader` role the tests connect as over TCP.
pub const READER_PASSWORD: &str = "reader-secret-7f3a";

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

fn server_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// This process's user name.
pub fn os_user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "root".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgCluster {
    /// Starts a cluster, or returns None (after saying why) where PostgreSQL is not
    /// installed and this is not CI.
    pub fn start() -> Option<PgCluster> {
        Self::start_maybe_tls(false)
    }

    /// Like [`PgCluster::start`], with TLS on: a test CA (`ca.pem` in [`PgCluster::tls_dir`])
    /// issued the server's certificate for 127.0.0.1 and `localhost` and a client
    /// certificate for the role `medfl_cert` (`client.pem`, `client.key`), which logs in
    /// by it (`cert` authentication, TLS only).
    pub fn start_tls() -> Option<PgCluster> {
        Self::start_maybe_tls(true)
    }

    fn start_maybe_tls(tls: bool) -> Option<PgCluster> {
        let Some(bin) = server_bin() else {
            assert!(
                !super::in_ci(),
                "CI=true and no PostgreSQL server under /usr/lib/postgresql: .ci/run installs Debian's `postgresql` package"
            );
            eprintln!(
                "SKIPPED: no PostgreSQL server under /usr/lib/postgresql; install Debian's `postgresql` package (apt-get install postgresql) to run the database tests"
            );
            return None;
        };
        Some(Self::start_with(bin, tls).expect("start a throwaway PostgreSQL cluster"))
    }

    /// Where the TLS test CA and the client's certificate are.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// The test CA, the server's certificate and the client's, written for the server
    /// (owned by its user, key 0600) and the client.
    fn write_tls(&self, data: &Path) -> Result<()> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "hospital database CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key)?;
        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        server.distinguished_name.push(DnType::CommonName, "db.hospital.local");
        let server_cert = server.signed_by(&server_key, &issuer)?;
        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, "medfl_cert");
        let client_cert = client.signed_by(&client_key, &issuer)?;
        let dir = self.tls_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
        std::fs::write(dir.join("client.pem"), client_cert.pem())?;
        std::fs::write(dir.join("client.key"), client_key.serialize_pem())?;
        for (name, text) in [
            ("server.crt", server_cert.pem()),
            ("server.key", server_key.serialize_pem()),
            ("root.crt", ca_cert.pem()),
        ] {
            let path = data.join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if self.as_postgres {
                Command::new("chown").arg("postgres:postgres").arg(&path).status()?;
            }
        }
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba)?;
        std::fs::write(
            &hba,
            format!(
                "hostssl hospital medfl_cert 127.0.0.1/32 cert\nhostnossl hospital medfl_cert 127.0.0.1/32 reject\n{rules}"
            ),
        )?;
        Ok(())
    }

    fn start_with(bin: PathBuf, tls: bool) -> Result<PgCluster> {
        let dir = tempfile::Builder::new().prefix("medfl-pg-").tempdir()?;
        let as_postgres = is_root();
        if as_postgres {
            std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            for sub in ["data", "socket"] {
                std::fs::create_dir(dir.path().join(sub))?;
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.path().join(sub))
                    .status()?;
                if !status.success() {
                    bail!("chown {sub} to postgres failed");
                }
            }
        } else {
            std::fs::create_dir(dir.path().join("socket"))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cluster = PgCluster {
            dir,
            bin,
            port,
            as_postgres,
        };
        let data = cluster.dir.path().join("data");
        cluster.server(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth-local=trust".as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                "--no-sync".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
            ],
        )?;
        // Peer authentication over the socket for this process's own user (the agent's
        // usual login on a hospital's database host).
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba)?;
        std::fs::write(&hba, format!("local hospital {} peer\n{rules}", os_user()))?;
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            cluster.socket().display()
        );
        if tls {
            cluster.write_tls(&data)?;
            options
                .push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key -c ssl_ca_file=root.crt");
        }
        let log = cluster.dir.path().join("server.log");
        cluster.server(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        )?;
        cluster.psql_in(
            "postgres",
            &format!("CREATE ROLE medfl_reader LOGIN PASSWORD '{READER_PASSWORD}'"),
        )?;
        cluster.psql_in("postgres", "CREATE DATABASE hospital")?;
        if tls {
            cluster.psql_in("postgres", "CREATE ROLE medfl_cert LOGIN")?;
        }
        if os_user() != "postgres" {
            cluster.psql_in("postgres", &format!("CREATE ROLE \"{}\" LOGIN", os_user()))?;
        }
        Ok(cluster)
    }

    fn server(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
        let program = self.bin.join(tool);
        let output = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .current_dir("/")
                .output()
        } else {
            Command::new(&program).args(args).output()
        }
        .with_context(|| format!("run {}", program.display()))?;
        if !output.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// Runs SQL as the superuser in the `hospital` database, over the socket; stops at
    /// the first error.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_in("hospital", sql)
    }

    pub fn psql_in(&self, db: &str, sql: &str) -> Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-U", "postgres", "-d", db])
            .arg("-h")
            .arg(self.socket())
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .context("run psql")?;
        if !output.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Loads a CSV file with a header into `table` (created by `create`), and lets
    /// `medfl_reader` read it.
    pub fn load_csv(&self, table: &str, create: &str, csv: &Path) -> Result<()> {
        self.psql(create)?;
        self.psql(&format!(
            "\\copy {table} FROM '{}' WITH (FORMAT csv, HEADER true)",
            csv.display()
        ))?;
        self.psql(&format!("GRANT SELECT ON {table} TO medfl_reader"))?;
        Ok(())
    }

    /// A connection string for `medfl_reader` over TCP (the password comes apart).
    pub fn reader_url(&self) -> String {
        format!("postgresql://medfl_reader@127.0.0.1:{}/hospital", self.port)
    }

    /// A connection string for this process's own user over the Unix socket, logged in
    /// by peer authentication (the server asks the kernel who is at the other end).
    pub fn peer_connection(&self) -> String {
        format!(
            "host={} port={} user={} dbname=hospital",
            self.socket().display(),
            self.port,
            os_user()
        )
    }

    /// A connection string for the superuser over the Unix socket (trust: no password).
    pub fn socket_connection(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=hospital",
            self.socket().display(),
            self.port
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.server(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "stop".as_ref(),
            ],
        );
    }
}
