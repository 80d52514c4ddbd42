//! The one error type of the crate.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error from a caller's loader or from a backend, kept as a `source()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of every fallible pupkit call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in pupkit.
///
/// Backend errors (Redis, ...) are kept only as [`std::error::Error::source`], so an optional
/// dependency never shows up in a signature. Ask questions with [`Error::is_timeout`],
/// [`Error::is_invalid_input`] and [`Error::is_backend`] rather than matching on variants.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A caller-supplied value (key, tag, option, size) was rejected before anything was sent.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was rejected ("cache key", "tag", "ttl", ...).
        what: &'static str,
        /// Why, including the offending value (truncated if long).
        reason: String,
    },

    /// A value was larger than the configured maximum.
    #[error("value for key {key:?} is {size} bytes encoded, over the limit of {limit} bytes")]
    ValueTooLarge {
        /// The key (truncated if long).
        key: String,
        /// The encoded size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// A value could not be serialized or deserialized.
    #[error("could not {action} value for key {key:?}")]
    Codec {
        /// `"encode"` or `"decode"`.
        action: &'static str,
        /// The key (truncated if long).
        key: String,
        /// The serde error.
        #[source]
        source: BoxError,
    },

    /// Stored data is not valid: a cache envelope that is garbage, truncated or of a future
    /// format version, or a ledger row that breaks its invariants.
    #[error("stored data is not valid: {reason}")]
    Corrupt {
        /// What was wrong with the bytes.
        reason: String,
    },

    /// A backend (Redis, ...) failed.
    #[error("{backend} {operation} failed")]
    Backend {
        /// The backend ("redis", ...).
        backend: &'static str,
        /// The operation that failed ("probe", "write", "invalidate", ...).
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },

    /// A backend call did not answer within its deadline.
    #[error("{backend} {operation} timed out after {after:?}")]
    Timeout {
        /// The backend ("redis", ...).
        backend: &'static str,
        /// The operation that timed out.
        operation: &'static str,
        /// The configured deadline.
        after: Duration,
    },

    /// A backend was not called because its circuit breaker is open.
    #[error(
        "{backend} {operation} skipped: circuit breaker open after repeated failures (next probe in {retry_in:?})"
    )]
    Unavailable {
        /// The backend ("redis", ...).
        backend: &'static str,
        /// The operation that was skipped.
        operation: &'static str,
        /// Time left before the breaker lets a probe through.
        retry_in: Duration,
    },

    /// A remote API refused a call with an HTTP error status, or answered with something that
    /// breaks its contract (malformed JSON, a missing or repeated index, vectors of the wrong
    /// size). Never carries a credential.
    #[error("{backend} API {}: {message}", api_phrase(*status, kind.as_deref(), code.as_deref()))]
    Api {
        /// The API ("openai", ...).
        backend: &'static str,
        /// The HTTP status; a 2xx status means the answer itself was not valid.
        status: u16,
        /// The error's `type`, when the API gave one (`invalid_request_error`,
        /// `insufficient_quota`, ...).
        kind: Option<String>,
        /// The error's `code`, when the API gave one (`rate_limit_exceeded`,
        /// `invalid_api_key`, ...).
        code: Option<String>,
        /// What the API said (secrets removed, truncated if long), or what was wrong with its
        /// answer.
        message: String,
    },

    /// A statement failed in the database (or its connection broke).
    #[error("postgres statement {statement:?} failed{}", code.as_deref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default())]
    Database {
        /// The statement text (truncated if long); parameters are never included.
        statement: String,
        /// The SQLSTATE, when the database answered with an error.
        code: Option<String>,
        /// The statement was cancelled by `statement_timeout`.
        timed_out: bool,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// No pooled connection became free within the checkout timeout.
    #[error(
        "no postgres connection free within {after:?}: pool of {size} open (max {max_size}), {waiters} callers waiting"
    )]
    PoolExhausted {
        /// The checkout timeout.
        after: Duration,
        /// Open connections.
        size: u32,
        /// The pool's maximum.
        max_size: u32,
        /// Callers waiting, this one included.
        waiters: u64,
    },

    /// A hard budget refused a reservation: the call would take its period past the cap.
    #[error(
        "budget for {scope} exhausted: spent {spent} and reserved {reserved} of {amount} {}, so {estimate} more does not fit{}",
        period_phrase(period),
        resets_at.map(|t| format!(" (resets {t})")).unwrap_or_default()
    )]
    BudgetExceeded {
        /// Whose budget (`global`, `service "x"`, `user "y"`).
        scope: String,
        /// `day`, `week`, `month` or `rolling`.
        period: &'static str,
        /// The cap.
        amount: crate::cost::MicroUsd,
        /// Spend so far in the period.
        spent: crate::cost::MicroUsd,
        /// Held by live reservations.
        reserved: crate::cost::MicroUsd,
        /// What this call asked for.
        estimate: crate::cost::MicroUsd,
        /// When the period ends (none for a rolling window).
        resets_at: Option<jiff::Timestamp>,
    },

    /// The caller's loader failed; its error is the source.
    #[error("loader for key {key:?} failed")]
    Loader {
        /// The key being loaded (for batch loads, the first missing key).
        key: String,
        /// The loader's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// True when a backend call ran past its deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::PoolExhausted { .. }
                | Error::Database {
                    timed_out: true,
                    ..
                }
        )
    }

    /// True when the caller's input was rejected (bad key, tag, option or oversized value).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidInput { .. } | Error::ValueTooLarge { .. }
        )
    }

    /// True when a backend failed, timed out, was skipped by its open circuit breaker, or (for
    /// a remote API) refused the call.
    pub fn is_backend(&self) -> bool {
        matches!(
            self,
            Error::Backend { .. }
                | Error::Timeout { .. }
                | Error::Unavailable { .. }
                | Error::Database { .. }
                | Error::PoolExhausted { .. }
                | Error::Api { .. }
        )
    }

    /// True when a remote API refused a call or answered against its contract; the variant's
    /// `status`, `kind` and `code` say how.
    pub fn is_api_error(&self) -> bool {
        matches!(self, Error::Api { .. })
    }

    /// True when a hard budget refused a reservation.
    pub fn is_budget_exceeded(&self) -> bool {
        matches!(self, Error::BudgetExceeded { .. })
    }

    /// True when the caller's loader failed.
    pub fn is_loader(&self) -> bool {
        matches!(self, Error::Loader { .. })
    }

    pub(crate) fn invalid(what: &'static str, reason: impl fmt::Display) -> Self {
        Error::InvalidInput {
            what,
            reason: reason.to_string(),
        }
    }

    pub(crate) fn corrupt(reason: impl fmt::Display) -> Self {
        Error::Corrupt {
            reason: reason.to_string(),
        }
    }
}

