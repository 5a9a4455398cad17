//! `waymark normalize`: one webhook body in, its canonical events out as NDJSON
//! (or its dead-letter reason, exit 1).

use std::io::{BufWriter, Write};

use anyhow::Context;
use chrono::Utc;

use waymark::config::{Config, Overrides};
use waymark::envelope::Envelope;

use super::args::ConfigArgs;
use super::{load_config, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Carrier name (easypost, ...).
    #[arg(long)]
    carrier: String,
    /// Tenant to stamp on the events.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Body file, or - for stdin.
    #[arg(default_value = "-")]
    file: String,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    let config = load_config(&args.config, Overrides::default())?;
    normalize(&config, &args.carrier, &args.tenant, &args.file)
}

fn normalize(config: &Config, carrier: &str, tenant: &str, file: &str) -> Result<(), Failure> {
    let body = if file == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf).context("cannot read stdin")?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {file}"))?
    };
    let now = Utc::now();
    let envelope = Envelope {
        topic: format!("{}{carrier}", waymark::envelope::RAW_TOPIC_PREFIX),
        partition: 0,
        offset: 0,
        timestamp_ms: Some(now.timestamp_millis()),
        headers: vec![("tenant-id".into(), Some(tenant.as_bytes().to_vec()))],
        key: None,
        payload: body,
    };
    match config.pipeline().canonical_events(&envelope, now) {
        Ok((_, events)) => {
            let mut out = BufWriter::new(std::io::stdout().lock());
            for event in events {
                serde_json::to_writer(&mut out, &event).context("cannot write to stdout")?;
                writeln!(out).context("cannot write to stdout")?;
            }
            out.flush().context("cannot write to stdout")?;
            Ok(())
        }
        Err(rejected) => Err(anyhow::anyhow!("dead letter ({}): {}", rejected.error.kind(), rejected.error).into()),
    }
}
