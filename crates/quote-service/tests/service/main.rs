//! quote-service tests: the router without sockets (`api`, on both backends), the real binary
//! (`process`), and what only PostgreSQL has (`postgres`: concurrent migration, outages).

mod api;
#[cfg(feature = "postgres")]
mod postgres;
mod process;
