//! Usage events: what a host reports, and the priced entry the ledger keeps.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::money::MicroUsd;
use crate::error::{Error, Result, excerpt};

/// The longest request id, service, user, model or operation name accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Where a unit of usage was served from, which decides its price.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UsageSource {
    /// A synchronous API call at the standard price.
    #[default]
    Api,
    /// An API call through the provider's batch API, at the batch price.
    Batch,
    /// Served from a cache: costs nothing; the standard price is recorded as saved.
    Cache,
    /// Merged into another caller's request: costs nothing; the standard price is saved.
    Dedup,
}

impl UsageSource {
    /// True for the sources that cost nothing and record a saving.
    pub fn is_saving(self) -> bool {
        matches!(self, UsageSource::Cache | UsageSource::Dedup)
    }

    /// The name used in CSV and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Api => "api",
            UsageSource::Batch => "batch",
            UsageSource::Cache => "cache",
            UsageSource::Dedup => "dedup",
        }
    }
}

/// One unit of usage as a host reports it: who, what, how much.
///
/// ```
/// use pupkit::cost::Usage;
///
/// let usage = Usage::new("req-1", "chat", "user-42", "gpt-4o-mini")
///     .operation("completion")
///     .tokens(1_200, 300);
/// assert_eq!(usage.input_tokens, 1_200);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// The idempotency key: recording the same id twice counts once.
    pub request_id: String,
    /// The service (feature, product area) that spent.
    pub service: String,
    /// The end user on whose behalf it was spent.
    pub user: String,
    /// The model, as named in the price table.
    pub model: String,
    /// What was done (`"embedding"`, `"completion"`, ...). Default `"request"`.
    pub operation: String,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Input tokens the provider served from its prompt cache (part of `input_tokens`).
    pub cached_input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Other billable units (images, seconds of audio, ...), priced per unit.
    pub units: u64,
    /// Where it was served from. Default [`UsageSource::Api`].
    pub source: UsageSource,
    /// A cost the host already knows (from the provider's response), used instead of the
    /// price table.
    pub cost: Option<MicroUsd>,
    /// When it happened. `None` means when it is recorded.
    pub at: Option<Timestamp>,
}

impl Usage {
    /// Usage of `model` by `user` through `service`, identified by `request_id`.
    pub fn new(
        request_id: impl Into<String>,
        service: impl Into<String>,
        user: impl Into<String>,
        model: impl Into<String>,
    ) -> Self {
        Usage {
            request_id: request_id.into(),
            service: service.into(),
            user: user.into(),
            model: model.into(),
            operation: "request".to_owned(),
            input_tokens: 0,
            cached_input_tokens: 0,
            output_tokens: 0,
            units: 0,
            source: UsageSource::Api,
            cost: None,
            at: None,
        }
    }

    /// Sets the operation name.
    pub fn operation(mut self, operation: impl Into<String>) -> Self {
        self.operation = operation.into();
        self
    }

    /// Sets input and output tokens.
    pub fn tokens(mut self, input: u64, output: u64) -> Self {
        self.input_tokens = input;
        self.output_tokens = output;
        self
    }

    /// Sets the input tokens served from the provider's prompt cache.
    pub fn cached_input_tokens(mut self, tokens: u64) -> Self {
        self.cached_input_tokens = tokens;
        self
    }

    /// Sets the billable units.
    pub fn units(mut self, units: u64) -> Self {
        self.units = units;
        self
    }

    /// Sets where it was served from.
    pub fn source(mut self, source: UsageSource) -> Self {
        self.source = source;
        self
    }

    /// Sets a known cost, overriding the price table.
    pub fn cost(mut self, cost: MicroUsd) -> Self {
        self.cost = Some(cost);
        self
    }

    /// Sets when it happened.
    pub fn at(mut self, at: Timestamp) -> Self {
        self.at = Some(at);
        self
    }

    /// Checks every caller-supplied field.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_id("request id", &self.request_id)?;
        validate_id("service", &self.service)?;
        validate_id("user", &self.user)?;
        validate_id("model", &self.model)?;
        validate_id("operation", &self.operation)?;
        if self.cached_input_tokens > self.input_tokens {
            return Err(Error::invalid(
                "cached input tokens",
                format!(
                    "{} is more than the {} input tokens",
                    self.cached_input_tokens, self.input_tokens
                ),
            ));
        }
        if let Some(cost) = self.cost
            && cost.is_negative()
        {
            return Err(Error::invalid("cost", format!("{cost} is negative")));
        }
        for (what, value) in [
            ("input tokens", self.input_tokens),
            ("output tokens", self.output_tokens),
            ("units", self.units),
        ] {
            if value > i64::MAX as u64 {
                return Err(Error::invalid(what, format!("{value} is too large")));
            }
        }
        Ok(())
    }
}

/// Rejects an empty, over-long or control-character identifier from a caller.
pub(crate) fn validate_id(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            what,
            format!(
                "{:?} is {} bytes, over the limit of {MAX_ID_LEN}",
                excerpt(value),
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(
            what,
            format!("{:?} contains a control character", excerpt(value)),
        ));
    }
    Ok(())
}

/// A priced usage event, as the ledger keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LedgerEntry {
    /// The idempotency key.
    pub request_id: String,
    /// When it happened.
    pub at: Timestamp,
    /// The service that spent.
    pub service: String,
    /// The user on whose behalf.
    pub user: String,
    /// The model.
    pub model: String,
    /// The operation.
    pub operation: String,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Other billable units.
    pub units: u64,
    /// Where it was served from.
    pub source: UsageSource,
    /// What it cost (zero for cache and dedup, and for unpriced models).
    pub cost: MicroUsd,
    /// What serving it from a cache or dedup saved.
    pub saved: MicroUsd,
    /// False when the model had no price: the cost is unknown, not zero.
    pub priced: bool,
}

impl LedgerEntry {
    /// Input plus output tokens.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}
