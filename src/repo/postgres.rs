//! [`PgPool`]: the pool, on bb8 with our own connection manager (bb8-postgres discards
//! connection errors and has no statement cache).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bb8::{ErrorSink, ManageConnection, Pool, PooledConnection, RunError};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::config::PgConfig;
use super::status::{PoolStatus, SlowQuery};
use crate::error::{Error, Result, excerpt};
use crate::redact::redact_url;

/// Why a new connection could not be made.
#[derive(Debug)]
enum ConnectError {
    Postgres(tokio_postgres::Error),
    TimedOut(Duration),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Postgres(e) => fmt::Display::fmt(e, f),
            ConnectError::TimedOut(after) => write!(f, "connecting took longer than {after:?}"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Postgres(e) => Some(e),
            ConnectError::TimedOut(_) => None,
        }
    }
}

/// Prepared statements of one connection, least recently used evicted past `capacity`.
struct StatementCache {
    capacity: usize,
    tick: u64,
    entries: HashMap<String, (Statement, u64)>,
}

impl StatementCache {
    fn new(capacity: usize) -> Self {
        StatementCache {
            capacity,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, sql: &str) -> Option<Statement> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(sql).map(|(statement, used)| {
            *used = tick;
            statement.clone()
        })
    }

    fn insert(&mut self, sql: &str, statement: Statement) {
        if self.entries.len() >= self.capacity
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.tick += 1;
        self.entries.insert(sql.to_owned(), (statement, self.tick));
    }

    fn remove(&mut self, sql: &str) {
        self.entries.remove(sql);
    }
}

/// A pooled connection: the client, its statement cache, and whether a query saw it break.
pub(crate) struct PgConnection {
    client: Client,
    statements: StatementCache,
    broken: bool,
    last_used: Instant,
}

/// Makes and checks connections for bb8.
struct PgManager {
    config: tokio_postgres::Config,
    connect_timeout: Duration,
    validation_timeout: Duration,
    validate_after_idle: Duration,
    statement_cache_size: usize,
    broken: Arc<AtomicU64>,
}

impl ManageConnection for PgManager {
    type Connection = PgConnection;
    type Error = ConnectError;

    async fn connect(&self) -> std::result::Result<PgConnection, ConnectError> {
        // The deadline covers the whole setup: TCP, authentication and session settings.
        let connecting = async {
            let (client, connection) = self
                .config
                .connect(NoTls)
                .await
                .map_err(ConnectError::Postgres)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::warn!(error = %error, "postgres connection ended with an error");
                }
            });
            Ok(PgConnection {
                client,
                statements: StatementCache::new(self.statement_cache_size),
                broken: false,
                last_used: Instant::now(),
            })
        };
        tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .unwrap_or(Err(ConnectError::TimedOut(self.connect_timeout)))
    }

    async fn is_valid(
        &self,
        connection: &mut PgConnection,
    ) -> std::result::Result<(), ConnectError> {
        if connection.last_used.elapsed() < self.validate_after_idle
            && !connection.client.is_closed()
        {
            return Ok(());
        }
        match tokio::time::timeout(self.validation_timeout, connection.client.simple_query(""))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => {
                self.broken.fetch_add(1, Ordering::Relaxed);
                Err(ConnectError::Postgres(error))
            }
            Err(_) => {
                self.broken.fetch_add(1, Ordering::Relaxed);
                Err(ConnectError::TimedOut(self.validation_timeout))
            }
        }
    }

    fn has_broken(&self, connection: &mut PgConnection) -> bool {
        let broken = connection.broken || connection.client.is_closed();
        if broken {
            self.broken.fetch_add(1, Ordering::Relaxed);
        }
        broken
    }
}

/// Logs the errors bb8 meets while making connections in the background.
#[derive(Debug, Clone)]
struct LogSink {
    url: Arc<str>,
}

impl ErrorSink<ConnectError> for LogSink {
    fn sink(&self, error: ConnectError) {
        tracing::warn!(url = %self.url, error = %error, "could not open a postgres connection");
    }

    fn boxed_clone(&self) -> Box<dyn ErrorSink<ConnectError>> {
        Box::new(self.clone())
    }
}

