//! [`PgLedger`]: the ledger in a Postgres table, with summaries and buckets computed in SQL.
//!
//! One row per event in `{schema}.pupkit_cost_ledger`, keyed by request id, so an append is
//! idempotent and safe to run again after a lost connection. Timestamps cross the wire as
//! integer microseconds since the Unix epoch and are converted in SQL, exactly over the whole
//! range Postgres stores; the ledger keeps them to the microsecond (nanoseconds are dropped,
//! toward the past). Caller-supplied values only ever travel as parameters.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use jiff::Timestamp;
use serde::Deserialize;
use serde::de::IntoDeserializer;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql};

use super::budget::resolve_time_zone;
use super::event::{LedgerEntry, UsageSource};
use super::memory::bucket_start;
use super::money::MicroUsd;
use super::store::{
    BucketTotal, BucketWidth, Dimension, GroupTotals, Ledger, LedgerQuery, LedgerSummary, Totals,
};
use crate::error::{Error, Result, excerpt};
use crate::repo::{PgPool, TxOptions};

/// The table's name inside its schema.
const TABLE: &str = "pupkit_cost_ledger";

/// The earliest instant Postgres stores (4714-11-24 00:00 UTC BC), in µs since 1970. Query
/// bounds before it are raised to it, so `LedgerQuery::between(Timestamp::MIN, ..)` works.
const EARLIEST_MICROS: i64 = -210_866_803_200_000_000;

/// Rows fetched per query while streaming entries.
const PAGE: usize = 5_000;

/// The columns of an entry as [`entry_from_row`] reads them.
const ENTRY_COLUMNS: &str = "request_id, (extract(epoch FROM at) * 1000000)::bigint, service, \
     user_id, model, operation, source, input_tokens, output_tokens, units, cost_micros, \
     saved_micros, priced";

/// The sums of a group as [`totals_from_row`] reads them, from column 4 on. Postgres sums
/// bigints as numeric; they are clamped to the bigint range, as the in-memory ledger saturates
/// (`coalesce` first: `least` and `greatest` skip a NULL, the sum of no rows).
const TOTALS_COLUMNS: &str = "\
     least(greatest(coalesce(sum(cost_micros), 0), -9223372036854775808), 9223372036854775807)::bigint, \
     least(greatest(coalesce(sum(saved_micros), 0), -9223372036854775808), 9223372036854775807)::bigint, \
     least(coalesce(sum(input_tokens), 0), 9223372036854775807)::bigint, \
     least(coalesce(sum(output_tokens), 0), 9223372036854775807)::bigint, \
     least(coalesce(sum(units), 0), 9223372036854775807)::bigint, \
     count(*), \
     count(*) FILTER (WHERE NOT priced)";

/// `GROUPING(service, user_id, model)` of each grouping set: a set bit is a column summed over.
const GROUPED_BY_NOTHING: i32 = 0b111;
const GROUPED_BY_SERVICE: i32 = 0b011;
const GROUPED_BY_USER: i32 = 0b101;
const GROUPED_BY_MODEL: i32 = 0b110;

/// The ledger in a Postgres table: appends are `INSERT ... ON CONFLICT DO NOTHING`, summaries
/// one `GROUPING SETS` query over indexed columns, buckets one query grouped by UTC hour or
/// local date, and entries a stream of keyset-paged queries (never the whole range in memory).
///
/// The table `{schema}.pupkit_cost_ledger` is made by [`migrate`](Self::migrate) (or
/// [`connect`](Self::connect)), which is idempotent and safe to run from several processes
/// at once.
///
/// ```no_run
/// # async fn run() -> pupkit::Result<()> {
/// use std::sync::Arc;
///
/// use pupkit::cost::{CostMeter, Meter, PgLedger, Usage};
/// use pupkit::repo::{PgConfig, PgPool};
///
/// let pool = PgPool::connect(&PgConfig::from_env()).await?;
/// let ledger = PgLedger::connect(pool, "public").await?;
/// let meter = Meter::builder().ledger(Arc::new(ledger)).build().await?;
/// let usage = Usage::new("req-1", "chat", "u1", "gpt-4o-mini").tokens(1_200, 300);
/// meter.record(usage).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PgLedger {
    pool: PgPool,
    /// The schema, as given (validated).
    schema: Arc<str>,
    /// `"schema".pupkit_cost_ledger`, quoted for SQL.
    table: Arc<str>,
    /// The append statement.
    insert: Arc<str>,
}

