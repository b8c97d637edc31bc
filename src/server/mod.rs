//! The network server: a listener that accepts clients within the limits, and one task per
//! connection that reads requests, has them dispatched, and writes the replies.
//!
//! Both protocols share one port; each request picks its own (see [`crate::protocol`]).

mod busy_poll;
mod client_log;
mod connection;
mod cpu_budget;
mod listener;

pub use cpu_budget::CpuBudget;
pub use listener::{Server, StartError};
