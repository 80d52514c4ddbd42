//! Alerts: what the meter raises, and the sinks it sends them through.

use std::fmt;
use std::sync::Mutex;
#[cfg(feature = "webhook")]
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::budget::Scope;
use super::money::MicroUsd;
use crate::error::Result;

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertKind {
    /// Spend in a budget's period crossed one of its thresholds.
    ThresholdCrossed,
    /// The period's run rate projects spend past the budget.
    ProjectedToExceed,
    /// A user's or service's cost in a bucket was over the anomaly factor times its trailing
    /// average.
    Anomaly,
    /// Usage of a model with no price was recorded: its cost is unknown.
    UnpricedModel,
    /// The host's p95 request latency over the monitor's window passed its limit.
    LatencyHigh,
    /// The host's share of failed requests over the monitor's window passed its limit.
    ErrorRateHigh,
    /// A cache's hit rate over the monitor's window fell under its limit.
    CacheHitRateLow,
}

impl AlertKind {
    /// The name used in keys and payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::ThresholdCrossed => "threshold_crossed",
            AlertKind::ProjectedToExceed => "projected_to_exceed",
            AlertKind::Anomaly => "anomaly",
            AlertKind::UnpricedModel => "unpriced_model",
            AlertKind::LatencyHigh => "latency_high",
            AlertKind::ErrorRateHigh => "error_rate_high",
            AlertKind::CacheHitRateLow => "cache_hit_rate_low",
        }
    }
}

/// One alert. It fires at most once per entity, kind, threshold and period.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Alert {
    /// What it is about.
    pub kind: AlertKind,
    /// Who: `global`, `service "x"`, `user "y"`, or the unpriced model's name.
    pub entity: String,
    /// The budget's scope, for budget alerts.
    pub scope: Option<Scope>,
    /// The threshold crossed, in percent.
    pub threshold: Option<u32>,
    /// The period it is about: the budget's (`day`, `week`, `month`, `rolling3600`), the
    /// anomaly's bucket (`hour`, `day`), or `day` for an unpriced model.
    pub period: String,
    /// The start of the period (or bucket) it is about. For a rolling budget, the start of
    /// the current stretch of one window length since the epoch, so it alerts at most once per
    /// window length.
    pub period_start: Timestamp,
    /// Spend so far in the period (or the bucket's cost), in micro-dollars.
    pub spent: MicroUsd,
    /// The budget's amount, for budget alerts.
    pub budget: Option<MicroUsd>,
    /// Spend as a percentage of the budget.
    pub percent_used: Option<f64>,
    /// The projected end-of-period spend.
    pub projected: Option<MicroUsd>,
    /// The expected value (the trailing average), for anomalies.
    pub expected: Option<MicroUsd>,
    /// Spend over the expected value, for anomalies.
    pub excess: Option<MicroUsd>,
    /// The measured value, for the monitor's alerts (p95 in ms, error rate, hit rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<f64>,
    /// The limit it passed, in the same unit as `observed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    /// A sentence for humans.
    pub message: String,
    /// When it was raised.
    pub at: Timestamp,
}

impl Alert {
    /// The dedup key: entity, kind, threshold and period.
    pub fn dedup_key(&self) -> String {
        format!(
            "{}|{}|{}|{}@{}",
            self.kind.as_str(),
            super::budget::escape_key(&self.entity),
            self.threshold.unwrap_or(0),
            super::budget::escape_key(&self.period),
            self.period_start.as_second()
        )
    }
}

/// Where alerts go. Implementations should not block for long: the meter calls them from a
/// spawned task, one alert at a time.
#[async_trait]
pub trait AlertSink: Send + Sync + fmt::Debug {
    /// Delivers one alert.
    async fn send(&self, alert: &Alert) -> Result<()>;
}

/// Logs each alert as a `tracing` warning (target `pupkit::cost::alert`).
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingSink;

#[async_trait]
impl AlertSink for TracingSink {
    async fn send(&self, alert: &Alert) -> Result<()> {
        tracing::warn!(
            target: "pupkit::cost::alert",
            kind = alert.kind.as_str(),
            entity = %alert.entity,
            threshold = alert.threshold,
            spent_micros = alert.spent.micros(),
            "{}",
            alert.message
        );
        Ok(())
    }
}

