//! Test program: inserts quotes into a database file and prints each id on stdout only
//! after the insert returned, i.e. once SQLite acknowledged it as durable.
//!
//! Usage: `quote-writer DB TAG COUNT`. Quotes read `"<TAG> #<n>"` by author `<TAG>`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use quote_store::{Database, NewQuote, Options};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [db, tag, count] = args.as_slice() else {
        let _ = writeln!(std::io::stderr(), "usage: quote-writer DB TAG COUNT");
        return ExitCode::from(2);
    };
    let Ok(count) = count.parse::<u64>() else {
        let _ = writeln!(std::io::stderr(), "COUNT must be a number, got {count:?}");
        return ExitCode::from(2);
    };
    match write(&PathBuf::from(db), tag, count) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "quote-writer: {error}");
            ExitCode::FAILURE
        }
    }
}

fn write(db: &std::path::Path, tag: &str, count: u64) -> Result<(), Box<dyn std::error::Error>> {
    let (database, _) = Database::open(db, Options::default())?;
    let mut store = database.connect()?;
    let mut out = std::io::stdout().lock();
    for n in 0..count {
        let quote = store.create(&NewQuote::new(&format!("{tag} #{n}"), tag)?)?;
        writeln!(out, "{}", quote.id)?;
        out.flush()?;
    }
    Ok(())
}
