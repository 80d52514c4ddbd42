//! The price table: per-model prices with effective dates, shipped as data.

use std::collections::HashMap;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use super::event::{Usage, UsageSource};
use super::money::{MicroUsd, round_div};
use crate::error::{Error, Result, excerpt};

/// The table that ships with the crate (`src/cost/prices.json`).
const BUILTIN: &str = include_str!("prices.json");

/// One model's prices from a date on, in micro-dollars per million tokens.
///
/// A missing `cached_input` price falls back to `input`; missing batch prices fall back to
/// the standard ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ModelPrice {
    /// The model name, exactly as usage reports it (a dated snapshot such as
    /// `gpt-4o-2024-08-06` also matches `gpt-4o`).
    pub model: String,
    /// The first day (UTC) these prices apply.
    pub effective_from: Date,
    /// Input tokens.
    #[serde(default)]
    pub input: i64,
    /// Input tokens served from the provider's prompt cache.
    #[serde(default)]
    pub cached_input: Option<i64>,
    /// Output tokens.
    #[serde(default)]
    pub output: i64,
    /// Input tokens through the batch API.
    #[serde(default)]
    pub batch_input: Option<i64>,
    /// Output tokens through the batch API.
    #[serde(default)]
    pub batch_output: Option<i64>,
    /// Micro-dollars per other billable unit.
    #[serde(default)]
    pub unit_price: i64,
}

impl ModelPrice {
    /// Prices for `model` from `effective_from`: input and output per million tokens.
    pub fn new(
        model: impl Into<String>,
        effective_from: Date,
        input: MicroUsd,
        output: MicroUsd,
    ) -> Self {
        ModelPrice {
            model: model.into(),
            effective_from,
            input: input.micros(),
            cached_input: None,
            output: output.micros(),
            batch_input: None,
            batch_output: None,
            unit_price: 0,
        }
    }

    /// What `usage` costs at these prices, rounded to the micro-dollar, as the source says;
    /// `None` when it has units and the model has no unit price.
    fn cost_of(&self, usage: &Usage, source: UsageSource) -> Option<MicroUsd> {
        if usage.units > 0 && self.unit_price == 0 {
            return None;
        }
        let (input, output) = match source {
            UsageSource::Batch => (
                self.batch_input.unwrap_or(self.input),
                self.batch_output.unwrap_or(self.output),
            ),
            _ => (self.input, self.output),
        };
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let uncached = usage.input_tokens - cached;
        let per_million = uncached as i128 * input as i128
            + cached as i128 * self.cached_input.unwrap_or(input) as i128
            + usage.output_tokens as i128 * output as i128;
        let units = usage.units as i128 * self.unit_price as i128;
        Some(MicroUsd::from_micros(
            round_div(per_million, 1_000_000)
                .saturating_add(units.clamp(0, i64::MAX as i128) as i64),
        ))
    }

    fn validate(&self) -> Result<()> {
        super::event::validate_id("model", &self.model)?;
        let prices = [
            Some(self.input),
            self.cached_input,
            Some(self.output),
            self.batch_input,
            self.batch_output,
            Some(self.unit_price),
        ];
        if prices.into_iter().flatten().any(|p| p < 0) {
            return Err(Error::invalid(
                "price",
                format!("model {:?} has a negative price", excerpt(&self.model)),
            ));
        }
        Ok(())
    }
}

/// What the price table made of one usage event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priced {
    /// What it cost.
    pub cost: MicroUsd,
    /// What a cache or dedup saved.
    pub saved: MicroUsd,
    /// False when the model has no price on that date (cost and saving are then zero and
    /// unknown).
    pub priced: bool,
}

#[derive(Deserialize)]
struct PriceFile {
    models: Vec<ModelPrice>,
}