/// A pool of Postgres connections with the report's settings (50 max, 10 idle, 3 s checkout,
/// 30 s statement timeout, TCP keepalive), a statement cache per connection, and timing of
/// every query. Cloning is cheap and shares the pool.
///
/// Queries take their parameters separately (`$1`, `$2`, ...), never interpolated into the
/// statement. A statement that fails leaves its connection usable; a connection that breaks
/// is dropped, never handed out again.
#[derive(Clone)]
pub struct PgPool {
    inner: Arc<Inner>,
}

/// One caller in `checkout`, counted in `waiting` until it is dropped.
struct Waiter<'a>(&'a Inner);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waiting_since_ms.store(0, Ordering::Relaxed);
        }
    }
}

struct Inner {
    pool: Pool<PgManager>,
    replica: Option<Pool<PgManager>>,
    config: PgConfig,
    url: Arc<str>,
    broken: Arc<AtomicU64>,
    checkout_timeouts: AtomicU64,
    waiting: AtomicU64,
    /// When the number of waiting callers last rose from zero (ms since `started`); 0 when
    /// nobody waits.
    waiting_since_ms: AtomicU64,
    started: Instant,
    slow_count: AtomicU64,
    slow_log: Mutex<VecDeque<SlowQuery>>,
    transaction_retries: AtomicU64,
}

impl fmt::Debug for PgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgPool")
            .field("url", &self.inner.url)
            .field("status", &self.status())
            .finish()
    }
}

/// A connection checked out of a [`PgPool`] by [`PgPool::connection`].
pub struct PgConnectionGuard<'a> {
    connection: PooledConnection<'a, PgManager>,
}

impl std::ops::Deref for PgConnectionGuard<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.connection.client
    }
}

/// The one row of `rows`, or an error saying how many there were.
fn exactly_one(sql: &str, mut rows: Vec<Row>) -> Result<Row> {
    match rows.len() {
        1 => Ok(rows.remove(0)),
        n => Err(Error::invalid(
            "query_one",
            format!("{:?} returned {n} rows, not exactly one", excerpt(sql)),
        )),
    }
}

/// The row of `rows` if there is one, or an error if there are several.
fn at_most_one(sql: &str, mut rows: Vec<Row>) -> Result<Option<Row>> {
    match rows.len() {
        0 => Ok(None),
        1 => Ok(Some(rows.remove(0))),
        n => Err(Error::invalid(
            "query_opt",
            format!("{:?} returned {n} rows, at most one expected", excerpt(sql)),
        )),
    }
}

/// Statements that read their own writes: from the replica until the first write, from the
/// primary after. Made by [`PgPool::unit_of_work`].
pub struct UnitOfWork {
    pool: PgPool,
    wrote: bool,
}

impl UnitOfWork {
    fn read_target(&self) -> Target {
        if self.wrote {
            Target::Primary
        } else {
            Target::Replica
        }
    }

    /// The rows of `sql`.
    pub async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.pool.query_on(self.read_target(), sql, params).await
    }

    /// The one row of `sql`.
    pub async fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        exactly_one(sql, self.query(sql, params).await?)
    }

    /// The row of `sql` if there is one.
    pub async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        at_most_one(sql, self.query(sql, params).await?)
    }

    /// Runs `sql` on the primary; later reads of this unit go to the primary too.
    pub async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.wrote = true;
        self.pool.execute(sql, params).await
    }

    /// Runs a transaction on the primary (see [`PgPool::transaction`]); later reads of this
    /// unit go to the primary too.
    pub async fn transaction<T, F>(&mut self, options: &TxOptions, work: F) -> Result<T>
    where
        F: for<'t> FnMut(&'t mut Tx<'_>) -> crate::cache::BoxFuture<'t, Result<T>>,
    {
        self.wrote = true;
        self.pool.transaction(options, work).await
    }
}

/// Which pool a statement goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Primary,
    /// The replica if there is one, else the primary.
    Replica,
}

