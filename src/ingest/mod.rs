//! `waymark ingest`: the HTTP receiver in front of the raw topics. It verifies
//! each provider's webhook signature ([`auth`]), produces the body byte for byte
//! to the source's raw topic and answers only once the broker acknowledged it
//! ([`server`]). It never dedupes or normalizes: the worker stays the one place
//! that decides.

pub mod auth;
pub mod jwks;

#[cfg(feature = "runtime")]
pub mod config;
#[cfg(feature = "runtime")]
pub mod keys;
#[cfg(feature = "runtime")]
pub mod server;