/// Keeps every alert in memory: for tests and for hosts that poll.
#[derive(Debug, Default)]
pub struct MemorySink {
    alerts: Mutex<Vec<Alert>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        MemorySink::default()
    }

    /// Every alert delivered so far.
    pub fn alerts(&self) -> Vec<Alert> {
        self.alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl AlertSink for MemorySink {
    async fn send(&self, alert: &Alert) -> Result<()> {
        self.alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(alert.clone());
        Ok(())
    }
}

/// The signature a [`WebhookSink`] puts in its `X-Pupkit-Signature` header:
/// `v1=` and the hex HMAC-SHA256 of `"{timestamp}.{body}"` under the shared secret. A receiver
/// recomputes it (and rejects old timestamps) to check that the alert is genuine.
pub fn webhook_signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", crate::hex::to_hex(&mac.finalize().into_bytes()))
}

/// Posts each alert as JSON to a URL, signed with HMAC-SHA256 (see [`webhook_signature`]),
/// retrying failures with exponential backoff (feature `webhook`).
#[cfg(feature = "webhook")]
pub struct WebhookSink {
    url: String,
    secret: Vec<u8>,
    client: reqwest::Client,
    attempts: u32,
}

#[cfg(feature = "webhook")]
impl fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSink")
            .field("url", &crate::redact::redact_url(&self.url))
            .field("secret", &"<redacted>")
            .field("attempts", &self.attempts)
            .finish()
    }
}

#[cfg(feature = "webhook")]
impl WebhookSink {
    /// A sink posting to `url`, signing with `secret`, with a 5 s timeout per attempt and
    /// three attempts.
    pub fn new(url: impl Into<String>, secret: impl Into<Vec<u8>>) -> Result<Self> {
        let url = url.into();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(crate::Error::invalid(
                "webhook url",
                format!(
                    "{:?} is not an http(s) URL",
                    crate::redact::redact_url(&url)
                ),
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| crate::Error::Backend {
                backend: "webhook",
                operation: "build client",
                source: Box::new(e),
            })?;
        Ok(WebhookSink {
            url,
            secret: secret.into(),
            client,
            attempts: 3,
        })
    }

    /// Sets the number of attempts per alert (at least 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }
}

#[cfg(feature = "webhook")]
#[async_trait]
impl AlertSink for WebhookSink {
    async fn send(&self, alert: &Alert) -> Result<()> {
        let body = serde_json::to_vec(alert).map_err(|e| crate::Error::Codec {
            action: "encode",
            key: "alert".to_owned(),
            source: Box::new(e),
        })?;
        let mut last_error = None;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt.min(6))).await;
            }
            let timestamp = Timestamp::now().as_second();
            let result = self
                .client
                .post(&self.url)
                .header("content-type", "application/json")
                .header("x-pupkit-timestamp", timestamp.to_string())
                .header(
                    "x-pupkit-signature",
                    webhook_signature(&self.secret, timestamp, &body),
                )
                .body(body.clone())
                .send()
                .await
                .and_then(|response| response.error_for_status());
            match result {
                Ok(_) => return Ok(()),
                // A 4xx other than 408/429 will not get better by retrying.
                Err(error)
                    if error.status().is_some_and(|s| {
                        s.is_client_error() && s.as_u16() != 408 && s.as_u16() != 429
                    }) =>
                {
                    last_error = Some(error);
                    break;
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(crate::Error::Backend {
            backend: "webhook",
            operation: "send alert",
            source: match last_error {
                Some(error) => Box::new(error.without_url()),
                None => "no attempt made".into(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac secret
        let signature = webhook_signature(b"secret", 1_700_000_000, b"{}");
        assert_eq!(
            signature,
            "v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        assert_ne!(signature, webhook_signature(b"other", 1_700_000_000, b"{}"));
        assert_ne!(
            signature,
            webhook_signature(b"secret", 1_700_000_001, b"{}")
        );
    }
}