impl fmt::Debug for PgLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgLedger")
            .field("table", &self.table)
            .field("pool", &self.pool)
            .finish()
    }
}

impl PgLedger {
    /// A ledger in `schema` (an identifier: an ASCII letter or `_`, then up to 62 letters,
    /// digits or `_`; quoted, so case matters) through `pool`. Nothing is sent; run
    /// [`migrate`](Self::migrate) once before use, or use [`connect`](Self::connect).
    pub fn new(pool: PgPool, schema: &str) -> Result<Self> {
        let quoted = quote_identifier(schema)?;
        let table = format!("{quoted}.{TABLE}");
        let insert = format!(
            "INSERT INTO {table} (request_id, at, service, user_id, model, operation, source, \
             input_tokens, output_tokens, units, cost_micros, saved_micros, priced) \
             VALUES ($1, {}, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (request_id) DO NOTHING",
            at_param(2)
        );
        Ok(PgLedger {
            pool,
            schema: schema.into(),
            table: table.into(),
            insert: insert.into(),
        })
    }

    /// [`new`](Self::new), then [`migrate`](Self::migrate).
    pub async fn connect(pool: PgPool, schema: &str) -> Result<Self> {
        let ledger = Self::new(pool, schema)?;
        ledger.migrate().await?;
        Ok(ledger)
    }

    /// Creates the schema (if missing), the table and its indexes (on `at`, `(user_id, at)`
    /// and `(service, at)`), unless they exist. Runs in one transaction under an advisory lock
    /// per schema, so processes starting together do not trip over each other.
    pub async fn migrate(&self) -> Result<()> {
        let table = &self.table;
        let statements: Arc<[String]> = [
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 request_id text PRIMARY KEY, \
                 at timestamptz NOT NULL, \
                 service text NOT NULL, \
                 user_id text NOT NULL, \
                 model text NOT NULL, \
                 operation text NOT NULL, \
                 source text NOT NULL, \
                 input_tokens bigint NOT NULL CHECK (input_tokens >= 0), \
                 output_tokens bigint NOT NULL CHECK (output_tokens >= 0), \
                 units bigint NOT NULL CHECK (units >= 0), \
                 cost_micros bigint NOT NULL, \
                 saved_micros bigint NOT NULL, \
                 priced boolean NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {TABLE}_at ON {table} (at)"),
            format!("CREATE INDEX IF NOT EXISTS {TABLE}_user_at ON {table} (user_id, at)"),
            format!("CREATE INDEX IF NOT EXISTS {TABLE}_service_at ON {table} (service, at)"),
        ]
        .into();
        let create_schema: Arc<str> =
            format!("CREATE SCHEMA {}", quote_identifier(&self.schema)?).into();
        let schema = self.schema.clone();
        let lock = format!("{TABLE}:{schema}");
        self.pool
            .transaction(&TxOptions::default(), move |tx| {
                let (statements, create_schema, schema, lock) = (
                    statements.clone(),
                    create_schema.clone(),
                    schema.clone(),
                    lock.clone(),
                );
                Box::pin(async move {
                    tx.query(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        &[&lock],
                    )
                    .await?;
                    let exists = tx
                        .query(
                            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
                            &[&&*schema],
                        )
                        .await?;
                    if exists.is_empty() {
                        tx.execute(&create_schema, &[]).await?;
                    }
                    for statement in statements.iter() {
                        tx.execute(statement, &[]).await?;
                    }
                    Ok(())
                })
            })
            .await
    }
}

/// `"name"`, after checking that `name` is a plain identifier (so quoting needs no escapes).
fn quote_identifier(name: &str) -> Result<String> {
    let mut chars = name.chars();
    let valid = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(Error::invalid(
            "ledger schema",
            format!(
                "{:?} is not an identifier: 1 to 63 ASCII letters, digits and underscores, \
                 not starting with a digit",
                excerpt(name)
            ),
        ));
    }
    Ok(format!("\"{name}\""))
}

/// SQL for the timestamptz `$n` microseconds after the Unix epoch. Whole seconds and the
/// remaining microseconds are added apart: `$n * interval '1 microsecond'` goes through a
/// float and rounds for instants more than 285 years from 1970.
fn at_param(n: usize) -> String {
    format!(
        "(timestamptz 'epoch' + (${n}::bigint / 1000000) * interval '1 second' \
         + (${n}::bigint % 1000000) * interval '1 microsecond')"
    )
}