/// One bb8 pool of connections to `url`, with `config`'s settings.
fn build_pool(
    config: &PgConfig,
    url: &str,
    application_name: &str,
    broken: &Arc<AtomicU64>,
) -> Result<Pool<PgManager>> {
    let redacted: Arc<str> = redact_url(url).into();
    let mut pg: tokio_postgres::Config = url.parse().map_err(|_| {
        Error::invalid(
            "postgres url",
            format!("{redacted:?} is not a valid Postgres URL"),
        )
    })?;
    pg.connect_timeout(config.checkout_timeout)
        .keepalives(true)
        .keepalives_idle(config.keepalive_idle)
        .keepalives_interval(config.keepalive_interval)
        .keepalives_retries(config.keepalive_retries)
        .application_name(application_name)
        .options(format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis()
        ));
    let manager = PgManager {
        config: pg,
        connect_timeout: config.checkout_timeout,
        validation_timeout: config.validation_timeout,
        validate_after_idle: config.validate_after_idle,
        statement_cache_size: config.statement_cache_size,
        broken: broken.clone(),
    };
    Ok(Pool::builder()
        .max_size(config.max_size)
        .min_idle(Some(config.min_idle))
        .idle_timeout(Some(config.idle_timeout))
        .reaper_rate(config.reaper_rate)
        .connection_timeout(config.checkout_timeout)
        .test_on_check_out(true)
        .queue_strategy(bb8::QueueStrategy::Lifo)
        .error_sink(Box::new(LogSink { url: redacted }))
        .build_unchecked(manager))
}

/// `run` answers a query with rows and an execute with a count; anything else is a bug here,
/// reported as an error rather than a panic.
fn unreachable_answer<T>(sql: &str) -> Result<T> {
    Err(Error::invalid(
        "statement",
        format!("{:?} got an answer of the wrong kind", excerpt(sql)),
    ))
}

/// Postgres' code for a statement cancelled by `statement_timeout` (or a cancel request).
const QUERY_CANCELED: &str = "57014";
/// Postgres' code for "cached plan must not change result type" after a schema change.
const FEATURE_NOT_SUPPORTED: &str = "0A000";

impl PgPool {
    /// A pool that opens its connections in the background (`min_idle` of them), so a host
    /// starts while Postgres is down. Must be called inside a Tokio runtime.
    pub fn lazy(config: &PgConfig) -> Result<Self> {
        config.validate()?;
        let url: Arc<str> = redact_url(&config.url).into();
        let broken = Arc::new(AtomicU64::new(0));
        let pool = build_pool(config, &config.url, &config.application_name, &broken)?;
        let replica = match &config.replica_url {
            Some(replica_url) => {
                let name = format!("{}-replica", config.application_name);
                Some(build_pool(config, replica_url, &name, &broken)?)
            }
            None => None,
        };
        Ok(PgPool {
            inner: Arc::new(Inner {
                pool,
                replica,
                config: config.clone(),
                url,
                broken,
                checkout_timeouts: AtomicU64::new(0),
                waiting: AtomicU64::new(0),
                waiting_since_ms: AtomicU64::new(0),
                started: Instant::now(),
                slow_count: AtomicU64::new(0),
                slow_log: Mutex::new(VecDeque::new()),
                transaction_retries: AtomicU64::new(0),
            }),
        })
    }

    /// Like [`lazy`](Self::lazy), then runs `SELECT 1` so that a wrong URL fails here.
    pub async fn connect(config: &PgConfig) -> Result<Self> {
        let pool = Self::lazy(config)?;
        pool.execute("SELECT 1", &[]).await?;
        Ok(pool)
    }

