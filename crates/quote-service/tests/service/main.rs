//! quote-service tests: the router without sockets (`api`), and the real binary (`process`).

mod api;
mod process;
