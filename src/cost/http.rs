//! The cost endpoints as an axum [`Router`] (feature `axum`): [`CostRoutes`], whose docs list
//! the routes, their input and their errors, and the [`AuthHook`] that guards them.
//!
//! Mounting them in a host's router, behind a bearer token:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use pupkit::cost::{CostMeter, CostRoutes, Meter};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let meter: Arc<dyn CostMeter> = Arc::new(Meter::builder().build().await?);
//! let token = std::env::var("COST_API_TOKEN")?;
//! let app = axum::Router::new()
//!     // ... the host's own routes ...
//!     .merge(CostRoutes::new(meter).bearer_token(token).router());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde_json::{Map, Value};
use sha2::Sha256;

use super::budget::{Budget, Mode, Period, Scope};
use super::event::validate_id;
use super::meter::CostMeter;
use super::money::MicroUsd;
use super::report::{ReportPeriod, SortBy};
use super::store::LedgerQuery;
use crate::error::{Error, excerpt};

/// The largest request body accepted, in bytes.
const BODY_LIMIT: usize = 16 * 1024;

/// The largest page of a user breakdown; a larger `limit` is lowered to it.
const MAX_PAGE: usize = 1000;

/// A host-supplied check that runs before every cost route.
///
/// It sees the request head (method, URI, headers, extensions: whatever the host's own
/// middleware put there) and answers `true` to let the request through. A refused request gets
/// `401` with `WWW-Authenticate: Bearer` and a JSON error body. The check is synchronous; a host
/// that must look a session up asynchronously does so in its own middleware and leaves its
/// verdict in the request extensions for the hook to read.
///
/// ```
/// use pupkit::cost::AuthHook;
///
/// // A shared secret, compared in constant time:
/// let bearer = AuthHook::bearer("s3cret");
/// // Or any check on the request head:
/// let internal = AuthHook::new(|parts| parts.headers.contains_key("x-internal-caller"));
/// ```
#[derive(Clone)]
pub struct AuthHook(Arc<dyn Fn(&Parts) -> bool + Send + Sync>);

impl AuthHook {
    /// A hook that lets a request through when `check` returns `true`.
    pub fn new(check: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        AuthHook(Arc::new(check))
    }

    /// A hook that wants exactly one `Authorization: Bearer <token>` header with this token.
    ///
    /// The comparison runs in constant time (an HMAC of each side, compared with
    /// [`Mac::verify_slice`]), so neither the token nor its length can be learned by timing
    /// answers. Whitespace around `token` is ignored (a token read from a file keeps its
    /// newline); an empty one lets nothing through.
    pub fn bearer(token: impl Into<String>) -> Self {
        let token = token.into();
        let token = token.trim();
        let key = crate::random::random_u128().to_le_bytes();
        let tag = (!token.is_empty()).then(|| keyed_digest(&key, token.as_bytes()));
        AuthHook::new(move |parts| {
            let Some(tag) = &tag else { return false };
            let Some(presented) = bearer_of(&parts.headers) else {
                return false;
            };
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
                return false;
            };
            mac.update(presented);
            mac.verify_slice(tag).is_ok()
        })
    }

    pub(crate) fn allows(&self, parts: &Parts) -> bool {
        (self.0)(parts)
    }
}

impl fmt::Debug for AuthHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthHook(..)")
    }
}

fn keyed_digest(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length, so this cannot fail; an empty tag would match nothing.
    Hmac::<Sha256>::new_from_slice(key)
        .map(|mut mac| {
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        })
        .unwrap_or_default()
}