    /// The rows of `sql` with `params` (from the replica, if there is one).
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.query_on(Target::Replica, sql, params).await
    }

    async fn query_on(
        &self,
        target: Target,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let started = Instant::now();
        let done = self
            .run_on_a_live_connection(target, sql, Op::Query(params))
            .await;
        self.record(sql, started);
        match done? {
            Done::Rows(rows) => Ok(rows),
            Done::Changed(_) => unreachable_answer(sql),
        }
    }

    /// The one row of `sql`; an error if there are none or several.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        exactly_one(sql, self.query(sql, params).await?)
    }

    /// The row of `sql` if there is one; an error if there are several.
    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        at_most_one(sql, self.query(sql, params).await?)
    }

    /// A connection of the primary for work the pool's methods do not cover (`LISTEN`, `COPY`,
    /// a long session): it dereferences to the tokio-postgres `Client` and returns to the
    /// pool when dropped. Waits at most the checkout timeout.
    pub async fn connection(&self) -> Result<PgConnectionGuard<'_>> {
        Ok(PgConnectionGuard {
            connection: self.checkout(Target::Primary).await?,
        })
    }

    /// A unit of work: it reads from the replica (if there is one) until it writes, and from
    /// the primary after, so it always reads its own writes.
    pub fn unit_of_work(&self) -> UnitOfWork {
        UnitOfWork {
            pool: self.clone(),
            wrote: false,
        }
    }

    /// Runs `sql` with `params`; the number of rows it changed.
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let started = Instant::now();
        let done = self
            .run_on_a_live_connection(Target::Primary, sql, Op::Execute(params))
            .await;
        self.record(sql, started);
        match done? {
            Done::Changed(changed) => Ok(changed),
            Done::Rows(_) => unreachable_answer(sql),
        }
    }

    /// Runs a statement on a pooled connection. If that connection turns out to be lost (a
    /// killed backend not yet noticed), the statement did not commit, so it runs again on
    /// another connection; each lost one is dropped, so this ends within the pool's size.
    async fn run_on_a_live_connection(
        &self,
        target: Target,
        sql: &str,
        op: Op<'_>,
    ) -> Result<Done> {
        let mut lost = 0;
        loop {
            let mut connection = self.checkout(target).await?;
            match run(&mut connection, sql, op).await {
                Err(error)
                    if connection.broken
                        && lost_connection(&error)
                        && lost < self.inner.config.max_size =>
                {
                    lost += 1;
                    tracing::debug!(statement = %sql, error = %error, "connection lost before the statement committed; running it on another");
                }
                done => return done,
            }
        }
    }

    /// A snapshot for health endpoints.
    pub fn status(&self) -> PoolStatus {
        let inner = &*self.inner;
        let state = inner.pool.state();
        let waiters = inner.waiting.load(Ordering::Relaxed);
        let since = inner.waiting_since_ms.load(Ordering::Relaxed);
        let now_ms = inner.started.elapsed().as_millis() as u64;
        let saturated = waiters > 0
            && since > 0
            && now_ms.saturating_sub(since) >= inner.config.saturation_threshold.as_millis() as u64;
        PoolStatus {
            size: state.connections,
            idle: state.idle_connections,
            in_use: state.connections - state.idle_connections,
            max_size: inner.config.max_size,
            waiters,
            checkout_timeouts: inner.checkout_timeouts.load(Ordering::Relaxed),
            broken_connections: inner.broken.load(Ordering::Relaxed),
            slow_queries: inner.slow_count.load(Ordering::Relaxed),
            transaction_retries: inner.transaction_retries.load(Ordering::Relaxed),
            replica_size: inner.replica.as_ref().map(|r| r.state().connections),
            saturated,
        }
    }

    /// The slowest recent queries, oldest first (bounded by `slow_query_log_size`).
    pub fn slow_queries(&self) -> Vec<SlowQuery> {
        let log = self
            .inner
            .slow_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    /// A connection, within the checkout timeout; counts waiters for `status()`.
    async fn checkout(&self, target: Target) -> Result<PooledConnection<'_, PgManager>> {
        let inner = &*self.inner;
        let pool = match (target, &inner.replica) {
            (Target::Replica, Some(replica)) => replica,
            _ => &inner.pool,
        };
        if inner.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            let now = inner.started.elapsed().as_millis() as u64;
            inner.waiting_since_ms.store(now.max(1), Ordering::Relaxed);
        }
        // Counted down on every way out, a caller that gives up (drops this future) included.
        let waiter = Waiter(inner);
        let got = pool.get().await;
        drop(waiter);
        match got {
            Ok(connection) => Ok(connection),
            Err(RunError::TimedOut) => {
                inner.checkout_timeouts.fetch_add(1, Ordering::Relaxed);
                let status = self.status();
                Err(Error::PoolExhausted {
                    after: inner.config.checkout_timeout,
                    size: status.size,
                    max_size: status.max_size,
                    waiters: status.waiters + 1,
                })
            }
            Err(RunError::User(error)) => Err(Error::Backend {
                backend: "postgres",
                operation: "connect",
                source: Box::new(error),
            }),
        }
    }

    /// Times a query: metrics per statement, and the slow-query log.
    fn record(&self, sql: &str, started: Instant) {
        let elapsed = started.elapsed();
        let statement = excerpt(sql);
        metrics::counter!("pupkit_db_queries_total", "statement" => statement.clone()).increment(1);
        metrics::histogram!("pupkit_db_query_seconds", "statement" => statement)
            .record(elapsed.as_secs_f64());
        let inner = &*self.inner;
        if elapsed >= inner.config.slow_query_threshold {
            inner.slow_count.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(statement = %sql, elapsed_ms = elapsed.as_millis() as u64, "slow query");
            let mut log = inner.slow_log.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() >= inner.config.slow_query_log_size {
                log.pop_front();
            }
            log.push_back(SlowQuery {
                statement: sql.to_owned(),
                elapsed,
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            });
        }
    }
}