/// Model prices with effective dates. [`PriceTable::builtin`] ships OpenAI's embedding and
/// chat models; a host overrides or adds models with [`insert`](Self::insert) or its own JSON.
///
/// ```
/// use pupkit::cost::{PriceTable, Usage};
///
/// let table = PriceTable::builtin();
/// let usage = Usage::new("r1", "search", "u1", "text-embedding-3-small").tokens(1_000_000, 0);
/// let priced = table.price(&usage, jiff::Timestamp::now());
/// assert_eq!(priced.cost.micros(), 20_000); // $0.02 per million tokens
/// ```
#[derive(Clone, Debug, Default)]
pub struct PriceTable {
    /// Per model, its prices sorted by effective date.
    models: HashMap<String, Vec<ModelPrice>>,
}

impl PriceTable {
    /// An empty table: every model is unpriced.
    pub fn empty() -> Self {
        PriceTable::default()
    }

    /// The table that ships with the crate (as of the date in `src/cost/prices.json`).
    pub fn builtin() -> Self {
        // The file is part of the crate and parsed by a unit test, so this cannot fail.
        PriceTable::from_json(BUILTIN).unwrap_or_default()
    }

    /// A table from JSON in the shipped format: `{"models": [{"model", "effective_from",
    /// "input", "output", ...}]}`, prices in micro-dollars per million tokens.
    pub fn from_json(json: &str) -> Result<Self> {
        let file: PriceFile = serde_json::from_str(json)
            .map_err(|e| Error::invalid("price table", format!("not valid price JSON: {e}")))?;
        let mut table = PriceTable::empty();
        for price in file.models {
            table.insert(price)?;
        }
        Ok(table)
    }

    /// Adds prices for a model from a date. Prices for the same model and date replace the
    /// old ones.
    pub fn insert(&mut self, price: ModelPrice) -> Result<()> {
        price.validate()?;
        let versions = self.models.entry(price.model.clone()).or_default();
        versions.retain(|p| p.effective_from != price.effective_from);
        versions.push(price);
        versions.sort_by_key(|p| p.effective_from);
        Ok(())
    }

    /// The prices of `model` in effect at `at`, if any.
    pub fn lookup(&self, model: &str, at: Timestamp) -> Option<&ModelPrice> {
        let day = at.to_zoned(TimeZone::UTC).date();
        let versions = self
            .models
            .get(model)
            .or_else(|| self.models.get(strip_snapshot_date(model)?))?;
        versions.iter().rev().find(|p| p.effective_from <= day)
    }

    /// Every model the table prices.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Prices one usage event at `at`.
    pub fn price(&self, usage: &Usage, at: Timestamp) -> Priced {
        let saving = usage.source.is_saving();
        let known = match usage.cost {
            Some(cost) => Some(cost),
            None => self
                .lookup(&usage.model, at)
                .and_then(|p| p.cost_of(usage, usage.source)),
        };
        match known {
            None => Priced {
                cost: MicroUsd::ZERO,
                saved: MicroUsd::ZERO,
                priced: false,
            },
            Some(amount) if saving => Priced {
                cost: MicroUsd::ZERO,
                saved: amount,
                priced: true,
            },
            Some(amount) => Priced {
                cost: amount,
                saved: MicroUsd::ZERO,
                priced: true,
            },
        }
    }
}

