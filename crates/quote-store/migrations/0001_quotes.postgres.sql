-- The quotes table on PostgreSQL: the same columns, rules and formats as 0001_quotes.sql.
-- An identity column draws from a sequence, which never hands out a value twice (not after a
-- delete, not after a rolled-back insert): ids are never reused, as with AUTOINCREMENT.
-- created_at is the same RFC 3339 UTC text with milliseconds that SQLite's strftime writes.
CREATE TABLE quotes (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    text       TEXT NOT NULL CHECK (char_length(text) BETWEEN 1 AND 1000),
    author     TEXT NOT NULL CHECK (char_length(author) BETWEEN 1 AND 200),
    created_at TEXT NOT NULL
        DEFAULT (to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
);
