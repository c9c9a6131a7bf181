//! The boxed future that object-safe async traits (resolvers, couriers) return: a leaf,
//! so that a courier need not import the resolver to name its return type.

use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
