//! Accept-Encoding negotiation, per RFC 9110 §12.5.3.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A content coding this crate can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Brotli (`br`).
    Brotli,
    /// gzip (`gzip`, also accepted as `x-gzip`).
    Gzip,
    /// No coding.
    Identity,
}

impl Encoding {
    /// The token in `Content-Encoding` and `Accept-Encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
            Encoding::Identity => "identity",
        }
    }

    /// The coding a `Content-Encoding` value names, if this crate can decode it.
    pub fn from_token(token: &str) -> Option<Encoding> {
        let token = token.trim();
        if token.eq_ignore_ascii_case("br") {
            Some(Encoding::Brotli)
        } else if token.eq_ignore_ascii_case("gzip") || token.eq_ignore_ascii_case("x-gzip") {
            Some(Encoding::Gzip)
        } else if token.eq_ignore_ascii_case("identity") {
            Some(Encoding::Identity)
        } else {
            None
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What negotiation came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Negotiated {
    /// Respond with this coding (possibly identity).
    Use(Encoding),
    /// The client refuses identity and every coding offered (`identity;q=0` or `*;q=0` with
    /// nothing acceptable): a server may answer 406.
    NotAcceptable,
}

/// The longest Accept-Encoding value parsed; anything longer is treated as absent.
const MAX_HEADER: usize = 4096;

/// Picks the coding for a response from the request's `Accept-Encoding` value, preferring
/// the server's order (`preference`) among codings of equal quality.
///
/// - No header: identity (any coding would be acceptable, but not every client decodes).
/// - An empty header: identity.
/// - `*` matches every coding not listed; `q=0` refuses a coding; identity is acceptable
///   unless refused by `identity;q=0` or by `*;q=0` without an `identity` entry.
/// - Malformed entries (a bad `q`) are ignored, never an error.
///
/// ```
/// use pupkit::compression::{negotiate, Encoding, Negotiated};
///
/// let prefer = [Encoding::Brotli, Encoding::Gzip];
/// assert_eq!(negotiate(Some("gzip, br"), &prefer), Negotiated::Use(Encoding::Brotli));
/// assert_eq!(negotiate(Some("gzip;q=1, br;q=0.5"), &prefer), Negotiated::Use(Encoding::Gzip));
/// assert_eq!(negotiate(Some("br, identity;q=0"), &prefer), Negotiated::Use(Encoding::Brotli));
/// assert_eq!(negotiate(Some("deflate, identity;q=0"), &prefer), Negotiated::NotAcceptable);
/// ```
pub fn negotiate(header: Option<&str>, preference: &[Encoding]) -> Negotiated {
    let Some(header) = header.filter(|h| h.len() <= MAX_HEADER) else {
        return Negotiated::Use(Encoding::Identity);
    };
    // Each listed coding with its weight in thousandths.
    let mut listed: Vec<(String, u16)> = Vec::new();
    for element in header.split(',') {
        let mut parts = element.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if coding.is_empty() {
            continue;
        }
        let mut weight = Some(1000);
        for parameter in parts {
            let parameter = parameter.trim();
            if let Some(value) = parameter
                .strip_prefix("q=")
                .or_else(|| parameter.strip_prefix("Q="))
            {
                weight = parse_qvalue(value.trim());
            }
        }
        if let Some(weight) = weight {
            let coding = if coding == "x-gzip" {
                "gzip".to_owned()
            } else {
                coding
            };
            listed.push((coding, weight));
        }
    }
    let weight_of = |name: &str| -> Option<u16> {
        listed
            .iter()
            .find(|(c, _)| c == name)
            .or_else(|| listed.iter().find(|(c, _)| c == "*"))
            .map(|(_, w)| *w)
    };
    let mut best: Option<(Encoding, u16)> = None;
    for encoding in preference.iter().filter(|e| **e != Encoding::Identity) {
        if let Some(weight) = weight_of(encoding.as_str())
            && weight > 0
            && best.is_none_or(|(_, w)| weight > w)
        {
            best = Some((*encoding, weight));
        }
    }
    // Identity: acceptable unless refused explicitly, or by `*;q=0` without its own entry.
    let identity = match listed.iter().find(|(c, _)| c == "identity") {
        Some((_, weight)) => *weight,
        None => match listed.iter().find(|(c, _)| c == "*") {
            Some((_, 0)) => 0,
            _ => 1,
        },
    };
    match best {
        Some((encoding, weight)) if weight >= identity => Negotiated::Use(encoding),
        _ if identity > 0 => Negotiated::Use(Encoding::Identity),
        Some((encoding, _)) => Negotiated::Use(encoding),
        None => Negotiated::NotAcceptable,
    }
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn parse_qvalue(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths: u16 = format!("{fraction:0<3}").parse().ok()?;
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFER: [Encoding; 2] = [Encoding::Brotli, Encoding::Gzip];

    fn pick(header: &str) -> Negotiated {
        negotiate(Some(header), &PREFER)
    }

    #[test]
    fn rfc_9110_cases() {
        use Encoding::*;
        use Negotiated::*;
        // No header or an empty one: no coding.
        assert_eq!(negotiate(None, &PREFER), Use(Identity));
        assert_eq!(pick(""), Use(Identity));
        // Listed codings; ties go to the server's order.
        assert_eq!(pick("gzip"), Use(Gzip));
        assert_eq!(pick("br"), Use(Brotli));
        assert_eq!(pick("gzip, deflate, br"), Use(Brotli));
        assert_eq!(pick("x-gzip"), Use(Gzip));
        assert_eq!(pick("GZIP"), Use(Gzip));
        // q-values decide before the server's order.
        assert_eq!(pick("br;q=0.5, gzip;q=0.8"), Use(Gzip));
        assert_eq!(pick("br;q=0, gzip"), Use(Gzip));
        assert_eq!(pick("br ; q=0.001, gzip;q=0"), Use(Brotli));
        // `*` matches what is not listed.
        assert_eq!(pick("*"), Use(Brotli));
        assert_eq!(pick("br;q=0, *"), Use(Gzip));
        assert_eq!(pick("*;q=0.5, gzip"), Use(Gzip));
        // Identity preferred over a coding with a lower q.
        assert_eq!(pick("identity, gzip;q=0.5"), Use(Identity));
        assert_eq!(pick("deflate"), Use(Identity));
        // Identity refused.
        // A coding that is not listed (with no `*`) is not acceptable.
        assert_eq!(pick("identity;q=0"), NotAcceptable);
        assert_eq!(pick("gzip, identity;q=0"), Use(Gzip));
        assert_eq!(pick("*;q=0"), NotAcceptable);
        assert_eq!(pick("deflate, identity;q=0"), NotAcceptable);
        assert_eq!(pick("*;q=0, identity"), Use(Identity));
        assert_eq!(pick("*;q=0, gzip"), Use(Gzip));
    }

    #[test]
    fn malformed_headers_are_ignored_not_errors() {
        use Encoding::*;
        use Negotiated::*;
        assert_eq!(pick("br;q=2"), Use(Identity));
        assert_eq!(pick("br;q=0.1234"), Use(Identity));
        assert_eq!(pick("br;q=abc, gzip"), Use(Gzip));
        assert_eq!(pick(",,;;=="), Use(Identity));
        assert_eq!(pick("\u{0}\u{ff}br"), Use(Identity));
        assert_eq!(
            negotiate(Some(&"br,".repeat(5_000)), &PREFER),
            Use(Identity)
        );
        assert_eq!(parse_qvalue("1.000"), Some(1000));
        assert_eq!(parse_qvalue("1.001"), None);
        assert_eq!(parse_qvalue("0.5"), Some(500));
    }

    #[test]
    fn the_server_order_is_configurable() {
        let gzip_first = [Encoding::Gzip, Encoding::Brotli];
        assert_eq!(
            negotiate(Some("br, gzip"), &gzip_first),
            Negotiated::Use(Encoding::Gzip)
        );
        assert_eq!(
            negotiate(Some("br"), &[Encoding::Gzip]),
            Negotiated::Use(Encoding::Identity)
        );
    }
}