/// What to do with a prepared statement.
#[derive(Clone, Copy)]
enum Op<'p> {
    Query(&'p [&'p (dyn ToSql + Sync)]),
    Execute(&'p [&'p (dyn ToSql + Sync)]),
}

/// What it gave.
enum Done {
    Rows(Vec<Row>),
    Changed(u64),
}

/// Runs one statement on `connection` through its statement cache. If Postgres says a cached
/// plan is no longer valid (the schema changed), the statement is prepared again and run once
/// more. A connection that broke is marked, so the pool drops it.
async fn run(connection: &mut PgConnection, sql: &str, op: Op<'_>) -> Result<Done> {
    let mut retried = false;
    loop {
        let statement = match connection.statements.get(sql) {
            Some(statement) => statement,
            None => match connection.client.prepare(sql).await {
                Ok(statement) => {
                    connection.statements.insert(sql, statement.clone());
                    statement
                }
                Err(error) => return Err(database_error(connection, sql, error)),
            },
        };
        let result = match op {
            Op::Query(params) => connection
                .client
                .query(&statement, params)
                .await
                .map(Done::Rows),
            Op::Execute(params) => connection
                .client
                .execute(&statement, params)
                .await
                .map(Done::Changed),
        };
        connection.last_used = Instant::now();
        match result {
            Ok(done) => return Ok(done),
            Err(error) if !retried && code(&error) == Some(FEATURE_NOT_SUPPORTED) => {
                tracing::debug!(statement = %sql, "cached plan invalidated by a schema change; preparing again");
                connection.statements.remove(sql);
                retried = true;
            }
            Err(error) => return Err(database_error(connection, sql, error)),
        }
    }
}

/// The connection, not the statement, failed: no answer at all, a closed connection, or the
/// backend terminated (57P01 and the rest of class 57P) or the connection lost (class 08). The
/// statement did not commit, so running it again on another connection is safe.
fn lost_connection(error: &Error) -> bool {
    match error {
        Error::Database { code: None, .. } => true,
        Error::Database {
            code: Some(code), ..
        } => code.starts_with("57P") || code.starts_with("08"),
        _ => false,
    }
}

/// The SQLSTATE of a database error.
fn code(error: &tokio_postgres::Error) -> Option<&str> {
    error.as_db_error().map(|db| db.code().code())
}

/// Our error for a failed statement; a failure that is not the database's answer (the
/// connection broke) marks the connection so the pool drops it.
fn database_error(connection: &mut PgConnection, sql: &str, error: tokio_postgres::Error) -> Error {
    let code = code(&error).map(str::to_owned);
    let fatal = code
        .as_deref()
        .is_some_and(|c| c.starts_with("57P") || c.starts_with("08"));
    if code.is_none() || fatal || error.is_closed() {
        connection.broken = true;
    }
    Error::Database {
        statement: excerpt(sql),
        timed_out: code.as_deref() == Some(QUERY_CANCELED),
        code,
        source: Box::new(error),
    }
}

/// Isolation level of a transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isolation {
    /// Postgres' default.
    #[default]
    ReadCommitted,
    /// Snapshot isolation.
    RepeatableRead,
    /// Full serializability; expect serialization failures, which
    /// [`PgPool::transaction`] retries.
    Serializable,
}

/// Options of a transaction.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TxOptions {
    /// Isolation level. Default read committed.
    pub isolation: Isolation,
    /// Refuse writes. Default false.
    pub read_only: bool,
    /// Times the whole transaction is run again after a serialization failure or deadlock
    /// (SQLSTATE 40001, 40P01), with backoff. Default 3.
    pub retries: u32,
}

impl Default for TxOptions {
    fn default() -> Self {
        TxOptions {
            isolation: Isolation::ReadCommitted,
            read_only: false,
            retries: 3,
        }
    }
}

impl TxOptions {
    /// Default options at `isolation`.
    pub fn isolation(isolation: Isolation) -> Self {
        TxOptions {
            isolation,
            ..TxOptions::default()
        }
    }
}

