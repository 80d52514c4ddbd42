//! [`PooledRepo`]: pooled database access as a trait, and [`CachedRepo`], which reads through
//! a [`TieredCache`](crate::cache::TieredCache) and invalidates tags on writes.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::postgres::{PgPool, Tx, TxOptions};
use crate::cache::{BoxFuture, EntryOptions, TieredCache};
use crate::error::{BoxError, Result};

/// The work of a transaction through the dyn-compatible [`PooledRepo`]: it may run more than
/// once (serialization failures are retried), and reports through what it captures.
pub type TxWork<'a> =
    Box<dyn for<'t> FnMut(&'t mut Tx<'_>) -> BoxFuture<'t, Result<()>> + Send + 'a>;

/// Pooled database access, typed through tokio-postgres' `ToSql` and `Row`. Dyn-compatible, so
/// a host can hold `Arc<dyn PooledRepo>`; [`PgPool`] implements it (and has generic inherent
/// methods of the same names).
#[async_trait]
pub trait PooledRepo: Send + Sync {
    /// The rows of `sql` with `params`.
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>>;

    /// The one row of `sql`; an error if there are none or several.
    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row>;

    /// The row of `sql` if there is one.
    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>>;

    /// Runs `sql`; the number of rows it changed.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64>;

    /// Runs `work` in a transaction and commits it.
    async fn transaction(&self, options: &TxOptions, work: TxWork<'_>) -> Result<()>;
}

#[async_trait]
impl PooledRepo for PgPool {
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        PgPool::query(self, sql, params).await
    }

    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        PgPool::query_one(self, sql, params).await
    }

    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        PgPool::query_opt(self, sql, params).await
    }

    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        PgPool::execute(self, sql, params).await
    }

    async fn transaction(&self, options: &TxOptions, mut work: TxWork<'_>) -> Result<()> {
        PgPool::transaction(self, options, move |tx| work(tx)).await
    }
}

/// A repository that reads through a tiered cache: [`read`](Self::read) serves a key from the
/// cache or loads it from the database (once, however many callers ask), and
/// [`write`](Self::write) runs a change and then invalidates the tags it names, so a read after
/// a write never sees the old row.
pub struct CachedRepo<R, C> {
    repo: Arc<R>,
    cache: C,
}

impl<R, C: Clone> Clone for CachedRepo<R, C> {
    fn clone(&self) -> Self {
        CachedRepo {
            repo: self.repo.clone(),
            cache: self.cache.clone(),
        }
    }
}

impl<R, C> CachedRepo<R, C>
where
    R: PooledRepo + 'static,
{
    /// Reads `repo` through `cache`.
    pub fn new(repo: R, cache: C) -> Self {
        CachedRepo {
            repo: Arc::new(repo),
            cache,
        }
    }

    /// The repository, for reads that bypass the cache.
    pub fn repo(&self) -> &R {
        &self.repo
    }

    /// The value under `key`: from the cache, or from `load` (given the repository), cached
    /// with `options` (TTL, tier, tags).
    pub async fn read<V, F, Fut>(
        &self,
        key: &str,
        options: &EntryOptions,
        load: F,
    ) -> Result<Arc<V>>
    where
        V: Send + Sync + 'static,
        C: TieredCache<V>,
        F: FnOnce(Arc<R>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let repo = self.repo.clone();
        self.cache
            .get_or_load(
                key,
                options,
                Box::new(move || Box::pin(async move { load(repo).await.map_err(BoxError::from) })),
            )
            .await
    }

    /// Runs `change` (given the repository) and then invalidates `tags`, so that reads of
    /// entries tagged with them load the new rows. If the change fails, nothing is invalidated.
    pub async fn write<V, T, F, Fut>(&self, tags: &[&str], change: F) -> Result<T>
    where
        V: Send + Sync + 'static,
        C: TieredCache<V>,
        F: FnOnce(Arc<R>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let out = change(self.repo.clone()).await?;
        self.cache.invalidate_tags(tags).await?;
        Ok(out)
    }
}