/// `gpt-4o-2024-08-06` → `gpt-4o`: the model family of a dated snapshot name.
fn strip_snapshot_date(model: &str) -> Option<&str> {
    let (base, date) = model.len().checked_sub(11).map(|i| model.split_at(i))?;
    let date = date.strip_prefix('-')?;
    let looks_like_date = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    looks_like_date.then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn at(day: Date) -> Timestamp {
        day.to_zoned(TimeZone::UTC).unwrap().timestamp()
    }

    #[test]
    fn builtin_table_parses_and_prices_embeddings() {
        let table = PriceTable::from_json(BUILTIN).expect("shipped table parses");
        let now = at(date(2026, 11, 1));
        for model in [
            "text-embedding-3-small",
            "text-embedding-3-large",
            "text-embedding-ada-002",
            "gpt-4o-mini",
        ] {
            assert!(table.lookup(model, now).is_some(), "{model} priced");
        }
        let large = Usage::new("r", "s", "u", "text-embedding-3-large").tokens(2_000_000, 0);
        assert_eq!(table.price(&large, now).cost.micros(), 260_000);
        let batch = large.clone().source(UsageSource::Batch);
        assert_eq!(table.price(&batch, now).cost.micros(), 130_000);
    }

    #[test]
    fn chat_prices_split_cached_input_and_output() {
        let table = PriceTable::builtin();
        let usage = Usage::new("r", "s", "u", "gpt-4o-mini")
            .tokens(1_000_000, 1_000_000)
            .cached_input_tokens(400_000);
        // 600k x $0.15 + 400k x $0.075 + 1M x $0.60
        let priced = table.price(&usage, at(date(2026, 1, 1)));
        assert_eq!(priced.cost.micros(), 90_000 + 30_000 + 600_000);
    }

    #[test]
    fn effective_dates_pick_the_price_of_the_day() {
        let mut table = PriceTable::empty();
        let old = ModelPrice::new(
            "m",
            date(2025, 1, 1),
            MicroUsd::from_dollars(1),
            MicroUsd::ZERO,
        );
        let new = ModelPrice::new(
            "m",
            date(2026, 1, 1),
            MicroUsd::from_dollars(2),
            MicroUsd::ZERO,
        );
        table.insert(new).unwrap();
        table.insert(old).unwrap();
        let usage = Usage::new("r", "s", "u", "m").tokens(1_000_000, 0);
        assert_eq!(
            table.price(&usage, at(date(2025, 6, 1))).cost.micros(),
            1_000_000
        );
        assert_eq!(
            table.price(&usage, at(date(2026, 6, 1))).cost.micros(),
            2_000_000
        );
        assert!(!table.price(&usage, at(date(2024, 6, 1))).priced);
    }

    #[test]
    fn unknown_models_are_unpriced_not_free_and_snapshots_match_their_family() {
        let table = PriceTable::builtin();
        let now = at(date(2026, 11, 1));
        let unknown = Usage::new("r", "s", "u", "mystery-model").tokens(1000, 1000);
        assert!(!table.price(&unknown, now).priced);
        // Units on a model without a unit price are unknown too, not free.
        let images = Usage::new("r", "s", "u", "gpt-4o").units(3);
        assert!(!table.price(&images, now).priced);
        // A snapshot with prices of its own is not priced as its family.
        let may = Usage::new("r", "s", "u", "gpt-4o-2024-05-13").tokens(1_000_000, 0);
        assert_eq!(table.price(&may, now).cost.micros(), 5_000_000);
        let snapshot = Usage::new("r", "s", "u", "gpt-4o-mini-2024-07-18").tokens(1_000_000, 0);
        assert_eq!(table.price(&snapshot, now).cost.micros(), 150_000);
    }

    #[test]
    fn cache_hits_cost_nothing_and_record_the_saving() {
        let table = PriceTable::builtin();
        let usage = Usage::new("r", "s", "u", "text-embedding-3-small")
            .tokens(1_000_000, 0)
            .source(UsageSource::Cache);
        let priced = table.price(&usage, at(date(2026, 11, 1)));
        assert_eq!((priced.cost.micros(), priced.saved.micros()), (0, 20_000));
    }

    #[test]
    fn bad_json_and_negative_prices_are_refused() {
        assert!(PriceTable::from_json("{").unwrap_err().is_invalid_input());
        let negative = r#"{"models":[{"model":"m","effective_from":"2026-01-01","input":-1}]}"#;
        assert!(
            PriceTable::from_json(negative)
                .unwrap_err()
                .is_invalid_input()
        );
    }
}