/// `answered HTTP 429 (insufficient_quota)`, or for a 2xx status `answered HTTP 200 with an
/// invalid response`: how an API error reads in a sentence.
fn api_phrase(status: u16, kind: Option<&str>, code: Option<&str>) -> String {
    if status < 300 {
        return format!("answered HTTP {status} with an invalid response");
    }
    let details: Vec<&str> = match (kind, code) {
        (Some(k), Some(c)) if k == c => vec![k],
        (k, c) => k.into_iter().chain(c).collect(),
    };
    if details.is_empty() {
        format!("answered HTTP {status}")
    } else {
        format!("answered HTTP {status} ({})", details.join(", "))
    }
}

/// `day` → `today`, `month` → `this month`: how a budget period reads in a sentence.
fn period_phrase(period: &str) -> String {
    match period {
        "day" => "today".to_owned(),
        "rolling" => "in its rolling window".to_owned(),
        other => format!("this {other}"),
    }
}

/// One receiver's copy of an error that several receive (an `Error` is not `Clone`): the
/// callers of one batched call, say. Invalid input, unavailability, API errors and timeouts
/// keep their kind; a backend error keeps its backend, operation and cause; anything else
/// becomes a backend error of `operation` on `backend`, with the original as its source.
pub(crate) fn share(error: &Arc<Error>, backend: &'static str, operation: &'static str) -> Error {
    match &**error {
        Error::InvalidInput { what, reason } => Error::InvalidInput {
            what,
            reason: reason.clone(),
        },
        Error::Unavailable {
            backend,
            operation,
            retry_in,
        } => Error::Unavailable {
            backend,
            operation,
            retry_in: *retry_in,
        },
        Error::Api {
            backend,
            status,
            kind,
            code,
            message,
        } => Error::Api {
            backend,
            status: *status,
            kind: kind.clone(),
            code: code.clone(),
            message: message.clone(),
        },
        Error::Timeout {
            backend,
            operation,
            after,
        } => Error::Timeout {
            backend,
            operation,
            after: *after,
        },
        Error::Backend {
            backend, operation, ..
        } => Error::Backend {
            backend,
            operation,
            source: Box::new(Shared {
                error: error.clone(),
                cause_only: true,
            }),
        },
        _ => Error::Backend {
            backend,
            operation,
            source: Box::new(Shared {
                error: error.clone(),
                cause_only: false,
            }),
        },
    }
}

