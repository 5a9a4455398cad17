//! `waymark health`: probe a running worker's `/healthz` (or `/readyz`), the
//! container health check, with nothing but the binary.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;

use waymark::config::{Config, Overrides};

use super::args::ConfigArgs;
use super::{load_config, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address of the worker's HTTP endpoint (default: http.listen of the
    /// configuration, WAYMARK_HTTP_LISTEN; an unspecified address such as
    /// 0.0.0.0 is probed on loopback).
    #[arg(long)]
    http_listen: Option<String>,
    /// Probe /readyz instead of /healthz.
    #[arg(long)]
    ready: bool,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    let overrides = Overrides { http_listen: args.http_listen, ..Overrides::default() };
    let config = load_config(&args.config, overrides)?;
    health(&config, args.ready)
}

/// GET /healthz (or /readyz) from the worker and report.
fn health(config: &Config, ready: bool) -> Result<(), Failure> {
    use std::io::Read;
    let mut addr = config.http_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let path = if ready { "/readyz" } else { "/healthz" };
    let timeout = Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot reach the worker at {addr} (is `waymark run` up, with http.listen = {addr}?)"))?;
    stream.set_read_timeout(Some(timeout)).context("socket")?;
    stream.set_write_timeout(Some(timeout)).context("socket")?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").context("sending the probe")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("reading the worker's answer")?;
    let status = response.split_whitespace().nth(1).unwrap_or("?");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
    if status == "200" {
        println!("{path}: ok");
        Ok(())
    } else {
        Err(anyhow::anyhow!("{path} answered {status}: {body}").into())
    }
}