/// The token of the one `Authorization: Bearer <token>` header, if there is exactly one.
fn bearer_of(headers: &HeaderMap) -> Option<&[u8]> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = value.as_bytes();
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The cost endpoints over a [`CostMeter`], as an axum [`Router`].
///
/// | route | answers |
/// |---|---|
/// | `GET /api/costs/realtime` | [`Realtime`](super::Realtime) |
/// | `GET /api/costs/report/{period}?from&to` | [`Report`](super::Report); `period` is `day`, `week`, `month` or `custom`, which needs `from` and `to` (at most 366 days apart) |
/// | `POST /api/costs/budget/{userId}` | sets the user's budget (body below); its [`BudgetStatus`](super::BudgetStatus) |
/// | `GET /api/costs/export/csv?from&to&service&user&model` | the selected ledger events as CSV ([`CSV_COLUMNS`](super::CSV_COLUMNS)), streamed; `from` defaults to the start of the current UTC month, `to` to the start of the next |
/// | `GET /api/costs/breakdown/user?period&from&to&sort&order&limit&offset` | [`UserBreakdown`](super::UserBreakdown); defaults `period=month`, `sort=cost` (or `tokens`, `requests`, `user`), `order=desc`, `limit=50` (at most 1000), `offset=0` |
///
/// The budget body is JSON (`content-type: application/json`, at most 16 KiB):
/// `{"amount_usd": 10.5, "period": "day" | "week" | "month" | "rolling", "rolling_secs": 3600,
/// "mode": "off" | "alert_only" | "hard", "thresholds": [50, 80, 100], "time_zone": "Europe/Berlin"}`;
/// `amount_usd` and `period` are required, `rolling_secs` goes with `rolling` only, and the
/// defaults are `alert_only`, 50/80/100 and the meter's time zone. Unknown fields and unknown
/// query parameters are refused.
///
/// Money in every JSON answer is integer micro-dollars; timestamps are RFC 3339 (in a query
/// string, send a `+` offset as `%2B`). Errors are JSON `{"error": "<what is wrong>", "field":
/// "<the field>"}`: `400` for bad input (with `field`), `401` from the auth hook (with
/// `WWW-Authenticate: Bearer`), `413` for a body over 16 KiB, `415` for a body that is not
/// JSON, `429` for an exhausted budget, `503` when the spend store or ledger fails (the details
/// go to the log, not to the caller), `500` for anything else.
///
/// [`router`](CostRoutes::router) gives a `Router<()>` with absolute paths: merge it into the
/// host's router (after the host's `with_state`).
///
/// **Set an [`auth`](CostRoutes::auth) hook or a [`bearer_token`](CostRoutes::bearer_token).**
/// Without one every route is open to anyone who can reach the router, and these routes
/// disclose every user's spend and let the caller change budgets.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use pupkit::cost::{CostMeter, CostRoutes, Meter};
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let meter: Arc<dyn CostMeter> = Arc::new(Meter::builder().build().await?);
/// let routes = CostRoutes::new(meter).bearer_token("s3cret");
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(listener, routes.router()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct CostRoutes {
    meter: Arc<dyn CostMeter>,
    auth: Option<AuthHook>,
}

#[derive(Debug)]
struct Shared {
    meter: Arc<dyn CostMeter>,
    auth: Option<AuthHook>,
}

type AppState = State<Arc<Shared>>;

impl CostRoutes {
    /// The routes over `meter`, with no authentication yet.
    pub fn new(meter: Arc<dyn CostMeter>) -> Self {
        CostRoutes { meter, auth: None }
    }

    /// Runs `hook` before every route; a request it refuses gets `401`.
    pub fn auth(mut self, hook: AuthHook) -> Self {
        self.auth = Some(hook);
        self
    }

    /// Wants `Authorization: Bearer <token>` on every request: [`AuthHook::bearer`].
    pub fn bearer_token(self, token: impl Into<String>) -> Self {
        self.auth(AuthHook::bearer(token))
    }

    /// The router: the five routes, the auth hook, and the 16 KiB body limit.
    pub fn router(&self) -> Router {
        if self.auth.is_none() {
            tracing::warn!(
                "pupkit cost routes are served without an auth hook: anyone who can reach them can read all spend and change budgets"
            );
        }
        let shared = Arc::new(Shared {
            meter: self.meter.clone(),
            auth: self.auth.clone(),
        });
        Router::new()
            .route("/api/costs/realtime", get(realtime))
            .route("/api/costs/report/{period}", get(report))
            .route("/api/costs/budget/{userId}", post(set_budget))
            .route("/api/costs/export/csv", get(export_csv))
            .route("/api/costs/breakdown/user", get(user_breakdown))
            .route_layer(middleware::from_fn_with_state(shared.clone(), authorize))
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(shared)
    }
}

/// An error answer: a status and a JSON body `{"error": ..., "field": ...}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field.into()),
        }
    }

    /// Maps a meter error, renaming the field of invalid input from the meter's name to the
    /// route's (`"amount"` to `"amount_usd"`, say).
    fn from_meter(error: Error, rename: impl Fn(&'static str) -> &'static str) -> Self {
        if let Error::InvalidInput { what, reason } = &error {
            let field = rename(what);
            return ApiError::bad(field, format!("invalid {field}: {reason}"));
        }
        if error.is_invalid_input() {
            return ApiError::bad("body", error.to_string());
        }
        if error.is_budget_exceeded() {
            return ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: error.to_string(),
                field: None,
            };
        }
        if error.is_backend() {
            tracing::warn!(%error, source = ?std::error::Error::source(&error), "cost route: backend failed");
            return ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the cost store is unavailable; try again later".to_owned(),
                field: None,
            };
        }
        tracing::error!(%error, source = ?std::error::Error::source(&error), "cost route failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "internal error".to_owned(),
            field: None,
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError::from_meter(error, |what| what)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".to_owned(), Value::String(self.message));
        if let Some(field) = self.field {
            body.insert("field".to_owned(), Value::String(field));
        }
        let mut response = (self.status, axum::Json(Value::Object(body))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn authorize(State(shared): AppState, request: Request, next: Next) -> Response {
    let Some(hook) = &shared.auth else {
        return next.run(request).await;
    };
    let (parts, body) = request.into_parts();
    if !hook.allows(&parts) {
        return ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or invalid credentials".to_owned(),
            field: None,
        }
        .into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

/// Query parameters, checked: only known names, each at most once.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(
        query: Result<Query<Vec<(String, String)>>, QueryRejection>,
        known: &[&str],
    ) -> ApiResult<Self> {
        let Query(pairs) = query.map_err(|r| ApiError::bad("query", r.body_text()))?;
        for (index, (name, _)) in pairs.iter().enumerate() {
            if !known.contains(&name.as_str()) {
                return Err(ApiError::bad(
                    excerpt(name),
                    format!(
                        "unknown query parameter {:?}; expected one of {}",
                        excerpt(name),
                        known.join(", ")
                    ),
                ));
            }
            if pairs[..index].iter().any(|(earlier, _)| earlier == name) {
                return Err(ApiError::bad(
                    name.clone(),
                    format!("query parameter {name:?} is given more than once"),
                ));
            }
        }
        Ok(Params(pairs))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn timestamp(&self, name: &'static str) -> ApiResult<Option<Timestamp>> {
        self.get(name)
            .map(|text| {
                text.parse::<Timestamp>().map_err(|_| {
                    ApiError::bad(
                        name,
                        format!(
                            "{:?} is not an RFC 3339 timestamp such as 2026-01-31T00:00:00Z (send `+` as %2B)",
                            excerpt(text)
                        ),
                    )
                })
            })
            .transpose()
    }

    fn id(&self, name: &'static str) -> ApiResult<Option<String>> {
        self.get(name)
            .map(|value| {
                validate_id(name, value)?;
                Ok(value.to_owned())
            })
            .transpose()
    }

    fn number(&self, name: &'static str, default: usize) -> ApiResult<usize> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text.parse().map_err(|_| {
                ApiError::bad(
                    name,
                    format!("{:?} is not a non-negative integer", excerpt(text)),
                )
            }),
        }
    }

    /// `period` (given, or from the query) with `from` and `to`, which only `custom` takes.
    fn report_period(&self, name: &str) -> ApiResult<ReportPeriod> {
        let from = self.timestamp("from")?;
        let to = self.timestamp("to")?;
        if name == "custom" {
            if from.is_none() {
                return Err(ApiError::bad("from", "period \"custom\" needs `from`"));
            }
            if to.is_none() {
                return Err(ApiError::bad("to", "period \"custom\" needs `to`"));
            }
        } else if let Some(field) = [("from", from), ("to", to)]
            .into_iter()
            .find_map(|(field, value)| value.map(|_| field))
        {
            return Err(ApiError::bad(
                field,
                format!("`{field}` is only taken with period \"custom\""),
            ));
        }
        Ok(ReportPeriod::parse(name, from, to)?)
    }
}

