//! SMTP intake: the listener, the per-connection driver, the session state machine and
//! the replies it speaks.

pub mod auth;
pub mod authgate;
pub mod conn;
pub mod limits;
pub mod line;
pub mod message;
pub mod refusals;
pub mod reply;
pub mod server;
pub mod session;
pub mod stress;
pub mod tls;

pub use reply::Reply;
