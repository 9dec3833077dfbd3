-- The quotes table. AUTOINCREMENT so that an id is never reused after a delete:
-- a `Location` handed out once, or a pagination cursor, never points at another quote.
CREATE TABLE quotes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    text       TEXT NOT NULL CHECK (length(text) BETWEEN 1 AND 1000),
    author     TEXT NOT NULL CHECK (length(author) BETWEEN 1 AND 200),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