fn path_param(path: Result<Path<String>, PathRejection>, field: &str) -> ApiResult<String> {
    path.map(|Path(value)| value)
        .map_err(|rejection| ApiError::bad(field, rejection.body_text()))
}

/// `GET /api/costs/realtime`
async fn realtime(State(shared): AppState) -> ApiResult<Response> {
    Ok(axum::Json(shared.meter.realtime().await?).into_response())
}

/// `GET /api/costs/report/{period}?from&to`
async fn report(
    State(shared): AppState,
    period: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Response> {
    let name = path_param(period, "period")?;
    let params = Params::parse(query, &["from", "to"])?;
    let period = params.report_period(&name)?;
    Ok(axum::Json(shared.meter.report(period).await?).into_response())
}

/// `GET /api/costs/breakdown/user?period&from&to&sort&order&limit&offset`
async fn user_breakdown(
    State(shared): AppState,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Response> {
    let params = Params::parse(
        query,
        &["period", "from", "to", "sort", "order", "limit", "offset"],
    )?;
    let period = params.report_period(params.get("period").unwrap_or("month"))?;
    let sort = params.get("sort").map(SortBy::parse).transpose()?;
    let descending = match params.get("order") {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::bad(
                "order",
                format!("{:?} is not one of asc, desc", excerpt(other)),
            ));
        }
    };
    let limit = params.number("limit", 50)?.min(MAX_PAGE);
    let offset = params.number("offset", 0)?;
    let breakdown = shared
        .meter
        .user_breakdown(period, sort.unwrap_or_default(), descending, offset, limit)
        .await?;
    Ok(axum::Json(breakdown).into_response())
}