/// Microseconds since the Unix epoch, rounded toward the past (so every instant lands in the
/// microsecond, and the hour, that contains it).
fn micros(at: Timestamp) -> i64 {
    let truncated = at.as_microsecond();
    if at.subsec_nanosecond() % 1_000 < 0 {
        truncated - 1
    } else {
        truncated
    }
}

/// The instant `micros` microseconds after the Unix epoch, as read from the table.
fn timestamp(micros: i64, column: &str) -> Result<Timestamp> {
    Timestamp::from_microsecond(micros).map_err(|_| {
        Error::corrupt(format!(
            "ledger column {column} holds {micros} µs since 1970, outside the supported range"
        ))
    })
}

/// Column `index` of `row`, or a corrupt-data error naming `column`.
fn column<'a, T: FromSql<'a>>(row: &'a Row, index: usize, column: &str) -> Result<T> {
    row.try_get(index).map_err(|error| {
        Error::corrupt(format!("ledger column {column} could not be read: {error}"))
    })
}

/// A count or sum that cannot be negative, or a corrupt-data error naming `column`.
fn count(row: &Row, index: usize, column_name: &str) -> Result<u64> {
    let value: i64 = column(row, index, column_name)?;
    u64::try_from(value).map_err(|_| {
        Error::corrupt(format!(
            "ledger column {column_name} holds {value}, below zero"
        ))
    })
}

/// A count for a bigint column, or an error if it does not fit.
fn bigint(what: &'static str, value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| {
        Error::invalid(
            what,
            format!("{value} is over the ledger's limit of {}", i64::MAX),
        )
    })
}

/// A source by its name (as [`UsageSource::as_str`] writes it).
fn parse_source(name: &str) -> Option<UsageSource> {
    let name: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        name.into_deserializer();
    UsageSource::deserialize(name).ok()
}

/// An entry from a row of [`ENTRY_COLUMNS`].
fn entry_from_row(row: &Row) -> Result<LedgerEntry> {
    let request_id: String = column(row, 0, "request_id")?;
    let in_row = |error: Error| match error {
        Error::Corrupt { reason } => Error::corrupt(format!(
            "{reason} (row of request id {:?})",
            excerpt(&request_id)
        )),
        other => other,
    };
    let read = || -> Result<LedgerEntry> {
        let source: String = column(row, 6, "source")?;
        let Some(parsed) = parse_source(&source) else {
            return Err(Error::corrupt(format!(
                "ledger column source holds {:?}, not a known usage source",
                excerpt(&source)
            )));
        };
        Ok(LedgerEntry {
            request_id: request_id.clone(),
            at: timestamp(column(row, 1, "at")?, "at")?,
            service: column(row, 2, "service")?,
            user: column(row, 3, "user_id")?,
            model: column(row, 4, "model")?,
            operation: column(row, 5, "operation")?,
            source: parsed,
            input_tokens: count(row, 7, "input_tokens")?,
            output_tokens: count(row, 8, "output_tokens")?,
            units: count(row, 9, "units")?,
            cost: MicroUsd::from_micros(column(row, 10, "cost_micros")?),
            saved: MicroUsd::from_micros(column(row, 11, "saved_micros")?),
            priced: column(row, 12, "priced")?,
        })
    };
    read().map_err(in_row)
}

/// Totals from a row of [`TOTALS_COLUMNS`], starting at column `first`.
fn totals_from_row(row: &Row, first: usize) -> Result<Totals> {
    Ok(Totals {
        cost: MicroUsd::from_micros(column(row, first, "sum(cost_micros)")?),
        saved: MicroUsd::from_micros(column(row, first + 1, "sum(saved_micros)")?),
        input_tokens: count(row, first + 2, "sum(input_tokens)")?,
        output_tokens: count(row, first + 3, "sum(output_tokens)")?,
        units: count(row, first + 4, "sum(units)")?,
        requests: count(row, first + 5, "count(*)")?,
        unpriced_requests: count(row, first + 6, "count(*) of unpriced")?,
    })
}

/// A [`LedgerQuery`] as SQL conditions and their parameters, `$1` on.
#[derive(Clone, Debug)]
struct Selection {
    from: i64,
    to: i64,
    service: Option<String>,
    user: Option<String>,
    model: Option<String>,
}

impl Selection {
    fn new(query: &LedgerQuery) -> Self {
        Selection {
            from: micros(query.from).max(EARLIEST_MICROS),
            to: micros(query.to).max(EARLIEST_MICROS),
            service: query.service.clone(),
            user: query.user.clone(),
            model: query.model.clone(),
        }
    }

