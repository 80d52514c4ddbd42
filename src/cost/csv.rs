//! CSV export of the ledger: RFC 4180, a fixed column order, streamed, formula-injection safe.

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};

use super::event::LedgerEntry;
use crate::error::Result;

/// The columns, in order. The order is part of the API: new columns are only ever appended.
pub const CSV_COLUMNS: [&str; 13] = [
    "timestamp",
    "request_id",
    "service",
    "user",
    "model",
    "operation",
    "source",
    "input_tokens",
    "output_tokens",
    "units",
    "cost_usd",
    "saved_usd",
    "priced",
];

/// Rows are sent in chunks of at most this many (as many as the ledger has ready).
const ROWS_PER_CHUNK: usize = 256;

/// Writes one cell: text that a spreadsheet would run as a formula (starting with `=`, `+`,
/// `-`, `@`, tab or carriage return) gets a leading `'`, and a cell with a comma, quote or
/// line break is quoted with its quotes doubled (RFC 4180).
pub fn write_cell(out: &mut String, cell: &str) {
    let inert = matches!(
        cell.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    );
    let needs_quotes = inert || cell.contains([',', '"', '\r', '\n']);
    if needs_quotes {
        out.push('"');
    }
    if inert {
        out.push('\'');
    }
    for c in cell.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if needs_quotes {
        out.push('"');
    }
}

/// The header line, CRLF-terminated.
pub(crate) fn header() -> String {
    let mut line = CSV_COLUMNS.join(",");
    line.push_str("\r\n");
    line
}

/// One entry as a CRLF-terminated line.
pub(crate) fn write_row(out: &mut String, entry: &LedgerEntry) {
    let text_cells = [
        entry.request_id.as_str(),
        entry.service.as_str(),
        entry.user.as_str(),
        entry.model.as_str(),
        entry.operation.as_str(),
    ];
    out.push_str(&entry.at.to_string());
    for cell in text_cells {
        out.push(',');
        write_cell(out, cell);
    }
    out.push(',');
    out.push_str(entry.source.as_str());
    for number in [entry.input_tokens, entry.output_tokens, entry.units] {
        out.push(',');
        out.push_str(&number.to_string());
    }
    out.push(',');
    out.push_str(&entry.cost.to_decimal_string());
    out.push(',');
    out.push_str(&entry.saved.to_decimal_string());
    out.push(',');
    out.push_str(if entry.priced { "true" } else { "false" });
    out.push_str("\r\n");
}

/// Turns a stream of entries into a stream of CSV chunks: the header, then rows in chunks of
/// up to 256. An error from the ledger ends the stream with that error.
pub(crate) fn encode(
    entries: BoxStream<'static, Result<LedgerEntry>>,
) -> BoxStream<'static, Result<Bytes>> {
    let header = futures_util::stream::once(async { Ok(Bytes::from(header())) });
    let rows = entries
        .ready_chunks(ROWS_PER_CHUNK)
        .filter_map(|batch| async move {
            let mut out = String::with_capacity(batch.len() * 160);
            for entry in batch {
                match entry {
                    Ok(entry) => write_row(&mut out, &entry),
                    Err(error) => return Some(Err(error)),
                }
            }
            (!out.is_empty()).then(|| Ok(Bytes::from(out)))
        });
    header.chain(rows).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(text: &str) -> String {
        let mut out = String::new();
        write_cell(&mut out, text);
        out
    }

    #[test]
    fn formulas_are_made_inert() {
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(cell("+1"), "\"'+1\"");
        assert_eq!(cell("-2"), "\"'-2\"");
        assert_eq!(cell("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(cell("\tx"), "\"'\tx\"");
    }

    #[test]
    fn rfc4180_quoting() {
        assert_eq!(cell("plain"), "plain");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(cell("a-b"), "a-b");
    }
}