/// `GET /api/costs/export/csv?from&to&service&user&model`: `from` defaults to the start of the
/// current UTC month, `to` to the start of the next.
async fn export_csv(
    State(shared): AppState,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Response> {
    let params = Params::parse(query, &["from", "to", "service", "user", "model"])?;
    let month = Period::Month.window(Timestamp::now(), &TimeZone::UTC);
    let from = params.timestamp("from")?.unwrap_or(month.start);
    let to = params.timestamp("to")?.unwrap_or(month.end);
    if from >= to {
        return Err(ApiError::bad(
            "to",
            format!("{to} is not after `from` {from}"),
        ));
    }
    let mut query = LedgerQuery::between(from, to);
    query.service = params.id("service")?;
    query.user = params.id("user")?;
    query.model = params.id("model")?;

    // The header comes first; waiting for the first rows too means a ledger that fails at
    // once gets an error status instead of a 200 cut short.
    let mut csv = shared.meter.export_csv(&query);
    let mut head = Vec::with_capacity(2);
    for _ in 0..2 {
        match csv.next().await {
            Some(Ok(chunk)) => head.push(chunk),
            Some(Err(error)) => return Err(error.into()),
            None => break,
        }
    }
    let rest = csv.inspect(|chunk| {
        if let Err(error) = chunk {
            tracing::warn!(%error, "CSV export failed part-way; the response is cut short");
        }
    });
    let body = futures_util::stream::iter(head.into_iter().map(Ok::<Bytes, Error>)).chain(rest);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"costs.csv\"",
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// The fields a budget body may have.
const BUDGET_FIELDS: [&str; 6] = [
    "amount_usd",
    "period",
    "rolling_secs",
    "mode",
    "thresholds",
    "time_zone",
];

/// `POST /api/costs/budget/{userId}` with a JSON body.
async fn set_budget(
    State(shared): AppState,
    user: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let user = path_param(user, "userId")?;
    validate_id("user", &user).map_err(|e| ApiError::from_meter(e, rename_budget_field))?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: "the body must be JSON, sent with `content-type: application/json`".to_owned(),
            field: Some("content-type".to_owned()),
        });
    }
    let body = body.map_err(|rejection| ApiError {
        status: rejection.status(),
        message: if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the body is over the limit of {BODY_LIMIT} bytes")
        } else {
            rejection.body_text()
        },
        field: Some("body".to_owned()),
    })?;
    let budget = parse_budget(user, &body)?;
    let rolling = matches!(budget.period, Period::Rolling(_));
    let status = shared.meter.set_budget(budget).await.map_err(|error| {
        ApiError::from_meter(error, |what| match what {
            "period" if rolling => "rolling_secs",
            other => rename_budget_field(other),
        })
    })?;
    Ok(axum::Json(status).into_response())
}

