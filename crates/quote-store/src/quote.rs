//! The quote type, its validation rules, and the seed set.

use serde::Serialize;

use crate::ValidationError;

/// A quote's id: a positive SQLite rowid, never reused.
pub type QuoteId = i64;

/// Longest quote text, in Unicode scalar values.
pub const TEXT_MAX_CHARS: usize = 1000;
/// Longest author name, in Unicode scalar values.
pub const AUTHOR_MAX_CHARS: usize = 200;
/// Most quotes one page of a listing returns.
pub const LIST_LIMIT_MAX: u32 = 100;

/// A stored quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quote {
    pub id: QuoteId,
    pub text: String,
    pub author: String,
    /// RFC 3339 UTC timestamp with milliseconds, set by the database.
    pub created_at: String,
}

/// A quote that passed validation and may be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewQuote {
    text: String,
    author: String,
}

impl NewQuote {
    /// Validates a quote: surrounding white space is trimmed, then each field must be
    /// non-empty, within its length limit, and free of control characters.
    pub fn new(text: &str, author: &str) -> Result<Self, ValidationError> {
        Ok(NewQuote {
            text: field("text", text, TEXT_MAX_CHARS)?,
            author: field("author", author, AUTHOR_MAX_CHARS)?,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn author(&self) -> &str {
        &self.author
    }
}

fn field(name: &'static str, value: &str, max: usize) -> Result<String, ValidationError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ValidationError::Empty { field: name });
    }
    let len = value.chars().count();
    if len > max {
        return Err(ValidationError::TooLong {
            field: name,
            len,
            max,
        });
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(ValidationError::ControlCharacter { field: name });
    }
    Ok(value.to_owned())
}

/// One page of a keyset-paginated listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub quotes: Vec<Quote>,
    /// The cursor for the next page (`after=`), or `None` on the last page.
    pub next: Option<QuoteId>,
}

impl Page {
    /// A page from up to `limit + 1` rows in id order: the extra row only says there is a
    /// next page, whose cursor is the last id kept.
    pub(crate) fn from_rows(mut quotes: Vec<Quote>, limit: usize) -> Page {
        let next = if quotes.len() > limit {
            quotes.truncate(limit);
            quotes.last().map(|q| q.id)
        } else {
            None
        };
        Page { quotes, next }
    }
}

/// The seed quotes loaded into a new database, parsed from `seed/quotes.tsv`
/// (text, author, provenance). Invalid lines are a build bug, caught by the tests.
pub fn seed_quotes() -> impl Iterator<Item = (&'static str, &'static str)> {
    include_str!("../seed/quotes.tsv")
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let mut cols = line.split('\t');
            Some((cols.next()?, cols.next()?))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seed_has_at_least_fifty_valid_distinct_quotes() {
        let seeds: Vec<_> = seed_quotes().collect();
        assert!(seeds.len() >= 50, "only {} seed quotes", seeds.len());
        for (text, author) in &seeds {
            NewQuote::new(text, author).unwrap_or_else(|e| panic!("seed {text:?}: {e}"));
        }
        let mut texts: Vec<_> = seeds.iter().map(|(t, _)| *t).collect();
        texts.sort_unstable();
        texts.dedup();
        assert_eq!(texts.len(), seeds.len(), "duplicate seed quote");
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        let text = "é".repeat(TEXT_MAX_CHARS);
        assert!(text.len() > TEXT_MAX_CHARS);
        assert!(NewQuote::new(&text, "A").is_ok());
        let text = "é".repeat(TEXT_MAX_CHARS + 1);
        assert_eq!(
            NewQuote::new(&text, "A"),
            Err(ValidationError::TooLong {
                field: "text",
                len: TEXT_MAX_CHARS + 1,
                max: TEXT_MAX_CHARS
            })
        );
    }

    proptest! {
        #[test]
        fn accepted_quotes_satisfy_every_rule(text in "\\PC{0,1100}", author in "\\PC{0,220}") {
            if let Ok(q) = NewQuote::new(&text, &author) {
                for (value, max) in [(q.text(), TEXT_MAX_CHARS), (q.author(), AUTHOR_MAX_CHARS)] {
                    prop_assert!(!value.is_empty());
                    prop_assert!(value.chars().count() <= max);
                    prop_assert_eq!(value, value.trim());
                }
            }
        }

        #[test]
        fn whitespace_only_is_empty(ws in "[ \t\n\r]{0,20}") {
            prop_assert_eq!(NewQuote::new(&ws, "a"), Err(ValidationError::Empty { field: "text" }));
            prop_assert_eq!(NewQuote::new("a", &ws), Err(ValidationError::Empty { field: "author" }));
        }

        #[test]
        fn any_control_character_is_refused(prefix in "[a-z]{1,10}", c in proptest::char::range('\0', '\u{1f}')) {
            prop_assume!(c != '\n' && c != '\t');
            let text = format!("{prefix}{c}{prefix}");
            prop_assert_eq!(NewQuote::new(&text, "a"), Err(ValidationError::ControlCharacter { field: "text" }));
        }
    }
}
