//! Integration tests: one binary, shared helpers in `common`. Tests that need
//! Kafka use the real broker named by WAYMARK_TEST_BROKERS (scripts/test.sh starts
//! one) and fail, never skip, when there is none.

mod cli;
mod common;
mod connection;
mod correct;
mod declared;
mod deploy;
mod explain;
mod failover;
mod faults;
mod fixtures;
mod ingest;
mod group;
mod keying;
mod produce;
mod properties;
mod replay;
mod scenarios;
mod schemas;
mod simulation;
mod worker;