/// A transaction in progress, handed to the work of [`PgPool::transaction`]. It goes through
/// the connection's statement cache; it is committed when the work succeeds and rolled back
/// otherwise (also if the work's future is dropped).
pub struct Tx<'a> {
    transaction: tokio_postgres::Transaction<'a>,
    statements: &'a mut StatementCache,
}

impl Tx<'_> {
    async fn statement(&mut self, sql: &str) -> Result<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement);
        }
        let statement = self
            .transaction
            .prepare(sql)
            .await
            .map_err(|e| tx_error(sql, e))?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// The rows of `sql` with `params`.
    pub async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let statement = self.statement(sql).await?;
        self.transaction
            .query(&statement, params)
            .await
            .map_err(|e| tx_error(sql, e))
    }

    /// The one row of `sql`; an error if there are none or several.
    pub async fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let statement = self.statement(sql).await?;
        self.transaction
            .query_one(&statement, params)
            .await
            .map_err(|e| tx_error(sql, e))
    }

    /// Runs `sql` with `params`; the number of rows it changed.
    pub async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let statement = self.statement(sql).await?;
        self.transaction
            .execute(&statement, params)
            .await
            .map_err(|e| tx_error(sql, e))
    }
}

fn tx_error(sql: &str, error: tokio_postgres::Error) -> Error {
    let code = code(&error).map(str::to_owned);
    Error::Database {
        statement: excerpt(sql),
        timed_out: code.as_deref() == Some(QUERY_CANCELED),
        code,
        source: Box::new(error),
    }
}

/// Serialization failure and deadlock: the transaction may succeed if run again.
fn retryable(error: &Error) -> bool {
    matches!(error, Error::Database { code: Some(code), .. } if code == "40001" || code == "40P01")
}

impl PgPool {
    /// Runs `work` in a transaction (tokio-postgres' builder, which rolls back on drop) and
    /// commits it. A serialization failure or deadlock, in the work or at commit, runs the
    /// whole transaction again after a backoff, up to `options.retries` times, so `work` must
    /// be safe to run more than once.
    ///
    /// ```no_run
    /// # async fn run(pool: pupkit::repo::PgPool) -> pupkit::Result<()> {
    /// use pupkit::repo::{Isolation, TxOptions};
    /// let moved = pool
    ///     .transaction(&TxOptions::isolation(Isolation::Serializable), |tx| {
    ///         Box::pin(async move {
    ///             tx.execute("UPDATE accounts SET cents = cents - 100 WHERE id = $1", &[&1i64]).await?;
    ///             tx.execute("UPDATE accounts SET cents = cents + 100 WHERE id = $1", &[&2i64]).await
    ///         })
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn transaction<T, F>(&self, options: &TxOptions, mut work: F) -> Result<T>
    where
        F: for<'t> FnMut(&'t mut Tx<'_>) -> crate::cache::BoxFuture<'t, Result<T>>,
    {
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let result = self.transaction_once(options, &mut work).await;
            self.record("transaction", started);
            match result {
                Err(error) if retryable(&error) && attempt < options.retries => {
                    attempt += 1;
                    self.inner
                        .transaction_retries
                        .fetch_add(1, Ordering::Relaxed);
                    let pause = Duration::from_millis(10 * (1 << attempt.min(6)));
                    tracing::debug!(attempt, error = %error, "transaction conflict; running it again");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    async fn transaction_once<T, F>(&self, options: &TxOptions, work: &mut F) -> Result<T>
    where
        F: for<'t> FnMut(&'t mut Tx<'_>) -> crate::cache::BoxFuture<'t, Result<T>>,
    {
        let mut connection = self.checkout(Target::Primary).await?;
        let PgConnection {
            client, statements, ..
        } = &mut *connection;
        let isolation = match options.isolation {
            Isolation::ReadCommitted => tokio_postgres::IsolationLevel::ReadCommitted,
            Isolation::RepeatableRead => tokio_postgres::IsolationLevel::RepeatableRead,
            Isolation::Serializable => tokio_postgres::IsolationLevel::Serializable,
        };
        let transaction = client
            .build_transaction()
            .isolation_level(isolation)
            .read_only(options.read_only)
            .start()
            .await
            .map_err(|e| tx_error("BEGIN", e))?;
        let mut tx = Tx {
            transaction,
            statements,
        };
        let value = work(&mut tx).await?;
        tx.transaction
            .commit()
            .await
            .map_err(|e| tx_error("COMMIT", e))?;
        Ok(value)
    }
}