    /// The conditions. Only the filters that are set appear, so each combination is its own
    /// (cached) statement whose plan can use the matching index.
    fn conditions(&self) -> String {
        let mut sql = format!("at >= {} AND at < {}", at_param(1), at_param(2));
        let mut n = 2;
        for (column, value) in [
            ("service", &self.service),
            ("user_id", &self.user),
            ("model", &self.model),
        ] {
            if value.is_some() {
                n += 1;
                sql.push_str(&format!(" AND {column} = ${n}"));
            }
        }
        sql
    }

    /// The parameters of [`conditions`](Self::conditions), in order.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&self.from, &self.to];
        for value in [&self.service, &self.user, &self.model]
            .into_iter()
            .flatten()
        {
            params.push(value);
        }
        params
    }
}

/// The state of an entries stream: where the last page ended.
struct Pages {
    pool: PgPool,
    table: Arc<str>,
    selection: Selection,
    /// `(at in µs, request id)` of the last entry handed out.
    after: Option<(i64, String)>,
    done: bool,
}

impl Pages {
    /// The next page, in `(at, request_id)` order, keyset-paged after the last one.
    async fn next_page(&mut self) -> Result<Vec<LedgerEntry>> {
        let mut sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM {} WHERE {}",
            self.table,
            self.selection.conditions()
        );
        let mut params = self.selection.params();
        if let Some((at, request_id)) = &self.after {
            let n = params.len() + 1;
            let after = at_param(n);
            sql.push_str(&format!(
                " AND at >= {after} AND (at > {after} OR request_id COLLATE \"C\" > ${})",
                n + 1
            ));
            params.push(at);
            params.push(request_id);
        }
        sql.push_str(&format!(
            " ORDER BY at, request_id COLLATE \"C\" LIMIT {PAGE}"
        ));
        let rows = self.pool.query(&sql, &params).await?;
        let entries = rows
            .iter()
            .map(entry_from_row)
            .collect::<Result<Vec<_>>>()?;
        if entries.len() < PAGE {
            self.done = true;
        }
        if let Some(last) = entries.last() {
            self.after = Some((micros(last.at), last.request_id.clone()));
        }
        Ok(entries)
    }
}

#[async_trait]
impl Ledger for PgLedger {
    async fn append(&self, entry: &LedgerEntry) -> Result<bool> {
        let input_tokens = bigint("input tokens", entry.input_tokens)?;
        let output_tokens = bigint("output tokens", entry.output_tokens)?;
        let units = bigint("units", entry.units)?;
        let inserted = self
            .pool
            .execute(
                &self.insert,
                &[
                    &entry.request_id,
                    &micros(entry.at),
                    &entry.service,
                    &entry.user,
                    &entry.model,
                    &entry.operation,
                    &entry.source.as_str(),
                    &input_tokens,
                    &output_tokens,
                    &units,
                    &entry.cost.micros(),
                    &entry.saved.micros(),
                    &entry.priced,
                ],
            )
            .await?;
        Ok(inserted == 1)
    }

    async fn summarize(&self, query: &LedgerQuery) -> Result<LedgerSummary> {
        let selection = Selection::new(query);
        let sql = format!(
            "SELECT GROUPING(service, user_id, model), service, user_id, model, {TOTALS_COLUMNS} \
             FROM {} WHERE {} \
             GROUP BY GROUPING SETS ((), (service), (user_id), (model))",
            self.table,
            selection.conditions()
        );
        let rows = self.pool.query(&sql, &selection.params()).await?;
        let mut summary = LedgerSummary::default();
        for row in &rows {
            let grouping: i32 = column(row, 0, "grouping")?;
            let totals = totals_from_row(row, 4)?;
            let (groups, index, name) = match grouping {
                GROUPED_BY_NOTHING => {
                    summary.totals = totals;
                    continue;
                }
                GROUPED_BY_SERVICE => (&mut summary.by_service, 1, "service"),
                GROUPED_BY_USER => (&mut summary.by_user, 2, "user_id"),
                GROUPED_BY_MODEL => (&mut summary.by_model, 3, "model"),
                other => {
                    return Err(Error::corrupt(format!(
                        "ledger summary row of unexpected grouping {other}"
                    )));
                }
            };
            groups.push(GroupTotals {
                key: column(row, index, name)?,
                totals,
            });
        }
        summary.sort();
        Ok(summary)
    }