/// The meter's names for budget fields, as the JSON body names them.
fn rename_budget_field(what: &'static str) -> &'static str {
    match what {
        "amount" => "amount_usd",
        "time zone" => "time_zone",
        "user" => "userId",
        other => other,
    }
}

/// Reads a budget body field by field, so every error names its field.
fn parse_budget(user: String, body: &[u8]) -> ApiResult<Budget> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    };
    if let Some(unknown) = fields.keys().find(|k| !BUDGET_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad(
            excerpt(unknown),
            format!(
                "unknown field {:?}; expected {}",
                excerpt(unknown),
                BUDGET_FIELDS.join(", ")
            ),
        ));
    }
    let mut take = |name: &str| fields.remove(name).filter(|v| !v.is_null());

    let amount = take("amount_usd")
        .ok_or_else(|| ApiError::bad("amount_usd", "`amount_usd` is required"))?;
    let amount = amount
        .as_f64()
        .ok_or_else(|| ApiError::bad("amount_usd", format!("{amount} is not a number")))?;
    if amount < 0.0 {
        return Err(ApiError::bad("amount_usd", format!("{amount} is negative")));
    }
    let amount =
        MicroUsd::try_from_usd(amount).map_err(|e| ApiError::from_meter(e, rename_budget_field))?;

    let period = take("period").ok_or_else(|| ApiError::bad("period", "`period` is required"))?;
    let period = string_field("period", &period)?;
    let rolling_secs = take("rolling_secs")
        .map(|v| {
            v.as_u64().ok_or_else(|| {
                ApiError::bad(
                    "rolling_secs",
                    format!("{v} is not a whole number of seconds"),
                )
            })
        })
        .transpose()?;
    let period = match (period, rolling_secs) {
        ("rolling", None) => {
            return Err(ApiError::bad(
                "rolling_secs",
                "period \"rolling\" needs `rolling_secs`",
            ));
        }
        (name, Some(_)) if name != "rolling" => {
            return Err(ApiError::bad(
                "rolling_secs",
                "`rolling_secs` is only taken with period \"rolling\"",
            ));
        }
        (name, secs) => Period::parse(name, secs)?,
    };

    let mut budget = Budget::new(Scope::User(user), amount, period);
    if let Some(mode) = take("mode") {
        budget = budget.mode(Mode::parse(string_field("mode", &mode)?)?);
    }
    if let Some(thresholds) = take("thresholds") {
        let thresholds: Vec<u32> = serde_json::from_value(thresholds).map_err(|_| {
            ApiError::bad(
                "thresholds",
                "`thresholds` must be a list of whole percents such as [50, 80, 100]",
            )
        })?;
        budget = budget.thresholds(thresholds);
    }
    if let Some(tz) = take("time_zone") {
        budget = budget.time_zone(string_field("time_zone", &tz)?);
    }
    Ok(budget)
}

