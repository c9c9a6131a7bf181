//! SMTP intake: the listener, the per-connection driver, the session state machine and
//! the replies it speaks.

pub mod auth;
pub mod conn;
pub mod message;
pub mod reply;
pub mod server;
pub mod session;
pub mod tls;

pub use reply::Reply;