    async fn buckets(
        &self,
        query: &LedgerQuery,
        by: Dimension,
        width: BucketWidth,
        tz: &str,
    ) -> Result<Vec<BucketTotal>> {
        let zone = resolve_time_zone(tz)?;
        let selection = Selection::new(query);
        let mut params = selection.params();
        // Grouped by UTC hour or by local date in SQL; each group's start is then computed
        // from its earliest event exactly as the in-memory ledger does. (`date_trunc('day', at,
        // tz)` would differ where a day starts in a repeated hour, e.g. America/Havana on
        // 2024-11-03: Postgres reads an ambiguous midnight as the later one.)
        let group = match width {
            BucketWidth::Hour => "date_trunc('hour', at, 'UTC')".to_owned(),
            BucketWidth::Day => {
                params.push(&tz);
                format!("(at AT TIME ZONE ${})::date", params.len())
            }
        };
        let key = match by {
            Dimension::Service => "service",
            Dimension::User => "user_id",
        };
        let sql = format!(
            "SELECT {key}, (extract(epoch FROM min(at)) * 1000000)::bigint, \
             least(greatest(sum(cost_micros), -9223372036854775808), 9223372036854775807)::bigint \
             FROM {} WHERE {} AND cost_micros <> 0 \
             GROUP BY {key}, {group} \
             ORDER BY {key} COLLATE \"C\", {group}",
            self.table,
            selection.conditions()
        );
        let rows = self.pool.query(&sql, &params).await?;
        rows.iter()
            .map(|row| {
                let first = timestamp(column(row, 1, "min(at)")?, "at")?;
                Ok(BucketTotal {
                    key: column(row, 0, key)?,
                    bucket: bucket_start(first, width, &zone),
                    cost: MicroUsd::from_micros(column(row, 2, "sum(cost_micros)")?),
                })
            })
            .collect()
    }

    /// Keyset-paged: each page of 5,000 entries is one query, so a page reflects the table
    /// when it is read (an entry appended meanwhile, after the last one handed out, shows up).
    fn entries(&self, query: &LedgerQuery) -> BoxStream<'static, Result<LedgerEntry>> {
        let pages = Pages {
            pool: self.pool.clone(),
            table: self.table.clone(),
            selection: Selection::new(query),
            after: None,
            done: false,
        };
        stream::unfold(pages, |mut pages| async move {
            if pages.done {
                return None;
            }
            match pages.next_page().await {
                Ok(entries) if entries.is_empty() => None,
                Ok(entries) => Some((entries.into_iter().map(Ok).collect::<Vec<_>>(), pages)),
                Err(error) => {
                    pages.done = true;
                    Some((vec![Err(error)], pages))
                }
            }
        })
        .flat_map(stream::iter)
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_must_be_plain_identifiers() {
        for good in ["public", "_x", "Ledger_2026", &"a".repeat(63)] {
            assert_eq!(quote_identifier(good).unwrap(), format!("\"{good}\""));
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a\"b",
            "x; DROP TABLE t",
            "é",
            &"a".repeat(64),
        ] {
            let error = quote_identifier(bad).unwrap_err();
            assert!(error.is_invalid_input(), "{bad:?}: {error}");
        }
    }

    #[test]
    fn micros_round_toward_the_past() {
        let at = |s, n| Timestamp::new(s, n).unwrap();
        assert_eq!(micros(at(1, 999_999_999)), 1_999_999);
        assert_eq!(micros(at(0, -1)), -1);
        assert_eq!(micros(at(-1, -1_000)), -1_000_001);
        assert_eq!(micros(at(-1, -1_500)), -1_000_002);
        assert_eq!(micros(Timestamp::MIN), Timestamp::MIN.as_microsecond());
    }

    #[test]
    fn sources_read_back_by_the_names_they_are_written_with() {
        for source in [
            UsageSource::Api,
            UsageSource::Batch,
            UsageSource::Cache,
            UsageSource::Dedup,
        ] {
            assert_eq!(parse_source(source.as_str()), Some(source));
        }
        assert_eq!(parse_source("carrier pigeon"), None);
        assert_eq!(parse_source("API"), None);
    }

    #[test]
    fn conditions_number_only_the_filters_that_are_set() {
        let query = LedgerQuery::between(Timestamp::UNIX_EPOCH, Timestamp::MAX).user("u1");
        let selection = Selection::new(&query);
        assert!(selection.conditions().ends_with(" AND user_id = $3"));
        assert_eq!(selection.params().len(), 3);
    }
}