/// The source of a [`share`]d error: the original error, or only its cause (when the copy
/// already says what the original said).
#[derive(Debug)]
struct Shared {
    error: Arc<Error>,
    cause_only: bool,
}

impl Shared {
    fn shown(&self) -> &(dyn std::error::Error + 'static) {
        let error: &(dyn std::error::Error + 'static) = &*self.error;
        match (self.cause_only, error.source()) {
            (true, Some(cause)) => cause,
            _ => error,
        }
    }
}

impl fmt::Display for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.shown(), f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.shown().source()
    }
}

/// Shortens caller-supplied text for an error message, so a 1 MiB key does not become a
/// 1 MiB error.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
        assert_eq!(excerpt("user:42"), "user:42");
        let long = "é".repeat(100);
        let cut = excerpt(&long);
        assert!(cut.ends_with("(200 bytes)"), "{cut}");
        assert!(cut.len() < 100);
    }

    #[test]
    fn shared_copies_keep_the_kind_and_the_whole_cause() {
        let chain = |e: &dyn std::error::Error| {
            let mut text = e.to_string();
            let mut next = e.source();
            while let Some(cause) = next {
                text = format!("{text}: {cause}");
                next = cause.source();
            }
            text
        };
        let reset = Arc::new(Error::Backend {
            backend: "redis",
            operation: "probe",
            source: "connection reset".into(),
        });
        let copy = share(&reset, "redis", "probe");
        assert!(copy.is_backend());
        assert_eq!(chain(&copy), "redis probe failed: connection reset");
        let timeout = Arc::new(Error::Timeout {
            backend: "redis",
            operation: "probe",
            after: Duration::from_millis(100),
        });
        assert!(share(&timeout, "x", "y").is_timeout());
        let invalid = Arc::new(Error::invalid("texts", "empty"));
        assert!(share(&invalid, "x", "y").is_invalid_input());
        let other = Arc::new(Error::corrupt("bad magic"));
        let copy = share(&other, "embeddings", "embed batch");
        assert_eq!(
            chain(&copy),
            format!("embeddings embed batch failed: {}", chain(&*other))
        );
    }

    #[test]
    fn questions_answer_by_kind() {
        let e = Error::invalid("cache key", "empty");
        assert!(e.is_invalid_input() && !e.is_backend() && !e.is_timeout());
        let t = Error::Timeout {
            backend: "redis",
            operation: "probe",
            after: Duration::from_millis(50),
        };
        assert!(t.is_timeout() && t.is_backend());
        assert_eq!(t.to_string(), "redis probe timed out after 50ms");
        let api = Error::Api {
            backend: "openai",
            status: 429,
            kind: Some("insufficient_quota".into()),
            code: Some("insufficient_quota".into()),
            message: "You exceeded your current quota".into(),
        };
        assert!(api.is_api_error() && api.is_backend() && !api.is_invalid_input());
        assert_eq!(
            api.to_string(),
            "openai API answered HTTP 429 (insufficient_quota): You exceeded your current quota"
        );
    }
}
