//! quote-service tests: the router without sockets (`api`, on both backends; `contract`, every
//! answer against `/openapi.json`), the real binary
//! (`process`), and what only PostgreSQL has (`postgres`: concurrent migration, outages).

mod api;
mod contract;
#[cfg(feature = "postgres")]
mod postgres;
mod process;