fn string_field<'a>(name: &'static str, value: &'a Value) -> ApiResult<&'a str> {
    value
        .as_str()
        .ok_or_else(|| ApiError::bad(name, format!("`{name}` must be a string, not {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_strictly() {
        assert_eq!(bearer_of(&headers("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer_of(&headers("bearer  abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer_of(&headers("Basic abc")), None);
        assert_eq!(bearer_of(&headers("Bearer ")), None);
        assert_eq!(bearer_of(&headers("Bear")), None);
        let mut two = headers("Bearer abc");
        two.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_of(&two), None);
    }

    #[test]
    fn an_empty_bearer_token_lets_nothing_through() {
        let (parts, ()) = axum::http::Request::builder()
            .header("authorization", "Bearer x")
            .body(())
            .unwrap()
            .into_parts();
        assert!(!AuthHook::bearer("").allows(&parts));
        assert!(AuthHook::bearer("x").allows(&parts));
        assert!(!AuthHook::bearer("xy").allows(&parts));
        assert!(AuthHook::bearer("x\n").allows(&parts));
        assert!(!AuthHook::bearer(" \n").allows(&parts));
    }

    #[test]
    fn meter_errors_map_to_statuses() {
        let status = |error: Error| ApiError::from(error).status;
        assert_eq!(
            status(Error::invalid("sort", "no")),
            StatusCode::BAD_REQUEST
        );
        let exceeded = Error::BudgetExceeded {
            scope: "user \"u1\"".into(),
            period: "day",
            amount: MicroUsd::from_dollars(1),
            spent: MicroUsd::from_dollars(1),
            reserved: MicroUsd::ZERO,
            estimate: MicroUsd::from_micros(5),
            resets_at: None,
        };
        assert_eq!(status(exceeded), StatusCode::TOO_MANY_REQUESTS);
        let timeout = Error::Timeout {
            backend: "redis",
            operation: "read",
            after: std::time::Duration::from_millis(50),
        };
        assert_eq!(status(timeout), StatusCode::SERVICE_UNAVAILABLE);
        let corrupt = ApiError::from(Error::corrupt("bad bytes from redis://secret@host"));
        assert_eq!(corrupt.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!corrupt.message.contains("secret"));
        let renamed = ApiError::from_meter(Error::invalid("time zone", "x"), rename_budget_field);
        assert_eq!(renamed.field.as_deref(), Some("time_zone"));
        assert_eq!(renamed.message, "invalid time_zone: x");
    }

    #[test]
    fn budget_bodies_name_the_bad_field() {
        let field = |body: &str| {
            parse_budget("u1".into(), body.as_bytes())
                .unwrap_err()
                .field
                .unwrap()
        };
        assert_eq!(field(r#"{"period":"day"}"#), "amount_usd");
        assert_eq!(field(r#"{"amount_usd":-1,"period":"day"}"#), "amount_usd");
        assert_eq!(
            field(r#"{"amount_usd":1e300,"period":"day"}"#),
            "amount_usd"
        );
        assert_eq!(
            field(r#"{"amount_usd":"NaN","period":"day"}"#),
            "amount_usd"
        );
        assert_eq!(field(r#"{"amount_usd":1,"period":"year"}"#), "period");
        assert_eq!(
            field(r#"{"amount_usd":1,"period":"rolling"}"#),
            "rolling_secs"
        );
        assert_eq!(
            field(r#"{"amount_usd":1,"period":"day","mode":"soft"}"#),
            "mode"
        );
        assert_eq!(
            field(r#"{"amount_usd":1,"period":"day","thresholds":[-5]}"#),
            "thresholds"
        );
        assert_eq!(
            field(r#"{"amount_usd":1,"period":"day","extra":1}"#),
            "extra"
        );
        assert_eq!(field(r#"{"amount_usd":1,"#), "body");
        assert_eq!(field("[]"), "body");
        let budget = parse_budget(
            "u1".into(),
            br#"{"amount_usd":2.5,"period":"rolling","rolling_secs":3600,"mode":"hard","thresholds":[90],"time_zone":null}"#,
        )
        .unwrap();
        assert_eq!(budget.amount.micros(), 2_500_000);
        assert_eq!(budget.mode, Mode::Hard);
        assert_eq!(budget.thresholds, vec![90]);
    }
}
