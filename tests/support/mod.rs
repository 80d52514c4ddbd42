//! Shared by the integration tests: service URLs, skip-or-fail, unique key prefixes, and a
//! private redis-server the fault tests can kill.
#![allow(dead_code)]

use std::net::TcpListener;
#[cfg(feature = "redis")]
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
#[cfg(feature = "redis")]
use std::time::{Duration, Instant};

/// `PUPKIT_REDIS_URL`, or the local default.
pub fn redis_url() -> String {
    std::env::var("PUPKIT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// True when `PUPKIT_REQUIRE_SERVICES=1`: a missing service fails the test instead of
/// skipping it.
pub fn services_required() -> bool {
    std::env::var("PUPKIT_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Skips (loudly) or fails, as `PUPKIT_REQUIRE_SERVICES` says.
pub fn unavailable(service: &str, why: &str) {
    if services_required() {
        panic!("{service} is required (PUPKIT_REQUIRE_SERVICES=1) but unavailable: {why}");
    }
    eprintln!(
        "\n*** SKIPPED: {service} unavailable ({why}); set PUPKIT_REQUIRE_SERVICES=1 to fail instead ***\n"
    );
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let test: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect();
    format!(
        "pkt-{test}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

#[cfg(feature = "redis")]
pub mod redis {
    use super::*;
    use pupkit::redis::{RedisConfig, RedisConnection};

    /// A connection to the test Redis, or `None` (after a loud skip) when it is unreachable.
    pub async fn connect() -> Option<RedisConnection> {
        let mut config = RedisConfig::new(redis_url());
        config.op_timeout = Duration::from_secs(2);
        match RedisConnection::connect(&config).await {
            Ok(connection) => Some(connection),
            Err(error) => {
                unavailable("Redis", &format!("{} at {}", error, redis_url()));
                None
            }
        }
    }

    /// A plain redis-rs connection for arranging and inspecting test data.
    pub async fn raw() -> ::redis::aio::MultiplexedConnection {
        ::redis::Client::open(redis_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("raw redis connection")
    }

    /// Deletes every key under `prefix` (this test's own keys only; never a flush).
    pub async fn delete_prefix(prefix: &str) {
        delete_matching(&format!("{prefix}:*")).await;
    }

    /// Every key matching the glob `pattern`, by `SCAN` (never `KEYS`).
    pub async fn keys_matching(pattern: &str) -> Vec<String> {
        let mut conn = raw().await;
        let (mut cursor, mut found) = (0u64, Vec::new());
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            found.extend(keys);
            if next == 0 {
                return found;
            }
            cursor = next;
        }
    }

    /// Deletes every key matching the glob `pattern` (a test's own keys only; never a flush).
    pub async fn delete_matching(pattern: &str) {
        let mut conn = raw().await;
        for keys in keys_matching(pattern).await.chunks(1000) {
            let _: () = ::redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .expect("del");
        }
    }

    /// A redis-server of the test's own, on its own port, that the test can kill and restart.
    pub struct PrivateRedis {
        pub port: u16,
        child: Option<Child>,
    }

    impl PrivateRedis {
        /// Starts one, or returns `None` (after a loud skip) when redis-server is not installed.
        pub fn start() -> Option<Self> {
            let mut server = PrivateRedis {
                port: free_port(),
                child: None,
            };
            match server.spawn() {
                Ok(()) => Some(server),
                Err(why) => {
                    unavailable("redis-server binary", &why);
                    None
                }
            }
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        fn spawn(&mut self) -> Result<(), String> {
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &self.port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run redis-server: {e}"))?;
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(format!(
                "redis-server did not listen on port {} within 10 s",
                self.port
            ))
        }

        /// Kills the server (SIGKILL) and waits for it to exit.
        pub fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        /// Starts it again on the same port.
        pub fn restart(&mut self) {
            self.kill();
            self.spawn().expect("restart redis-server");
        }
    }

    impl Drop for PrivateRedis {
        fn drop(&mut self) {
            self.kill();
        }
    }
}

/// `PUPKIT_DATABASE_URL`, or the local default.
pub fn database_url() -> String {
    std::env::var("PUPKIT_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[cfg(feature = "postgres")]
pub mod postgres {
    use super::*;
    use pupkit::repo::{PgConfig, PgPool};

    /// A pool on the test database, its own schema created (named after `test`), or `None`
    /// (after a loud skip) when Postgres is unreachable.
    pub async fn pool(
        test: &str,
        configure: impl FnOnce(&mut PgConfig),
    ) -> Option<(PgPool, String)> {
        let mut config = PgConfig::new(database_url());
        config.min_idle = 0;
        config.max_size = 5;
        config.application_name = unique_prefix(test);
        configure(&mut config);
        let pool = match PgPool::connect(&config).await {
            Ok(pool) => pool,
            Err(error) => {
                unavailable("PostgreSQL", &format!("{error} at {}", database_url()));
                return None;
            }
        };
        let schema = unique_prefix(test).replace('-', "_");
        pool.execute(&format!("CREATE SCHEMA {schema}"), &[])
            .await
            .expect("create the test schema");
        Some((pool, schema))
    }

    /// Drops a test's schema.
    pub async fn drop_schema(pool: &PgPool, schema: &str) {
        pool.execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"), &[])
            .await
            .expect("drop the test schema");
    }
}

/// Headless Chromium for the tests that check what a browser renders.
pub mod browser {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    /// The Chromium binary (`PUPKIT_CHROMIUM`, then Debian's names), or `None` after a loud
    /// skip (a failure with `PUPKIT_REQUIRE_SERVICES=1`).
    pub async fn chromium() -> Option<String> {
        let mut candidates = Vec::new();
        if let Ok(path) = std::env::var("PUPKIT_CHROMIUM") {
            candidates.push(path);
        }
        candidates.extend(
            ["/usr/bin/chromium", "chromium", "chromium-browser"]
                .into_iter()
                .map(str::to_owned),
        );
        for candidate in &candidates {
            let ran = tokio::process::Command::new(candidate)
                .arg("--version")
                .output()
                .await;
            if ran.is_ok_and(|o| o.status.success()) {
                return Some(candidate.clone());
            }
        }
        super::unavailable(
            "Chromium",
            &format!("none of {candidates:?} runs (apt-get install chromium)"),
        );
        None
    }

    /// What one headless run printed.
    pub struct Run {
        pub success: bool,
        pub stdout: String,
        pub stderr: String,
    }

    impl Run {
        /// The run's status and the tail of its stderr, for assertion messages.
        pub fn context(&self) -> String {
            let mut start = self.stderr.len().saturating_sub(2_000);
            while !self.stderr.is_char_boundary(start) {
                start += 1;
            }
            format!(
                "success {}\n--- stdout ---\n{}\n--- stderr (tail) ---\n{}",
                self.success,
                self.stdout,
                &self.stderr[start..]
            )
        }
    }

    /// Runs headless Chromium on `url` with a fresh profile, letting scripts run for
    /// `budget_ms` of virtual time; `action` is `--dump-dom` or `--screenshot=<path>` (plus
    /// `--window-size=...` when wanted).
    pub async fn headless(binary: &str, url: &str, budget_ms: u32, action: &[String]) -> Run {
        let profile = scratch("chromium-profile");
        let run = tokio::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--virtual-time-budget={budget_ms}"))
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(action)
            .arg(url)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(90), run)
            .await
            .expect("Chromium finished within 90 s")
            .expect("run Chromium");
        let _ = std::fs::remove_dir_all(&profile);
        Run {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// A fresh directory under the system's temp dir.
    pub fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(super::unique_prefix(test));
        std::fs::create_dir_all(&dir).expect("create a scratch dir");
        dir
    }

    /// `target/test-artifacts/<name>` (created), where tests leave screenshots for people.
    pub fn artifact(name: &str) -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let dir = target.join("test-artifacts");
        std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
        dir.join(name)
    }
}
